"""The trainer's handling of a CUDA out-of-memory error, in a real tiny run of the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, base_recipe, cli_command, write_recipe

OOM_AT_STEP_3 = """
import sys, torch
from llmtune.stages.lm import LanguageModelStep
calls, step = 0, LanguageModelStep.step
def failing_step(self, model, batch):  # the third training micro-batch runs out of memory
    global calls
    calls += torch.is_grad_enabled()
    if calls == 3:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has 79 GiB in use")
    return step(self, model, batch)
LanguageModelStep.step = failing_step
from llmtune.cli import main
sys.argv = ["llmtune", *sys.argv[1:]]
main()
"""


def test_trainer_turns_out_of_memory_into_one_message_and_keeps_the_checkpoint(tmp_path):
    """A real tiny sft run whose third step raises torch.OutOfMemoryError from inside the stage's step: exit 1,
    one message with the levers, no traceback, the checkpoint of step 2 kept, run.json failed with its peak."""
    recipe = base_recipe(tmp_path, train={"max_steps": 5, "save_every": 2, "micro_batch_size": 2, "log_every": 1})
    path = write_recipe(tmp_path, recipe)
    script = tmp_path / "oom.py"
    script.write_text(OOM_AT_STEP_3)
    _, env = cli_command("train", str(path))
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, str(script), "train", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = proc.stderr + proc.stdout
    assert "error: CUDA out of memory at step 3 (tried to allocate 20.00 GiB)" in err
    assert "fix: lower the memory a step needs: train.micro_batch_size 2 -> 1" in err
    assert "step-00000002" in err and "is kept" in err
    out = tmp_path / "out"
    assert (out / "checkpoints" / "step-00000002").is_dir()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["peak_memory"]["peak_rss_gb"] > 0
