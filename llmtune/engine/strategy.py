"""The one place llmtune meets DeepSpeed (OpenRLHF's strategy object): the trained model, its optimizer and
schedule wrapped into one engine (``prepare``), frozen models for inference next to it (``frozen``: references
and reward models, partitioned over the processes under ZeRO-3), the full weights of a partitioned module
for a while (``full_weights``: generation), and the final export (``export``). Stages reach DeepSpeed only
through the strategy their StageContext holds; the configs themselves are plain dicts (engine/config.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from llmtune.engine.checkpoint import export_model
from llmtune.engine.config import deepspeed_config, frozen_zero3_config
from llmtune.engine.distributed import DistInfo
from llmtune.model.load import DTYPES, LoadedModel, ModelSpec, Partition, load
from llmtune.recipe.schema import RecipeBase


def _deepspeed() -> Any:
    from llmtune.engine import import_deepspeed

    return import_deepspeed()


class Strategy:
    """DeepSpeed for one run: the recipe's ZeRO stage, precision and offload on this run's processes. The
    trained model's engine is ``engine`` once ``prepare`` made it."""

    def __init__(self, recipe: RecipeBase, dist: DistInfo) -> None:
        self.recipe, self.dist = recipe, dist
        self.zero_stage = recipe.distributed.zero_stage
        self.engine: Any = None  # the trained model's DeepSpeed engine, after prepare

    @property
    def version(self) -> str:
        return str(_deepspeed().__version__)

    def config(self, grad_accum: int | None = None) -> dict[str, Any]:
        """The training engine's DeepSpeed config (grad_accum: micro-batches per step, default the recipe's)."""
        return deepspeed_config(self.recipe, self.dist.world_size, grad_accum=grad_accum)

    @contextmanager
    def loading(self, config: dict[str, Any]) -> Iterator[None]:
        """Around loading the trained model: under ZeRO-3 transformers creates each weight partitioned over the
        processes (HfDeepSpeedConfig alive meanwhile); nothing otherwise."""
        if self.zero_stage != 3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(config)  # must stay alive while the model loads: partitioned init
        try:
            yield
        finally:
            del hf_ds

    def cast(self, model: torch.nn.Module) -> None:
        """ZeRO 0-2 cast the module to the training dtype; ZeRO-3 expects it done, and peft creates its adapter
        weights in fp32 next to the bf16 / fp16 base."""
        if self.zero_stage != 3 or self.recipe.precision == "fp32":
            return
        dtype = DTYPES[self.recipe.precision]
        for p in model.parameters():
            if p.dtype.is_floating_point and p.dtype != dtype and not hasattr(p, "ds_id"):
                p.data = p.data.to(dtype)

    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: dict[str, Any]
    ) -> tuple[Any, Any]:
        """The model, optimizer and LR schedule in one DeepSpeed engine; returns (engine, scheduler)."""
        engine, _, _, scheduler = _deepspeed().initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        if self.dist.world_size == 1 and self.zero_stage == 0:
            # nothing to average with: skip the gradient all-reduce (ZeRO 1-3 gather their gradients through it)
            engine.enable_backward_allreduce = False
        self.engine = engine
        return engine, scheduler

    # --- frozen models ------------------------------------------------------------------------------------

    @property
    def partition(self) -> Partition | None:
        """How frozen models are partitioned over the processes under ZeRO-3 (None with ZeRO 0-2: each process
        then holds a full copy); what a reward source is handed."""
        config = frozen_zero3_config(self.recipe, self.dist.world_size)
        return None if config is None else Partition(config, self._inference_engine(config))

    @staticmethod
    def _inference_engine(config: dict[str, Any]) -> Any:
        def wrap(module: torch.nn.Module) -> Any:
            """A frozen model (loaded partitioned) wrapped by DeepSpeed without an optimizer: ZeRO-3 inference,
            whose hooks gather each layer's weights for its forward pass."""
            return _deepspeed().initialize(model=module, config=config)[0]

        return wrap

    def frozen(self, spec: ModelSpec, tokenizer: Any) -> LoadedModel:
        """A frozen model for inference next to the trained one: under ZeRO-3 partitioned over the processes
        like the trained model (every process must then run the same number of forward passes on it; keep the
        returned LoadedModel, which holds the engine, alive while it is used)."""
        part = self.partition
        loaded = load(spec, self.dist.device, tokenizer, zero3=part.config if part is not None else None)
        return part.apply(loaded) if part is not None else loaded

    # --- whole weights --------------------------------------------------------------------------------------

    @contextmanager
    def full_weights(self, module: torch.nn.Module | None = None) -> Iterator[None]:
        """Under ZeRO-3, gather the partitioned weights (of module, a part of the engine's model; default all of
        it) once for a whole rollout, not once per generated token, which is what the per-module hooks would
        do; a no-op otherwise."""
        if self.engine.zero_optimization_stage() != 3:
            yield
            return
        with _deepspeed().zero.GatheredParameters(list((module or self.engine.module).parameters())):
            yield

    def export(
        self, tokenizer: Any, out: Path, part: str | None = None, adapters: list[str] | None = None
    ) -> list[str]:
        """Write the trained model (or its submodule ``part``; peft ``adapters``) to out; collective under ZeRO-3
        (weights are gathered to rank 0). Returns the file names (rank 0)."""
        return export_model(self.engine, tokenizer, out, self.zero_stage, self.dist.rank, part, adapters)
