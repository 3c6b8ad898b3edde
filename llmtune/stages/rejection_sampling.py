"""Rejection sampling (best-of-N, iterated as in LLaMA-2): per round, sample ``num_samples`` completions per
prompt from the current model, score them with the rewards, keep each prompt's best, and fine-tune on the
winners with the sft stage and the shared training loop; the next round starts from the model this one wrote.
With ``train_with: dpo`` a round trains the dpo stage on its best / worst pairs instead (iterative dpo: the
round's start model is the reference, and each round's pairs come from the model the last one wrote).

``output_dir`` holds one directory per round and, after the last one, the final model::

    round-K/samples.jsonl    every completion: prompt, answer, completion, ended, rewards per source, total
    round-K/selected.jsonl   per prompt, the best completion as a messages row, when it beats the prompt's worst
                             and clears the threshold (default: the rule's maximum, a right answer)
    round-K/pairs.jsonl      selection best_and_worst or train_with dpo: {prompt, chosen, rejected} rows
    round-K/generated.json   the round's statistics, written last: generation of the round is complete
    round-K/model/           the sft (or dpo) run of the round (checkpoints, metrics, its model)
    round-K/merged/          lora / qlora, not the last round: the adapter merged into its base (next model.path)
    rounds.jsonl             one line of statistics per round (with each reward source's mean, reward/<source>,
                             and a judge's unparsable / cached counts, reward/<judge>/unparsable)
    model files, recipe.yaml, run.json, metrics.jsonl: the last round's model, loadable as an sft output is

A rerun of an interrupted run skips what is complete: finished rounds, a round's generation, and the sft
run resumes from its own newest checkpoint. Under torchrun every process samples and scores its share of
the prompts; rank 0 gathers them and writes the files while the others wait.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmtune.engine.card import write_model_card
from llmtune.engine.checkpoint import EXPORT_STAGING, plan_run
from llmtune.engine.distributed import DistInfo, barrier, setup_distributed
from llmtune.engine.report import run_console
from llmtune.engine.setup import open_trackers
from llmtune.engine.trackers import Trackers, remove_tracker_files, status_of_exception
from llmtune.engine.trainer import publish, train
from llmtune.errors import DataError, UserError
from llmtune.manifest import RunManifest, status_of
from llmtune.plot import write_run_curves
from llmtune.recipe.data import DataConfig, DataSource
from llmtune.recipe.load import dump_recipe
from llmtune.recipe.stages import DpoRecipe, RejectionSamplingRecipe, SftRecipe
from llmtune.stages.best_of_n import GENERATED, PAIRS, generate_round, write_jsonl
from llmtune.stages.dpo import DpoStage
from llmtune.stages.sft import SftStage

MODEL_DIR, MERGED_DIR = "model", "merged"
_RUN_FILES = {"recipe.yaml", "run.json", "metrics.jsonl", "curves.png", "checkpoints", EXPORT_STAGING}


# ------------------------------------------------------------------------------------------------- prompts


def read_prompts(recipe: RejectionSamplingRecipe, console: Console) -> list[Any]:
    """Every usable prompt of data.train, read by the data pipeline the other stages use (formats, columns,
    max_samples, system, weight, on_bad_row), without tokenizing: each round renders them with its own
    model's tokenizer. No usable prompt is a DataError (exit 2), raised before any model loads."""
    from llmtune.data.pipeline import PromptExample, build_data
    from llmtune.data.prompts import to_prompt
    from llmtune.engine.report import print_data_summary

    def encode(row: dict, fmt: str, src: DataSource) -> list[Any]:
        return [PromptExample(input_ids=[], labels=[], prompt=to_prompt(row, src.system))]

    bundle = build_data(recipe, encode, "prompts", default_format="prompts", use_cache=False)
    print_data_summary(console, bundle, recipe)
    if bundle.eval:
        console.print(f"note: {len(bundle.eval)} held-out prompt(s) (data.eval / eval_split) are not sampled")
    prompts = []
    for e in bundle.train:
        assert isinstance(e, PromptExample)
        e.prompt.row = e.row
        prompts.append(e.prompt)
    return prompts


# ----------------------------------------------------------------------------------------------- the rounds


def round_dir(out: Path, k: int) -> Path:
    return out / f"round-{k}"


def _uses_adapter(recipe: RejectionSamplingRecipe) -> bool:
    return recipe.finetuning.method in ("lora", "qlora")


def round_output(out: Path, k: int, recipe: RejectionSamplingRecipe) -> Path:
    """The full model round k leaves for the next one: its sft output, or (lora / qlora) the merge."""
    return round_dir(out, k) / (MERGED_DIR if _uses_adapter(recipe) else MODEL_DIR)


