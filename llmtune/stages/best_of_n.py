"""One round of best-of-N, rejection sampling's generation: sample ``num_samples`` completions per prompt with
the round's model, score them with the rewards, keep each prompt's best (when it beats the prompt's worst and
clears the threshold), and write the round's files (samples.jsonl, selected.jsonl, pairs.jsonl, then
generated.json last). Under torchrun every process samples and scores its share of the prompts; rank 0
gathers them and writes the files while the others wait. The rounds are stages/rejection_sampling.py."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmtune.engine.distributed import DistInfo, barrier
from llmtune.errors import DataError
from llmtune.model.load import inference_dtype
from llmtune.objectives.rl import best_of_n
from llmtune.recipe.stages import RejectionSamplingRecipe

GENERATED = "generated.json"  # written last in a round directory: its generation is complete
PAIRS = "pairs.jsonl"  # a round's {prompt, chosen, rejected} rows: best vs worst of each kept prompt


def writes_pairs(rs: Any) -> bool:
    """Whether a round writes pairs.jsonl: asked for (selection best_and_worst) or trained on (train_with dpo)."""
    return bool(rs.selection == "best_and_worst" or rs.train_with == "dpo")


@dataclass
class Sampled:
    """This process's completions of a round, n per prompt in prompt order."""

    completions: list[str]
    ended: list[bool]
    lengths: list[int]
    seconds: float  # loading the model and sampling


def generate_round(
    recipe: RejectionSamplingRecipe,
    prompts: list[Any],
    k: int,
    rdir: Path,
    model_path: str,
    dist: DistInfo,
    console: Console,
    trust_reward_code: bool,
) -> dict[str, Any]:
    """Sample, score and select for round k; rank 0 writes the round's files (generated.json last)."""
    n = recipe.rejection_sampling.num_samples
    round_prompts = _round_prompts(recipe, prompts, k)
    mine = _shard(round_prompts, dist)
    t0 = time.perf_counter()
    dtype = inference_dtype(recipe.precision, dist.device)
    sampled = _sample(recipe, round_prompts, mine, k, model_path, dtype, dist, console)
    totals, per_source, counts = _score(recipe, mine, sampled, dtype, dist, trust_reward_code)
    groups = []
    for i in range(len(mine)):
        sl = slice(i * n, (i + 1) * n)
        groups.append(
            {
                "completions": sampled.completions[sl],
                "ended": sampled.ended[sl],
                "lengths": sampled.lengths[sl],
                "totals": [float(x) for x in totals[sl]],
                "sources": {s: [float(x) for x in v[sl]] for s, v in per_source.items()},
            }
        )
    groups = _gather(groups, dist, len(round_prompts))
    counts = _sum_counts(counts, dist)
    stats: dict[str, Any] = {}
    if dist.is_main:
        seconds = time.perf_counter() - t0
        stats = select_and_write(recipe, round_prompts, groups, k, rdir, seconds, sampled.seconds, counts)
        console.print(_stats_line(stats))
    barrier()
    if not dist.is_main:
        done = rdir / GENERATED
        stats = json.loads((done if done.is_file() else rdir / "stats.json").read_text())
    if stats["kept"] == 0:
        raise _nothing_kept(stats, k, rdir, n)
    return stats


def _round_prompts(recipe: RejectionSamplingRecipe, prompts: list[Any], k: int) -> list[Any]:
    """The prompts round k samples: all, or rejection_sampling.max_prompts of them drawn by the round's seed."""
    rs = recipe.rejection_sampling
    chosen = list(range(len(prompts)))
    if rs.max_prompts is not None and rs.max_prompts < len(prompts):
        chosen = sorted(random.Random(recipe.seed + k).sample(chosen, rs.max_prompts))
    return [prompts[i] for i in chosen]


def _sample(
    recipe: RejectionSamplingRecipe,
    round_prompts: list[Any],
    mine: list[Any],
    k: int,
    model_path: str,
    dtype: torch.dtype,
    dist: DistInfo,
    console: Console,
) -> Sampled:
    """num_samples completions of each of this process's prompts by the round's model (freed afterwards)."""
    from llmtune.data.chat import resolve_chat_template
    from llmtune.data.prompts import render_prompt
    from llmtune.generation.sample import GenerationProgress, end_tokens, generation_batch, rollout
    from llmtune.model.tokenizer import load_tokenizer

    gen, n = recipe.generation, recipe.rejection_sampling.num_samples
    tokenizer = load_tokenizer(recipe.model.model_copy(update={"path": model_path}) if k > 1 else recipe.model)
    template = resolve_chat_template(tokenizer, recipe.model.chat_template, required=True)
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
    return Sampled(completions, [e for _, e in outs], [len(o) for o, _ in outs], time.perf_counter() - t0)


