"""Write arithmetic prompts for the online-stage demonstration (scripts/online_demo.sh): a training file and a
held-out file whose questions never occur in training.

    python scripts/make_arith_data.py OUT_DIR [--task add|mul] [--train N] [--held N] [--seed S]

Each row is ``{"prompt": "What is 47 + 38? Answer with the number.", "answer": "85"}``, the ``prompts`` shape
the online stages read; the rule ``gsm8k`` scores a reply by its last number, so "47 + 38 = 85" is right and a
reply that rambles on to another number is wrong. Tasks:

- ``add``: two two-digit numbers (8100 questions);
- ``mul``: a one- or two-digit number times a one-digit number (2-19 x 2-9, 144 questions; held-out pairs are
  ones whose order-swapped twin is not in training either).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def questions(task: str) -> list[tuple[tuple[int, int], str, str]]:
    """Every question of ``task``: (its number pair, the prompt, the answer)."""
    if task == "add":
        pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
        return [((a, b), f"What is {a} + {b}? Answer with the number.", str(a + b)) for a, b in pairs]
    if task == "mul":
        pairs = [(a, b) for a in range(2, 20) for b in range(2, 10)]
        return [((a, b), f"What is {a} times {b}? Answer with the number.", str(a * b)) for a, b in pairs]
    raise SystemExit(f"unknown task {task!r}: use add or mul")


def split(task: str, n_train: int, n_held: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, held) rows: a held-out question's numbers never occur as a training pair, either order."""
    rng = random.Random(seed)
    rows = questions(task)
    rng.shuffle(rows)
    held, held_pairs = [], set()
    for pair, prompt, answer in rows:
        if len(held) == n_held:
            break
        held.append({"prompt": prompt, "answer": answer})
        held_pairs |= {pair, pair[::-1]}
    rest = [{"prompt": p, "answer": a} for pair, p, a in rows if pair not in held_pairs]
    if len(rest) < n_train:
        raise SystemExit(f"task {task} has {len(rest)} questions left for training, fewer than --train {n_train}")
    return rest[:n_train], held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--task", default="add")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--held", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train, held = split(args.task, args.train, args.held, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("held.jsonl", held)):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{args.out}: {len(train)} training and {len(held)} held-out {args.task} questions")


if __name__ == "__main__":
    main()
