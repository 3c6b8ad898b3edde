"""The training loop every stage shares: setup -> (resume) -> train with accumulation, eval and
checkpoints -> export. A stage contributes only its data and its step."""

from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass
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
    remove_checkpoints,
    remove_partial_checkpoints,
    resume_point,
    save_checkpoint,
    tag,
)
from llmtune.engine.config import build_optimizer, build_scheduler, check_precision, deepspeed_config
from llmtune.engine.distributed import DistInfo, all_reduce_sum, barrier, setup_distributed
from llmtune.engine.ema import WeightAverage
from llmtune.engine.memory import estimate_memory, out_of_memory_error, peak_line, write_peak
from llmtune.engine.report import MetricsLog, Progress, print_data_summary, run_console
from llmtune.engine.trackers import Trackers, remove_tracker_files, status_of_exception
from llmtune.errors import DataError, RecipeError, Stopped, TrainingError
from llmtune.manifest import RunManifest
from llmtune.model.load import describe, load_tokenizer, position_limit, tokenizer_record
from llmtune.objectives.logprobs import chunk_positions, lm_head_of
from llmtune.plot import write_run_curves
from llmtune.recipe.load import dump_recipe, resolved_dict
from llmtune.recipe.schema import RecipeBase
from llmtune.runtime import readable_like_normal_files


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


def evaluate(engine: Any, stage: Any, samples: list[Any], recipe: RecipeBase, dist: DistInfo, collate: Any):
    """Loss over the eval set (every rank takes a shard; sums are reduced). Returns name -> value."""
    model = engine.module
    was_training = model.training
    model.eval()
    bs = recipe.train.eval_batch_size or recipe.train.micro_batch_size
    mine = samples[dist.rank :: dist.world_size]
    # Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively): a rank
    # with fewer rows repeats its first batch and leaves it out of the sums.
    n_batches = math.ceil(math.ceil(len(samples) / dist.world_size) / bs)
    loss = torch.zeros((), dtype=torch.float64, device=dist.device)
    units = torch.zeros((), dtype=torch.float64, device=dist.device)
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for b in range(n_batches):
            rows = mine[b * bs : (b + 1) * bs]
            batch = _to(collate(rows or (mine or samples)[:bs]), dist.device)
            out = stage.step(engine, batch)
            for k in out.metrics:
                sums.setdefault(k, torch.zeros((), dtype=torch.float64, device=dist.device))
            if not rows:
                continue
            loss += out.loss_sum.double()
            units += out.units.double()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=dist.device)) + v.double()
    if was_training:
        model.train()
    loss, units = all_reduce_sum(loss), all_reduce_sum(units)
    n = max(units.item(), 1.0)
    result = {"eval/loss": loss.item() / n, "eval/units": round(units.item())}
    if stage.unit_name == "tokens":  # a per-token cross entropy: perplexity means something
        result["eval/perplexity"] = math.exp(min(result["eval/loss"], 50.0))
    for k in sorted(sums):  # the same keys on every rank: each ran at least one batch
        result[f"eval/{k}"] = all_reduce_sum(sums[k]).item() / n
    return result


@dataclass
class Run:
    """Everything one training run holds between set-up, the loop and the finish."""

    recipe: RecipeBase
    stage: Any
    dist: DistInfo
    console: Console
    out: Path
    tokenizer: Any
    data: Any  # StageData
    collate: Any
    batches: Any  # the stage's batch source: Batches or Rollouts
    total_steps: int
    resume_from: Path | None = None  # the checkpoint this run continues from
    owns_group: bool = True  # the process group was made for this run: end it at the finish
    engine: Any = None
    scheduler: Any = None
    guard: StepGuard | None = None
    state: TrainerState | None = None
    resumed: bool = False
    log: MetricsLog | None = None
    trackers: Trackers | None = None
    manifest: RunManifest | None = None
    saved_step: int = -1
    progress: Progress | None = None
    ema: WeightAverage | None = None  # train.ema
    adalora: Any = None  # engine.adalora.AdaLoraSchedule for finetuning.method adalora
    last_record: dict[str, Any] | None = None  # the last logged training step (for the model card)


