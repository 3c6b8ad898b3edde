"""scripts/pipeline_cpu.sh chains every stage on the tiny model: each output loads as the next input."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_cpu_pipeline_chains_all_stages(tmp_path: Path) -> None:
    out = tmp_path / "pipeline"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "pipeline_cpu.sh"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pipeline finished" in proc.stdout
    for stage in ("cpt", "sft", "rm", "dpo"):
        assert json.loads((out / stage / "run.json").read_text())["status"] == "finished"
    assert (out / "sft-merged" / "config.json").is_file()
    ppl = json.loads((out / "eval-perplexity.json").read_text())
    rm = json.loads((out / "eval-rm.json").read_text())
    cmp = json.loads((out / "eval-compare.json").read_text())
    assert 1.0 < ppl["perplexity"] < 100.0  # the random tiny model starts near 1000
    assert rm["accuracy"] > 0.6  # the reward model prefers answers to refusals
    assert abs(cmp["win_rate"] + cmp["tie_rate"] + cmp["loss_rate"] - 1.0) < 1e-6
    assert cmp["win_rate"] > cmp["loss_rate"]  # the reward model prefers the dpo policy's answers
