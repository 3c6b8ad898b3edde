"""Rejection sampling (best-of-N, iterated as in LLaMA-2): per round, sample ``num_samples`` completions per
prompt from the current model, score them with the rewards, keep each prompt's best, and fine-tune on the
winners with the sft stage and the shared training loop; the next round starts from the model this one wrote.

``output_dir`` holds one directory per round and, after the last one, the final model::

    round-K/samples.jsonl    every completion: prompt, answer, completion, ended, rewards per source, total
    round-K/selected.jsonl   per prompt, the best completion as a messages row, when it beats the prompt's worst
                             and clears the threshold (default: the rule's maximum, a right answer)
    round-K/pairs.jsonl      selection best_and_worst: {prompt, chosen, rejected} rows that dpo reads
    round-K/generated.json   the round's statistics, written last: generation of the round is complete
    round-K/model/           the sft run of the round (checkpoints, metrics, its model)
    round-K/merged/          lora / qlora, not the last round: the adapter merged into its base (next model.path)
    rounds.jsonl             one line of statistics per round (with each reward source's mean, reward/<source>,
                             and a judge's unparsable / cached counts, reward/<judge>/unparsable)
    model files, recipe.yaml, run.json, metrics.jsonl: the last round's model, loadable as an sft output is

A rerun of an interrupted run skips what is complete: finished rounds, a round's generation, and the sft
run resumes from its own newest checkpoint. Under torchrun every process samples and scores its share of
the prompts; rank 0 gathers them and writes the files while the others wait.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmtune.errors import DataError, UserError
from llmtune.manifest import RunManifest, status_of
from llmtune.objectives.rl import best_of_n
from llmtune.recipe.data import DataConfig, DataSource
from llmtune.recipe.stages import RejectionSamplingRecipe, SftRecipe

GENERATED = "generated.json"  # written last in a round directory: its generation is complete
MODEL_DIR, MERGED_DIR = "model", "merged"
_RUN_FILES = {"recipe.yaml", "run.json", "metrics.jsonl", "curves.png", "checkpoints", ".export-in-progress"}


# ------------------------------------------------------------------------------------------------- prompts


def read_prompts(recipe: RejectionSamplingRecipe, console: Console) -> list[Any]:
    """Every usable prompt of data.train, read by the data pipeline the other stages use (formats, columns,
    max_samples, system, weight, on_bad_row), without tokenizing: each round renders them with its own
    model's tokenizer. No usable prompt is a DataError (exit 2), raised before any model loads."""
    from llmtune.data.pipeline import PromptExample, build_data
    from llmtune.data.prompts import to_prompt
    from llmtune.engine.report import print_data_summary

    def encode(row: dict, fmt: str, src: DataSource) -> list[PromptExample]:
        return [PromptExample(input_ids=[], labels=[], prompt=to_prompt(row, src.system))]

    bundle = build_data(recipe, encode, "prompts", default_format="prompts", use_cache=False)
    print_data_summary(console, bundle, recipe)
    if bundle.eval:
        console.print(f"note: {len(bundle.eval)} held-out prompt(s) (data.eval / eval_split) are not sampled")
    prompts = []
    for e in bundle.train:
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


def sft_recipe(recipe: RejectionSamplingRecipe, out: Path, k: int) -> SftRecipe:
    """The sft run of round k: the same model / method / training settings, trained on the round's winners."""
    d = recipe.data
    model = recipe.model.model_copy(update={"path": start_model(out, k, recipe)})
    if k > 1:  # later rounds start from a directory this run wrote: it holds the tokenizer
        model = model.model_copy(update={"revision": None})
    data = DataConfig(
        train=[DataSource(path=str(round_dir(out, k) / "selected.jsonl"), format="messages")],
        max_length=d.max_length,
        on_bad_row=d.on_bad_row,
        cache_dir=d.cache_dir,
        shuffle=d.shuffle,
    )
    return SftRecipe(
        stage="sft",
        output_dir=str(round_dir(out, k) / MODEL_DIR),
        seed=recipe.seed,
        model=model,
        finetuning=recipe.finetuning.model_copy(),
        data=data,
        train=recipe.train.model_copy(),
        distributed=recipe.distributed.model_copy(),
        precision=recipe.precision,
        sft=recipe.sft.model_copy(),
    )


