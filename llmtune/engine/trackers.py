"""Experiment trackers (``train.report_to``): tensorboard, wandb and mlflow get every row metrics.jsonl gets,
with its step, and the resolved recipe. Offline by default: everything lands in output_dir.

    tensorboard  output_dir/tensorboard          scalars per metric, the recipe as text
    wandb        output_dir/wandb (offline mode  history per step, the recipe as the run's config
                 unless WANDB_MODE is set)       (`wandb sync output_dir/wandb/offline-run-*` uploads it)
    mlflow       output_dir/mlruns, a local file metrics per step, the recipe flattened into params and
                 store (or MLFLOW_TRACKING_URI)  recipe.yaml as an artifact

Only rank 0 opens them. A run resumed in the same output_dir continues the same wandb / mlflow run (their
ids are kept in output_dir/trackers.json); tensorboard drops the events after the resumed step. A tracker
that fails never stops training: it is reported once and switched off, and metrics.jsonl stays complete.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from llmtune.errors import Stopped

IDS_FILE = "trackers.json"
# What the trackers write into output_dir (a run that left only these has nothing of value to resume).
TRACKER_FILES = ("tensorboard", "wandb", "mlruns", IDS_FILE)
TRACKERS = ("tensorboard", "wandb", "mlflow")
# The module each tracker needs (validate checks them without importing them).
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PIP_NAMES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def missing_tracker(names: list[str]) -> str | None:
    """The first tracker in names whose package is not importable here (found without importing it)."""
    import importlib.util

    for name in names:
        try:
            found = importlib.util.find_spec(MODULES[name]) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return name
    return None


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl row, without its step (text such as skipped: nan, and None, are not
    metrics a tracker can plot)."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"}; lists are written as JSON."""
    flat: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return flat


class Tracker(Protocol):
    """One backend: start (a fresh run, or with ids from trackers.json the earlier one), log one row, finish."""

    name: str

    def start(
        self, out: Path, run_name: str, recipe: dict[str, Any], recipe_text: str, ids: dict[str, Any]
    ) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def rewind(self, step: int) -> None:
        """A resumed run logs again from this step on (wandb and mlflow keep every value they got)."""

    def finish(self, status: str) -> None: ...


