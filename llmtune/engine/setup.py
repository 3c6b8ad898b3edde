"""Setting a run up, before the first step: processes, output directory, tokenizer and data (failing fast,
before any heavy work), the resume checks, then the model in its DeepSpeed engine, a restored checkpoint,
the trackers and the manifest."""

from __future__ import annotations

import functools
import hashlib
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from llmtune import __version__
from llmtune.data.chat import resolve_chat_template
from llmtune.engine.batches import total_steps as steps_of_run
from llmtune.engine.checkpoint import (
    EXPORT_STAGING,
    RunPlan,
    TrainerState,
    fresh_start,
    load_checkpoint,
    plan_run,
    read_trainer_state,
    remove_partial_checkpoints,
)
from llmtune.engine.config import build_optimizer, build_scheduler, check_precision
from llmtune.engine.contract import BatchSource, Stage, StageContext, StageData
from llmtune.engine.distributed import DistInfo, barrier, setup_distributed
from llmtune.engine.ema import WeightAverage
from llmtune.engine.memory import estimate_memory
from llmtune.engine.report import MetricsLog, Progress, plural, print_data_summary, run_console
from llmtune.engine.step import StepGuard
from llmtune.engine.strategy import Strategy
from llmtune.engine.trackers import Trackers, remove_tracker_files
from llmtune.errors import DataError, RecipeError
from llmtune.manifest import RunManifest
from llmtune.model.load import describe, position_limit
from llmtune.model.tokenizer import load_tokenizer, tokenizer_record
from llmtune.objectives.logprobs import chunk_positions, lm_head_of
from llmtune.recipe.load import dump_recipe, resolved_dict
from llmtune.recipe.schema import RecipeBase


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_output_dir(recipe: RecipeBase, dist: DistInfo, console: Console, **options: Any) -> tuple[Path, RunPlan]:
    """Refuse a foreign non-empty output_dir, clean partial / stale checkpoints, save the resolved recipe."""
    out = Path(recipe.output_dir).expanduser()
    text = dump_recipe(recipe)
    plan = plan_run(out, text, **options)
    if dist.is_main and not plan.finished:
        out.mkdir(parents=True, exist_ok=True)
        if plan.resume_from is None:
            fresh_start(out)
            remove_tracker_files(out)  # a fresh start is a new tracker run
        else:
            removed = remove_partial_checkpoints(out)
            if removed:
                console.print(f"removed partial checkpoints (a write was interrupted): {', '.join(removed)}")
        shutil.rmtree(out / EXPORT_STAGING, ignore_errors=True)  # an export a kill interrupted
        (out / "recipe.yaml").write_text(text, encoding="utf-8")
    barrier()
    return out, plan


@dataclass
class Run:
    """Everything one training run holds between set-up, the loop and the finish."""

    ctx: StageContext
    stage: Stage
    console: Console
    out: Path
    data: StageData
    batches: BatchSource  # the stage's batch source: Batches, ScheduledBatches or Rollouts
    total_steps: int
    state: TrainerState
    resume_from: Path | None = None  # the checkpoint this run continues from
    owns_group: bool = True  # the process group was made for this run: end it at the finish
    engine: Any = None
    scheduler: Any = None
    guard: StepGuard | None = None
    resumed: bool = False
    log: MetricsLog | None = None
    trackers: Trackers | None = None
    manifest: RunManifest | None = None
    saved_step: int = -1
    progress: Progress | None = None
    ema: WeightAverage | None = None  # train.ema
    adalora: Any = None  # engine.adalora.AdaLoraSchedule for finetuning.method adalora
    last_record: dict[str, Any] | None = None  # the last logged training step (for the model card)
    between: tuple[Any, dict[str, Any]] | None = None  # random + stage state after the last step (trainer)

    @property
    def recipe(self) -> RecipeBase:
        return self.ctx.recipe

    @property
    def dist(self) -> DistInfo:
        return self.ctx.dist


