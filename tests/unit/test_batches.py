"""The fixed batch source: which samples a run's steps reach (dpo computes reference log-probs for those
only), checked against the windows the loop is actually handed."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmtune.engine.batches import Batches
from llmtune.engine.distributed import DistInfo
from llmtune.recipe.stages import SftRecipe
from tests.conftest import base_recipe


def _source(world: int, rank: int, n: int = 50, **train) -> Batches:
    import torch

    recipe = SftRecipe.model_validate(
        base_recipe(Path("/tmp"), train={"micro_batch_size": 2, "grad_accum": 3, **train})
    )
    dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    return Batches(list(range(n)), recipe, dist, collate=lambda rows: rows)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize(("epoch", "window", "steps"), [(0, 0, 2), (0, 3, 9), (1, 2, 1), (0, 0, 100)])
def test_reached_is_what_the_windows_hold(world: int, epoch: int, window: int, steps: int) -> None:
    expected: set[int] = set()
    for rank in range(world):
        src = _source(world, rank)
        e, w, left = epoch, window, steps
        while left > 0:
            for win in src.epoch_windows(e, w):
                expected.update(i for micro in win for i in micro)
                left -= 1
                if left == 0:
                    break
            e, w = e + 1, 0
    assert _source(world, 0).reached(epoch, window, steps) == expected
    if steps < 5:
        assert len(expected) < 50  # a short run reaches a part of the data
