"""Process reward models as reward sources: the output of an ``rm`` run with ``rm.loss: process`` (a full
``AutoModelForTokenClassification`` directory, or a TOKEN_CLS peft adapter with its head), recognised by the
``prm.json`` beside it.

A completion is split into steps on the recorded separator (stripped, empty pieces dropped), rendered after
the prompt exactly as in training (llmtune.data.stepwise.encode_steps), and each step's p(good) is read at its
step-end token; the steps' probabilities are aggregated into one score (``reward.aggregation``: min, last,
mean or product; llmtune.objectives.prm.aggregate). A completion without a step scores 0.0.
"""

from __future__ import annotations

from typing import Any

import torch

from llmtune.data.chat import resolve_chat_template
from llmtune.data.formats import RowError
from llmtune.data.packing import Sample, collate
from llmtune.data.stepwise import encode_steps, split_steps
from llmtune.errors import UserError
from llmtune.model.load import LoadedModel, ModelSpec, Partition, load
from llmtune.model.reward import read_prm_info
from llmtune.objectives.prm import aggregate, step_good_probs
from llmtune.rewards import model_source_name

PRM_HINT = "pass the output directory of an rm run with rm.loss: process (it holds prm.json)"


def is_prm(path: str) -> bool:
    """A directory with prm.json: a process reward model."""
    return read_prm_info(path) is not None


def require_prm(path: str, what: str) -> None:
    """Refuse a prm.json directory whose model has no token-classification head."""
    from llmtune.model.resolve import head_of

    task, archs = head_of(path, what)
    if task is not None:
        if task != "TOKEN_CLS":
            raise UserError(
                f"{what} {path} has prm.json but is a {task or None} adapter, not a process reward model "
                "(task_type TOKEN_CLS)",
                hint=PRM_HINT,
            )
        return
    if not any(a.endswith("ForTokenClassification") for a in archs):
        raise UserError(
            f"{what} {path} has prm.json but its architectures are {', '.join(archs) or 'not recorded'}, not a "
            "token classifier",
            hint=PRM_HINT,
        )


def load_prm(
    path: str, dtype: torch.dtype, device: torch.device, what: str, zero3: Partition | None = None
) -> LoadedModel:
    """A PRM for inference: AutoModelForTokenClassification (num_labels 2), or a TOKEN_CLS adapter on its base;
    zero3: partitioned over a training run's processes (and wrapped) under ZeRO-3."""
    from llmtune.model.resolve import resolve

    require_prm(path, what)
    base, adapter, _ = resolve(path, None, what)
    spec = ModelSpec(path=base, head="token", adapter=adapter, dtype=dtype, what=what)
    loaded = load(spec, device, zero3=zero3.config if zero3 is not None else None)
    return zero3.apply(loaded) if zero3 is not None else loaded


def step_scores(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict]],
    completions: list[str],
    *,
    separator: str,
    template: str | None,
    device: torch.device | str,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[list[float]]:
    """Each completion's per-step p(good), in step order ([] for a completion without a step)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs: list[tuple[list[int], list[int]]] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        steps = split_steps(completion, separator)
        try:
            seqs.append(encode_steps(tokenizer, template, prompt, steps, separator, max_length) if steps else ([], []))
        except RowError:
            seqs.append(([], []))  # nothing to score (e.g. no step within max_length)
    # a completion without a step still takes a (one-token) place in the batches and gets no score: every
    # process then runs the same number of forward passes for the same number of completions (ZeRO-3)
    seqs = [(ids, ends) if ids else ([pad if pad is not None else 0], []) for ids, ends in seqs]
    out: list[list[float]] = [[] for _ in seqs]
    todo = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(todo), batch_size):
                idx = todo[start : start + batch_size]
                b = collate([Sample(seqs[i][0], list(seqs[i][0])) for i in idx], pad if pad is not None else 0)
                logits = model(
                    input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)
                ).logits  # (B, T, 2)
                probs = step_good_probs(logits).cpu()  # (B, T)
                for row, i in enumerate(idx):
                    out[i] = [float(probs[row, p]) for p in seqs[i][1]]
    finally:
        if was_training:
            model.train()
    return out


class PrmSource:
    """A RewardSource backed by a process reward model (see the module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        device: torch.device | str,
        dtype: torch.dtype | str,
        aggregation: str = "min",
        batch_size: int = 8,
        name: str | None = None,
        what: str = "reward.model",
        zero3: Partition | None = None,
    ) -> None:
        """zero3: how a training run partitions the model over its processes under ZeRO-3."""
        from llmtune.model.resolve import pick_dtype

        info = read_prm_info(path)
        if info is None:
            raise UserError(f"{what} {path} has no prm.json: it is not a process reward model", hint=PRM_HINT)
        self.path = path
        self.name = name or model_source_name(path)
        self.separator = str(info.get("step_separator", "\n"))
        self.aggregation = aggregation
        aggregate([], aggregation)  # refuses an unknown name now
        self.device = torch.device(device)
        if isinstance(dtype, str):
            dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.loaded: LoadedModel | None = load_prm(path, dtype, self.device, what, zero3)
        self.template = resolve_chat_template(self.loaded.tokenizer, None, required=False)
        limit = getattr(self.loaded.model.config, "max_position_embeddings", None)
        self.max_length = limit if isinstance(limit, int) else None

    def step_scores(self, prompts: list[list[dict]], completions: list[str]) -> list[list[float]]:
        if self.loaded is None:
            raise RuntimeError(f"reward source {self.name} was closed")
        return step_scores(
            self.loaded.model,
            self.loaded.tokenizer,
            prompts,
            completions,
            separator=self.separator,
            template=self.template,
            device=self.device,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )

    def score(self, prompts: list[list[dict]], completions: list[str], answers: list[str | None]) -> list[float]:
        return [aggregate(p, self.aggregation) for p in self.step_scores(prompts, completions)]

    def close(self) -> None:
        if self.loaded is not None:
            from llmtune.model.resolve import free

            self.loaded = None
            free()
