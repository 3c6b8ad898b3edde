"""Row filters applied before training: exact / near-duplicate removal, token length bounds, and perplexity.

Dedup compares a row's *prompt text*: the contents of its user turns joined by newlines (alpaca: instruction
and input; sharegpt / messages: every user / human turn), or the text of a text row. Two rows are exact
duplicates when their prompt texts are equal after lowercasing and collapsing whitespace; near duplicates
when the Jaccard similarity of their word 3-gram sets is at least the threshold. Near duplicates are found
with MinHash (128 fixed hash functions, 32 bands of 4: a pair at Jaccard 0.7 becomes a candidate with
probability 0.9998) and every candidate is confirmed with the exact Jaccard, so no row is dropped on an
estimate. The training sources are deduplicated together, in the recipe's order (a row of a later source
that repeats a row of an earlier one is dropped from the later), and the eval sources together; the first
row of a group is kept.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from llmtune.data.formats import RowError, to_conversation, to_text

EXACT_DUPLICATE = "exact duplicate of an earlier row (data.dedup)"
NGRAM = 3
NUM_PERM = 128
BANDS = 32
_MERSENNE = (1 << 31) - 1
_WORD = re.compile(r"\w+", re.UNICODE)


def is_filter_reason(reason: str) -> bool:
    """A drop reason of data.dedup or data.filter (a usable row filtered out, not a bad row)."""
    return "data.dedup)" in reason or "data.filter." in reason


def near_reason(threshold: float) -> str:
    return f"near duplicate of an earlier row (word {NGRAM}-gram Jaccard >= {threshold:g}, data.dedup)"


def length_reason(bound: str, n: int) -> str:
    return f"longer than data.filter.max_tokens={n}" if bound == "max" else f"shorter than data.filter.min_tokens={n}"


def prompt_text(row: dict[str, Any], fmt: str, system: str | None = None) -> str:
    """The text dedup compares: the user turns of a conversation (joined by newlines), or a text row's text."""
    if fmt == "text":
        return to_text(row)
    conv = to_conversation(row, fmt, default_system=system)
    return "\n".join(m["content"] for m in conv.messages if m["role"] == "user")


def normalize(text: str) -> str:
    return " ".join(text.casefold().split())


def shingles(text: str, n: int = NGRAM) -> frozenset[int]:
    """The set of word n-grams of a text (lowercased words), each as a stable 64-bit hash; a text of fewer than
    n words is one shingle of all its words."""
    words = _WORD.findall(text.casefold())
    grams = [words[i : i + n] for i in range(max(1, len(words) - n + 1))]
    return frozenset(
        int.from_bytes(hashlib.blake2b(" ".join(g).encode(), digest_size=8).digest(), "little") for g in grams
    )


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class Deduper:
    """Feed rows' prompt texts in order; ``check`` returns the drop reason of a duplicate of an earlier kept
    row, or None (and remembers the row) for a new one.

    >>> d = Deduper("exact")
    >>> d.check("Hello  World"), d.check("hello world"), d.check("hello there")
    (None, 'exact duplicate of an earlier row (data.dedup)', None)
    """

    def __init__(self, mode: str, threshold: float = 0.7) -> None:
        self.mode, self.threshold = mode, threshold
        self.seen: set[str] = set()
        self.kept: list[frozenset[int]] = []
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(BANDS)]
        rng = np.random.default_rng(1234)  # fixed: the same file always keeps the same rows
        self.a = rng.integers(1, _MERSENNE, NUM_PERM, dtype=np.uint64)
        self.b = rng.integers(0, _MERSENNE, NUM_PERM, dtype=np.uint64)

    def signature(self, grams: frozenset[int]) -> np.ndarray:
        """MinHash: per hash function h_k(x) = (a_k * x + b_k) mod (2^31 - 1), the minimum over the shingles
        (a_k, b_k, x < 2^31: the products fit in 64 bits)."""
        p = np.uint64(_MERSENNE)
        x = np.array(sorted(grams), dtype=np.uint64) % p
        return ((self.a[:, None] * x[None, :] + self.b[:, None]) % p).min(axis=1)

    def check(self, text: str) -> str | None:
        key = normalize(text)
        if key in self.seen:
            return EXACT_DUPLICATE
        if self.mode == "exact":
            self.seen.add(key)
            return None
        grams = shingles(text)
        sig = self.signature(grams)
        rows = NUM_PERM // BANDS
        bands = [sig[i * rows : (i + 1) * rows].tobytes() for i in range(BANDS)]
        candidates = {j for band, bucket in zip(bands, self.buckets, strict=True) for j in bucket.get(band, ())}
        for j in sorted(candidates):
            if jaccard(grams, self.kept[j]) >= self.threshold:
                return near_reason(self.threshold)
        self.seen.add(key)
        index = len(self.kept)
        self.kept.append(grams)
        for band, bucket in zip(bands, self.buckets, strict=True):
            bucket.setdefault(band, []).append(index)
        return None