def train(
    recipe: RecipeBase,
    stage: Any,
    local_rank: int | None = None,
    resume: bool = True,
    resume_from: Path | None = None,
    overwrite: bool = False,
    trust_reward_code: bool = False,
    trackers: Trackers | None = None,
) -> None:
    """setup (fail fast, before any heavy work) -> model and engine -> the loop -> the final evaluation,
    checkpoint and export. trackers: a caller's (rejection sampling's rounds share one); by default the run
    opens those train.report_to names and closes them at the end, also when it fails."""
    stage.trust_reward_code = trust_reward_code
    run = _setup(recipe, stage, local_rank, resume=resume, resume_from=resume_from, overwrite=overwrite)
    if run is None:
        return
    _start_engine(run, trackers)
    try:
        _loop(run)
        _finish(run)
    except BaseException as e:
        if trackers is None and run.trackers is not None:
            run.trackers.close(status_of_exception(e))
        raise
    if trackers is None and run.trackers is not None:
        run.trackers.close("finished")


def _setup(recipe: RecipeBase, stage: Any, local_rank: int | None, **options: Any) -> Run | None:
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
    # Rank 0 tokenizes first and fills the cache; the others then read it.
    console.print(f"reading and tokenizing the data ({len(recipe.data.train)} training source(s)) ...")
    if dist.is_main:
        data = stage.build_data(recipe, tokenizer, template)
    barrier()
    if not dist.is_main:
        data = stage.build_data(recipe, tokenizer, template)
    print_data_summary(console, data, recipe)
    data_fingerprint = _data_fingerprint(data.reports)
    if plan.resume_from is not None:  # before the model loads: a resume that cannot be exact fails fast
        explicit = options.get("resume_from") is not None
        _check_resumable(plan.resume_from, recipe, dist, data_fingerprint, explicit, console)
    if not data.train:
        raise DataError("no training example left after reading the data", hint="see the summary above")

    collate = functools.partial(stage.collate, pad_id=tokenizer.pad_token_id)
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
    return Run(
        recipe,
        stage,
        dist,
        console,
        out,
        tokenizer,
        data,
        collate,
        batches,
        total_steps,
        plan.resume_from,
        owns_group=owns_group,
        state=state,
    )