def run_rejection_sampling(
    recipe: RejectionSamplingRecipe,
    local_rank: int | None = None,
    resume: bool = True,
    resume_from: Path | None = None,
    overwrite: bool = False,
    trust_reward_code: bool = False,
) -> None:
    from llmtune.engine.checkpoint import plan_run
    from llmtune.engine.distributed import barrier, setup_distributed
    from llmtune.engine.report import run_console
    from llmtune.engine.trainer import train
    from llmtune.plot import write_run_curves
    from llmtune.recipe.load import dump_recipe
    from llmtune.rewards import check_rewards
    from llmtune.stages.sft import SftStage

    rs = recipe.rejection_sampling
    dist = setup_distributed(recipe.distributed.backend, local_rank)
    console = run_console(dist.is_main)

    # --- before any model loads: the output directory, the rewards, the prompts --------------------------
    out = Path(recipe.output_dir).expanduser()
    text = dump_recipe(recipe)
    plan = plan_run(out, text, resume=resume, overwrite=overwrite)
    if plan.finished and resume_from is None:
        console.print(
            f"{out} already holds a finished run of this recipe: nothing to do "
            "(pass --no-resume or --overwrite to run again)"
        )
        return
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

    manifest = _manifest(recipe, dist)
    trackers = _open_trackers(recipe, out, dist, console, continuing)
    try:
        for k in range(1, rs.rounds + 1):
            rdir = round_dir(out, k)
            sft = sft_recipe(recipe, out, k)
            model_dir = rdir / MODEL_DIR
            done = status_of(model_dir) == "finished" and _same_text(model_dir / "recipe.yaml", dump_recipe(sft))
            if done and resume_round != k and _next_model_ready(out, k, recipe):
                console.print(f"[bold]round {k}/{rs.rounds}[/]: finished earlier, skipped")
                continue
            console.print(f"[bold]round {k}/{rs.rounds}[/]: model {sft.model.path}")
            # one tracker run for all rounds: round k's steps follow the steps of the rounds before it, and the
            # round's generation statistics come at the step its training starts from
            offset = sum(_planned_steps(round_dir(out, j) / MODEL_DIR) for j in range(1, k))
            if (rdir / GENERATED).is_file():
                console.print(f"round {k}: generation was complete ({rdir / GENERATED}), not repeated")
            else:
                stats = generate_round(recipe, prompts, k, rdir, sft.model.path, dist, console, trust_reward_code)
                trackers.shifted(offset).log({"step": 0, **{f"rounds/{key}": v for key, v in stats.items()}})
            _write_rounds(out, rs.rounds)
            if not done or resume_round == k:
                train(  # the process group is this run's: train() leaves it up
                    sft,
                    SftStage(),
                    local_rank=local_rank,
                    resume=True,
                    resume_from=resume_from if resume_round == k else None,
                    trackers=trackers.shifted(offset, round=k),
                )
            if _uses_adapter(recipe) and k < rs.rounds:
                if dist.is_main:
                    _merge(sft.model.path, model_dir, rdir / MERGED_DIR, console)
                barrier()
        if dist.is_main:
            files = _publish_final(out, round_dir(out, rs.rounds) / MODEL_DIR, rs.rounds, recipe)
            _write_rounds(out, rs.rounds)
            final = RunManifest.read(round_dir(out, rs.rounds) / MODEL_DIR) or RunManifest()
            manifest.tokenizer, manifest.torch, manifest.deepspeed = final.tokenizer, final.torch, final.deepspeed
            manifest.status, manifest.finished = "finished", time.strftime("%Y-%m-%dT%H:%M:%S")
            manifest.write(out)
            write_run_curves(out, console)  # every round's loss, and the sampled reward per round
            console.print(f"[green]done[/]: {rs.rounds} round(s); final model written to {out} ({', '.join(files)})")
        trackers.close("finished")
        barrier()
    except BaseException as e:
        from llmtune.engine.trackers import status_of_exception

        trackers.close(status_of_exception(e))
        if dist.is_main and out.is_dir():
            manifest.status = status_of_exception(e)
            manifest.write(out)
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _planned_steps(model_dir: Path) -> int:
    manifest = RunManifest.read(model_dir)
    return (manifest.total_steps or 0) if manifest is not None else 0


