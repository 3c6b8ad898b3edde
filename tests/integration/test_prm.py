"""Process reward models end to end on the tiny model: ``stage: rm`` with ``rm.loss: process`` on generated
arithmetic chains (scripts/make_prm_data.py), its output loaded with plain transformers, and the PRM as a
reward source (llmtune.rewards.prm). The slow test checks that it learns to flag wrong steps on held-out
chains and that a best-of-N reranked by it beats a random pick."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_MODEL, assert_ok, run_cli, write_recipe

sys.path.insert(0, str(ROOT / "scripts"))
from make_prm_data import chains


def _recipe(tmp_path: Path, rows: list[dict], **train: object) -> dict:
    data = tmp_path / "chains.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "stage": "rm",
        "output_dir": str(tmp_path / "out"),
        "seed": 0,
        "model": {"path": str(TINY_MODEL)},
        "finetuning": {"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"train": [{"path": str(data)}], "eval_split": 0.25, "max_length": 128},
        "rm": {"loss": "process", "step_separator": "\n"},
        "train": {"max_steps": 3, "micro_batch_size": 8, "lr": 1e-3, "log_every": 1, "eval_every": 3, **train},
        "precision": "fp32",
    }


def test_prm_lora_run_loads_and_scores(tmp_path: Path) -> None:
    """A short lora run: eval metrics exist, the adapter and merged/ carry prm.json, merged/ loads with
    AutoModelForTokenClassification (2 labels), and a reward block naming it scores completions per step."""
    proc = run_cli("train", str(write_recipe(tmp_path, _recipe(tmp_path, chains(40, seed=3)))))
    assert_ok(proc)
    out = tmp_path / "out"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if "eval/step_accuracy" in r][-1]
    assert 0.0 <= last["eval/step_accuracy"] <= 1.0 and 0.0 <= last["eval/first_error_accuracy"] <= 1.0
    for d in (out, out / "merged"):
        assert json.loads((d / "prm.json").read_text())["step_separator"] == "\n"
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"

    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(out / "merged")
    assert model.config.num_labels == 2 and model.config.id2label == {0: "bad", 1: "good"}

    from llmtune.recipe.online import RewardConfig
    from llmtune.rewards import build_rewards

    prompt = [{"role": "user", "content": "Start from 3 and compute step by step."}]
    completions = ["3+4=7\n7*2=14", "3+4=7\n\n7*2=15\n", ""]
    for path in (out, out / "merged"):  # the adapter (with its head) and the merged copy
        with build_rewards(
            RewardConfig(model=str(path), aggregation="product"), trust_code=False, device="cpu", dtype="fp32"
        ) as rewards:
            source = rewards.sources[0]
            steps = source.step_scores([prompt] * 3, completions)
            assert [len(s) for s in steps] == [2, 2, 0]  # split on "\n", empty pieces dropped
            assert all(0.0 < p < 1.0 for s in steps for p in s)
            result = rewards([prompt] * 3, completions, [None] * 3)
            assert result.total[0] == pytest.approx(steps[0][0] * steps[0][1], rel=1e-5)
            assert result.total[2] == 0.0
