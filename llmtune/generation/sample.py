"""Batched generation with left padding: greedy (temperature 0) or sampling, seeded per batch so that
the result does not depend on what ran before.

``generate`` serves eval, ``rollout`` the online stages (grpo, ppo, rejection sampling). Both say whether
each completion ended, and stop on the end tokens they are given (``end_tokens``: every end token the chat
template uses, not only ``eos_token_id``); ``rollout`` also leaves the training state of the model (train
mode, ``use_cache``, gradient checkpointing, the random number generators) as it found it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def template_end_token(tokenizer: Any, template: str | None) -> int | None:
    """The token the chat template puts right after an assistant reply (<|im_end|>, <|eot_id|>, ...), found
    by rendering a conversation and reading what follows the reply; None when it is not a single special
    token (e.g. a template that ends a reply with plain text)."""
    if template is None:
        return None
    reply = "llmtune-reply-marker"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:  # a template that cannot render this probe: fall back to the tokenizer's eos
        return None
    at = text.rfind(reply)
    if at < 0:
        return None
    after = text[at + len(reply) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return int(ids[0]) if ids[0] in special or ids[0] in added else None


def end_tokens(model: Any, tokenizer: Any, template: str | None) -> list[int]:
    """Every token that ends a completion: the chat template's end of turn, then the eos ids."""
    ids = stop_ids(model, tokenizer)
    turn_end = template_end_token(tokenizer, template)
    if turn_end is not None and turn_end not in ids:
        ids.insert(0, turn_end)
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


def _config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


@contextmanager
def generation_mode(model: Any) -> Iterator[None]:
    """Eval mode with the KV cache on and gradient checkpointing off (training loads models with
    ``use_cache=False`` and may checkpoint); everything is put back afterwards."""
    was_training = model.training
    config = _config(model)
    use_cache = getattr(config, "use_cache", True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = (
        "is_activation_checkpointing" if hasattr(base, "is_activation_checkpointing") else "is_gradient_checkpointing"
    )
    checkpointing = bool(getattr(base, flag, False))
    if checkpointing:
        base.gradient_checkpointing_disable()
    config.use_cache = True
    model.eval()
    try:
        yield
    finally:
        config.use_cache = use_cache
        if checkpointing:
            # the settings it was enabled with (ppo's shared base adds the adapter routing to recomputation)
            kwargs = getattr(base, "llmtune_checkpointing_kwargs", {"use_reentrant": False})
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train(was_training)


GENERATION_BATCH = 32  # completions per generate call by default: sized for throughput, not the training micro-batch


def generation_batch(batch_size: int | None, micro_batch_size: int) -> int:
    """Completions per generate call: generation.batch_size, else GENERATION_BATCH (or the training
    micro-batch when that is larger). Generation holds no gradients, so it affords more rows than training."""
    return batch_size or max(GENERATION_BATCH, micro_batch_size)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class GenerationProgress:
    """An ``on_batch`` callback that says how far a generation phase is: ``label: 320/3200 completions (10%),
    41 s, about 6.2 min left`` at each tenth of the way, printed with `say` (a line each, readable in a log
    file). Lines come only once `after_s` seconds have passed since the start (0: always; the online stages'
    short rollouts stay quiet). `clock` is for tests."""

    def __init__(
        self,
        say: Callable[[str], Any],
        total: int,
        label: str,
        after_s: float = 0.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.say, self.total, self.label, self.after_s = say, total, label, after_s
        self.clock = clock or time.perf_counter
        self.start = self.clock()
        self.done = 0
        self.shown = 0  # tenths already said

    def __call__(self, n: int) -> None:
        self.done += n
        tenth = self.done * 10 // max(self.total, 1)
        if tenth <= self.shown:
            return
        self.shown = tenth
        elapsed = self.clock() - self.start
        if elapsed < self.after_s:
            return
        left = elapsed / self.done * (self.total - self.done)
        eta = f", about {_duration(left)} left" if self.done < self.total else ""
        self.say(
            f"{self.label}: {self.done}/{self.total} completions ({self.done / max(self.total, 1):.0%}), "
            f"{_duration(elapsed)}{eta}"
        )


def _sampling(temperature: float, top_p: float, top_k: int) -> dict[str, Any]:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k or 0}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


class _StopWhenAsked:
    """A transformers stopping criterion: every sequence is done once should_stop() says so (a SIGTERM while
    sampling), so that generate returns within one token's time instead of finishing the batch."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def _generate_batches(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    stops: list[int],
    *,
    max_new_tokens: int,
    sampling: dict[str, Any],
    batch_size: int,
    seed: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    keep_stop: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> list[tuple[list[int], bool]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    out: list[tuple[list[int], bool]] = []
    extra: dict[str, Any] = {}
    if should_stop is not None:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList([_StopWhenAsked(should_stop)])
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        if should_stop is not None and should_stop():
            break  # the caller discards a stopped rollout: no more batches
        chunk = prompts[start : start + batch_size]
        ids, mask = left_pad(chunk, pad)
        torch.manual_seed(seed + b)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stops or None,
            pad_token_id=pad,
            **sampling,
            **extra,
        )
        for row in gen[:, ids.shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            out.append((row, False) if cut is None else (row[: cut + keep_stop], True))
        if on_batch is not None:
            on_batch(len(chunk))
    return out


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
    stops: list[int] | None = None,
) -> list[tuple[list[int], bool]]:
    """(completion token ids without the stop token, whether it ended with one) for each prompt (token ids),
    in order. stops: the tokens that end a completion (end_tokens: the chat template's end of turn and the
    eos ids); None: the eos ids alone.

    Batch b is sampled with torch seed ``seed + b``: the same inputs, seed and batch size give the same
    completions on the same device. ``on_batch(n)`` is called after each batch (progress bars).
    """
    device = device or next(model.parameters()).device
    model.eval()
    return _generate_batches(
        model,
        tokenizer,
        prompts,
        stops if stops is not None else stop_ids(model, tokenizer),
        max_new_tokens=max_new_tokens,
        sampling=_sampling(temperature, top_p, 0),
        batch_size=batch_size,
        seed=seed,
        device=device,
        on_batch=on_batch,
    )


@torch.no_grad()
def rollout(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    gen: Any,
    *,
    seed: int,
    stops: list[int],
    device: torch.device,
    batch_size: int | None = None,
    keep_stop: bool = False,
    on_batch: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[tuple[list[int], bool]]:
    """Completions for the online stages: (token ids, ended with a stop token) per prompt, in order; the ids
    hold the stop token that ended the completion only with keep_stop (what the policy sampled, which the
    policy-gradient stages learn as it was). ``gen`` is a recipe's GenerationConfig. The random state the training loop uses
    (dropout, data order) is untouched: sampling runs on a forked generator state seeded per batch.
    ``on_batch(n)`` after each generate call (GenerationProgress). ``should_stop``: once it returns True the
    rollout ends within a token (fewer, cut completions come back: the caller checks it and discards them)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), generation_mode(model):
        return _generate_batches(
            model,
            tokenizer,
            prompts,
            stops,
            max_new_tokens=gen.max_new_tokens,
            sampling=_sampling(gen.temperature, gen.top_p, gen.top_k),
            batch_size=batch_size or gen.batch_size or 8,
            seed=seed,
            device=device,
            keep_stop=keep_stop,
            on_batch=on_batch,
            should_stop=should_stop,
        )
