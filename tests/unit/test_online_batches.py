"""grpo and ppo count a step in prompts: prompts_per_step prompts over all processes, each giving
num_generations rows (ppo: 1), whatever train.micro_batch_size (which only cuts the rows into forward passes;
the accumulation follows) and the number of processes. In process, on the stages' real batch sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmtune.engine.config import deepspeed_config
from llmtune.engine.contract import StageData
from llmtune.engine.distributed import DistInfo
from llmtune.errors import RecipeError
from llmtune.recipe.stages import GrpoRecipe, PpoRecipe
from llmtune.stages.grpo import GrpoStage
from llmtune.stages.online import micro_batches, step_shape
from llmtune.stages.ppo import PpoStage
from tests.conftest import base_recipe

PROMPTS = list(range(64))  # the batch source only counts and orders them


def _dist(world: int, rank: int = 0) -> DistInfo:
    return DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


def _grpo(pps: int, g: int, mb: int) -> GrpoRecipe:
    return GrpoRecipe.model_validate(
        base_recipe(
            Path("/tmp"),
            stage="grpo",
            grpo={"num_generations": g, "prompts_per_step": pps},
            train={"micro_batch_size": mb},
        )
    )


@pytest.mark.parametrize(
    ("pps", "g", "mb", "world"),
    [(16, 8, 4, 1), (16, 8, 16, 1), (16, 8, 128, 1), (16, 8, 5, 1), (16, 8, 8, 2), (3, 2, 4, 1), (4, 4, 3, 2)],
)
def test_grpo_rows_per_step_are_prompts_times_generations(pps: int, g: int, mb: int, world: int) -> None:
    recipe = _grpo(pps, g, mb)
    for rank in range(world):
        src = GrpoStage().batch_source(StageData(PROMPTS, [], []), recipe, _dist(world, rank), None)
        assert src.per_rollout * world == pps  # prompts per step, all processes
        assert src.rows_per_step == pps * g
        # the step's rows on this process, cut into micro-batches of at most mb: the accumulation follows
        rows = list(range(pps // world * g))
        chunks = micro_batches(rows, mb)
        assert len(chunks) == src.accum and all(len(c) <= mb for c in chunks)
        assert [r for c in chunks for r in c] == rows
        ds = deepspeed_config(recipe, world, grad_accum=src.accum)
        assert ds["gradient_accumulation_steps"] == src.accum
        assert ds["train_batch_size"] >= pps * g  # DeepSpeed's count: full micro-batches
    assert f"{pps} prompts x {g} generations per step" in src.step_text


def test_ppo_rows_per_step_are_its_prompts() -> None:
    """ppo: one completion per prompt; a rollout of rollout_batch_size per process gives ppo_epochs x
    (rollout / step) steps."""
    recipe = PpoRecipe.model_validate(
        base_recipe(
            Path("/tmp"),
            stage="ppo",
            finetuning={"method": "full"},
            ppo={"prompts_per_step": 8, "rollout_batch_size": 8, "ppo_epochs": 3},
            train={"micro_batch_size": 3},
        )
    )
    src = PpoStage().batch_source(StageData(PROMPTS, [], []), recipe, _dist(2), None)
    assert (src.per_rollout, src.rows_per_step, src.accum, src.steps_per_rollout) == (8, 8, 2, 6)


def test_a_step_that_does_not_split_over_the_processes_is_refused() -> None:
    with pytest.raises(RecipeError, match="prompts_per_step 3 does not split evenly over 2") as e:
        step_shape(3, 8, 4, 2, "grpo")
    assert "(e.g. 4)" in (e.value.hint or "")


def test_grad_accum_which_sized_the_old_step_is_refused_with_the_setting_that_keeps_it() -> None:
    """train.grad_accum used to make a grpo step micro_batch_size x grad_accum completions per process; now
    that would silently mean nothing, so it is refused, naming the prompts_per_step that keeps the old step."""
    with pytest.raises(ValueError, match=r"train\.grad_accum 4") as e:
        GrpoRecipe.model_validate(
            base_recipe(
                Path("/tmp"), stage="grpo", grpo={"num_generations": 8}, train={"micro_batch_size": 8, "grad_accum": 4}
            )
        )
    assert "grpo.prompts_per_step: 4 x the number of processes" in str(e.value)
    r = GrpoRecipe.model_validate(base_recipe(Path("/tmp"), stage="grpo", train={"grad_accum": 1}))  # the default
    assert r.grpo.prompts_per_step == 16 and r.grpo.dynamic_sampling is False
    assert PpoRecipe.model_validate(base_recipe(Path("/tmp"), stage="ppo")).ppo.prompts_per_step == 16