def _start_engine(run: Run, trackers: Trackers | None = None) -> None:
    """Load the model, build the optimizer and schedule, wrap them in DeepSpeed, restore a checkpoint, and
    write the manifest."""
    recipe, dist, console = run.recipe, run.dist, run.console
    ds_config = deepspeed_config(recipe, dist.world_size, grad_accum=run.batches.accum)
    from llmtune.engine import import_deepspeed

    deepspeed = import_deepspeed()

    hf_ds = None
    if recipe.distributed.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # must stay alive while the model loads: partitioned init
    console.print(f"loading {recipe.model.path} ({recipe.finetuning.method}) ...")
    loaded = run.stage.load_model(recipe, dist.device, run.tokenizer)
    describe(loaded, recipe, console)
    model = loaded.model
    console.print(estimate_memory(model, recipe, dist.world_size).line())
    if recipe.distributed.zero_stage == 3 and recipe.precision != "fp32":
        # ZeRO 0-2 cast the module to the training dtype; ZeRO-3 expects it done, and peft creates its
        # adapter weights in fp32 next to the bf16 / fp16 base.
        dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float16
        for p in model.parameters():
            if p.dtype.is_floating_point and p.dtype != dtype and not hasattr(p, "ds_id"):
                p.data = p.data.to(dtype)
    # a model that trains several parts at their own rates says which (ppo's ActorCritic.lr_of)
    optimizer = build_optimizer(recipe, model, lr_of=getattr(model, "lr_of", None))
    scheduler = build_scheduler(recipe, optimizer, run.total_steps)
    run.guard = StepGuard(optimizer)  # after the scheduler, which wraps optimizer.step itself
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    del hf_ds
    if dist.world_size == 1 and recipe.distributed.zero_stage == 0:
        # nothing to average with: skip the gradient all-reduce (ZeRO 1-3 gather their gradients through it)
        engine.enable_backward_allreduce = False
    run.engine, run.scheduler = engine, scheduler
    head = lm_head_of(engine)
    if head is not None:
        cfg = engine.module.config
        vocab = int(getattr(getattr(cfg, "text_config", None) or cfg, "vocab_size", 0))
        console.print(
            f"LM head: applied per chunk of {chunk_positions(vocab):,} positions ({vocab:,}-token vocabulary): "
            "no (B, T, V) logits are kept"
        )
    if recipe.finetuning.method == "adalora":
        from llmtune.engine.adalora import AdaLoraSchedule

        run.adalora = AdaLoraSchedule(engine, run.total_steps)

    ckpt = run.resume_from
    if ckpt is not None:
        base_lrs = list(scheduler.base_lrs)
        fingerprint = run.state.data_fingerprint
        run.state = load_checkpoint(engine, ckpt, dist.rank, quantized=recipe.finetuning.method == "qlora")
        run.state.data_fingerprint = fingerprint
        if run.adalora is not None:
            run.adalora.load(ckpt)
        _schedule_from_recipe(scheduler, base_lrs)
        run.resumed, run.saved_step = True, run.state.step
        console.print(f"resumed from {ckpt} (step {run.state.step})")
    if recipe.train.ema is not None:  # from the weights training starts (or resumes) with
        run.ema = WeightAverage(engine.module, recipe.train.ema.decay, recipe.train.ema.every)
        if ckpt is not None:
            run.ema.load(ckpt)

    mb, b = recipe.train.micro_batch_size, run.batches
    console.print(
        f"training: {len(run.data.train):,} rows, {b.windows_per_epoch:,} steps/epoch, "
        f"{_plural(run.total_steps, 'step')} | {b.step_text + ' | ' if b.step_text else ''}batch {mb} x accum "
        f"{b.accum} x {dist.world_size} proc = {b.rows_per_step} rows/step | ZeRO-{recipe.distributed.zero_stage} "
        f"{recipe.precision} on {dist.device.type}"
    )
    phases = getattr(run.batches, "describe", None)
    if phases is not None:  # data.schedule: its phases in steps
        console.print(phases())
    resume_step = run.state.step if run.resumed else None
    run.trackers = trackers if trackers is not None else open_trackers(recipe, run.out, dist, console, run.resumed)
    if resume_step is not None:
        run.trackers.resumed_after(resume_step)
    run.log = MetricsLog(run.out / "metrics.jsonl", dist.is_main, resume_step=resume_step, trackers=run.trackers)
    run.manifest = RunManifest(
        llmtune=__version__,
        torch=torch.__version__,
        deepspeed=deepspeed.__version__,
        stage=recipe.stage,
        world_size=dist.world_size,
        device=dist.device.type,
        total_steps=run.total_steps,
        tokenizer=tokenizer_record(run.tokenizer),
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    if dist.is_main:
        run.manifest.write(run.out)


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


def _loop(run: Run) -> None:
    """Optimizer steps over the batch source's windows, with logging, evaluation, checkpoints, and the
    NaN / stop decisions; the manifest says stopped / failed if the loop ends early."""
    recipe, stage, dist, engine, state = run.recipe, run.stage, run.dist, run.engine, run.state
    t, data, batches, out = recipe.train, run.data, run.batches, run.out
    assert state is not None and run.log is not None and run.manifest is not None
    reached = getattr(batches, "reached", None)
    if reached is not None:
        data.reached = reached(state.epoch, state.window_in_epoch, run.total_steps - state.step)
    stage.before_training(engine, data, dist, run.collate)
    if run.resumed:
        stage.load_state_dict(state.stage_state)
    if t.best_metric:
        _check_best_metric(engine, stage, data.eval, recipe, dist, run.collate)
    engine.train()
    unit = stage.unit_name
    progress = Progress(run.console, run.total_steps, state.step)
    run.progress = progress
    window_tokens = 0.0
    t_last = time.perf_counter()
    with StopRequest(run.console) as stopper:  # SIGTERM / Ctrl-C: finish the step, checkpoint, stop
        try:
            while state.step < run.total_steps:
                for window in batches.epoch_windows(state.epoch, state.window_in_epoch):
                    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
                    step_start = time.perf_counter()
                    try:
                        result = _train_window(
                            engine, stage, window, dist, run.guard, stopper.signum != 0, run.adalora, state.step + 1
                        )
                    except Exception as e:
                        if is_fp16_scale_error(e):
                            raise fp16_scale_error(e, state.step + 1, out) from None
                        if isinstance(e, torch.OutOfMemoryError):
                            raise out_of_memory_error(e, state.step + 1, recipe, resume_point(out)) from None
                        raise
                    state.step += 1
                    state.window_in_epoch += 1
                    state.tokens += int(result.units)
                    window_tokens += result.units
                    step_metrics = {**result.metrics, **batches.metrics()}
                    if "rollout_s" in step_metrics:  # the window was generated just before this step
                        step_metrics["train_s"] = time.perf_counter() - step_start
                    if run.ema is not None:
                        run.ema.after_step(state.step)
                    if window is None:  # the stage ended this rollout's steps early: no update, the schedule moves on
                        skipped = "early_stop"
                        run.scheduler.step()
                    else:
                        skipped = _check_numbers(result, recipe, state, out, run.console)
                        batches.after_step(step_metrics)
                    if skipped == "nan" and not result.applied:
                        run.scheduler.step()  # DeepSpeed saw the overflow and held the schedule: a skipped step moves it on
                    last = state.step == run.total_steps
                    if state.step % t.log_every == 0 or last or state.step == 1 or skipped:
                        now = time.perf_counter()
                        record = {
                            "step": state.step,
                            "epoch": round(state.epoch + state.window_in_epoch / batches.windows_per_epoch, 4),
                            "loss": result.loss,
                            "lr": lr,
                            "grad_norm": result.grad_norm,
                            unit: state.tokens,
                            f"{unit}_per_s": window_tokens / max(now - t_last, 1e-9),
                            **step_metrics,
                        }
                        if skipped:
                            record["skipped"] = skipped
                        if window is None:
                            record["loss"] = None
                        if state.nan_skips:
                            record["nan_skips"] = state.nan_skips
                        if state.overflow_skips:
                            record["overflow_skips"] = state.overflow_skips
                        window_tokens, t_last = 0.0, now
                        run.log.write(record)
                        progress.log(record)
                        run.last_record = record
                    progress.update(state.step, result.loss if window is not None else None, lr)
                    if t.eval_every and data.eval and state.step % t.eval_every == 0 and not last:
                        _eval_and_log(run)
                    if t.save_every and state.step % t.save_every == 0 and not last:
                        _save(run)
                    if result.stop and not last:
                        if run.saved_step != state.step:
                            _save(run)
                        raise Stopped(
                            stopper.signum or signal.SIGTERM, state.step, out / "checkpoints" / tag(state.step)
                        )
                    if state.step >= run.total_steps:
                        if state.window_in_epoch >= batches.windows_per_epoch:  # the last step ended an epoch
                            state.epoch, state.window_in_epoch = state.epoch + 1, 0
                        break
                else:
                    state.epoch += 1
                    state.window_in_epoch = 0
        except BaseException as e:
            progress.stop()
            run.manifest.status = "stopped" if isinstance(e, Stopped) else "failed"
            write_peak(run.manifest, dist.device, out, dist.is_main)
            raise
    progress.stop()


def _save(run: Run) -> None:
    t = run.recipe.train
    run.state.stage_state = run.stage.state_dict()
    best = (t.best_metric, t.best_mode) if t.best_metric else None
    # every process holds the same weight average (ZeRO 0-2): process 0 writes it with the checkpoint
    extras = tuple(x for x in (run.adalora, run.ema) if x is not None)
    save_checkpoint(run.engine, run.out, run.state, run.dist.rank, t.keep_checkpoints, best, extras=extras)
    run.saved_step = run.state.step


def _finish(run: Run) -> None:
    """The final evaluation and checkpoint, then the export through a staging directory, the manifest, and
    the curves (curves.png)."""
    dist, out, state = run.dist, run.out, run.state
    assert state is not None and run.manifest is not None
    if run.data.eval:
        _eval_and_log(run)
    if run.recipe.train.save_every and run.saved_step != state.step:
        _save(run)
    run.engine.module.config.use_cache = True
    # Written to a staging directory, then moved into place file by file: a kill mid-export leaves no
    # truncated weights in output_dir (and run.json says finished only after the move).
    staging = out / EXPORT_STAGING
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    run.console.print(f"writing the model to {out} ...")
    with warnings.catch_warnings():
        if run.adalora is not None:  # ranks AdaLoRA pruned to 0 are empty tensors by design, not unsaved shards
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        run.stage.export(run.engine, run.tokenizer, staging, run.recipe, dist)
        if run.ema is not None:  # the average in the model's own export shape, beside it
            run.console.print(f"writing the weight average ({run.ema.updates} updates) to {out / 'ema'} ...")
            with run.ema.swapped_in():
                run.stage.export(run.engine, run.tokenizer, staging / "ema", run.recipe, dist)
    epochs = round(state.epoch + state.window_in_epoch / max(run.batches.windows_per_epoch, 1), 4)
    if dist.is_main:
        _write_cards(run, staging, epochs)
        readable_like_normal_files(staging)  # safetensors writes its files 0600
    files = _publish(staging, out) if dist.is_main else []
    m = run.manifest
    m.status, m.finished, m.steps = "finished", time.strftime("%Y-%m-%dT%H:%M:%S"), state.step
    m.epochs, m.trainer_state = epochs, asdict(state)
    peak = write_peak(m, dist.device, out, dist.is_main)  # also writes run.json
    if dist.is_main:
        write_run_curves(out, run.console)  # curves.png; a failure to draw is a warning, never a failed run
        _remove_checkpoints_at_finish(run)
    barrier()
    skips = f" ({state.nan_skips} skipped for NaN / Inf)" if state.nan_skips else ""
    run.console.print(
        f"[green]done[/]: {_plural(state.step, 'step')}{skips}; model written to {out} ({', '.join(files)})"
    )
    run.console.print(peak_line(peak))
    if run.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _write_cards(run: Run, staging: Path, epochs: float) -> None:
    """The model card (README.md) of the export and of each part beside it (ema/, ppo's critic/)."""
    from llmtune.engine.card import write_model_card

    unit = run.stage.unit_name
    skip = {"step", "epoch", "lr", "grad_norm", "skipped", unit, f"{unit}_per_s", "rollout_s", "train_s"}
    last = {k: v for k, v in (run.last_record or {}).items() if k not in skip}
    metrics = {("loss (last step)" if k == "loss" else k): v for k, v in last.items()}
    metrics.update(run.state.eval_metrics if run.state.eval_step == run.state.step else {})
    options = {"steps": run.state.step, "epochs": epochs, "metrics": metrics}
    write_model_card(staging, run.recipe, **options)
    parts = {
        "ema": "The exponential moving average of the trained weights (train.ema), in the model's own shape.",
        "critic": "PPO's critic (the value model) trained beside the policy, which is the folder above. With "
        "ppo.memory shared it is an adapter on the policy's base plus value_head.safetensors, which ppo reads back.",
    }
    for sub in sorted(p for p in staging.iterdir() if p.is_dir()):
        if any((sub / f).is_file() for f in ("adapter_config.json", "config.json")):
            write_model_card(
                sub, run.recipe, what=parts.get(sub.name, f"The {sub.name} part of the run's output."), **options
            )


def _remove_checkpoints_at_finish(run: Run) -> None:
    """A finished run's output is its export: its checkpoints go, unless the recipe sets train.keep_checkpoints
    (then the newest N stay, e.g. to --resume-from one with a longer schedule); the best_metric checkpoint
    stays either way."""
    t = run.recipe.train
    if "keep_checkpoints" in t.model_fields_set:
        return
    best = (t.best_metric, t.best_mode) if t.best_metric else None
    removed, kept = remove_checkpoints(run.out, best)
    if removed:
        note = f"; kept the best by {t.best_metric}: {kept.name}" if kept is not None else ""
        run.console.print(
            f"removed {_plural(len(removed), 'checkpoint')} (the exported model is the run's output{note}; set "
            "train.keep_checkpoints to keep the newest)"
        )


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


class StepGuard:
    """Lets the trainer veto one optimizer update. The step function of the optimizer llmtune builds is
    wrapped, and every DeepSpeed wrapper (ZeRO 1-3, bf16 / fp16 master weights) updates the weights only
    through it: a vetoed step leaves weights, moments and the optimizer's step count as they were, and
    DeepSpeed still zeroes the gradients and keeps its micro-step counters in order."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.block = False
        inner = optimizer.step

        @functools.wraps(inner)
        def step(*args: Any, **kwargs: Any) -> Any:
            return None if self.block else inner(*args, **kwargs)

        optimizer.step = step  # type: ignore[method-assign]


class StopRequest:
    """SIGTERM (a scheduler preempting the job) or Ctrl-C while training: finish the step in progress, write a
    checkpoint, and stop with a message; a second signal stops at once. Every process votes in the step's
    reduction, so all of them stop after the same step and write the checkpoint together."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, console: Console) -> None:
        # the notice goes to stderr: with `llmtune train ... | tee log`, Ctrl-C ends tee and stdout with it
        self.console = Console(stderr=True, quiet=console.quiet, highlight=False, soft_wrap=True)
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:  # the second one: stop now, as the signal would without llmtune
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum
        self.console.print(
            f"\n[yellow]{signal.Signals(signum).name}[/]: finishing this step, writing a checkpoint, then stopping "
            "(send it again to stop at once)"
        )


@dataclass
class WindowResult:
    loss: float  # mean over the window's units, all ranks
    units: float
    grad_norm: float | None
    metrics: dict[str, float]
    nonfinite: str | None  # "loss" / "gradient": llmtune vetoed the update for a NaN / Inf
    applied: bool  # DeepSpeed's view: it took the step (and moved the LR schedule), not seeing an overflow
    stop: bool = False  # some process was asked to stop (SIGTERM / Ctrl-C)


def _train_window(
    engine: Any,
    stage: Any,
    window: list[dict[str, torch.Tensor]] | None,
    dist: DistInfo,
    guard: StepGuard,
    stop_requested: bool = False,
    adalora: Any = None,
    step: int = 0,
):
    """One optimizer step over an accumulation window. The loss is normalised by the number of units
    (tokens) in the whole window on all ranks, so the update does not depend on how rows are split into
    micro-batches, accumulation steps and processes. DeepSpeed averages gradients over ranks, hence the
    factor world_size. Before the update, a NaN / Inf loss on any rank (or, under ZeRO-0, a non-finite
    gradient) vetoes it on every rank. A None window (the stage skips the step on every rank) only votes on
    stopping. adalora: AdaLoRA's schedule, which reads the step's gradients (`step`: this step's 1-based
    number) around the update."""
    if window is None:
        stop = all_reduce_sum(torch.tensor([1.0 if stop_requested else 0.0], dtype=torch.float64, device=dist.device))
        return WindowResult(0.0, 0.0, None, {}, None, True, stop.item() > 0)
    batches = [_to(b, dist.device) for b in window]
    stage.prepare_window(engine, batches, dist)  # window-level quantities (KTO's reference point)
    local_units = sum(stage.units(b).double() for b in batches)
    global_units = all_reduce_sum(torch.as_tensor(local_units, dtype=torch.float64, device=dist.device))
    denom = max(global_units.item(), 1.0)
    loss_total = torch.zeros((), dtype=torch.float64, device=dist.device)
    bad_losses = torch.zeros((), dtype=torch.float64, device=dist.device)
    sums: dict[str, torch.Tensor] = {}
    grad_norm = None
    for i, b in enumerate(batches):
        out = stage.step(engine, b)
        loss = out.loss_sum * (dist.world_size / denom)
        engine.backward(loss, scale_wrt_gas=False)
        loss_total += out.loss_sum.detach().double()
        bad_losses += (~torch.isfinite(out.loss_sum.detach())).double().sum()
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0) + v.detach().double()
        if i < len(batches) - 1:
            engine.step()  # a micro-step: DeepSpeed only counts it
    # the boundary: one reduction decides, on every rank alike, whether the update may happen
    if engine.zero_optimization_stage() == 0:
        grad_norm = _local_grad_norm(engine.module)  # ZeRO-0 keeps whole gradients on every rank
    stop = torch.ones_like(loss_total) if stop_requested else torch.zeros_like(loss_total)
    totals = all_reduce_sum(torch.stack([loss_total, bad_losses, stop]))
    nonfinite = "loss" if totals[1].item() > 0 or not math.isfinite(totals[0].item()) else None
    if nonfinite is None and grad_norm is not None and not math.isfinite(grad_norm):
        nonfinite = "gradient"
    guard.block = nonfinite is not None
    if adalora is not None:
        adalora.before_update()
    try:
        engine.step()
    finally:
        guard.block = False
    applied = engine.was_step_applied()
    if adalora is not None:
        adalora.after_update(step, applied and nonfinite is None)
    metrics = {
        k: all_reduce_sum(torch.as_tensor(v, device=dist.device)).item() / denom for k, v in sorted(sums.items())
    }
    if grad_norm is None:
        grad_norm = _engine_grad_norm(engine)
    return WindowResult(
        totals[0].item() / denom, global_units.item(), grad_norm, metrics, nonfinite, applied, totals[2].item() > 0
    )


