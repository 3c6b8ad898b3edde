#!/usr/bin/env python3
"""The table of scripts/online_demo.sh: per online stage its wall time and the held-out accuracy (greedy, rule
gsm8k) of the model it wrote, against the start model's, with the ratio and the shares of empty and
truncated answers.

    python scripts/online_demo_table.py OUT [STAGE ...]      # environment: TARGET=1.3, DEGENERATE=0.2

Reads OUT/eval-base.json, OUT/eval-STAGE.json and OUT/times.tsv; writes OUT/table.md and OUT/table.json.
Exits 1 when a stage stays under TARGET (1.3x) its start, or when its answers degenerate (over 20% empty or
truncated where the start model had fewer).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TARGET = float(os.environ.get("TARGET", "1.3"))
DEGENERATE = float(os.environ.get("DEGENERATE", "0.2"))  # the share of empty or truncated answers that fails


def main(out: Path, stages: list[str]) -> int:
    base = json.loads((out / "eval-base.json").read_text())
    times = {}
    if (out / "times.tsv").is_file():
        for line in (out / "times.tsv").read_text().splitlines()[1:]:
            name, seconds = line.split("\t")
            times[name] = times.get(name, 0) + int(seconds)  # a resumed stage: its runs' sum
    rows, failed = [], []
    start = base["mean_reward"]
    for name in stages:
        f = out / f"eval-{name}.json"
        if not f.is_file():
            failed.append(f"{name}: no evaluation ({f} missing)")
            continue
        r = json.loads(f.read_text())
        ratio = r["mean_reward"] / start if start > 0 else None  # a start of 0: no ratio
        row = {
            "stage": name,
            "seconds": times.get(name),
            "start": start,
            "after": r["mean_reward"],
            "ratio": ratio,
            "empty": r["empty_share"],
            "truncated": r["truncated_share"],
            "rows": r["examples"],
        }
        rows.append(row)
        if TARGET > 0 and (ratio is None or ratio < TARGET):
            why = f"{ratio:.2f}x" if ratio is not None else "no ratio to a start of 0"
            failed.append(f"{name}: {start:.3f} -> {r['mean_reward']:.3f} is {why}, under {TARGET}x")
        for key in ("empty", "truncated"):
            if row[key] > DEGENERATE and row[key] > base[f"{key}_share"]:
                failed.append(f"{name}: {row[key]:.0%} {key} answers")
    lines = [
        f"| stage | seconds | held-out accuracy: start | after | ratio | empty | truncated (start {base['truncated_share']:.0%}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['seconds'] if r['seconds'] is not None else '-'} | {r['start']:.3f} | "
            f"{r['after']:.3f} | {'-' if r['ratio'] is None else format(r['ratio'], '.2f') + 'x'} | {r['empty']:.0%} | "
            f"{r['truncated']:.0%} |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps({"base": start, "held_out": base["examples"], "stages": rows}, indent=1))
    for f in failed:
        print(f"check failed: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    names = sys.argv[2:] or ["rejection_sampling", "iterative_dpo", "grpo", "ppo"]
    raise SystemExit(main(Path(sys.argv[1]), names))