def setup(
    recipe: RecipeBase, stage: Stage, local_rank: int | None, trust_reward_code: bool = False, **options: Any
) -> Run | None:
    """Processes, output directory, tokenizer and data; None when the run is already finished."""
    owns_group = not torch.distributed.is_initialized()  # a caller's group (rejection sampling rounds) stays up
    dist = setup_distributed(recipe.distributed.backend, local_rank)
    console = run_console(dist.is_main)
    check_precision(recipe, dist.device)
    seed_everything(recipe.seed)
    out, plan = prepare_output_dir(recipe, dist, console, **options)
    if plan.finished:
        console.print(
            f"{out} already holds a finished run of this recipe: nothing to do "
            "(pass --no-resume or --overwrite to train again)"
        )
        return None
    tokenizer = load_tokenizer(recipe.model)
    limit = position_limit(recipe.model)
    if limit is not None and recipe.data.max_length > limit:
        console.print(
            f"note: data.max_length {recipe.data.max_length} is more than the model's {limit} positions; "
            f"rows are cut at {limit} tokens"
        )
        recipe.data.max_length = limit
    template = resolve_chat_template(tokenizer, recipe.model.chat_template, required=stage.needs_chat_template)
    if template is not None:
        tokenizer.chat_template = template
    collate = functools.partial(stage.collate, pad_id=tokenizer.pad_token_id)
    ctx = StageContext(recipe, tokenizer, template, dist, Strategy(recipe, dist), collate, trust_reward_code)
    data = _read_data(ctx, stage, console, out)
    data_fingerprint = _data_fingerprint(data.reports)
    if plan.resume_from is not None:  # before the model loads: a resume that cannot be exact fails fast
        explicit = options.get("resume_from") is not None
        _check_resumable(plan.resume_from, recipe, dist, data_fingerprint, explicit, console)
    if not data.train:
        raise DataError("no training example left after reading the data", hint="see the summary above")

    batches = stage.batch_source(data, recipe, dist, collate)
    total_steps = steps_of_run(recipe, batches.windows_per_epoch)
    a = recipe.finetuning.adalora
    if recipe.finetuning.method == "adalora" and a.tinit + a.tfinal >= total_steps:
        raise RecipeError(
            f"finetuning.adalora: tinit {a.tinit} + tfinal {a.tfinal} leave no step of this run's {total_steps} "
            "to shrink the rank budget in",
            hint=f"lower tinit / tfinal so that tinit + tfinal < {total_steps}, or train more steps",
        )
    state = TrainerState(
        world_size=dist.world_size, zero_stage=recipe.distributed.zero_stage, data_fingerprint=data_fingerprint
    )
    return Run(ctx, stage, console, out, data, batches, total_steps, state, plan.resume_from, owns_group=owns_group)


def _read_data(ctx: StageContext, stage: Stage, console: Console, out: Path) -> StageData:
    """The stage's data, tokenized by rank 0 first (it fills the cache, and writes the files the data asks for
    into output_dir; the others then read it)."""
    recipe, dist = ctx.recipe, ctx.dist
    console.print(f"reading and tokenizing the data ({len(recipe.data.train)} training source(s)) ...")

    def build() -> StageData:
        return stage.build_data(recipe, ctx.tokenizer, ctx.template, trust_reward_code=ctx.trust_reward_code)

    if dist.is_main:
        data = build()
        for name, text in data.outputs.items():  # e.g. the perplexity filter's scores
            (out / name).write_text(text, encoding="utf-8")
    barrier()
    if not dist.is_main:
        data = build()
    print_data_summary(console, data, recipe)
    return data