def length_check(n: int, min_tokens: int | None, max_tokens: int | None) -> None:
    """Raise RowError for a row of n tokens outside the bounds of data.filter."""
    if max_tokens is not None and n > max_tokens:
        raise RowError(length_reason("max", max_tokens))
    if min_tokens is not None and n < min_tokens:
        raise RowError(length_reason("min", min_tokens))


# --- perplexity ---------------------------------------------------------------------------------------------


def perplexity_reason(side: str, fraction: float) -> str:
    which = "lowest" if side == "low" else "highest"
    return f"perplexity in the {which} {fraction:g} (data.filter.perplexity.drop_{side})"


def select_by_perplexity(scores: dict[int, float], drop_low: float, drop_high: float) -> tuple[set[int], set[int]]:
    """The keys with the lowest round(drop_low * n) and highest round(drop_high * n) scores (ties broken by
    key, so the choice is deterministic)."""
    order = sorted(scores, key=lambda k: (scores[k], k))
    n = len(order)
    n_low, n_high = round(drop_low * n), round(drop_high * n)
    if n_low + n_high >= n:
        n_high = max(0, n - 1 - n_low)
    low = set(order[:n_low])
    high = set(order[n - n_high :]) if n_high else set()
    return low, high


def score_nll(
    model: Any, items: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int
) -> list[tuple[float, int]]:
    """(summed NLL, count) over the learned tokens of each (input_ids, labels) item (labels != -100, each token
    predicted from the tokens before it, as the training loss is computed); exp(sum / count) is its perplexity."""
    import torch

    from llmtune.objectives.logprobs import hidden_states_as_logits, token_logps_from_hidden

    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (i, lab) in enumerate(chunk):
            ids[r, : len(i)], labels[r, : len(lab)], mask[r, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
        with torch.no_grad():
            with hidden_states_as_logits(model) as head:  # the head per chunk of positions: no (B, T, V) logits
                hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logp, learned, _ = token_logps_from_hidden(hidden, labels.to(device), head)  # (B, T-1) each
        out.extend(zip((-logp.sum(1)).tolist(), learned.sum(1).long().tolist(), strict=True))
    return out


def model_scorer(recipe: Any, tokenizer: Any) -> Callable[[list[Any]], list[tuple[float, int]]]:
    """The scorer of data.filter.perplexity: loads its model (model: or model.path) only when called (a cache
    miss), scores the examples and frees it."""
    cfg = recipe.data.filter.perplexity

    def score(examples: list[Any]) -> list[tuple[float, int]]:
        import torch
        from transformers import AutoModelForCausalLM

        from llmtune.errors import DataError

        path = cfg.model or recipe.model.path
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            device, dtype = torch.device("cpu"), torch.float32
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                revision=recipe.model.revision if cfg.model is None else None,
                trust_remote_code=recipe.model.trust_remote_code,
            )
        except (OSError, ValueError) as e:
            raise DataError(
                f"data.filter.perplexity.model {path}: cannot load it ({str(e).splitlines()[0]})",
                hint="give a causal LM directory or hub id that shares the training tokenizer",
            ) from None
        vocab = model.get_input_embeddings().num_embeddings
        top = max((max(e.input_ids) for e in examples), default=0)
        if top >= vocab:
            raise DataError(
                f"data.filter.perplexity.model {path} has {vocab} token embeddings but the data has token id {top}",
                hint="score with a model that uses the training tokenizer (or model: null for the trained model)",
            )
        model.to(device).eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # longest first: batches of similar lengths pad less; the scores go back in the examples' order
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
        scored = score_nll(model, [(examples[i].input_ids, examples[i].labels) for i in order], cfg.batch_size, pad)
        out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
        for i, v in zip(order, scored, strict=True):
            out[i] = v
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return out

    return score
