"""The DeepSpeed config, the LR schedule and the precision checks a recipe turns into."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from llmtune.engine.config import build_optimizer, check_precision, deepspeed_config, lr_lambda
from llmtune.errors import RecipeError
from llmtune.recipe import validate_recipe
from tests.conftest import TINY_MODEL, base_recipe


def _recipe(tmp_path: Path, **sections):
    return validate_recipe(base_recipe(tmp_path, **sections))


def test_deepspeed_config_follows_the_recipe(tmp_path: Path) -> None:
    r = _recipe(
        tmp_path,
        train={"micro_batch_size": 3, "grad_accum": 5, "max_grad_norm": 0.5},
        distributed={"zero_stage": 3, "offload": "all"},
        precision="bf16",
    )
    cfg = deepspeed_config(r, world_size=4)
    assert cfg["train_batch_size"] == 3 * 5 * 4
    assert cfg["gradient_accumulation_steps"] == 5 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    r0 = _recipe(tmp_path, train={"max_grad_norm": None}, precision="fp16")
    cfg0 = deepspeed_config(r0, world_size=1)
    assert cfg0["gradient_clipping"] == 0.0 and cfg0["fp16"]["enabled"] and cfg0["fp16"]["loss_scale"] == 0
    assert "offload_optimizer" not in cfg0["zero_optimization"]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_schedule_shapes(tmp_path: Path, kind: str) -> None:
    r = _recipe(tmp_path, train={"lr_scheduler": kind, "warmup_steps": 4, "min_lr_ratio": 0.1})
    f = lr_lambda(r, total_steps=24)
    assert f(0) == pytest.approx(1 / 5) and f(3) == pytest.approx(4 / 5)  # linear warmup to the peak
    assert f(4) == pytest.approx(1.0)
    end = f(24)
    assert end == pytest.approx({"cosine": 0.1, "linear": 0.1, "constant": 1.0}[kind])
    mid = f(14)  # halfway through the decay
    expected = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), "linear": 0.55, "constant": 1.0}[kind]
    assert mid == pytest.approx(expected)


def test_rewarming_starts_from_a_floor_and_decays_to_one(tmp_path: Path) -> None:
    """Continued pretraining: warm up from 0.1 x lr (where an earlier run's cosine may have ended) over 4
    steps, then cosine down to the floor again."""
    r = _recipe(tmp_path, train={"warmup_steps": 4, "warmup_start_ratio": 0.1, "min_lr_ratio": 0.1})
    f = lr_lambda(r, total_steps=24)
    assert f(0) == pytest.approx(0.1 + 0.9 * 1 / 5) and f(3) == pytest.approx(0.1 + 0.9 * 4 / 5)
    assert f(4) == pytest.approx(1.0) and f(24) == pytest.approx(0.1)
    assert all(f(i) < f(i + 1) for i in range(4))


def test_ema_is_refused_with_zero3(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"train\.ema cannot be combined with distributed\.zero_stage 3"):
        _recipe(tmp_path, train={"ema": {"decay": 0.9}}, distributed={"zero_stage": 3})


def test_weight_decay_skips_biases_and_norms(tmp_path: Path) -> None:
    r = _recipe(tmp_path, train={"weight_decay": 0.1})
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(r, model)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_precision_checks(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="fp16 is not supported on CPU"):
        check_precision(_recipe(tmp_path, precision="fp16"), torch.device("cpu"))
    # a model saved in bf16, trained in fp16 (on a GPU): a warning that names the risk
    bf16_model = tmp_path / "bf16-model"
    shutil.copytree(TINY_MODEL, bf16_model)
    cfg = json.loads((bf16_model / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (bf16_model / "config.json").write_text(json.dumps(cfg))
    r = _recipe(tmp_path, model={"path": str(bf16_model)}, precision="fp16")
    with pytest.warns(UserWarning, match="trained in bf16"):
        check_precision(r, torch.device("cuda"))