def _open_trackers(recipe: RejectionSamplingRecipe, out: Path, dist: Any, console: Console, continuing: bool):
    """One tracker run for the whole run in output_dir (each round's rows carry their round), continuing the
    earlier one when the run continues."""
    from rich.markup import escape

    from llmtune.engine.trackers import Trackers, remove_tracker_files
    from llmtune.recipe.load import dump_recipe, resolved_dict

    if dist.is_main and not continuing:
        remove_tracker_files(out)
    return Trackers.open(
        recipe.train.report_to,
        out,
        recipe.train.run_name or out.resolve().name,
        resolved_dict(recipe),
        dump_recipe(recipe),
        enabled=dist.is_main,
        resume=continuing,
        warn=lambda m: console.print(f"[yellow]{escape(m)}[/]"),
    )


def _check_answers(recipe: RejectionSamplingRecipe, prompts: list[Any]) -> None:
    """Rules that score against the row's answer need one on every prompt: said before any model loads."""
    from llmtune.rewards.rules import needs_answer

    rules = [r for r in recipe.rejection_sampling.reward.rules() if needs_answer(r)]
    missing = sum(1 for p in prompts if p.answer is None)
    if rules and missing:
        raise DataError(
            f"rejection_sampling.reward.rule {rules[0]} scores against each prompt's `answer`, and {missing} of "
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


# ------------------------------------------------------------------------------------ generate and select


def _inference_dtype(recipe: RejectionSamplingRecipe, device: torch.device) -> torch.dtype:
    if recipe.precision == "fp32" or device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if recipe.precision == "bf16" else torch.float16


def _load_policy(
    recipe: RejectionSamplingRecipe, path: str, k: int, dtype: torch.dtype, device: torch.device, tokenizer: Any
) -> Any:
    """The round's model for sampling: the starting model (round 1, with the recipe's hub options) or the
    last round's local output."""
    from llmtune.model.load import ModelSpec, load

    spec = ModelSpec.frozen(recipe, path, "model.path" if k == 1 else f"round {k - 1}'s model")
    spec = dataclasses.replace(spec, dtype=dtype, revision=spec.revision if k == 1 else None)
    return load(spec, device, tokenizer).model


def _shard(items: list[Any], dist: Any) -> list[Any]:
    return items[dist.rank :: dist.world_size]


def _sum_counts(mine: dict[str, float], dist: Any) -> dict[str, float]:
    """The reward sources' counts of every rank, summed."""
    if dist.world_size == 1:
        return dict(mine)
    parts: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, mine)
    out: dict[str, float] = {}
    for part in parts:
        for key, v in part.items():
            out[key] = out.get(key, 0.0) + float(v)
    return out


def _gather(mine: list[Any], dist: Any, n: int) -> list[Any]:
    """The shards of every rank (each took items[rank::world]) put back into the original order."""
    if dist.world_size == 1:
        return mine
    parts: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, mine)
    merged: list[Any] = [None] * n
    for r, part in enumerate(parts):
        for j, item in enumerate(part):
            merged[r + j * dist.world_size] = item
    return merged


