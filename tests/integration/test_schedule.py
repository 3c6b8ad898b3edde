"""data.schedule end to end: a cpt run killed after a checkpoint and resumed trains what the uninterrupted
run trains (the same losses, shares and weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, as_if_killed, assert_ok, base_recipe, read_metrics, run_cli, write_recipe

FACTS = ROOT / "recipes" / "quickstart" / "facts" / "cpt.txt"


def _recipe(tmp_path: Path, general: Path, domain: Path, **train: object) -> dict:
    schedule = [
        {"until": 0.4, "weights": {"general": 1.0, "domain": 0.0}},
        {"weights": {"general": 0.2, "domain": 0.8}, "ramp": True},
    ]
    return base_recipe(
        tmp_path,
        stage="cpt",
        finetuning={"method": "full"},
        data={"train": [{"path": str(general)}, {"path": str(domain)}], "max_length": 32, "schedule": schedule},
        train={"max_steps": 12, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "log_every": 1, **train},
    )


@pytest.mark.slow
def test_schedule_resume_is_exact(tmp_path: Path) -> None:
    lines = [x for x in FACTS.read_text().splitlines() if x.strip()]
    general, domain = tmp_path / "general.jsonl", tmp_path / "domain.txt"
    general.write_text("\n".join(json.dumps({"text": x}) for x in lines[:60]) + "\n")
    domain.write_text("\n".join(lines[60:90]) + "\n")
    (tmp_path / "a").mkdir()
    straight = _recipe(tmp_path / "a", general, domain)
    assert_ok(run_cli("train", str(write_recipe(tmp_path / "a", straight))))
    (tmp_path / "b").mkdir()
    resumed = _recipe(tmp_path / "b", general, domain, save_every=5, keep_checkpoints=3)
    path = write_recipe(tmp_path / "b", resumed)
    assert_ok(run_cli("train", str(path)))
    out = Path(resumed["output_dir"])
    as_if_killed(out, drop=("step-00000012",), unmark=("step-00000010",))  # killed while saving step 10
    proc = run_cli("train", str(path))
    assert_ok(proc)
    assert "resumed from" in proc.stdout and "(step 5)" in proc.stdout
    ma, mb = read_metrics(Path(straight["output_dir"])), read_metrics(out)
    keys = ("loss", "data/share/general", "data/share/domain")
    rows_a = [[m[k] for k in keys] for m in ma if "loss" in m]
    rows_b = [[m[k] for k in keys] for m in mb if "loss" in m]
    assert [r[1:] for r in rows_a] == [r[1:] for r in rows_b]
    assert [r[0] for r in rows_a] == pytest.approx([r[0] for r in rows_b], rel=1e-6)
    assert [r[2] for r in rows_a[:5]] == [0.0] * 5 and rows_a[-1][2] == 0.75  # 40% general, then domain rises
    a, b = load_file(Path(straight["output_dir"]) / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-7, rtol=1e-6)
