"""train.report_to: tensorboard, wandb (offline) and mlflow (a local file store) write into output_dir what
metrics.jsonl holds, and the resolved recipe; validate refuses a tracker whose package is missing."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmtune.engine.trackers import numbers
from tests.conftest import ROOT, assert_ok, assert_refused, base_recipe, read_metrics, run_cli, write_recipe

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

# a machine's tracker settings would take the runs elsewhere: the defaults (offline, in output_dir) are under test
TRACKER_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


def expected(out: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as name -> {step: value}, the numbers a tracker can plot."""
    series: dict[str, dict[int, float]] = {}
    for row in read_metrics(out):
        for k, v in numbers(row).items():
            series.setdefault(k, {})[row["step"]] = v
    return series


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    series = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        series[tag] = {e.step: e.value for e in events}
        assert len(series[tag]) == len(events), f"tensorboard {tag}: a step twice in {[e.step for e in events]}"
    return series


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's .wandb file: LevelDB's log format (32 KiB blocks of records, each with a
    7-byte header crc32 / length / type) after wandb's 7-byte file header, each record a wandb protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk  # full / first, middle / last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def wandb_history(records: list[Any]) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    series.setdefault(key, {})[r.history.step.num] = json.loads(item.value_json)
    return series


def assert_same(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], what: str) -> None:
    assert set(got) == set(want), f"{what}: {sorted(set(got) ^ set(want))}"
    for name, steps in want.items():
        assert set(got[name]) == set(steps), f"{what} {name}: steps {sorted(got[name])} vs {sorted(steps)}"
        for step, v in steps.items():
            assert got[name][step] == pytest.approx(v, rel=1e-6, abs=1e-9), f"{what} {name} step {step}"


def test_three_trackers_write_what_metrics_jsonl_holds_offline(tmp_path: Path, monkeypatch) -> None:
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    recipe = base_recipe(
        tmp_path,
        data={
            "train": [{"path": str(ROOT / "recipes" / "quickstart" / "sft.jsonl")}],
            "max_length": 128,
            "eval_split": 0.2,
        },
        train={"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1, "eval_every": 2, "save_every": 2},
    )
    recipe["train"]["report_to"] = ["tensorboard", "wandb", "mlflow"]
    recipe["train"]["run_name"] = "tiny-sft"
    path = write_recipe(tmp_path, recipe)
    proc = run_cli("train", str(path), cwd=tmp_path)
    assert_ok(proc)
    assert "warning: tracker" not in proc.stdout + proc.stderr
    out = tmp_path / "out"
    want = expected(out)
    assert {"loss", "lr", "eval/loss"} <= set(want) and len(want["loss"]) == 4

    # tensorboard: every scalar at its step, and the recipe as text
    assert_same(tensorboard_scalars(out / "tensorboard"), want, "tensorboard")

    # wandb: one offline run in output_dir/wandb, its history and its config the resolved recipe
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    ids = json.loads((out / "trackers.json").read_text())
    (run_file,) = run_dir.glob(f"run-{ids['wandb_id']}.wandb")
    records = wandb_records(run_file)
    assert_same(wandb_history(records), want, "wandb")
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.display_name == "tiny-sft"
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"]
    assert config["stage"] == "sft"

    # mlflow: a file store in output_dir/mlruns; the run finished, its metrics, params and recipe.yaml artifact
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run(ids["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-sft"
    got = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in run.data.metrics}
    assert_same(got, want, "mlflow")
    assert run.data.params["train.lr"] == "0.001" and run.data.params["stage"] == "sft"
    artifact = client.download_artifacts(run.info.run_id, "recipe.yaml", str(tmp_path))
    assert Path(artifact).read_text() == (out / "recipe.yaml").read_text()
    assert yaml.safe_load(Path(artifact).read_text())["train"]["run_name"] == "tiny-sft"


def test_validate_refuses_a_tracker_whose_package_is_missing(tmp_path: Path) -> None:
    """The package is hidden the way a missing one looks to Python (sys.modules[name] = None: import and
    find_spec both fail); everything else is the real validate command."""
    recipe = base_recipe(tmp_path)
    recipe["train"]["report_to"] = "wandb"
    path = write_recipe(tmp_path, recipe)
    hide = "import sys; sys.modules['wandb'] = None; sys.argv = ['llmtune', 'validate', sys.argv[1]]; "
    code = hide + "from llmtune.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert_refused(proc, "train.report_to: wandb is not installed", "pip install wandb", "llmtune[trackers]")
    # with the package there, the same recipe is valid
    assert_ok(run_cli("validate", str(path)))