def _check_numbers(result: WindowResult, recipe: RecipeBase, state: TrainerState, out: Path, console: Console):
    """After a step: None when it was fine; "overflow" for an fp16 step the loss scaler skipped (normal while
    the scale settles); "nan" for a step skipped for a NaN / Inf (train.on_nan: skip). Stops the run with the
    step and the cause when on_nan is stop, or once more than max_nan_skips steps were skipped."""
    t = recipe.train
    fp16 = recipe.precision == "fp16"
    cause = None
    if not math.isfinite(result.loss):
        cause = f"the loss is {result.loss}"
    elif result.nonfinite == "gradient" or (not result.applied and not fp16):
        # without fp16 loss scaling, DeepSpeed skips a step only for a non-finite gradient norm
        norm = result.grad_norm
        cause = f"the gradient norm is {norm}" if norm is not None and not math.isfinite(norm) else None
        cause = cause or "the gradient is not finite"
    elif not result.applied:
        state.overflow_skips += 1
        return "overflow"
    if cause is None:
        return None
    checkpoints = resume_point(out)
    fix = (
        "  fix: lower train.lr, keep train.max_grad_norm on, use bf16 rather than fp16, and check the data for "
        "empty or extreme rows"
    )
    if t.on_nan == "stop":
        raise TrainingError(
            f"{cause} at step {state.step}; training stopped ({checkpoints})\n{fix} "
            "(or set train.on_nan: skip to skip such steps)"
        )
    state.nan_skips += 1
    if state.nan_skips > t.max_nan_skips:
        raise TrainingError(
            f"{cause} at step {state.step}: {state.nan_skips} steps skipped for NaN / Inf, more than "
            f"train.max_nan_skips={t.max_nan_skips}; training stopped ({checkpoints})\n{fix}"
        )
    console.print(
        f"[yellow]step {state.step} skipped[/]: {cause}; no weight changed "
        f"({state.nan_skips} of at most {t.max_nan_skips} skips)"
    )
    return "nan"


