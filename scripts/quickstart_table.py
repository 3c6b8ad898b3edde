#!/usr/bin/env python3
"""The quickstart pipeline's table: for each stage its wall time and the metric it exists to move, measured
on held-out rows (recipes/quickstart/facts, made by scripts/make_pipeline_data.py), before and after.

    python scripts/quickstart_table.py OUT      # OUT: what scripts/quickstart.sh ran the pipeline into

cpt: perplexity of held-out text; sft: exact match on held-out questions (phrasings no stage trained on);
rm: pair accuracy on held-out pairs, and how often it scores an empty reply above the right answer;
dpo / grpo / ppo / rejection sampling: the reward model's mean score and exact match of greedy answers to
the held-out questions, against the sft model they start from. Every generating row also shows the share
of empty and of truncated (never ended) answers: a stage whose answers degenerate fails its check however
its metric moved. Writes OUT/table.json and OUT/table.md; exits 1 when a check fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "recipes" / "quickstart" / "facts"
BASE = ROOT / "recipes" / "quickstart" / "model"
ALIGN = ("dpo", "grpo", "ppo", "rejection_sampling")
DEGENERATE = 0.2  # more empty or truncated answers than this share fails a stage
NOISE = 2  # held-out rows: a change of fewer than this many rows is noise


def llmtune_eval(out: Path, name: str, *args: str) -> dict:
    """An `llmtune eval` report (run once; a later call reads it back)."""
    report = out / f"eval-{name}.json"
    if not report.is_file():
        tmp = out / f"eval-{name}.tmp.json"
        cmd = [sys.executable, "-m", "llmtune", "eval", *args, "--output", str(tmp)]
        cmd += ["--generations", str(out / f"eval-{name}.generations.jsonl")]  # beside the report, not the tmp
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"quickstart table: `{' '.join(cmd)}` failed with exit code {proc.returncode}")
        tmp.replace(report)
    return json.loads(report.read_text())


def empty_preferred(rm: Path) -> float:
    """The share of held-out questions on which the reward model scores an empty reply above the right one."""
    import torch

    from llmtune.rewards.model import RewardModelSource
    from llmtune.runtime import quiet_libraries

    quiet_libraries()  # transformers' weight-loading bar and notes, as in every llmtune command

    rows = [json.loads(line) for line in (FACTS / "held.jsonl").read_text().splitlines()]
    source = RewardModelSource(str(rm), device="cpu", dtype=torch.float32)
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    right = source.score(prompts, [r["answer"] for r in rows], [None] * len(rows))
    empty = source.score(prompts, [""] * len(rows), [None] * len(rows))
    source.close()
    return sum(e > r for e, r in zip(empty, right, strict=True)) / len(rows)


def seconds(out: Path) -> dict[str, float]:
    """Each stage's training + merge wall time from pipeline.tsv (the last run that did the work)."""
    done: dict[str, float] = {}
    tsv = out / "pipeline.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        stage, secs, how = line.split("\t")
        if how != "ran":
            continue
        if stage.startswith("merge-"):  # the merge after the stage's training
            key = stage.removeprefix("merge-")
            done[key] = done.get(key, 0.0) + float(secs)
        else:
            done[stage] = float(secs)
    return done


def rm_score(report: dict) -> float:
    """The reward model's mean score in a `--task reward` report (its one source that is not the rule)."""
    return next(v["mean"] for k, v in report["rewards"].items() if k != "exact_match")


def gen_shape(report: dict) -> str:
    return f"empty {report['empty_share']:.0%}, truncated {report['truncated_share']:.0%}"


