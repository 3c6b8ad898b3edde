"""Shared fixtures: the tiny offline chat model, the shared data sets, recipe writing and CLI runs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "recipes" / "quickstart" / "model"
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_SESSION_ENVIRON = dict(os.environ)  # the fork server's environment: before any test changes a variable


SLOW_TEST_TIMEOUT = 900  # seconds; the default tier's limit is pyproject.toml's `timeout`


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A slow test without a time limit of its own gets SLOW_TEST_TIMEOUT."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT))


def _become_subreaper() -> None:
    """Orphans of this test process (a torchrun worker whose launcher died, a chat child of a closed pty) are
    re-parented to it instead of to init, so that the end-of-test sweep below still finds them (Linux)."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_child_subreaper = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


_become_subreaper()


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children first), read from /proc; [] where /proc is missing."""
    parents: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ")"
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def kill_descendants(pid: int, spare: int | None = None) -> list[int]:
    """SIGKILL every process below pid but `spare` (whose own descendants are killed) and reap the ones that
    were ours; returns the pids killed."""
    import signal

    killed = [p for p in descendants(pid) if p != spare]
    for child in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    while True:  # reap our children (and adopted orphans) so that no zombie is left
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if reaped == 0:
            break
    return killed


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test() -> Any:
    """Every process a test started (the CLI, torchrun and its workers, a chat under a pty, bash pipelines)
    ends with the test, whether it passed, failed or hit its time limit (pytest-timeout, pyproject.toml)."""
    yield
    from tests import forkserver

    kill_descendants(os.getpid(), spare=forkserver.server_pid())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests import forkserver

    stats = forkserver.STATS
    if stats["forked"] or stats["fresh"]:
        differ = ", ".join(sorted(stats["differ"])) or "none"
        terminalreporter.write_line(
            f"CLI runs of one process: {stats['forked']} forked, {stats['fresh']} fresh (variables that differed: {differ})"
        )


def pytest_sessionfinish() -> None:
    from tests import forkserver

    forkserver.stop()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from llmtune.model.tokenizer import load_tokenizer
    from llmtune.recipe.schema import ModelConfig

    return load_tokenizer(ModelConfig(path=str(TINY_MODEL)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "llmtune-cache"))


def base_recipe(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A small sft recipe on the tiny model; sections replace or extend top-level blocks."""
    recipe: dict[str, Any] = {
        "stage": "sft",
        "output_dir": str(tmp_path / "out"),
        "seed": 0,
        "model": {"path": str(TINY_MODEL)},
        "finetuning": {"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"train": [{"path": str(ROOT / "recipes" / "quickstart" / "sft.jsonl")}], "max_length": 128},
        "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1},
        "precision": "fp32",
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(tmp_path: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli_command(*args: str, nproc: int = 1, environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of the real CLI in a fresh process (under torchrun when nproc > 1);
    environ: the variables to start from (default: this process's)."""
    environ = os.environ if environ is None else environ
    env = {**environ, "OMP_NUM_THREADS": "1" if nproc > 1 else environ.get("OMP_NUM_THREADS", "2")}
    # one hash seed for every CLI run, forked (tests/forkserver.py) or started afresh, so that the two kinds
    # compare alike wherever a test sets one run against another
    env["PYTHONHASHSEED"] = "0"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "llmtune", *args]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port())]
        cmd = [sys.executable, *launcher, "-m", "llmtune", *args]
    return cmd, env


def run_cli(
    *args: str,
    cwd: Path | None = None,
    timeout: int = 600,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    fresh: bool = False,
    **popen: Any,
) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process (DeepSpeed keeps process-global state). env: added variables;
    popen: further subprocess.run arguments (e.g. preexec_fn). A run with one process is a fork of a process
    that has the imports done (tests/forkserver.py) unless fresh=True: a test of what happens while the
    libraries are imported (their warnings, the modules a command imports) needs a fresh interpreter."""
    cmd, base = cli_command(*args, nproc=nproc)
    full_env = {**base, **(env or {})}
    if (
        nproc == 1 and not popen and not fresh
    ):  # a fork of a process that has the imports done (see tests/forkserver.py)
        from tests import forkserver

        server = forkserver.server(cli_command(environ=_SESSION_ENVIRON)[1])
        if server is not None and server.can_run(full_env):
            forkserver.STATS["forked"] += 1
            return server.run(cmd, list(args), cwd or ROOT, full_env, timeout)
        forkserver.STATS["fresh"] += 1
    return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, **popen)


def start_cli(*args: str, nproc: int = 1, output: int = subprocess.PIPE) -> subprocess.Popen:
    """Start the real CLI and return at once (for tests that signal or kill it). output=subprocess.DEVNULL
    for long runs whose output nobody reads (a full pipe would block them)."""
    cmd, env = cli_command(*args, nproc=nproc)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=output, stderr=output, text=True)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr


def assert_refused(proc: subprocess.CompletedProcess, *phrases: str, fix: bool = True) -> str:
    """A clean refusal: exit 2, `error:` (and a `fix:` line), no traceback, every phrase in stderr. Returns
    stderr for further checks."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "error:" in proc.stderr, proc.stderr
    if fix:
        assert "fix:" in proc.stderr, proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr
    return proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_metrics(out: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_curves(out: Path, *panels: str) -> None:
    """The run's curves.png (drawn when it finished) is a PNG, and the curves of its metrics.jsonl are these
    panels (what tests/unit/test_plot.py checks line by line)."""
    from llmtune.plot import CURVES_FILE, curve_data, read_run

    png = (out / CURVES_FILE).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, len(png)
    assert [p.title for p in curve_data([read_run(out)])] == list(panels)


def as_if_killed(out: Path, *, drop: tuple[str, ...] = (), unmark: tuple[str, ...] = (), export: bool = True) -> None:
    """Leave output_dir as a SIGKILL would: the named checkpoints never written (drop) or never completed
    (unmark), no exported model (export=True removes it), run.json still saying running."""
    import json
    import shutil

    for name in drop:
        shutil.rmtree(out / "checkpoints" / name)
    for name in unmark:
        (out / "checkpoints" / name / "COMPLETE").unlink()
    if export:
        for f in ("model.safetensors", "adapter_model.safetensors", "curves.png"):
            (out / f).unlink(missing_ok=True)
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**manifest, "status": "running"}))
