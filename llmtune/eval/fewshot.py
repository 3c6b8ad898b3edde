"""Few-shot example selection: for each input, the k pool examples most similar to it (Jaccard / IoU of
their sets of word tokens), or k seeded random ones. An input never gets itself as an example."""

from __future__ import annotations

import random
import re

_WORD = re.compile(r"\w+")


def word_set(text: str) -> frozenset[str]:
    return frozenset(w.lower() for w in _WORD.findall(text))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b| (0 when both are empty)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def select_examples(
    queries: list[str],
    pool: list[str],
    k: int,
    method: str = "jaccard",
    seed: int = 0,
    exclude: list[int | None] | None = None,
) -> list[list[int]]:
    """For each query, the indices of k pool entries: highest Jaccard first (ties: lower index first),
    or k random ones (seeded per query). ``exclude[i]``: a pool index query i must not get (itself,
    when the pool is drawn from the same data), or None."""
    if k <= 0:
        return [[] for _ in queries]
    pool_sets = [word_set(p) for p in pool]
    chosen: list[list[int]] = []
    for i, q in enumerate(queries):
        skip = exclude[i] if exclude is not None else None
        candidates = [j for j in range(len(pool)) if j != skip]
        if method == "random":
            chosen.append(random.Random(seed * 1_000_003 + i).sample(candidates, min(k, len(candidates))))
            continue
        qs = word_set(q)
        ranked = sorted(candidates, key=lambda j: (-jaccard(qs, pool_sets[j]), j))
        chosen.append(ranked[:k])
    return chosen