def generate_round(
    recipe: RejectionSamplingRecipe,
    prompts: list[Any],
    k: int,
    rdir: Path,
    model_path: str,
    dist: Any,
    console: Console,
    trust_reward_code: bool,
) -> dict[str, Any]:
    """Sample, score and select for round k; rank 0 writes the round's files (generated.json last)."""
    from llmtune.data.chat import resolve_chat_template
    from llmtune.data.prompts import render_prompt
    from llmtune.engine.distributed import barrier
    from llmtune.generation.sample import GenerationProgress, end_tokens, generation_batch, rollout
    from llmtune.model.tokenizer import load_tokenizer
    from llmtune.rewards import build_rewards

    rs, gen = recipe.rejection_sampling, recipe.generation
    n = rs.num_samples
    chosen = list(range(len(prompts)))
    if rs.max_prompts is not None and rs.max_prompts < len(prompts):
        chosen = sorted(random.Random(recipe.seed + k).sample(chosen, rs.max_prompts))
    round_prompts = [prompts[i] for i in chosen]
    mine = _shard(round_prompts, dist)

    tokenizer = load_tokenizer(recipe.model.model_copy(update={"path": model_path}) if k > 1 else recipe.model)
    template = resolve_chat_template(tokenizer, recipe.model.chat_template, required=True)
    dtype = _inference_dtype(recipe, dist.device)
    t0 = time.perf_counter()
    model = _load_policy(recipe, model_path, k, dtype, dist.device, tokenizer)
    stops = end_tokens(model, tokenizer, template)
    budget = max(1, recipe.data.max_length - gen.max_new_tokens)
    ids = []
    for p in mine:
        text = render_prompt(tokenizer, template, p.messages)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][-budget:])
    repeated = [row for row in ids for _ in range(n)]
    seed = recipe.seed * 1000003 + k * 7919 + dist.rank * 104729
    batch = generation_batch(gen.batch_size, recipe.train.micro_batch_size)
    share = f" ({len(repeated)} on each of {dist.world_size} processes)" if dist.world_size > 1 else ""
    console.print(
        f"round {k}: sampling {len(round_prompts)} prompts x {n} = {len(round_prompts) * n} completions{share}, "
        f"{batch} per generate call (generation.batch_size)"
    )
    progress = GenerationProgress(console.print, len(repeated), f"round {k}: sampled")
    outs = (
        rollout(
            model,
            tokenizer,
            repeated,
            gen,
            seed=seed,
            stops=stops,
            device=dist.device,
            batch_size=batch,
            on_batch=progress,
        )
        if repeated
        else []
    )
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    completions = [tokenizer.decode(o, skip_special_tokens=True) for o, _ in outs]
    ended = [e for _, e in outs]
    lengths = [len(o) for o, _ in outs]
    t_gen = time.perf_counter() - t0

    rewards = build_rewards(
        rs.reward, trust_code=trust_reward_code, device=dist.device, dtype=dtype, what="rejection_sampling.reward"
    )
    try:
        if completions:
            res = rewards(
                [p.messages for p in mine for _ in range(n)],
                completions,
                [p.answer for p in mine for _ in range(n)],
                ended,
            )
            totals, per_source = list(res.total), {s: list(v) for s, v in res.per_source.items()}
            counts = dict(res.stats)
        else:
            totals, per_source, counts = [], {}, {}
    finally:
        rewards.close()
    groups = []
    for i in range(len(mine)):
        sl = slice(i * n, (i + 1) * n)
        groups.append(
            {
                "completions": completions[sl],
                "ended": ended[sl],
                "lengths": lengths[sl],
                "totals": [float(x) for x in totals[sl]],
                "sources": {s: [float(x) for x in v[sl]] for s, v in per_source.items()},
            }
        )
    groups = _gather(groups, dist, len(round_prompts))
    counts = _sum_counts(counts, dist)
    stats: dict[str, Any] = {}
    if dist.is_main:
        stats = _select_and_write(recipe, round_prompts, groups, k, rdir, time.perf_counter() - t0, t_gen, counts)
        console.print(_stats_line(stats))
    barrier()
    if not dist.is_main:
        done = rdir / GENERATED
        stats = json.loads((done if done.is_file() else rdir / "stats.json").read_text())
    if stats["kept"] == 0:
        raise DataError(
            f"round {k}: no prompt kept, nothing to fine-tune on: of {stats['prompts']} prompts, "
            f"{stats['no_spread']} had no reward spread (all {n} samples scored alike), "
            f"{stats['under_threshold']} had a best under the threshold"
            + (f" {stats['threshold']}" if stats["threshold"] is not None else "")
            + (f", {stats['empty']} had an empty best" if stats["empty"] else "")
            + f" (the best reward was {stats['max_reward']:.4g}); see {rdir / 'samples.jsonl'}"
            + (f"; rounds 1-{k - 1} are finished in {rdir.parent}/round-*/model" if k > 1 else ""),
            hint="raise rejection_sampling.num_samples or generation.temperature, use easier prompts (or start from "
            "a model that solves some, e.g. an sft output), or lower rejection_sampling.threshold; check that the "
            "reward rule fits the data's `answer`",
        )
    return stats


