"""What a stage gives the trainer core: its data, and one step (batch -> summed loss, units, metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llmtune.data.packing import Sample, collate
from llmtune.data.pipeline import SourceReport
from llmtune.engine.batches import Batches, ScheduledBatches
from llmtune.engine.checkpoint import export_model
from llmtune.engine.config import frozen_zero3_config
from llmtune.model.load import Head, LoadedModel, ModelSpec, load
from llmtune.objectives.logprobs import hidden_states_as_logits, lm_loss_sum_from_hidden, token_logps_from_hidden
from llmtune.recipe.schema import RecipeBase


@dataclass
class StageData:
    train: list[Sample] | list[Any]
    eval: list[Sample] | list[Any]
    reports: list[SourceReport]
    notes: list[str] = field(default_factory=list)
    reached: set[int] | None = None  # indices of the training samples this run's steps will use (None: all)
    # data.schedule: each training source's id and rows (train holds them all, for the data summary)
    sources: list[tuple[str, Any]] | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # files for output_dir, by name (DataBundle.outputs)


@dataclass
class StepOutput:
    """loss_sum: the loss summed over `units` (tokens for LM stages); metrics: sums over the same units."""

    loss_sum: torch.Tensor
    units: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Stage(Protocol):
    """What the trainer core asks of a stage. StageDefaults gives the causal-LM answers to the hooks."""

    name: str
    needs_chat_template: bool
    unit_name: str

    def build_data(self, recipe: Any, tokenizer: Any, template: str | None) -> StageData: ...

    def load_model(self, recipe: Any, device: torch.device, tokenizer: Any) -> LoadedModel: ...

    def collate(self, samples: list[Any], pad_id: int) -> dict[str, torch.Tensor]: ...

    def batch_source(self, data: StageData, recipe: Any, dist: Any, collate: Any) -> Any: ...

    def before_training(self, engine: Any, data: StageData, dist: Any, collate: Any) -> None: ...

    def evaluate(self, engine: Any, samples: list[Any], recipe: Any, dist: Any, collate: Any) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export(self, engine: Any, tokenizer: Any, out: Path, recipe: Any, dist: Any) -> list[str]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput: ...


class StageDefaults:
    """Hooks most stages share: a causal LM, padded / packed token batches, nothing before training."""

    unit_name = "tokens"  # what `units` counts: the loss is a mean over these
    trust_reward_code = False  # set by the trainer from --trust-reward-code

    def load_model(self, recipe: Any, device: torch.device, tokenizer: Any) -> LoadedModel:
        """The model the stage trains (the trainer wraps it in its DeepSpeed engine)."""
        return load(ModelSpec.trained(recipe), device, tokenizer)

    def load_frozen(self, recipe: Any, path: str, what: str, dist: Any, tokenizer: Any, head: Head = "lm") -> Any:
        """A frozen model for inference next to the trained one (a reference): under ZeRO-3 partitioned over the
        processes like the trained model, so every process must run the same number of forward passes on it."""
        from llmtune.engine.report import run_console

        zero3 = frozen_zero3_config(recipe, dist.world_size)
        where = f"partitioned over {dist.world_size} processes (ZeRO-3)" if zero3 else f"on {dist.device.type}"
        run_console(dist.is_main).print(f"loading {what} {path} (frozen, {where}) ...")
        loaded = load(ModelSpec.frozen(recipe, path, what, head), dist.device, tokenizer, zero3=zero3)
        self.__dict__.setdefault("frozen_models", []).append(loaded)  # keeps a ZeRO-3 inference engine alive
        return loaded.model

    def collate(self, samples: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(samples, pad_id)

    def prepare_window(self, engine: Any, batches: list[dict[str, torch.Tensor]], dist: Any) -> None:
        """Called with a step's micro-batches (this process's) before any of them trains: a stage whose loss
        needs a statistic of the whole step adds it to the batches (every process calls it at once)."""

    def batch_source(self, data: StageData, recipe: Any, dist: Any, collate: Any) -> Any:
        """Where the loop draws its windows from: the fixed, shuffled training samples, or with data.schedule
        the sources' rows in the shares of each phase."""
        if recipe.data.schedule is not None:
            assert data.sources is not None, f"stage {recipe.stage} gives its sources for data.schedule"
            return ScheduledBatches(data.sources, recipe, dist, collate)
        return Batches(data.train, recipe, dist, collate)

    def before_training(self, engine: Any, data: StageData, dist: Any, collate: Any) -> None:
        """Runs once after DeepSpeed is set up and before the first step (e.g. reference log-probs)."""

    def evaluate(self, engine: Any, samples: list[Any], recipe: Any, dist: Any, collate: Any) -> dict[str, float]:
        """The loss (and the step's metrics) over the evaluation samples, as eval/ names."""
        from llmtune.engine.trainer import evaluate

        return evaluate(engine, self, samples, recipe, dist, collate)

    def state_dict(self) -> dict[str, Any]:
        """The stage's own state that a checkpoint must keep for an exact resume (e.g. ppo's KL coefficient)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned, after before_training, when a run resumes."""

    def export(self, engine: Any, tokenizer: Any, out: Path, recipe: Any, dist: Any) -> list[str]:
        """Write the final model to out (collective under ZeRO-3); returns the file names (rank 0)."""
        return export_model(engine, tokenizer, out, recipe.distributed.zero_stage, dist.rank)


def forward_lm(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) of a causal LM for a collated batch (padded or packed). Prompt / P-tuning put their
    virtual tokens in front of the sequence: their logits are dropped, so that position t still predicts t+1."""
    kwargs: dict[str, torch.Tensor] = {"input_ids": batch["input_ids"]}
    for k in ("attention_mask", "position_ids"):
        if k in batch:
            kwargs[k] = batch[k]
    logits = model(**kwargs, use_cache=False).logits
    return logits[:, -batch["input_ids"].shape[1] :]


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over the learned tokens and their number, from the final hidden states and the
    LM head applied a chunk of positions at a time (no (B, T, V) logits; objectives/logprobs.py)."""
    with hidden_states_as_logits(model) as head:
        hidden = forward_lm(model, batch)  # (B, T, H); the logits (B, T, V) where head is None
    return lm_loss_sum_from_hidden(hidden, batch["labels"], head)


def lm_token_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token log-probs (B, T-1) of the labels, their mask and (with_entropy) the entropy per position, chunked
    as lm_loss is."""
    with hidden_states_as_logits(model) as head:
        hidden = forward_lm(model, batch)
    return token_logps_from_hidden(hidden, batch["labels"], head, with_entropy=with_entropy)


def shaped_data(bundle: Any, shape: Any, scheduled: bool, notes: list[str]) -> StageData:
    """A built data bundle with its rows shaped (packed, or one sample a row). With a data.schedule each
    source is shaped on its own (the schedule draws rows by source); train then holds them all in order."""
    data = StageData(train=[], eval=shape(bundle.eval), reports=bundle.reports, notes=notes, outputs=bundle.outputs)
    if not scheduled:
        data.train = shape(bundle.train)
    else:
        data.sources = [(name, shape(ex)) for name, ex in bundle.train_sources()]
        data.train = [row for _, rows in data.sources for row in rows]
    return data


def recipe_settings(recipe: RecipeBase, *parts: object) -> str:
    """The settings that change tokenization, for the data cache key."""
    d = recipe.data
    filters = (d.dedup, d.dedup_threshold if d.dedup == "near" else None, d.filter.min_tokens, d.filter.max_tokens)
    return "|".join(map(str, (recipe.stage, recipe.data.max_length, *parts, *filters)))
