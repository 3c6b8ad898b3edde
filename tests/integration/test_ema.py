"""train.ema: the exported average equals one computed independently from the saved checkpoints, a killed
and resumed run continues it exactly, and a LoRA run averages (and exports) its adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import TINY_MODEL, as_if_killed, assert_ok, base_recipe, run_cli, write_recipe

DECAY = 0.6


def _train(tmp_path: Path, name: str, method: str = "full") -> Path:
    sub = tmp_path / name
    sub.mkdir(exist_ok=True)
    recipe = base_recipe(
        sub,
        finetuning={"method": method},
        train={"max_steps": 4, "lr": 1e-3, "save_every": 1, "keep_checkpoints": 10, "ema": {"decay": DECAY}},
    )
    assert_ok(run_cli("train", str(write_recipe(sub, recipe))))
    return Path(recipe["output_dir"])


def _checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def test_ema_export_equals_an_independent_average_of_the_checkpoints(tmp_path: Path) -> None:
    out = _train(tmp_path, "a")
    average = {k: v.double() for k, v in load_file(TINY_MODEL / "model.safetensors").items()}  # the start
    for step in range(1, 5):
        weights = _checkpoint_weights(out / "checkpoints" / f"step-{step:08d}")
        for k in average:
            average[k] = DECAY * average[k] + (1 - DECAY) * weights[k].double()
    exported, final = load_file(out / "ema" / "model.safetensors"), load_file(out / "model.safetensors")
    assert exported.keys() == final.keys()
    moved = 0
    for k, v in exported.items():
        torch.testing.assert_close(v.double(), average[k], atol=1e-6, rtol=1e-5, msg=k)
        moved += not torch.equal(v, final[k])
    assert moved > 0  # the average is not the final weights
    assert (out / "ema" / "config.json").is_file()  # it loads as a model on its own

    # killed after the step-2 checkpoint, then run again: it resumes and ends at the same average
    shutil.rmtree(out / "ema")
    as_if_killed(out, drop=("step-00000003", "step-00000004"))
    proc = run_cli("train", str(tmp_path / "a" / "recipe.yaml"))
    assert_ok(proc)
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = load_file(out / "ema" / "model.safetensors")
    for k, v in exported.items():
        torch.testing.assert_close(resumed[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_lora_ema_is_an_adapter(tmp_path: Path) -> None:
    out = _train(tmp_path, "lora", method="lora")
    ema = load_file(out / "ema" / "adapter_model.safetensors")
    final = load_file(out / "adapter_model.safetensors")
    assert ema.keys() == final.keys() and any("lora_" in k for k in ema)
    assert any(not torch.equal(ema[k], final[k]) for k in ema)
    assert json.loads((out / "ema" / "adapter_config.json").read_text())["peft_type"] == "LORA"