def _select_and_write(
    recipe: RejectionSamplingRecipe,
    prompts: list[Any],
    groups: list[dict[str, Any]],
    k: int,
    rdir: Path,
    seconds: float,
    gen_seconds: float,
    source_counts: dict[str, float] | None = None,
) -> dict[str, Any]:
    rs = recipe.rejection_sampling
    samples, selected, pairs = [], [], []
    best_totals, all_totals, lengths, ended = [], [], [], []
    match: list[float] = []
    threshold = selection_threshold(rs)
    counts = {"no_spread": 0, "under_threshold": 0, "empty": 0}
    for p, g in zip(prompts, groups, strict=True):
        totals = g["totals"]
        for j, c in enumerate(g["completions"]):
            samples.append(
                {
                    "round": k,
                    "row": p.row,
                    "sample": j,
                    "prompt": p.messages,
                    "answer": p.answer,
                    "completion": c,
                    "ended": g["ended"][j],
                    "tokens": g["lengths"][j],
                    "rewards": {s: v[j] for s, v in g["sources"].items()},
                    "total": totals[j],
                }
            )
        match.extend(x for s, v in g["sources"].items() if _is_match_source(s) for x in v)
        all_totals.extend(totals)
        lengths.extend(g["lengths"])
        ended.extend(g["ended"])
        if not totals:
            continue
        pick = best_of_n(torch.tensor([totals], dtype=torch.float64), threshold)
        best, worst = int(pick["best"][0]), int(pick["worst"][0])
        best_totals.append(totals[best])
        if not pick["spread"][0]:
            counts["no_spread"] += 1
            continue
        if not pick["clears"][0]:
            counts["under_threshold"] += 1
            continue
        content = g["completions"][best]
        if not content.strip():
            counts["empty"] += 1
            continue  # sft cannot learn an empty reply
        selected.append({"messages": [*p.messages, {"role": "assistant", "content": content}]})
        if rs.selection == "best_and_worst":
            pairs.append({"prompt": p.messages, "chosen": content, "rejected": g["completions"][worst]})
    rdir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(rdir / "samples.jsonl", samples)
    _write_jsonl(rdir / "selected.jsonl", selected)
    if rs.selection == "best_and_worst":
        _write_jsonl(rdir / "pairs.jsonl", pairs)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    stats = {
        "round": k,
        "prompts": len(prompts),
        "samples": len(samples),
        "mean_reward": mean(all_totals),
        "mean_best_reward": mean(best_totals),
        "max_reward": max(all_totals) if all_totals else None,
        "kept": len(selected),
        "kept_fraction": len(selected) / len(prompts) if prompts else 0.0,
        **counts,
        "threshold": threshold,
        "exact_match": mean(match),
        "mean_completion_tokens": mean(lengths),
        "ended_fraction": mean([float(e) for e in ended]),
        "generate_seconds": round(gen_seconds, 2),
        "seconds": round(seconds, 2),
    }
    if rs.selection == "best_and_worst":
        stats["pairs"] = len(pairs)
    names = sorted({s for g in groups for s in g["sources"]})
    for name in names:  # each source's mean score, and its counts (a judge's unparsable / cached judgements)
        stats[f"reward/{name}"] = mean([x for g in groups for x in g["sources"].get(name, [])])
    for key, v in sorted((source_counts or {}).items()):
        stats[f"reward/{key}"] = v
    if selected:  # a round that selected nothing stays incomplete: the error below says what to change
        _write_json(rdir / GENERATED, stats)  # last: the round's generation is complete
    else:
        _write_json(rdir / "stats.json", stats)
    return stats


