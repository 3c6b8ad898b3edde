"""Reward-model scoring: the output of an ``rm`` run (a full AutoModelForSequenceClassification directory, or a
SEQ_CLS peft adapter with its score head), scored on decoded text.

The text is rendered and tokenized with the reward model's own tokenizer and chat template, so a reward
model whose tokenizer differs from the policy's scores the same conversation. The score of a conversation
is the score head's output at its last real token (read through the attention mask, so padding does not
matter); scoring runs in batches, in eval mode, under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from llmtune.data.chat import resolve_chat_template
from llmtune.data.packing import Sample, collate
from llmtune.model.load import LoadedModel, Partition
from llmtune.model.resolve import free, last_token_scores, load_reward_model, pick_dtype
from llmtune.rewards import model_source_name


def with_reply(messages: list[dict], reply: str) -> list[dict]:
    """The conversation ``messages`` followed by the assistant turn ``reply``."""
    return [*messages, {"role": "assistant", "content": reply}]


def encode_for_scoring(tokenizer: Any, template: str | None, messages: list[dict]) -> list[int]:
    """Token ids of a conversation as the reward model reads it: its chat template, or (a model without one)
    the turns' texts joined by blank lines, with the tokenizer's special tokens."""
    if template is not None:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"])


def score_conversations(
    model: Any,
    tokenizer: Any,
    convs: list[list[dict]],
    *,
    template: str | None,
    device: torch.device | str,
    batch_size: int,
    max_length: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[float]:
    """A reward model's score of each conversation (prompt turns + the assistant reply): the score head's
    output at the last real token. ``template`` is the Jinja chat template to render with (None: join the
    turns' texts); sequences longer than ``max_length`` tokens are cut to their first ``max_length``."""
    seqs = []
    for msgs in convs:
        ids = encode_for_scoring(tokenizer, template, msgs)
        seqs.append(ids[:max_length] if max_length is not None else ids)
    scores: list[float] = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = pad if pad is not None else 0
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad(), last_token_scores(model) as captured:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                b = collate([Sample(seqs[i], list(seqs[i])) for i in idx], pad)
                mask = b["attention_mask"].to(device)
                captured.clear()
                model(input_ids=b["input_ids"].to(device), attention_mask=mask)
                per_pos = captured[-1]  # (B, T)
                last = (mask.sum(dim=1) - 1).to(per_pos.device)
                vals = per_pos[torch.arange(len(idx), device=per_pos.device), last].tolist()
                for i, v in zip(idx, vals, strict=True):
                    scores[i] = float(v)
                if on_batch is not None:
                    on_batch(len(idx))
    finally:
        if was_training:
            model.train()
    return scores


class RewardModelSource:
    """A RewardSource backed by a reward model (see the module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        device: torch.device | str,
        dtype: torch.dtype | str,
        batch_size: int = 8,
        name: str | None = None,
        what: str = "reward.model",
        chat_template: str | None = None,
        max_length: int | None = None,
        zero3: Partition | None = None,
    ) -> None:
        """zero3: how a training run partitions the model over its processes under ZeRO-3 (its DeepSpeed config
        and its wrap; every process must then score the same number of batches)."""
        self.path = path
        self.name = name or model_source_name(path)
        self.device = torch.device(device)
        if isinstance(dtype, str):
            dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        config = zero3.config if zero3 is not None else None
        self.loaded: LoadedModel | None = load_reward_model(path, dtype, self.device, what=what, zero3=config)
        if zero3 is not None:
            zero3.apply(self.loaded)
        self.template = resolve_chat_template(self.loaded.tokenizer, chat_template, required=False)
        limit = getattr(self.loaded.model.config, "max_position_embeddings", None)
        self.max_length = max_length if max_length is not None else limit if isinstance(limit, int) else None

    @classmethod
    def from_model(
        cls, path: str, model: Any, tokenizer: Any, *, device: torch.device, batch_size: int, max_length: int | None
    ) -> RewardModelSource:
        """A source over a reward model the caller holds (ppo's shared memory: the reward adapter on the policy's
        base); ``model`` is called like a sequence classifier and has a ``score`` module."""
        self = cls.__new__(cls)
        self.path, self.name, self.device, self.batch_size = path, model_source_name(path), device, batch_size
        self.loaded = LoadedModel(model=model, tokenizer=tokenizer, name=path, has_adapter=True)
        self.template = resolve_chat_template(tokenizer, None, required=False)
        self.max_length = max_length
        return self

    @property
    def tokenizer(self) -> Any:
        assert self.loaded is not None, "the reward model was closed"
        return self.loaded.tokenizer

    @property
    def model(self) -> Any:
        assert self.loaded is not None, "the reward model was closed"
        return self.loaded.model

    def score(self, prompts: list[list[dict]], completions: list[str], answers: list[str | None]) -> list[float]:
        if self.loaded is None:
            raise RuntimeError(f"reward source {self.name} was closed")
        convs = [with_reply(p, c) for p, c in zip(prompts, completions, strict=True)]
        return score_conversations(
            self.loaded.model,
            self.loaded.tokenizer,
            convs,
            template=self.template,
            device=self.device,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded = None  # the last reference: free() can then release the weights (and CUDA memory)
            free()
