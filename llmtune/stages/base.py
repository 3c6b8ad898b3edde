"""The defaults and helpers the stages share. What a stage gives the trainer core (its data, and one step:
batch -> summed loss, units, metrics) is the engine's contract (llmtune.engine.contract)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmtune.data.packing import collate
from llmtune.engine.batches import Batches, ScheduledBatches
from llmtune.engine.contract import Batch, BatchSource, Collate, StageContext, StageData, Window
from llmtune.engine.distributed import DistInfo
from llmtune.engine.report import run_console
from llmtune.engine.step import evaluate
from llmtune.model.load import Head, LoadedModel, ModelSpec, load
from llmtune.objectives.logprobs import hidden_states_as_logits, lm_loss_sum_from_hidden, token_logps_from_hidden
from llmtune.recipe.schema import RecipeBase


class StageDefaults:
    """Hooks most stages share: a causal LM, padded / packed token batches, nothing before training."""

    name: str
    needs_chat_template: bool
    unit_name = "tokens"  # what `units` counts: the loss is a mean over these

    def load_model(self, recipe: Any, device: torch.device, tokenizer: Any) -> LoadedModel:
        """The model the stage trains (the trainer wraps it in its DeepSpeed engine)."""
        return load(ModelSpec.trained(recipe), device, tokenizer)

    def load_frozen(self, ctx: StageContext, path: str, what: str, head: Head = "lm") -> Any:
        """A frozen model for inference next to the trained one (a reference): under ZeRO-3 partitioned over the
        processes like the trained model, so every process must run the same number of forward passes on it."""
        dist = ctx.dist
        zero3 = ctx.strategy.partition is not None
        where = f"partitioned over {dist.world_size} processes (ZeRO-3)" if zero3 else f"on {dist.device.type}"
        run_console(dist.is_main).print(f"loading {what} {path} (frozen, {where}) ...")
        loaded = ctx.strategy.frozen(ModelSpec.frozen(ctx.recipe, path, what, head), ctx.tokenizer)
        ctx.frozen.append(loaded)  # the run keeps a ZeRO-3 inference engine alive
        return loaded.model

    def collate(self, samples: list[Any], pad_id: int) -> Batch:
        return collate(samples, pad_id)

    def prepare_window(self, ctx: StageContext, window: Window) -> None:
        """Called with a step's micro-batches (this process's) before any of them trains: a stage whose loss
        needs a statistic of the whole step adds it to the batches (every process calls it at once)."""

    def batch_source(self, data: StageData, recipe: Any, dist: DistInfo, collate: Collate) -> BatchSource:
        """Where the loop draws its windows from: the fixed, shuffled training samples, or with data.schedule
        the sources' rows in the shares of each phase."""
        if recipe.data.schedule is not None:
            assert data.sources is not None, f"stage {recipe.stage} gives its sources for data.schedule"
            return ScheduledBatches(data.sources, recipe, dist, collate)
        return Batches(data.train, recipe, dist, collate)

    def before_training(self, ctx: StageContext, data: StageData) -> None:
        """Runs once after DeepSpeed is set up and before the first step (e.g. reference log-probs)."""

    def evaluate(self, ctx: StageContext, samples: Sequence[Any]) -> dict[str, float]:
        """The loss (and the step's metrics) over the evaluation samples, as eval/ names."""
        return evaluate(ctx, self, samples)  # type: ignore[arg-type]  # a concrete stage is a Stage

    def state_dict(self) -> dict[str, Any]:
        """The stage's own state that a checkpoint must keep for an exact resume (e.g. ppo's KL coefficient)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned, after before_training, when a run resumes."""

    def export(self, ctx: StageContext, out: Path) -> list[str]:
        """Write the final model to out (collective under ZeRO-3); returns the file names (rank 0)."""
        return ctx.strategy.export(ctx.tokenizer, out)


def forward_lm(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
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
    stage = recipe.stage  # type: ignore[attr-defined]  # every stage's recipe names its stage
    return "|".join(map(str, (stage, recipe.data.max_length, *parts, *filters)))