def start_model(out: Path, k: int, recipe: RejectionSamplingRecipe) -> str:
    return recipe.model.path if k == 1 else str(round_output(out, k - 1, recipe))


def round_recipe(recipe: RejectionSamplingRecipe, out: Path, k: int) -> SftRecipe | DpoRecipe:
    """The training run of round k: the same model / method / training settings, trained on the round's
    winners (sft on selected.jsonl), or with train_with dpo on its best / worst pairs (pairs.jsonl), the round's
    start model being dpo's reference."""
    d = recipe.data
    model = recipe.model.model_copy(update={"path": start_model(out, k, recipe)})
    if k > 1:  # later rounds start from a directory this run wrote: it holds the tokenizer
        model = model.model_copy(update={"revision": None})
    dpo = recipe.rejection_sampling.train_with == "dpo"
    source = (
        DataSource(path=str(round_dir(out, k) / PAIRS), format="pairs")
        if dpo
        else DataSource(path=str(round_dir(out, k) / "selected.jsonl"), format="messages")
    )
    data = DataConfig(
        train=[source],
        max_length=d.max_length,
        on_bad_row=d.on_bad_row,
        cache_dir=d.cache_dir,
        shuffle=d.shuffle,
    )
    shared: dict[str, Any] = {
        "output_dir": str(round_dir(out, k) / MODEL_DIR),
        "seed": recipe.seed,
        "model": model,
        "finetuning": recipe.finetuning.model_copy(),
        "data": data,
        "train": recipe.train.model_copy(),
        "distributed": recipe.distributed.model_copy(),
        "precision": recipe.precision,
    }
    if dpo:
        return DpoRecipe(stage="dpo", dpo=recipe.dpo.model_copy(), **shared)
    return SftRecipe(stage="sft", sft=recipe.sft.model_copy(), **shared)


@dataclass
class _Rounds:
    """One rejection-sampling run between its set-up and its finish."""

    recipe: RejectionSamplingRecipe
    out: Path
    dist: DistInfo
    console: Console
    prompts: list[Any]
    trackers: Trackers
    local_rank: int | None
    resume_from: Path | None
    resume_round: int | None
    trust_reward_code: bool