def is_fp16_scale_error(e: BaseException) -> bool:
    return "loss scale already at minimum" in str(e)


def fp16_scale_error(e: BaseException, step: int, out: Path) -> TrainingError:
    """DeepSpeed's dynamic loss scaler gave up: fp16 overflows even at the smallest loss scale."""
    return TrainingError(
        f"fp16 overflow at step {step}: the gradients overflow even at the minimum loss scale; training stopped "
        f"({resume_point(out)})\n"
        "  fix: use precision: bf16 (on Ampere or newer GPUs), or lower train.lr and keep train.max_grad_norm on"
    )


def _local_grad_norm(model: torch.nn.Module) -> float | None:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else None


def _engine_grad_norm(engine: Any) -> float | None:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if isinstance(g, torch.Tensor) else g)


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


def _check_best_metric(engine, stage, samples, recipe, dist, collate) -> None:
    """Before the first step: train.best_metric must be a metric this stage's evaluation reports (found by
    evaluating one batch, with the random state put back), so that a typo does not surface hours later."""
    name = recipe.train.best_metric
    if not samples:
        raise RecipeError(
            f"train.best_metric {name} needs evaluation data, and this run has none",
            hint="add data.eval or data.eval_split, or remove train.best_metric",
        )
    bs = recipe.train.eval_batch_size or recipe.train.micro_batch_size
    devices = [dist.device] if dist.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        names = stage.evaluate(engine, samples[: bs * dist.world_size], recipe, dist, collate)
    if name not in names:
        raise RecipeError(
            f"train.best_metric {name} is not a metric of this stage's evaluation, which reports "
            f"{', '.join(sorted(names))}",
            hint="name one of those (e.g. best_metric: eval/loss, best_mode: min)",
        )


def _eval_and_log(run: Run) -> None:
    result = run.stage.evaluate(run.engine, run.data.eval, run.recipe, run.dist, run.collate)
    run.state.eval_step, run.state.eval_metrics = run.state.step, result
    record = {"step": run.state.step, **result}
    run.log.write(record)
    run.progress.log(record)


def _publish(staging: Path, out: Path) -> list[str]:
    """Move what the export wrote into output_dir (replacing an earlier export's files); returns the names."""
    names = []
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if entry.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            names.append(entry.name + "/")
        else:
            names.append(entry.name)
        os.replace(entry, target)
    staging.rmdir()
    return names
