"""Packing and batching: examples become training rows (one each, or several packed into one row with their
position ids) and rows become right-padded batches."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from llmtune.data.chat import IGNORE_INDEX
from llmtune.data.pipeline import Example


@dataclass
class Sample:
    """One training row: token ids, labels, and position ids when several examples share the row."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None


def as_samples(examples: list[Example]) -> list[Sample]:
    return [Sample(e.input_ids, e.labels) for e in examples]


def pack_stream(examples: list[Example], max_length: int) -> list[Sample]:
    """cpt packing: concatenate the documents (each ends in EOS) and cut into max_length rows."""
    ids = [t for e in examples for t in e.input_ids]
    rows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [Sample(r, list(r)) for r in rows if len(r) >= 2]


def pack_examples(examples: list[Example], max_length: int, seed: int) -> list[Sample]:
    """sft packing: first-fit-decreasing into rows of max_length; position ids restart per example, so
    that attention (flash-attention varlen, or transformers' packed-sequence mask) keeps examples apart."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for b, space in enumerate(free):
            if space >= n:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(max_length - n)
    random.Random(seed).shuffle(bins)
    samples = []
    for b in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in b:
            e = examples[i]
            ids += e.input_ids
            # the first token of an example is never predicted from the previous example
            labels += [IGNORE_INDEX, *e.labels[1:]]
            pos += list(range(len(e.input_ids)))
        samples.append(Sample(ids, labels, pos))
    return samples


def collate(samples: list[Sample], pad_id: int, pad_to_multiple: int = 8) -> dict[str, Any]:
    """Right-pad to the longest row (rounded up to a multiple of 8). Packed rows carry position_ids and no
    attention_mask; the padding then forms its own trailing segment, whose labels are ignored."""
    import torch

    longest = max(len(s.input_ids) for s in samples)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    n = len(samples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    packed = any(s.position_ids is not None for s in samples)
    mask = torch.zeros((n, width), dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    for r, s in enumerate(samples):
        k = len(s.input_ids)
        ids[r, :k] = torch.tensor(s.input_ids)
        labels[r, :k] = torch.tensor(s.labels)
        mask[r, :k] = 1
        if packed:
            p = s.position_ids if s.position_ids is not None else list(range(k))
            pos[r, :k] = torch.tensor(p)
            pos[r, k:] = torch.arange(width - k)
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = mask
    return batch