def run_rejection_sampling(
    recipe: RejectionSamplingRecipe,
    local_rank: int | None = None,
    resume: bool = True,
    resume_from: Path | None = None,
    overwrite: bool = False,
    trust_reward_code: bool = False,
) -> None:
    dist = setup_distributed(recipe.distributed.backend, local_rank)
    console = run_console(dist.is_main)
    run = _start(recipe, dist, console, local_rank, resume, resume_from, overwrite, trust_reward_code)
    if run is None:
        return
    manifest = _manifest(recipe, dist)
    try:
        for k in range(1, recipe.rejection_sampling.rounds + 1):
            _round(run, k)
        if dist.is_main:
            _finish(run, manifest)
        run.trackers.close("finished")
        barrier()
    except BaseException as e:
        run.trackers.close(status_of_exception(e))
        if dist.is_main and run.out.is_dir():
            manifest.status = status_of_exception(e)
            manifest.write(run.out)
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _start(
    recipe: RejectionSamplingRecipe,
    dist: DistInfo,
    console: Console,
    local_rank: int | None,
    resume: bool,
    resume_from: Path | None,
    overwrite: bool,
    trust_reward_code: bool,
) -> _Rounds | None:
    """Before any model loads: the output directory, the rewards, the prompts, the trackers; None when the run
    is already finished."""
    from llmtune.rewards import check_rewards

    rs = recipe.rejection_sampling
    out = Path(recipe.output_dir).expanduser()
    text = dump_recipe(recipe)
    plan = plan_run(out, text, resume=resume, overwrite=overwrite)
    if plan.finished and resume_from is None:
        console.print(
            f"{out} already holds a finished run of this recipe: nothing to do "
            "(pass --no-resume or --overwrite to run again)"
        )
        return None
    resume_round = _round_of_checkpoint(out, resume_from, rs.rounds) if resume_from is not None else None
    check_rewards(rs.reward, trust_code=trust_reward_code, what="rejection_sampling.reward")
    prompts = read_prompts(recipe, console)
    _check_answers(recipe, prompts)
    continuing = resume and not overwrite and _has_rounds(out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if (overwrite or not resume) and resume_from is None:
            _remove_rounds(out)
        (out / "recipe.yaml").write_text(text, encoding="utf-8")
        _manifest(recipe, dist).write(out)
    barrier()
    if continuing:
        console.print(f"continuing the run in {out}: finished rounds and generations are kept")
    # one tracker run for the whole run in output_dir (each round's rows carry their round), continuing the
    # earlier one when the run continues
    if dist.is_main and not continuing:
        remove_tracker_files(out)
    trackers = open_trackers(recipe, out, dist, console, continuing)
    return _Rounds(
        recipe, out, dist, console, prompts, trackers, local_rank, resume_from, resume_round, trust_reward_code
    )


def _round(run: _Rounds, k: int) -> None:
    """Round k: generate (unless complete), train on the winners (sft) or pairs (dpo) unless finished, merge an
    adapter for the next round."""
    recipe, out, dist, console = run.recipe, run.out, run.dist, run.console
    rounds = recipe.rejection_sampling.rounds
    rdir = round_dir(out, k)
    sft = round_recipe(recipe, out, k)
    model_dir = rdir / MODEL_DIR
    done = status_of(model_dir) == "finished" and _same_text(model_dir / "recipe.yaml", dump_recipe(sft))
    if done and run.resume_round != k and _next_model_ready(out, k, recipe):
        console.print(f"[bold]round {k}/{rounds}[/]: finished earlier, skipped")
        return
    console.print(f"[bold]round {k}/{rounds}[/]: model {sft.model.path}")
    # one tracker run for all rounds: round k's steps follow the steps of the rounds before it, and the
    # round's generation statistics come at the step its training starts from
    offset = sum(_planned_steps(round_dir(out, j) / MODEL_DIR) for j in range(1, k))
    if (rdir / GENERATED).is_file():
        console.print(f"round {k}: generation was complete ({rdir / GENERATED}), not repeated")
    else:
        stats = generate_round(recipe, run.prompts, k, rdir, sft.model.path, dist, console, run.trust_reward_code)
        run.trackers.shifted(offset).log({"step": 0, **{f"rounds/{key}": v for key, v in stats.items()}})
    _write_rounds(out, rounds)
    if not done or run.resume_round == k:
        train(  # the process group is this run's: train() leaves it up
            sft,
            DpoStage() if isinstance(sft, DpoRecipe) else SftStage(),
            local_rank=run.local_rank,
            resume=True,
            resume_from=run.resume_from if run.resume_round == k else None,
            trackers=run.trackers.shifted(offset, round=k),
        )
    if _uses_adapter(recipe) and k < rounds:
        if dist.is_main:
            _merge(sft.model.path, model_dir, rdir / MERGED_DIR, console)
        barrier()


def _finish(run: _Rounds, manifest: RunManifest) -> None:
    """Rank 0: the last round's model published into output_dir, rounds.jsonl, run.json and the curves."""
    out, rounds = run.out, run.recipe.rejection_sampling.rounds
    files = _publish_final(out, round_dir(out, rounds) / MODEL_DIR, rounds, run.recipe)
    _write_rounds(out, rounds)
    final = RunManifest.read(round_dir(out, rounds) / MODEL_DIR) or RunManifest()
    manifest.tokenizer, manifest.torch, manifest.deepspeed = final.tokenizer, final.torch, final.deepspeed
    manifest.status, manifest.finished = "finished", time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest.write(out)
    write_run_curves(out, run.console)  # every round's loss, and the sampled reward per round
    run.console.print(f"[green]done[/]: {rounds} round(s); final model written to {out} ({', '.join(files)})")


def _planned_steps(model_dir: Path) -> int:
    manifest = RunManifest.read(model_dir)
    return (manifest.total_steps or 0) if manifest is not None else 0


def _check_answers(recipe: RejectionSamplingRecipe, prompts: list[Any]) -> None:
    """Rules that score against the row's answer need one on every prompt: said before any model loads."""
    from llmtune.rewards.rules import needs_answer

    reward = recipe.rejection_sampling.reward
    rules = [f"rule {r}" for r in reward.rules() if needs_answer(r)]
    rules += [f"judge {j.model} (mode pairwise)" for j in reward.judges() if j.mode == "pairwise"]
    missing = sum(1 for p in prompts if p.answer is None)
    if rules and missing:
        raise DataError(
            f"rejection_sampling.reward.{rules[0]} scores against each prompt's `answer`, and {missing} of "
            f"{len(prompts)} prompts have none",
            hint="give every prompt row an `answer` (or `output` / an assistant reply), or use a rule that needs "
            "none (regex:..., length_penalty:N) or a reward model",
        )


def _round_of_checkpoint(out: Path, ckpt: Path, rounds: int) -> int:
    """--resume-from names a checkpoint of one round's sft run: that round continues from it."""
    path = Path(ckpt).expanduser().resolve()
    for k in range(1, rounds + 1):
        if (round_dir(out, k) / MODEL_DIR).resolve() in path.parents:
            return k
    raise UserError(
        f"--resume-from {ckpt} is not a checkpoint of this run's rounds",
        hint=f"pass a directory like {round_dir(out, 1) / MODEL_DIR}/checkpoints/step-00000100, or run the same "
        "command without --resume-from (finished rounds are skipped, the round in progress resumes)",
    )


def _has_rounds(out: Path) -> bool:
    return out.is_dir() and any(p.name.startswith("round-") for p in out.iterdir())


def _remove_rounds(out: Path) -> None:
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith("round-"):
            shutil.rmtree(p)
    (out / "rounds.jsonl").unlink(missing_ok=True)


def _same_text(path: Path, text: str) -> bool:
    return path.is_file() and path.read_text(encoding="utf-8") == text


def _next_model_ready(out: Path, k: int, recipe: RejectionSamplingRecipe) -> bool:
    if not _uses_adapter(recipe) or k == recipe.rejection_sampling.rounds:
        return True
    return (round_dir(out, k) / MERGED_DIR / "config.json").is_file()


def _manifest(recipe: RejectionSamplingRecipe, dist: Any) -> RunManifest:
    from llmtune import __version__

    return RunManifest(
        llmtune=__version__,
        stage=recipe.stage,
        world_size=dist.world_size,
        device=dist.device.type,
        rounds=recipe.rejection_sampling.rounds,
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def _write_rounds(out: Path, rounds: int) -> None:
    """rounds.jsonl from the rounds' generated.json (rebuilt, so a rerun never repeats a line)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        lines = []
        for k in range(1, rounds + 1):
            f = round_dir(out, k) / GENERATED
            if f.is_file():
                lines.append(json.loads(f.read_text()))
        write_jsonl(out / "rounds.jsonl", lines)


# ------------------------------------------------------------------------------------------------ outputs


def _merge(base: str, adapter: Path, target: Path, console: Console) -> None:
    """round-K/merged: the adapter merged into the round's start model (written aside, then moved in)."""
    from llmtune.model.merge import merge_lora

    if (target / "config.json").is_file():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    result = merge_lora(base, str(adapter), tmp, dtype="auto")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    console.print(f"merged the adapter into {base}: {target} (max |logit| diff {result.max_logit_diff:.2g})")


def _publish_final(out: Path, model_dir: Path, rounds: int, recipe: Any) -> list[str]:
    """Copy the last round's model (weights or adapter, tokenizer, configs) into output_dir, through a staging
    directory, with a model card of the whole run; metrics.jsonl gets every round's training log, each line
    with its round."""
    staging = out / EXPORT_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for entry in sorted(model_dir.iterdir()):
        if entry.name in _RUN_FILES or entry.name.endswith(".tmp"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, staging / entry.name)
        else:
            shutil.copy2(entry, staging / entry.name)
    metrics = []
    for k in range(1, rounds + 1):
        f = round_dir(out, k) / MODEL_DIR / "metrics.jsonl"
        if f.is_file():
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    metrics.append({"round": k, **json.loads(line)})
    write_jsonl(staging / "metrics.jsonl", metrics)
    runs = [RunManifest.read(round_dir(out, k) / MODEL_DIR) or RunManifest() for k in range(1, rounds + 1)]
    state = runs[-1].trainer_state or {}
    write_model_card(
        staging,
        recipe,
        steps=sum(m.steps or 0 for m in runs),
        metrics=state.get("eval_metrics") if isinstance(state.get("eval_metrics"), dict) else None,
        what=f"Rejection sampling: {rounds} round(s) of sampling answers to the prompts, scoring them, keeping "
        + (
            "each prompt's best and worst and training dpo on those pairs (iterative dpo)."
            if recipe.rejection_sampling.train_with == "dpo"
            else "the best and fine-tuning on them (sft)."
        )
        + " This is the last round's model.",
    )
    return publish(staging, out)


__all__ = ["read_prompts", "round_recipe", "run_rejection_sampling"]


class RejectionSamplingStage:
    """Found by name like every stage; it runs rounds (each one's sft on the trainer) instead of one trainer
    loop, so ``llmtune.stages.run_stage`` calls its ``run``."""

    name = "rejection_sampling"

    def run(self, recipe: RejectionSamplingRecipe, local_rank: int | None = None, **options: Any) -> None:
        run_rejection_sampling(recipe, local_rank=local_rank, **options)


STAGE = RejectionSamplingStage
