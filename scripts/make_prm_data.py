"""Write recipes/data/prm/arith_chains.jsonl: generated arithmetic chains with step labels, the demo data of
recipes/prm.yaml (a process reward model). Run from the repository root; the output is committed.

Each row is TRL's stepwise shape ``{prompt, completions, labels}``: a start number and a chain of small
operations ("3+4=7", "7*2=14", ...), each step applied to the previous result. In half the chains one step's
result is wrong (off by 1-3); the chain stops at that step (as PRM800K's chains stop at their first bad step),
labelled false, every step before it true. The rows are also given to ``llmtune train`` tests, which import
``chains`` from here.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "recipes" / "data" / "prm" / "arith_chains.jsonl"


def step(rng: random.Random, value: int, small: bool = False) -> tuple[str, int]:
    """One operation on value: (its text without the result, the true result). small: single digits only
    (+ and - by 1-3, every value in 0-9: a table of about 50 facts, which the tests' tiny model can learn)."""
    if small:
        ops = [op for op in "+-" if (value + 3 <= 9 if op == "+" else value >= 3)]
        op, b = rng.choice(ops), rng.randint(1, 3)
        return f"{value}{op}{b}=", value + b if op == "+" else value - b
    op = rng.choice("+-*") if value <= 20 else rng.choice("+-")
    b = rng.randint(2, 3) if op == "*" else rng.randint(1, 9)
    if op == "-" and b > value:
        op = "+"
    result = value + b if op == "+" else value - b if op == "-" else value * b
    return f"{value}{op}{b}=", result


def chain(
    rng: random.Random, n_steps: int = 4, wrong: bool | None = None, small: bool = False, start: int | None = None
) -> dict:
    """One row: {prompt, completions, labels}; wrong: inject one wrong step (None: a coin flip); small: single
    digits (see step); start: the number to start from (None: drawn, 1-9)."""
    start = rng.randint(1, 9) if start is None else start
    wrong = rng.random() < 0.5 if wrong is None else wrong
    bad_at = rng.randrange(n_steps) if wrong else -1
    steps, labels, value = [], [], start
    for i in range(n_steps):
        text, result = step(rng, value, small)
        if i == bad_at:
            offsets = [d for d in (-3, -2, -1, 1, 2, 3) if not small or 0 <= result + d <= 9]
            result += rng.choice(offsets)
        steps.append(f"{text}{result}")
        labels.append(i != bad_at)
        value = result
        if i == bad_at:
            break
    return {"prompt": f"Start from {start} and compute step by step.", "completions": steps, "labels": labels}


def chains(n: int, seed: int = 0, n_steps: int = 4, small: bool = False) -> list[dict]:
    rng = random.Random(seed)
    return [chain(rng, n_steps, small=small) for _ in range(n)]


def main(n: int = 300) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in chains(n)), encoding="utf-8")
    print(f"{OUT.relative_to(ROOT)}: {n} rows, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
