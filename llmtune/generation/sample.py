"""Batched generation with left padding: greedy (temperature 0) or sampling, seeded per batch so that
the result does not depend on what ran before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the generation config's and the tokenizer's (e.g. <|im_end|> and <|endoftext|>)."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for x in eos if isinstance(eos, list) else [eos]:
        if x is not None and x not in ids:
            ids.append(int(x))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so that every row ends where generation starts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Completions (token ids, without the stop token) for each prompt (token ids), in order.

    Batch b is sampled with torch seed ``seed + b``: the same inputs, seed and batch size give the same
    completions on the same device. ``on_batch(n)`` is called after each batch (progress bars).
    """
    device = device or next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    model.eval()
    out: list[list[int]] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start : start + batch_size]
        ids, mask = left_pad(chunk, pad)
        torch.manual_seed(seed + b)
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        else:
            sampling.update({"temperature": None, "top_p": None, "top_k": None})
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stops or None,
            pad_token_id=pad,
            **sampling,
        )
        for row in gen[:, ids.shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
        if on_batch is not None:
            on_batch(len(chunk))
    return out