def start_engine(run: Run, trackers: Trackers | None = None) -> None:
    """Load the model, build the optimizer and schedule, wrap them in DeepSpeed, restore a checkpoint, and
    write the manifest."""
    _prepare_model(run)
    if run.resume_from is not None:
        _restore(run, run.resume_from)
    recipe = run.recipe
    if recipe.train.ema is not None:  # from the weights training starts (or resumes) with
        run.ema = WeightAverage(run.engine.module, recipe.train.ema.decay, recipe.train.ema.every)
        if run.resume_from is not None:
            run.ema.load(run.resume_from)
    _print_plan(run)
    resume_step = run.state.step if run.resumed else None
    run.trackers = (
        trackers if trackers is not None else open_trackers(recipe, run.out, run.dist, run.console, run.resumed)
    )
    if resume_step is not None:
        run.trackers.resumed_after(resume_step)
    run.log = MetricsLog(run.out / "metrics.jsonl", run.dist.is_main, resume_step=resume_step, trackers=run.trackers)
    run.manifest = RunManifest(
        llmtune=__version__,
        torch=torch.__version__,
        deepspeed=run.ctx.strategy.version,
        stage=recipe.stage,  # type: ignore[attr-defined]  # every stage's recipe names its stage
        world_size=run.dist.world_size,
        device=run.dist.device.type,
        total_steps=run.total_steps,
        tokenizer=tokenizer_record(run.ctx.tokenizer),
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    if run.dist.is_main:
        run.manifest.write(run.out)


def _prepare_model(run: Run) -> None:
    """The trained model loaded (partitioned under ZeRO-3), its optimizer and LR schedule, in one engine."""
    recipe, dist, console, strategy = run.recipe, run.dist, run.console, run.ctx.strategy
    ds_config = strategy.config(grad_accum=run.batches.accum)
    console.print(f"loading {recipe.model.path} ({recipe.finetuning.method}) ...")
    with strategy.loading(ds_config):
        loaded = run.stage.load_model(recipe, dist.device, run.ctx.tokenizer)
        describe(loaded, recipe, console)
        model = loaded.model
        console.print(estimate_memory(model, recipe, dist.world_size).line())
        strategy.cast(model)
        # a model that trains several parts at their own rates says which (ppo's ActorCritic.lr_of)
        optimizer = build_optimizer(recipe, model, lr_of=getattr(model, "lr_of", None))
        scheduler = build_scheduler(recipe, optimizer, run.total_steps)
        run.guard = StepGuard(optimizer)  # after the scheduler, which wraps optimizer.step itself
        run.engine, run.scheduler = strategy.prepare(model, optimizer, scheduler, ds_config)
    head = lm_head_of(run.engine)
    if head is not None:
        cfg = run.engine.module.config
        vocab = int(getattr(getattr(cfg, "text_config", None) or cfg, "vocab_size", 0))
        console.print(
            f"LM head: applied per chunk of {chunk_positions(vocab):,} positions ({vocab:,}-token vocabulary): "
            "no (B, T, V) logits are kept"
        )
    if recipe.finetuning.method == "adalora":
        from llmtune.engine.adalora import AdaLoraSchedule

        run.adalora = AdaLoraSchedule(run.engine, run.total_steps)


def _restore(run: Run, ckpt: Path) -> None:
    """The checkpoint's weights, optimizer, counters and random state; the LR follows this recipe."""
    base_lrs = list(run.scheduler.base_lrs)
    fingerprint = run.state.data_fingerprint
    quantized = run.recipe.finetuning.method == "qlora"
    run.state = load_checkpoint(run.engine, ckpt, run.dist.rank, quantized=quantized)
    run.state.data_fingerprint = fingerprint
    if run.adalora is not None:
        run.adalora.load(ckpt)
    _schedule_from_recipe(run.scheduler, base_lrs)
    run.resumed, run.saved_step = True, run.state.step
    run.console.print(f"resumed from {ckpt} (step {run.state.step})")


def _print_plan(run: Run) -> None:
    """The derived quantities of the run, in one line: rows, steps, batch shape, ZeRO stage, precision."""
    recipe, dist, b = run.recipe, run.dist, run.batches
    mb = recipe.train.micro_batch_size
    run.console.print(
        f"training: {len(run.data.train):,} rows, {b.windows_per_epoch:,} steps/epoch, "
        f"{plural(run.total_steps, 'step')} | {b.step_text + ' | ' if b.step_text else ''}batch {mb} x accum "
        f"{b.accum} x {dist.world_size} proc = {b.rows_per_step} rows/step | ZeRO-{recipe.distributed.zero_stage} "
        f"{recipe.precision} on {dist.device.type}"
    )
    phases = getattr(run.batches, "describe", None)
    if phases is not None:  # data.schedule: its phases in steps
        run.console.print(phases())


def open_trackers(recipe: RecipeBase, out: Path, dist: DistInfo, console: Console, resume: bool) -> Trackers:
    """The run's train.report_to trackers (on rank 0), continuing the earlier tracker runs on a resume."""
    return Trackers.open(
        recipe.train.report_to,
        out,
        recipe.train.run_name or out.resolve().name,
        resolved_dict(recipe),
        dump_recipe(recipe),
        enabled=dist.is_main,
        resume=resume,
        warn=lambda m: console.print(f"[yellow]{escape(m)}[/]"),
    )


def _schedule_from_recipe(scheduler: Any, base_lrs: list[float]) -> None:
    """After a checkpoint is loaded, the learning rate follows this recipe's schedule at the restored step.
    The same recipe gives the very values the checkpoint holds; after a deliberate change (--resume-from with
    another train.lr, max_steps or warmup), the next step does not run at the old schedule's rate."""
    scheduler.base_lrs = base_lrs
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr, base in zip(scheduler.optimizer.param_groups, lrs, base_lrs, strict=True):
        group["lr"], group["initial_lr"] = lr, base
    scheduler._last_lr = lrs


def _data_fingerprint(reports: list[Any]) -> str:
    """One hash of every source's contents and settings ("" when a source has none, e.g. caching is off)."""
    parts = [getattr(r, "fingerprint", "") for r in reports]
    if not parts or not all(parts):
        return ""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _check_resumable(
    ckpt: Path, recipe: RecipeBase, dist: DistInfo, data_fingerprint: str, explicit: bool, console: Console
) -> None:
    """A checkpoint continues exactly only with the launch settings and the data it was written with."""
    previous = read_trainer_state(ckpt)
    if previous.world_size != dist.world_size or previous.zero_stage != recipe.distributed.zero_stage:
        raise RecipeError(
            f"{ckpt} was written with {previous.world_size} processes and ZeRO-{previous.zero_stage}; "
            f"this run has {dist.world_size} and ZeRO-{recipe.distributed.zero_stage}",
            hint="resume with the same launch settings, or use a new output_dir",
        )
    before = previous.data_fingerprint
    if before and data_fingerprint and before != data_fingerprint:
        what = f"the training data (file contents) changed since {ckpt} was written"
        if explicit:
            console.print(f"[yellow]warning[/]: {what}; continuing from it as --resume-from asks")
            return
        raise DataError(
            f"{what}: resuming would not continue the same run",
            hint="restore the data files, or start over with --no-resume, or pass --resume-from "
            f"{ckpt} to continue with the new data deliberately",
        )
