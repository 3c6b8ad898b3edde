"""One small module per stage; the loop, checkpoints and logging live once, in llmtune.engine."""

from __future__ import annotations

from typing import Any


def get_stage(name: str) -> Any:
    if name == "cpt":
        from llmtune.stages.cpt import CptStage

        return CptStage()
    if name == "sft":
        from llmtune.stages.sft import SftStage

        return SftStage()
    raise ValueError(f"unknown stage {name}")


def run_stage(recipe: Any, local_rank: int | None = None) -> None:
    from llmtune.engine.trainer import train

    train(recipe, get_stage(recipe.stage), local_rank=local_rank)