def selection_threshold(rs: Any) -> float | None:
    """The threshold a prompt's best must clear: rejection_sampling.threshold, or (null) the reward's known
    maximum (exact_match and the like: 1.0, a right answer), or none (reward models, user code, "none")."""
    from llmtune.rewards import reward_maximum

    if rs.threshold == "none":
        return None
    return float(rs.threshold) if rs.threshold is not None else reward_maximum(rs.reward)


def _is_match_source(name: str) -> bool:
    """A rule source whose 1.0 means the answer is right (exact_match, gsm8k), whatever its prefix."""
    tail = name.replace(":", "/").split("/")[-1]
    return tail in ("exact_match", "gsm8k")


def _stats_line(s: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    parts = [
        f"round {s['round']}: {s['prompts']} prompts, {s['samples']} samples",
        f"mean reward {f(s['mean_reward'])}",
        f"mean best {f(s['mean_best_reward'])}",
        f"kept {s['kept']} ({f(s['kept_fraction'])})",
        f"no spread {s['no_spread']}",
        f"under threshold {s['under_threshold']} "
        + (f"(threshold {f(s['threshold'])})" if s["threshold"] is not None else "(no threshold)")
        + (f", empty {s['empty']}" if s["empty"] else ""),
        f"exact match {f(s['exact_match'])}",
        f"length {f(s['mean_completion_tokens'])} tokens",
        f"ended {f(s['ended_fraction'])}",
    ]
    if "pairs" in s:
        parts.append(f"pairs {s['pairs']}")
    for key in sorted(k for k in s if k.startswith("reward/") and k.endswith("/unparsable")):
        parts.append(f"{key[len('reward/') : -len('/unparsable')]} unparsable {s[key]:.0f}")
    return " | ".join(parts) + f" ({s['seconds']:.0f} s)"


def _write_rounds(out: Path, rounds: int) -> None:
    """rounds.jsonl from the rounds' generated.json (rebuilt, so a rerun never repeats a line)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        lines = []
        for k in range(1, rounds + 1):
            f = round_dir(out, k) / GENERATED
            if f.is_file():
                lines.append(json.loads(f.read_text()))
        _write_jsonl(out / "rounds.jsonl", lines)


# ------------------------------------------------------------------------------------------------ outputs


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


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
    staging = out / ".export-in-progress"
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
    _write_jsonl(staging / "metrics.jsonl", metrics)
    from llmtune.engine.card import write_model_card

    runs = [RunManifest.read(round_dir(out, k) / MODEL_DIR) or RunManifest() for k in range(1, rounds + 1)]
    state = runs[-1].trainer_state or {}
    write_model_card(
        staging,
        recipe,
        steps=sum(m.steps or 0 for m in runs),
        metrics=state.get("eval_metrics") if isinstance(state.get("eval_metrics"), dict) else None,
        what=f"Rejection sampling: {rounds} round(s) of sampling answers to the prompts, scoring them, keeping "
        "the best and fine-tuning on them (sft). This is the last round's model.",
    )
    names = []
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if entry.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        names.append(entry.name + ("/" if entry.is_dir() else ""))
        os.replace(entry, target)
    staging.rmdir()
    return names


__all__ = ["read_prompts", "run_rejection_sampling", "sft_recipe"]


class RejectionSamplingStage:
    """Found by name like every stage; it runs rounds (each one's sft on the trainer) instead of one trainer
    loop, so ``llmtune.stages.run_stage`` calls its ``run``."""

    name = "rejection_sampling"

    def run(self, recipe: RejectionSamplingRecipe, local_rank: int | None = None, **options: Any) -> None:
        run_rejection_sampling(recipe, local_rank=local_rank, **options)


STAGE = RejectionSamplingStage
