"""engine.trackers without a training run: what a row gives a tracker, train.report_to's forms, and that a
tracker failing (to start, or later) is reported once and switched off while the others go on."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmtune.engine.trackers import Trackers, flatten, numbers
from llmtune.recipe.schema import TrainConfig


def test_a_row_gives_its_finite_numbers_without_the_step() -> None:
    row = {"step": 3, "loss": 1.5, "tokens": 12, "skipped": "nan", "grad_norm": None, "eval/x": float("inf")}
    assert numbers(row) == {"loss": 1.5, "tokens": 12.0}
    assert numbers({"step": 1, "flag": True}) == {}


def test_flatten_names_nested_keys_with_dots() -> None:
    assert flatten({"train": {"lr": 0.1, "report_to": ["wandb"]}, "seed": 1}) == {
        "train.lr": "0.1",
        "train.report_to": '["wandb"]',
        "seed": "1",
    }


@pytest.mark.parametrize(
    ("given", "want"),
    [
        (None, []),
        ("none", []),
        ("wandb", ["wandb"]),
        ("tensorboard,mlflow", ["tensorboard", "mlflow"]),
        (["wandb", "wandb"], ["wandb"]),
        ("all", ["tensorboard", "wandb", "mlflow"]),
    ],
)
def test_report_to_takes_a_name_a_list_or_none(given, want) -> None:
    assert TrainConfig(report_to=given).report_to == want


def test_report_to_refuses_an_unknown_tracker() -> None:
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(report_to=["wandb", "comet"])


class Broken:
    """A tracker whose log fails after the first row."""

    name = "broken"

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log(self, step: int, metrics: dict) -> None:
        if self.rows:
            raise OSError("disk full")
        self.rows.append((step, metrics))

    def finish(self, status: str) -> None:
        raise AssertionError("a dropped tracker is not finished")


class Recording:
    name = "recording"

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []
        self.status: str | None = None

    def log(self, step: int, metrics: dict) -> None:
        self.rows.append((step, metrics))

    def finish(self, status: str) -> None:
        self.status = status


def test_a_failing_tracker_is_reported_once_and_the_others_go_on() -> None:
    warnings: list[str] = []
    broken, recording = Broken(), Recording()
    trackers = Trackers([broken, recording], warn=warnings.append)
    for step in (1, 2, 3):
        trackers.log({"step": step, "loss": float(step)})
    assert len(warnings) == 1 and "tracker broken failed to log (OSError: disk full)" in warnings[0]
    assert broken.rows == [(1, {"loss": 1.0})]
    assert recording.rows == [(1, {"loss": 1.0}), (2, {"loss": 2.0}), (3, {"loss": 3.0})]
    # a shifted view (rejection sampling's rounds) moves the steps and adds its fields; only the owner closes
    trackers.shifted(10, round=2).log({"step": 1, "loss": 0.5})
    assert recording.rows[-1] == (11, {"round": 2.0, "loss": 0.5})
    trackers.shifted(10).close("failed")
    assert recording.status is None
    trackers.close("failed")
    assert recording.status == "failed" and len(warnings) == 1


def test_a_tracker_that_cannot_start_is_skipped_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")  # mlflow refuses the scheme
    warnings: list[str] = []
    trackers = Trackers.open(
        ["mlflow", "tensorboard"], tmp_path, "run", {"stage": "sft"}, "stage: sft\n", warn=warnings.append
    )
    assert [t.name for t in trackers.trackers] == ["tensorboard"]
    assert len(warnings) == 1 and "tracker mlflow could not start" in warnings[0]
    trackers.log({"step": 1, "loss": 2.0})
    trackers.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_nothing_is_opened_on_other_ranks_or_without_trackers(tmp_path: Path) -> None:
    assert Trackers.open(["tensorboard"], tmp_path, "run", {}, "", enabled=False).trackers == []
    assert Trackers.open([], tmp_path, "run", {}, "").trackers == []
    assert not any(tmp_path.iterdir())
