"""Checkpoint rotation, output-dir planning and the fp16 message: pure file-system logic, no DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.engine.checkpoint import MARKER, _rotate, best_checkpoint, plan_run, remove_partial_checkpoints
from llmtune.errors import UserError


def _ckpt(out: Path, step: int, loss: float | None = None, complete: bool = True) -> Path:
    p = out / "checkpoints" / f"step-{step:08d}"
    p.mkdir(parents=True)
    state = {"step": step, "eval_step": step if loss is not None else -1}
    if loss is not None:
        state["eval_metrics"] = {"eval/loss": loss}
    (p / "trainer_state.json").write_text(json.dumps(state))
    if complete:
        (p / MARKER).write_text("ok\n")
    return p


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_rotation_keeps_the_newest_n(tmp_path: Path) -> None:
    for s in (1, 2, 3, 4):
        _ckpt(tmp_path, s)
    _rotate(tmp_path, keep=2)
    assert _names(tmp_path) == ["step-00000003", "step-00000004"]


def test_rotation_keeps_the_best_as_well(tmp_path: Path) -> None:
    for s, loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, None)):
        _ckpt(tmp_path, s, loss)
    assert best_checkpoint(sorted((tmp_path / "checkpoints").iterdir()), "eval/loss", "min").name == "step-00000002"
    assert best_checkpoint(sorted((tmp_path / "checkpoints").iterdir()), "eval/loss", "max").name == "step-00000001"
    _rotate(tmp_path, keep=1, best=("eval/loss", "min"))
    assert _names(tmp_path) == ["step-00000002", "step-00000004"]


def test_rotation_never_counts_or_keeps_old_partial_writes(tmp_path: Path) -> None:
    _ckpt(tmp_path, 1)
    _ckpt(tmp_path, 2, complete=False)  # a write that was interrupted
    _ckpt(tmp_path, 3)
    _rotate(tmp_path, keep=2)
    assert _names(tmp_path) == ["step-00000001", "step-00000003"]
    _ckpt(tmp_path, 4, complete=False)
    assert remove_partial_checkpoints(tmp_path) == ["step-00000004"]


def test_plan_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert plan_run(out, "a: 1\n").resume_from is None  # nothing there yet
    out.mkdir()
    (out / "recipe.yaml").write_text("a: 1\n")
    (out / "run.json").write_text(json.dumps({"status": "running"}))
    ckpt = _ckpt(out, 5)
    assert plan_run(out, "a: 1\n").resume_from == ckpt
    assert plan_run(out, "a: 1\n", resume=False).resume_from is None
    with pytest.raises(UserError, match="different recipe"):
        plan_run(out, "a: 2\n")
    assert plan_run(out, "a: 2\n", overwrite=True).resume_from is None
    (out / "run.json").write_text(json.dumps({"status": "finished"}))
    assert plan_run(out, "a: 1\n").finished
    with pytest.raises(UserError, match="not a complete llmtune checkpoint"):
        plan_run(out, "a: 1\n", resume_from=_ckpt(out, 6, complete=False))
    assert plan_run(out, "a: 9\n", resume_from=ckpt).resume_from == ckpt
    # a run that stopped before leaving a checkpoint or a model can be started over with another recipe
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "recipe.yaml").write_text("a: 1\n")
    (fresh / "run.json").write_text(json.dumps({"status": "failed"}))
    assert plan_run(fresh, "a: 2\n").resume_from is None
    (fresh / "model.safetensors").write_text("weights")
    with pytest.raises(UserError):
        plan_run(fresh, "a: 2\n")


def test_fp16_minimum_scale_becomes_a_training_error(tmp_path: Path) -> None:
    from llmtune.engine.trainer import fp16_scale_error, is_fp16_scale_error

    e = Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")
    assert is_fp16_scale_error(e) and not is_fp16_scale_error(ValueError("shapes"))
    err = fp16_scale_error(e, 7, tmp_path)
    assert err.exit_code == 1 and "step 7" in str(err) and "bf16" in str(err)
