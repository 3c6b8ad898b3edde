"""A run whose stdout is a pipe (`llmtune train r.yaml | tee log`): its reader going away never loses the
run, and Ctrl-C (SIGINT to the whole pipeline's process group, as a terminal sends it) checkpoints, exits
130, and the same command resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, base_recipe, cli_command, write_recipe

STEP = re.compile(r"^step (\d+)")


def _lines_until(stream, pattern: re.Pattern[str], seen: list[str]) -> re.Match[str]:
    for line in stream:
        seen.append(line)
        m = pattern.search(line)
        if m:
            return m
    raise AssertionError("the output ended before a line matching " + pattern.pattern + ":\n" + "".join(seen[-30:]))


def _complete_step(out: Path) -> int:
    root = out / "checkpoints"
    done = [int(p.name.split("-")[1]) for p in root.iterdir() if (p / "COMPLETE").is_file()] if root.is_dir() else []
    return max(done, default=0)


def _wait_for(condition, proc: subprocess.Popen, what: str, limit: float = 300) -> None:
    """Poll until condition() holds (the run's own progress decides, not a fixed sleep); fail if the run ends."""
    deadline = time.monotonic() + limit
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {limit} s"
        time.sleep(0.1)


def _last_logged_step(out: Path) -> int:
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:
            continue
    return max(steps, default=0)


@pytest.mark.slow  # two runs of the CLI (~40 s here)
def test_a_piped_run_survives_its_reader_and_ctrl_c_checkpoints_and_resumes(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, train={"max_steps": 500, "save_every": 2, "log_every": 1, "micro_batch_size": 2})
    path = write_recipe(tmp_path, recipe)
    out = Path(recipe["output_dir"])
    cmd, env = cli_command("train", str(path))
    with open(tmp_path / "stderr.txt", "w") as err:
        # `llmtune train recipe.yaml | tee log`: both in one process group, as a shell's job
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, process_group=0)
        tee = subprocess.Popen(
            ["tee", str(tmp_path / "log")], stdin=proc.stdout, stdout=subprocess.PIPE, text=True, process_group=proc.pid
        )
        proc.stdout.close()
        seen: list[str] = []
        _lines_until(tee.stdout, STEP, seen)
        # the reader goes away without a signal to llmtune: every later step line is written to a dead pipe
        tee.kill()
        tee.wait()
        tee.stdout.close()
        after = _last_logged_step(out) + 2
        _wait_for(lambda: _complete_step(out) >= after, proc, f"a checkpoint at step {after} or later")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: to llmtune (and tee, gone already)
        assert proc.wait(timeout=300) == 130
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    assert "SIGINT: stopping at the next micro-batch" in stderr, stderr[-3000:]  # said where it can still be read
    assert "stopped: by SIGINT after step" in stderr, stderr[-3000:]
    stopped = int(stderr.split("after step ")[1].split(";")[0])
    assert stopped >= after and (out / "checkpoints" / f"step-{stopped:08d}" / "COMPLETE").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"

    again = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0
    )
    seen = []
    resumed = _lines_until(again.stdout, re.compile(r"resumed from .*\(step (\d+)\)"), seen)
    assert int(resumed.group(1)) == stopped
    first = _lines_until(again.stdout, STEP, seen)
    assert int(first.group(1)) == stopped + 1
    os.killpg(again.pid, signal.SIGINT)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 130, stderr[-3000:]
