"""The weight average (train.ema) against hand-worked values, its save / load, and the re-warming schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmtune.engine.ema import WeightAverage
from llmtune.errors import TrainingError


def test_the_average_follows_its_formula_on_trained_parameters_only() -> None:
    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)  # frozen: not averaged
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = WeightAverage(model, decay=0.5, every=2)
    assert set(ema.shadow) == {"weight"}
    for step, value in enumerate(([[3.0, 2.0]], [[5.0, 6.0]], [[7.0, 8.0]], [[9.0, 10.0]]), start=1):
        with torch.no_grad():
            model.weight.copy_(torch.tensor(value))
        ema.after_step(step)
    # updated at steps 2 and 4 only: 0.5 * (0.5 * [1, 2] + 0.5 * [5, 6]) + 0.5 * [9, 10] = [6, 7]
    assert ema.shadow["weight"].tolist() == [[6.0, 7.0]]
    assert ema.updates == 2
    with ema.swapped_in():
        assert model.weight.tolist() == [[6.0, 7.0]]
    assert model.weight.tolist() == [[9.0, 10.0]]  # the model's own weights come back


def test_save_and_load_continue_the_average(tmp_path: Path) -> None:
    a = torch.nn.Linear(3, 2)
    ema = WeightAverage(a, decay=0.9, every=1)
    with torch.no_grad():
        a.weight.add_(1.0)
    ema.after_step(1)
    ema.save(tmp_path)
    b = WeightAverage(torch.nn.Linear(3, 2), decay=0.9, every=1)
    b.load(tmp_path)
    assert b.updates == 1
    for n in ema.shadow:
        assert torch.equal(b.shadow[n], ema.shadow[n])


def test_a_checkpoint_without_an_average_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"(?s)has no ema\.pt.*fix:"):
        WeightAverage(torch.nn.Linear(2, 2), decay=0.9, every=1).load(tmp_path)
    WeightAverage(torch.nn.Linear(2, 2), decay=0.9, every=1).save(tmp_path)
    with pytest.raises(TrainingError, match="averages other parameters"):
        WeightAverage(torch.nn.Linear(2, 2, bias=False), decay=0.9, every=1).load(tmp_path)
