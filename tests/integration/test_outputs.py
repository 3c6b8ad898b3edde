"""What a finished run leaves, and what its piped log says: step N/TOTAL with elapsed time and ETA, one
number format; files readable like normal files; llmtune's model card; run.json's epochs; no stale
checkpoints."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tests.conftest import assert_ok, base_recipe, run_cli, write_recipe
from tests.integration.test_train import unseen_sft_data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_finished_run_s_log_and_outputs(tmp_path: Path) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=20)
    recipe = base_recipe(
        tmp_path,
        data={"train": [{"path": str(data)}], "max_length": 64, "eval_split": 0.2},
        train={"epochs": 2, "micro_batch_size": 4, "lr": 3e-3, "log_every": 1, "save_every": 2},
    )
    recipe["train"].pop("max_steps")
    path = write_recipe(tmp_path, recipe)
    proc = run_cli("train", str(path), fresh=True)  # stdout and stderr are pipes; a fresh interpreter
    assert_ok(proc)
    out = Path(recipe["output_dir"])

    # the log: every step line with the total, elapsed time and ETA; lr in one format; counts as integers
    steps = [line for line in proc.stdout.splitlines() if re.match(r"step \d+/\d+ \(\d+:\d\d elapsed", line)]
    assert len(steps) == 8, proc.stdout  # 16 training rows / 4 per step x 2 epochs
    for line in steps:
        assert re.match(r"step \d/8 \(\d+:\d\d elapsed, ETA \d+:\d\d\): loss=\d+\.\d{4} lr=\d\.\d\de-\d\d ", line), line
    assert steps[-1].startswith("step 8/8 ") and "ETA 0:00" in steps[-1] and "epoch=2.00" in steps[-1]
    assert re.search(r"^step 8/8 \(eval\): eval/loss=\d+\.\d{4} eval/units=\d+ ", proc.stdout, re.M), proc.stdout
    assert "Loading weights" not in proc.stdout + proc.stderr

    # every file as readable as the umask lets a plain new file be (the weights were 0600)
    mode = 0o666 & ~_umask()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "adapter_model.safetensors") in files
    assert all(p.stat().st_mode & 0o777 == mode for p in files), [(p.name, oct(p.stat().st_mode)) for p in files]

    # llmtune's model card, not peft's template
    card = (out / "README.md").read_text()
    assert "[More Information Needed]" not in card
    assert "| stage | sft |" in card and "| method | lora, r 8, alpha 16: an adapter |" in card
    assert "| data | `echo.jsonl (local)` |" in card and "8 steps (2 epochs)" in card
    assert "| loss (last step) |" in card and "| eval/loss |" in card and "AutoPeftModelForCausalLM" in card
    assert str(tmp_path) not in card

    # two epochs done, said as two
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["epochs"] == 2.0
    assert manifest["trainer_state"]["epoch"] == 2 and manifest["trainer_state"]["window_in_epoch"] == 0

    # the export is the output: the checkpoints (steps 6 and 8; rotation took 2 and 4) are gone
    assert not (out / "checkpoints").exists()
    assert "removed 2 checkpoints" in proc.stdout
