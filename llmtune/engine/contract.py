"""What the trainer core asks of a stage, owned by the core: stages depend on the engine, never the reverse.

A run hands its stage one ``StageContext`` (the recipe, the tokenizer and chat template, the processes, and
the DeepSpeed strategy) for the hooks that run once the model exists; the stage gives its data
(``StageData``), its batch source, and one step (batch -> ``StepOutput``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llmtune.engine.distributed import DistInfo
from llmtune.engine.strategy import Strategy
from llmtune.model.load import LoadedModel
from llmtune.recipe.schema import RecipeBase

Batch = dict[str, torch.Tensor]  # a collated micro-batch: input_ids, labels, ... and the stage's own tensors
Window = list[Batch]  # one optimizer step's micro-batches (this process's)
Collate = Callable[[Sequence[Any]], Batch]  # samples -> a micro-batch


@dataclass
class StageData:
    train: Sequence[Any]  # a list, or cpt's memory-mapped corpus
    eval: Sequence[Any]
    reports: list[Any]  # data.pipeline.SourceReport per source
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


@dataclass
class Interrupt:
    """Set when a stop is asked for (SIGTERM, Ctrl-C) on a one-process run: work a stage does between steps
    (an online stage's rollout) checks it and ends early with errors.RolloutInterrupted, and the step in
    progress ends at its next micro-batch (errors.StepInterrupted), instead of finishing first. (Several
    processes finish the step in progress and vote, as before: they must stop together.)"""

    requested: bool = False

    def __call__(self) -> bool:
        return self.requested

    def set(self) -> None:
        self.requested = True


@dataclass(frozen=True)
class StageContext:
    """What one run hands its stage, once: made when the tokenizer and template are known, before the model
    loads. The trained model's DeepSpeed engine is ``engine`` once the strategy has prepared it."""

    recipe: RecipeBase
    tokenizer: Any
    template: str | None
    dist: DistInfo
    strategy: Strategy
    collate: Collate
    trust_reward_code: bool = False
    frozen: list[LoadedModel] = field(default_factory=list)  # frozen models the run keeps alive (ZeRO-3 engines)
    interrupt: Interrupt = field(default_factory=Interrupt)

    @property
    def engine(self) -> Any:
        return self.strategy.engine


class BatchSource(Protocol):
    """Where the loop draws its windows from (engine.batches: Batches, ScheduledBatches, Rollouts)."""

    windows_per_epoch: int
    accum: int  # micro-batches per optimizer step
    rows_per_step: int
    step_text: str

    def epoch_windows(self, epoch: int, start_window: int = 0) -> Iterator[Window | None]: ...

    def metrics(self) -> dict[str, float]: ...

    def after_step(self, metrics: dict[str, float]) -> None: ...


class Stage(Protocol):
    """What the trainer core asks of a stage. stages.base.StageDefaults gives the causal-LM answers."""

    name: str
    needs_chat_template: bool
    unit_name: str  # what `units` counts: the loss is a mean over these

    def build_data(
        self, recipe: Any, tokenizer: Any, template: str | None, *, trust_reward_code: bool = False
    ) -> StageData: ...

    def load_model(self, recipe: Any, device: torch.device, tokenizer: Any) -> LoadedModel: ...

    def collate(self, samples: list[Any], pad_id: int) -> Batch: ...

    def batch_source(self, data: StageData, recipe: Any, dist: DistInfo, collate: Collate) -> BatchSource: ...

    def before_training(self, ctx: StageContext, data: StageData) -> None: ...

    def prepare_window(self, ctx: StageContext, window: Window) -> None: ...

    def evaluate(self, ctx: StageContext, samples: Sequence[Any]) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export(self, ctx: StageContext, out: Path) -> list[str]: ...

    def units(self, batch: Batch) -> torch.Tensor: ...

    def step(self, model: Any, batch: Batch) -> StepOutput: ...
