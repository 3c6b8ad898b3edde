"""train.on_nan: skip. A model with one poisoned token (its input embedding is NaN) gives a NaN loss exactly
for the rows that contain that token; every other row trains normally. A skipped step must change no
weight and no optimizer state, be counted, survive a resume, and stop the run past train.max_nan_skips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmtune.engine.checkpoint import weights_only_loading
from tests.conftest import TINY_MODEL, as_if_killed, base_recipe, read_metrics, run_cli, write_recipe
from tests.integration.test_train import unseen_sft_data

POISON = "Zyxwq"  # a made-up word: the data rows never contain it otherwise


def poisoned_model(tmp_path: Path) -> tuple[Path, int]:
    """The tiny model with the input embedding of one token of POISON set to NaN; returns (dir, token id)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    normal = set(tok(" ".join(_normal_text(tmp_path)))["input_ids"])
    candidates = [i for i in tok(f"Echo twice: {POISON}")["input_ids"] if i not in normal]
    assert candidates, "the poison word shares every token with the normal data"
    bad = candidates[-1]
    out = tmp_path / "poisoned-model"
    shutil.copytree(TINY_MODEL, out)
    weights = load_file(out / "model.safetensors")
    weights["model.embed_tokens.weight"][bad] = float("nan")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out, bad


def _normal_text(tmp_path: Path) -> list[str]:
    path = unseen_sft_data(tmp_path / "normal.jsonl", n=40)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [m["content"] for r in rows for m in r["messages"]]


def poisoned_data(tmp_path: Path, n_poisoned: int) -> Path:
    """40 normal echo rows, then n_poisoned rows with POISON in the user turn."""
    path = unseen_sft_data(tmp_path / "normal.jsonl", n=40)
    lines = path.read_text().splitlines()
    for i in range(n_poisoned):
        word = ["apple", "river", "stone"][i % 3]
        row = {
            "messages": [
                {"role": "user", "content": f"Echo twice: {POISON} {word}"},
                {"role": "assistant", "content": f"{word} {word}"},
            ]
        }
        lines.insert(7 + 17 * i, json.dumps(row))
    out = tmp_path / "poisoned.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DeepSpeed checkpoint's model and optimizer state (LR scheduler and counters left out)."""
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                if "lr_scheduler" not in str(k):
                    walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    with weights_only_loading():
        for f in sorted(ckpt.glob("*.pt")):
            walk(f.name, torch.load(f, map_location="cpu"))
    assert found, f"no tensors in {ckpt}"
    return found


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN included (the poisoned embedding row stays NaN in full fine-tuning)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.allclose(a.float(), b.float(), rtol=0, atol=0, equal_nan=True)
    return torch.equal(a, b)


def _recipe(tmp_path: Path, model: Path, data: Path, **train: Any) -> dict[str, Any]:
    return base_recipe(
        tmp_path,
        model={"path": str(model)},
        data={"train": [{"path": str(data)}], "max_length": 64},
        train={"max_steps": 12, "micro_batch_size": 4, "lr": 2e-3, "save_every": 1, "keep_checkpoints": 20, **train},
    )


def _skipped_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if r.get("skipped") == "nan"]


def test_skip_changes_nothing_counts_and_resumes_exactly(tmp_path: Path) -> None:
    model, _ = poisoned_model(tmp_path)
    data = poisoned_data(tmp_path, n_poisoned=1)
    recipe = _recipe(tmp_path, model, data, on_nan="skip")
    path = write_recipe(tmp_path, recipe)
    proc = run_cli("train", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(recipe["output_dir"])
    skipped = _skipped_steps(out)
    # 41 rows, batch 4: 11 steps per epoch, 12 steps = the poisoned row is met in both epochs (or once,
    # when the second epoch's order puts it past step 12)
    assert 1 <= len(skipped) <= 2, skipped
    assert f"step {skipped[0]} skipped" in proc.stdout and "the loss is nan" in proc.stdout
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "finished" and manifest["trainer_state"]["nan_skips"] == len(skipped)
    assert f"({len(skipped)} skipped for NaN / Inf)" in proc.stdout

    k = skipped[0]
    ckpts = out / "checkpoints"
    before, at = tensors(ckpts / f"step-{k - 1:08d}"), tensors(ckpts / f"step-{k:08d}")
    assert before.keys() == at.keys()
    unchanged = [name for name in before if same(before[name], at[name])]
    assert len(unchanged) == len(before), "a skipped step changed weights or optimizer state"
    after = tensors(ckpts / f"step-{k + 1:08d}")
    assert any(not same(at[name], after[name]) for name in at), "the step after a skip must train"
    # the LR schedule moves on through a skipped step
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    assert lrs[k + 1] < lrs[k] < lrs[k - 1]
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in adapter.values())
    final = dict(adapter)

    # killed just after the skipped step: the resumed run ends with the same weights and the same count
    as_if_killed(out, drop=tuple(p.name for p in ckpts.iterdir() if int(p.name.split("-")[1]) > k))
    proc = run_cli("train", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {ckpts / f'step-{k:08d}'}" in proc.stdout
    resumed = load_file(out / "adapter_model.safetensors")
    for name, value in final.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)
    assert json.loads((out / "run.json").read_text())["trainer_state"]["nan_skips"] == len(skipped)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_skip_under_zero_bf16_full(tmp_path: Path, zero_stage: int) -> None:
    """DeepSpeed's own ZeRO optimizers (bf16 master weights) see the NaN too: still exactly one skip per
    poisoned step, weights unchanged, the run finishes."""
    model, _ = poisoned_model(tmp_path)
    data = poisoned_data(tmp_path, n_poisoned=1)
    recipe = _recipe(tmp_path, model, data, on_nan="skip", max_steps=8)
    recipe.update(precision="bf16", finetuning={"method": "full"}, distributed={"zero_stage": zero_stage})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(recipe["output_dir"])
    skipped = _skipped_steps(out)
    assert len(skipped) == 1, skipped
    k = skipped[0]
    before, at = tensors(out / "checkpoints" / f"step-{k - 1:08d}"), tensors(out / "checkpoints" / f"step-{k:08d}")
    assert all(same(before[name], at[name]) for name in before)
    weights = load_file(out / "model.safetensors")
    bad = [name for name, v in weights.items() if not torch.isfinite(v).all()]
    assert bad == ["model.embed_tokens.weight"]  # the poisoned row only: full fine-tuning kept it as it was
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r and r["step"] != k]
    assert all(v is not None for v in losses)


def test_too_many_skips_stop_the_run(tmp_path: Path) -> None:
    model, _ = poisoned_model(tmp_path)
    data = poisoned_data(tmp_path, n_poisoned=3)
    recipe = _recipe(tmp_path, model, data, on_nan="skip", max_nan_skips=1)
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "more than train.max_nan_skips=1" in proc.stderr and "fix:" in proc.stderr
    out = Path(recipe["output_dir"])
    assert len(_skipped_steps(out)) == 1
    assert not (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_stop_is_the_default_and_names_the_option(tmp_path: Path) -> None:
    model, _ = poisoned_model(tmp_path)
    data = poisoned_data(tmp_path, n_poisoned=1)
    recipe = _recipe(tmp_path, model, data)
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "the loss is nan at step" in proc.stderr and "train.on_nan: skip" in proc.stderr
