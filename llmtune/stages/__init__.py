"""One module per stage, found by name: ``llmtune.stages.<name>.STAGE`` is the stage's class (the names are
those of the recipe registry, ``llmtune.recipe.stages.STAGE_RECIPES``). The loop, checkpoints and logging
live once, in llmtune.engine."""

from __future__ import annotations

import importlib
import os
from typing import Any, Protocol, runtime_checkable

from llmtune.runtime import quiet_libraries


@runtime_checkable
class RunsItself(Protocol):
    """A stage that drives its own loop instead of the trainer's (rejection sampling: rounds of generate ->
    score -> select -> sft, each sft on the trainer)."""

    def run(self, recipe: Any, local_rank: int | None = None, **options: Any) -> None: ...


def get_stage(name: str) -> Any:
    """A fresh instance of the stage ``name`` (stages keep state over a run: one per run)."""
    from llmtune.recipe.stages import STAGE_RECIPES

    if name not in STAGE_RECIPES:
        raise ValueError(f"unknown stage {name}")
    return importlib.import_module(f"{__name__}.{name}").STAGE()


def run_stage(recipe: Any, local_rank: int | None = None, **options: Any) -> None:
    """options: resume_from (a checkpoint dir), resume (bool), overwrite (bool), trust_reward_code (bool);
    see llmtune.engine.trainer."""
    quiet_libraries(loading_bars=False)
    from llmtune.engine.report import run_console
    from llmtune.model.gguf import resolve_gguf

    console = run_console(int(os.environ.get("RANK", "0")) == 0)
    recipe.model.path = resolve_gguf(recipe.model.path, console)  # a .gguf file: its converted model
    if getattr(getattr(recipe, "dpo", None), "reference", None):
        recipe.dpo.reference = resolve_gguf(recipe.dpo.reference, console)
    stage = get_stage(recipe.stage)
    if isinstance(stage, RunsItself):
        stage.run(recipe, local_rank=local_rank, **options)
        return
    from llmtune.engine.trainer import train

    train(recipe, stage, local_rank=local_rank, **options)