def _score(
    recipe: RejectionSamplingRecipe,
    mine: list[Any],
    sampled: Sampled,
    dtype: torch.dtype,
    dist: DistInfo,
    trust_reward_code: bool,
) -> tuple[list[float], dict[str, list[float]], dict[str, float]]:
    """The rewards' total and per-source scores of every completion, and the sources' counts (a judge's
    unparsable / cached judgements); the reward models are freed afterwards."""
    from llmtune.rewards import build_rewards

    rs, n = recipe.rejection_sampling, recipe.rejection_sampling.num_samples
    rewards = build_rewards(
        rs.reward, trust_code=trust_reward_code, device=dist.device, dtype=dtype, what="rejection_sampling.reward"
    )
    try:
        if not sampled.completions:
            return [], {}, {}
        res = rewards(
            [p.messages for p in mine for _ in range(n)],
            sampled.completions,
            [p.answer for p in mine for _ in range(n)],
            sampled.ended,
        )
        return list(res.total), {s: list(v) for s, v in res.per_source.items()}, dict(res.stats)
    finally:
        rewards.close()


def _nothing_kept(stats: dict[str, Any], k: int, rdir: Path, n: int) -> DataError:
    return DataError(
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


def _sum_counts(mine: dict[str, float], dist: DistInfo) -> dict[str, float]:
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


@dataclass
class Selection:
    """What a round keeps: per prompt its best completion as a messages row (and with best_and_worst its
    chosen / rejected pair), the best totals, and why the others were left out."""

    selected: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pairs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_totals: list[float] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"no_spread": 0, "under_threshold": 0, "empty": 0}
    )


def select_and_write(
    recipe: RejectionSamplingRecipe,
    prompts: list[Any],
    groups: list[dict[str, Any]],
    k: int,
    rdir: Path,
    seconds: float,
    gen_seconds: float,
    source_counts: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Select each prompt's best, write the round's files, and return its statistics (generated.json, written
    last, only when some prompt was kept; stats.json otherwise)."""
    rs = recipe.rejection_sampling
    threshold = selection_threshold(rs)
    samples = [row for p, g in zip(prompts, groups, strict=True) for row in _sample_rows(k, p, g)]
    sel = _select(prompts, groups, threshold, writes_pairs(rs))
    rdir.mkdir(parents=True, exist_ok=True)
    write_jsonl(rdir / "samples.jsonl", samples)
    write_jsonl(rdir / "selected.jsonl", sel.selected)
    if writes_pairs(rs):
        write_jsonl(rdir / PAIRS, sel.pairs)
    all_totals = [x for g in groups for x in g["totals"]]
    lengths = [x for g in groups for x in g["lengths"]]
    ended = [e for g in groups for e in g["ended"]]
    match = [x for g in groups for s, v in g["sources"].items() if _is_match_source(s) for x in v]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    stats = {
        "round": k,
        "prompts": len(prompts),
        "samples": len(samples),
        "mean_reward": mean(all_totals),
        "mean_best_reward": mean(sel.best_totals),
        "max_reward": max(all_totals) if all_totals else None,
        "kept": len(sel.selected),
        "kept_fraction": len(sel.selected) / len(prompts) if prompts else 0.0,
        **sel.counts,
        "threshold": threshold,
        "exact_match": mean(match),
        "mean_completion_tokens": mean(lengths),
        "ended_fraction": mean([float(e) for e in ended]),
        "generate_seconds": round(gen_seconds, 2),
        "seconds": round(seconds, 2),
    }
    if writes_pairs(rs):
        stats["pairs"] = len(sel.pairs)
    names = sorted({s for g in groups for s in g["sources"]})
    for name in names:  # each source's mean score, and its counts (a judge's unparsable / cached judgements)
        stats[f"reward/{name}"] = mean([x for g in groups for x in g["sources"].get(name, [])])
    for key, v in sorted((source_counts or {}).items()):
        stats[f"reward/{key}"] = v
    if sel.selected:  # a round that selected nothing stays incomplete: the error says what to change
        write_json(rdir / GENERATED, stats)  # last: the round's generation is complete
    else:
        write_json(rdir / "stats.json", stats)
    return stats


def _sample_rows(k: int, p: Any, g: dict[str, Any]) -> list[dict[str, Any]]:
    """samples.jsonl's lines for one prompt: every completion with its rewards."""
    return [
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
            "total": g["totals"][j],
        }
        for j, c in enumerate(g["completions"])
    ]


def _select(prompts: list[Any], groups: list[dict[str, Any]], threshold: float | None, pairs: bool) -> Selection:
    """Per prompt (objectives.rl.best_of_n): its best completion, kept when it beats the prompt's worst, clears
    the threshold and is not empty."""
    sel = Selection()
    for p, g in zip(prompts, groups, strict=True):
        totals = g["totals"]
        if not totals:
            continue
        pick = best_of_n(torch.tensor([totals], dtype=torch.float64), threshold)
        best, worst = int(pick["best"][0]), int(pick["worst"][0])
        sel.best_totals.append(totals[best])
        if not pick["spread"][0]:
            sel.counts["no_spread"] += 1
            continue
        if not pick["clears"][0]:
            sel.counts["under_threshold"] += 1
            continue
        content = g["completions"][best]
        if not content.strip():
            sel.counts["empty"] += 1
            continue  # sft cannot learn an empty reply
        sel.selected.append({"messages": [*p.messages, {"role": "assistant", "content": content}]})
        if pairs:
            sel.pairs.append({"prompt": p.messages, "chosen": content, "rejected": g["completions"][worst]})
    return sel


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


# ------------------------------------------------------------------------------------------------ outputs


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)
