"""Frozen models under ZeRO-3: partitioned over the processes, not a full copy on each, with the same outputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_MODEL, base_recipe, cli_command, write_recipe


def _reward_model(path: Path) -> Path:
    """A sequence classifier with a trained-looking score head (what an rm run of method full writes)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(TINY_MODEL, num_labels=1)
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_frozen_models_are_partitioned_under_zero3(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, finetuning={"method": "full"}, distributed={"zero_stage": 3}))
    rm = _reward_model(tmp_path / "rm")
    result = tmp_path / "result.json"
    cmd, env = cli_command(nproc=2)
    launcher = cmd[: cmd.index("-m", 2)]  # python -m torch.distributed.run --nproc_per_node 2 --master_port N
    worker = ROOT / "tests" / "workers" / "frozen_zero3.py"
    proc = subprocess.run(
        [*launcher, str(worker), str(recipe), str(rm), str(result)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(result.read_text())
    assert out["engine"] and out["trainable"] == 0
    for name in ("reference", "reward"):
        local, total = out[name]
        assert total > 0 and local <= total / 2 + 1024, (name, local, total)  # about half each, not all
    assert out["logit_diff"] < 1e-4 and out["score_diff"] < 1e-4
