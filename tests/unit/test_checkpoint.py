"""Checkpoint rotation, output-dir planning and the fp16 message: pure file-system logic, no DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.engine.checkpoint import (
    MARKER,
    _rotate,
    best_checkpoint,
    plan_run,
    remove_checkpoints,
    remove_partial_checkpoints,
)
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


def test_a_nan_evaluation_is_never_the_best(tmp_path: Path) -> None:
    for s, loss in ((1, 2.0), (2, float("nan")), (3, 1.5), (4, float("inf"))):
        _ckpt(tmp_path, s, loss)
    done = sorted((tmp_path / "checkpoints").iterdir())
    assert best_checkpoint(done, "eval/loss", "min").name == "step-00000003"
    assert best_checkpoint(done, "eval/loss", "max").name == "step-00000001"


def test_a_finished_run_removes_its_checkpoints(tmp_path: Path) -> None:
    for s in (2, 4):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 6, complete=False)
    removed, kept = remove_checkpoints(tmp_path)
    assert removed == ["step-00000002", "step-00000004", "step-00000006"] and kept is None
    assert not (tmp_path / "checkpoints").exists()
    assert remove_checkpoints(tmp_path) == ([], None)  # nothing left: nothing to do


def test_a_finished_run_keeps_its_best_checkpoint(tmp_path: Path) -> None:
    for s, loss in ((2, 3.0), (4, 1.0), (6, 2.0)):
        _ckpt(tmp_path, s, loss)
    removed, kept = remove_checkpoints(tmp_path, ("eval/loss", "min"))
    assert removed == ["step-00000002", "step-00000006"] and kept is not None and kept.name == "step-00000004"
    assert _names(tmp_path) == ["step-00000004"]


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
    with pytest.raises(UserError, match="does not exist"):
        plan_run(out, "a: 1\n", resume_from=out / "checkpoints" / "step-00000099")
    with pytest.raises(UserError, match="is not a directory"):
        plan_run(out, "a: 1\n", resume_from=out / "recipe.yaml")
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
    """DeepSpeed's own dynamic loss scaler, driven to its minimum scale, raises what the trainer maps."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from llmtune.engine.step import fp16_scale_error, is_fp16_scale_error

    scaler = DynamicLossScaler(
        init_scale=1.0, scale_window=1000, min_scale=1.0, delayed_shift=1, consecutive_hysteresis=False
    )
    with pytest.raises(Exception) as caught:  # DeepSpeed raises a bare Exception
        scaler.update_scale(True)
    e = caught.value
    assert is_fp16_scale_error(e) and not is_fp16_scale_error(ValueError("shapes"))
    err = fp16_scale_error(e, 7, tmp_path)
    assert err.exit_code == 1 and "step 7" in str(err) and "bf16" in str(err)


def _result(loss: float = 1.0, grad_norm: float | None = 0.5, nonfinite: str | None = None, applied: bool = True):
    from llmtune.engine.step import WindowResult

    return WindowResult(loss, 10.0, grad_norm, {}, nonfinite, applied)


def _numbers_recipe(tmp_path: Path, **train: object):
    from llmtune.recipe.load import validate_recipe

    return validate_recipe(
        {
            "stage": "sft",
            "output_dir": str(tmp_path),
            "model": {"path": "m"},
            "data": {"train": [{"path": "d"}]},
            "train": train,
        }
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_check_numbers_decides_stop_skip_and_overflow(tmp_path: Path, precision: str) -> None:
    from rich.console import Console

    from llmtune.engine.checkpoint import TrainerState
    from llmtune.engine.step import check_numbers
    from llmtune.errors import TrainingError

    console = Console(quiet=True)
    stop = _numbers_recipe(tmp_path)
    stop.precision = precision
    state = TrainerState(step=5)
    assert check_numbers(_result(), stop, state, tmp_path, console) is None
    with pytest.raises(TrainingError, match=r"the loss is nan at step 5(.|\n)*train\.on_nan: skip"):
        check_numbers(_result(loss=float("nan"), nonfinite="loss"), stop, state, tmp_path, console)
    with pytest.raises(TrainingError, match="gradient norm is inf at step 5"):
        check_numbers(_result(grad_norm=float("inf"), nonfinite="gradient"), stop, state, tmp_path, console)
    # DeepSpeed skipped the step itself, the loss being finite: fp16's loss scaler settling, else a bad gradient
    if precision == "fp16":
        assert check_numbers(_result(grad_norm=float("inf"), applied=False), stop, state, tmp_path, console) == (
            "overflow"
        )
        assert state.overflow_skips == 1 and state.nan_skips == 0
    else:
        with pytest.raises(TrainingError, match="gradient"):
            check_numbers(_result(grad_norm=float("inf"), applied=False), stop, state, tmp_path, console)

    skip = _numbers_recipe(tmp_path, on_nan="skip", max_nan_skips=2)
    skip.precision = precision
    state = TrainerState(step=9)
    assert check_numbers(_result(loss=float("inf"), nonfinite="loss"), skip, state, tmp_path, console) == "nan"
    assert check_numbers(_result(grad_norm=float("nan"), nonfinite="gradient"), skip, state, tmp_path, console) == (
        "nan"
    )
    assert state.nan_skips == 2
    with pytest.raises(TrainingError, match=r"3 steps skipped for NaN / Inf, more than train\.max_nan_skips=2"):
        check_numbers(_result(loss=float("nan"), nonfinite="loss"), skip, state, tmp_path, console)


def test_a_recipe_saved_before_new_keys_existed_is_the_same_recipe(tmp_path: Path) -> None:
    """A run written by an older llmtune (its recipe.yaml lacks keys added since, at their defaults) resumes;
    a real change is still another recipe."""
    import yaml

    from llmtune.engine.checkpoint import same_recipe
    from llmtune.recipe.load import dump_recipe, validate_recipe
    from tests.conftest import base_recipe

    current = dump_recipe(validate_recipe(base_recipe(tmp_path)))
    older = yaml.safe_load(current)
    del older["train"]["ema"], older["data"]["memory_map"]  # keys this version added, at their defaults
    assert same_recipe(yaml.safe_dump(older, sort_keys=False), current)
    older["train"]["lr"] = 0.5
    assert not same_recipe(yaml.safe_dump(older, sort_keys=False), current)
    assert not same_recipe("stage: [unreadable", current)


def test_a_run_saved_with_memory_map_false_resumes_under_the_auto_default(tmp_path: Path) -> None:
    """memory_map picks how the rows are read, not which (tests/unit/test_corpus_rows.py): the old default,
    written into a run's recipe.yaml, is the same run as the new one."""
    import yaml

    from llmtune.engine.checkpoint import same_recipe
    from llmtune.recipe.load import dump_recipe, validate_recipe
    from tests.conftest import base_recipe

    current = dump_recipe(validate_recipe(base_recipe(tmp_path, stage="cpt", finetuning={"method": "full"})))
    assert yaml.safe_load(current)["data"]["memory_map"] == "auto"
    older = yaml.safe_load(current)
    older["data"]["memory_map"] = False
    assert same_recipe(yaml.safe_dump(older, sort_keys=False), current)
    older["data"]["max_length"] = 64
    assert not same_recipe(yaml.safe_dump(older, sort_keys=False), current)
