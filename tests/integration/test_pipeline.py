"""scripts/pipeline.sh chains the stages (each output the next one's input, finished stages skipped, the first
failure named with its exit code); scripts/quickstart.sh runs the whole chain on the tiny model and checks
each stage's held-out metric in one table."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY_MODEL

P = ROOT / "recipes" / "quickstart" / "pipeline"


def _bash(*args: str, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        ["bash", *args], cwd=ROOT, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def test_pipeline_refuses_unknown_stages_and_missing_recipes(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "pipeline.sh")
    proc = _bash(script, str(tmp_path / "out"), str(TINY_MODEL), f"sfft={P / 'sft.yaml'}")
    assert proc.returncode == 2 and "unknown stage 'sfft'" in proc.stderr
    proc = _bash(script, str(tmp_path / "out"), str(TINY_MODEL), "sft=missing.yaml")
    assert proc.returncode == 2 and "sft needs a recipe file" in proc.stderr
    proc = _bash(script, str(tmp_path / "out"))
    assert proc.returncode == 2 and "STAGE=RECIPE" in proc.stdout  # the usage


def test_pipeline_stops_at_the_first_failing_stage_with_its_exit_code(tmp_path: Path) -> None:
    bad = yaml.safe_load((P / "sft.yaml").read_text())
    bad["train"]["lrr"] = 1.0  # a typo: llmtune refuses the recipe with exit code 2
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(bad))
    out = tmp_path / "out"
    proc = _bash(
        str(ROOT / "scripts" / "pipeline.sh"), str(out), str(TINY_MODEL),
        f"sft={tmp_path / 'sft.yaml'}", f"dpo={P / 'dpo.yaml'}",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "pipeline: stage sft failed with exit code 2" in proc.stderr and "unknown key 'lrr'" in proc.stderr
    assert "pipeline: dpo" not in proc.stdout and not (out / "dpo").exists()


@pytest.mark.slow
def test_quickstart_moves_every_stage_and_continues_where_it_stopped(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    proc = _bash(str(ROOT / "scripts" / "quickstart.sh"), str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {r["stage"]: r for r in json.loads((out / "table.json").read_text())}
    assert list(rows) == ["cpt", "sft", "rm", "dpo", "grpo", "ppo", "rejection_sampling"]
    assert all(r["check"] == "ok" for r in rows.values()), rows
    assert rows["cpt"]["after"] < 0.7 * rows["cpt"]["start"]  # held-out perplexity down >= 30%
    assert rows["sft"]["start"] < 0.05 and rows["sft"]["after"] >= 0.3  # held-out exact match
    assert rows["rm"]["after"] >= 0.65
    assert rows["grpo"]["after"] > rows["grpo"]["start"]  # exact match over the sft start
    for stage in ("dpo", "ppo"):
        assert rows[stage]["after"] > rows[stage]["start"]  # the reward model's score over the sft start
    assert "| stage | seconds |" in proc.stdout
    # every output loads with transformers as it is
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for stage in ("sft", "dpo", "grpo", "ppo", "rejection_sampling"):
        AutoModelForCausalLM.from_pretrained(out / f"{stage}-merged")
    AutoModelForSequenceClassification.from_pretrained(out / "rm", num_labels=1)

    again = _bash(str(ROOT / "scripts" / "quickstart.sh"), str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("cpt", "sft", "rm", "dpo", "grpo", "ppo", "rejection_sampling"):
        assert f"pipeline: {stage}: finished earlier" in again.stdout
    assert "llmtune train" not in again.stdout