class TensorBoardTracker:
    name = "tensorboard"

    def start(self, out, run_name, recipe, recipe_text, ids):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        if not ids.get("tensorboard"):  # once per run
            ids["tensorboard"] = True
            indented = "\n".join("    " + line for line in recipe_text.splitlines())  # markdown code block
            self.writer.add_text("recipe", indented, 0)
        self.writer.flush()

    def log(self, step, metrics):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def rewind(self, step: int) -> None:
        """Hide the events at `step` and after (a resumed run logs them again): a session start at that step,
        which tensorboard reads as "purge what follows" (SummaryWriter's purge_step, at any time)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer._get_file_writer().add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
        self.writer.flush()

    def finish(self, status):
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def start(self, out, run_name, recipe, recipe_text, ids):
        import wandb

        run_id = ids.get("wandb_id") or secrets.token_hex(4)  # not `random`: that one is seeded for training
        ids["wandb_id"] = run_id
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "llmtune"),
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(out),  # its files go to out/wandb
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            config=recipe,
            settings=wandb.Settings(silent=True),
        )

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def finish(self, status):
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MlflowTracker:
    name = "mlflow"

    def start(self, out, run_name, recipe, recipe_text, ids):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A local file store: mlflow 3 keeps it behind this switch (its default is a database server)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=uri)
        run_id = ids.get("mlflow_run_id")
        if run_id is not None and ids.get("mlflow_uri") == uri:
            try:
                client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return
            except Exception:
                pass  # gone from the store: start a new run
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "llmtune")
        found = client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        self.run_id = client.create_run(exp_id, run_name=run_name).info.run_id
        ids["mlflow_run_id"], ids["mlflow_uri"] = self.run_id, uri
        params = [Param(k, v[:6000]) for k, v in flatten(recipe).items()]
        for i in range(0, len(params), 100):  # mlflow takes at most 100 params a batch
            client.log_batch(self.run_id, params=params[i : i + 100])
        client.log_text(self.run_id, recipe_text, "recipe.yaml")

    def log(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, status):
        state = {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, state)


BACKENDS: dict[str, Any] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers of one run (none on ranks other than 0). ``log`` takes a metrics.jsonl row; a tracker that
    raises is reported once and dropped, so that tracking never costs a run."""

    def __init__(self, trackers: list[Tracker], warn: Any = print, step_offset: int = 0, extra: dict | None = None):
        self.trackers, self.warn = trackers, warn
        self.step_offset, self.extra = step_offset, extra or {}
        self.closed = False

    @classmethod
    def open(
        cls,
        names: Sequence[str],
        out: Path,
        run_name: str,
        recipe: dict[str, Any],
        recipe_text: str,
        *,
        enabled: bool = True,
        resume: bool = False,
        warn: Any = print,
    ) -> Trackers:
        """Start each tracker named: fresh, or (resume) continuing the runs trackers.json names."""
        if not enabled or not names:
            return cls([], warn)
        ids_path = out / IDS_FILE
        ids: dict[str, Any] = {}
        if resume and ids_path.is_file():
            try:
                ids = json.loads(ids_path.read_text(encoding="utf-8"))
            except ValueError:
                ids = {}
        started = []
        for name in names:
            tracker = BACKENDS[name]()
            try:
                tracker.start(out, run_name, recipe, recipe_text, ids)
            except Exception as e:
                warn(f"warning: tracker {name} could not start ({type(e).__name__}: {e}); training goes on without it")
                continue
            started.append(tracker)
        ids_path.write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
        return cls(started, warn)

    def shifted(self, step_offset: int, **extra: Any) -> Trackers:
        """The same trackers, with every step moved by step_offset and extra fields in every row (rejection
        sampling's rounds: one curve over all rounds, each row with its round)."""
        view = Trackers(self.trackers, self.warn, self.step_offset + step_offset, {**self.extra, **extra})
        view.closed = True  # the owner closes them
        return view

    def log(self, record: dict[str, Any]) -> None:
        if not self.trackers:
            return
        metrics = numbers({**self.extra, **record})
        step = int(record.get("step", 0)) + self.step_offset
        for tracker in list(self.trackers):
            try:
                tracker.log(step, metrics)
            except Exception as e:
                self._drop(tracker, "log", e)

    def resumed_after(self, step: int) -> None:
        """The run continues after `step` (a checkpoint's): what was logged past it is logged again."""
        for tracker in list(self.trackers):
            rewind = getattr(tracker, "rewind", None)
            if rewind is None:
                continue
            try:
                rewind(step + 1 + self.step_offset)
            except Exception as e:
                self._drop(tracker, "rewind", e)

    def close(self, status: str = "finished") -> None:
        """End every tracker's run: finished, stopped or failed."""
        if self.closed:
            return
        self.closed = True
        for tracker in list(self.trackers):
            try:
                tracker.finish(status)
            except Exception as e:
                self._drop(tracker, "finish", e)
        self.trackers = []

    def _drop(self, tracker: Tracker, what: str, e: Exception) -> None:
        self.warn(
            f"warning: tracker {tracker.name} failed to {what} ({type(e).__name__}: {e}); it is switched off, "
            "training goes on (metrics.jsonl has every row)"
        )
        if tracker in self.trackers:
            self.trackers.remove(tracker)


def remove_tracker_files(out: Path) -> None:
    """Before a fresh start in an output_dir: the tensorboard events and tracker ids of an earlier run go (its
    wandb and mlflow runs stay where they are, as runs of their own)."""
    import shutil

    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    (out / IDS_FILE).unlink(missing_ok=True)


def status_of_exception(e: BaseException) -> str:
    """finished / stopped / failed, as run.json says it, for an exception that ended a run."""
    return "stopped" if isinstance(e, (Stopped, KeyboardInterrupt)) else "failed"