def degenerate(report: dict) -> str | None:
    if report["empty_share"] > DEGENERATE:
        return f"{report['empty_share']:.0%} empty answers"
    if report["truncated_share"] > DEGENERATE:
        return f"{report['truncated_share']:.0%} answers never end"
    return None


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart-pipeline")
    held, n = FACTS / "held.jsonl", len((FACTS / "held.jsonl").read_text().splitlines())
    noise = NOISE / n
    secs = seconds(out)
    rows: list[dict] = []

    def row(stage: str, metric: str, start: float, after: float, better: str, extra: str, problem: str | None):
        rows.append(
            {
                "stage": stage,
                "seconds": round(secs.get(stage, 0.0), 1),
                "metric": metric,
                "start": round(start, 4),
                "after": round(after, 4),
                "better": better,
                "outputs": extra,
                "check": "ok" if problem is None else f"FAIL: {problem}",
            }
        )

    # cpt: held-out perplexity, the tiny random model vs after cpt
    text = ("--task", "perplexity", "--data", str(FACTS / "cpt_held.txt"), "--format", "text")
    ppl0 = llmtune_eval(out, "base-perplexity", "--model", str(BASE), *text)["perplexity"]
    ppl1 = llmtune_eval(out, "cpt-perplexity", "--model", str(out / "cpt"), *text)["perplexity"]
    row("cpt", "held-out perplexity", ppl0, ppl1, "lower", "", None if ppl1 < 0.7 * ppl0 else "perplexity fell < 30%")

    # sft: held-out exact match, the cpt model vs the sft model
    gen = ("--data", str(held), "--max-new-tokens", "8")
    em0 = llmtune_eval(out, "cpt-generate", "--model", str(out / "cpt"), "--task", "generate", *gen)
    sft = json.loads((out / "eval-sft.json").read_text())
    sft_em, sft_rm = sft["rewards"]["exact_match"]["mean"], rm_score(sft)
    problem = degenerate(sft) or (None if sft_em >= em0["exact_match"] + 0.2 else "exact match rose < 20 points")
    row("sft", "held-out exact match", em0["exact_match"], sft_em, "higher", gen_shape(sft), problem)

    # rm: held-out pair accuracy, and whether it prefers saying nothing
    pref = llmtune_eval(out, "rm-preference", "--model", str(out / "rm"), "--task", "preference", "--data",
                        str(FACTS / "pairs_held.jsonl"))  # fmt: skip
    empty = empty_preferred(out / "rm")
    problem = None
    if pref["accuracy"] < 0.65:  # chance is 0.5; held-out pairs ask phrasings no stage trained on
        problem = "pair accuracy < 65%"
    elif empty > 0.1:
        problem = f"scores an empty reply above the right answer on {empty:.0%} of prompts"
    row("rm", "held-out pair accuracy", 0.5, pref["accuracy"], "higher", f"prefers empty: {empty:.0%}", problem)

    # alignment: each against the sft model, on its own objective (and exact match must not collapse)
    for stage in ALIGN:
        report = out / f"eval-{stage}.json"
        if not report.is_file():
            continue
        r = json.loads(report.read_text())
        em, rm = r["rewards"]["exact_match"]["mean"], rm_score(r)
        target = "exact match" if stage in ("grpo", "rejection_sampling") else "reward-model score"
        start, after = (sft_em, em) if target == "exact match" else (sft_rm, rm)
        problem = degenerate(r)
        if problem is None and after < start - (noise if target == "exact match" else 0.0):
            problem = f"{target} fell"
        if problem is None and em < sft_em - 0.1:
            problem = f"exact match fell from {sft_em:.0%} to {em:.0%}"
        extra = f"{gen_shape(r)}; exact match {em:.0%} (sft {sft_em:.0%})" if target != "exact match" else gen_shape(r)
        row(stage, f"held-out {target}", start, after, "higher", extra, problem)

    lines = [
        "| stage | seconds | metric (held-out) | start | after | outputs | check |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        arrow = "down" if r["better"] == "lower" else "up"
        lines.append(
            f"| {r['stage']} | {r['seconds']:.0f} | {r['metric']} ({arrow} is better) | {r['start']:.3g} | "
            f"{r['after']:.3g} | {r['outputs']} | {r['check']} |"
        )
    note = (
        f"{n} held-out questions: a change of fewer than {NOISE} of them ({noise:.1%}) is noise; "
        f"total training + merge time {sum(r['seconds'] for r in rows):.0f} s"
    )
    table = "\n".join(lines) + "\n\n" + note + "\n"
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)
    failed = [r["stage"] for r in rows if r["check"] != "ok"]
    if failed:
        print(f"quickstart: the check failed for {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
