"""Process reward models end to end on the tiny model: ``stage: rm`` with ``rm.loss: process`` on generated
arithmetic chains (scripts/make_prm_data.py), its output loaded with plain transformers, and the PRM as a
reward source (llmtune.rewards.prm). The slow test checks that it learns to flag wrong steps on held-out
chains and that a best-of-N reranked by it beats a random pick."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_MODEL, assert_ok, run_cli, write_recipe

sys.path.insert(0, str(ROOT / "scripts"))
from make_prm_data import chain, chains


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

    from llmtune.recipe.schema import RewardConfig
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


@pytest.mark.slow
@pytest.mark.xfail(
    reason="not yet seen to pass: on CPU the 2-layer, 64-wide tiny model stayed at the class prior on held-out "
    "chains within 150-300 optimizer steps (eval step accuracy = the share of good steps, held-out AUC 0.50, "
    "also on single-step balanced chains); needs a longer run or a pretrained model",
    strict=False,
)
def test_prm_learns_wrong_steps_and_reranks_best_of_n(tmp_path: Path) -> None:
    """Full fine-tuning on 600 generated single-digit chains (make_prm_data's small table, which the tiny model
    can learn): on 200 held-out chains the PRM's p(good) ranks good steps above bad ones (AUC > 0.6; chance
    0.5), and for 100 held-out prompts with 4 candidate chains each (one all-correct, three with a wrong step,
    all from the prompt's start number) the min-aggregated PRM picks the correct one more often than a random
    pick (1 in 4) would."""
    recipe = _recipe(tmp_path, chains(600, seed=1, small=True), max_steps=150, micro_batch_size=16, lr=3e-3)
    recipe["finetuning"] = {"method": "full"}
    recipe["data"]["eval_split"] = 0.1
    recipe["train"]["eval_every"] = 150
    assert_ok(run_cli("train", str(write_recipe(tmp_path, recipe))))

    from llmtune.rewards.prm import PrmSource

    prm = PrmSource(str(tmp_path / "out"), device="cpu", dtype="fp32", aggregation="min", batch_size=32)
    held = chains(200, seed=99, small=True)
    scores = prm.step_scores(
        [[{"role": "user", "content": r["prompt"]}] for r in held], ["\n".join(r["completions"]) for r in held]
    )
    good = [p for r, s in zip(held, scores, strict=True) for p, ok in zip(s, r["labels"], strict=True) if ok]
    bad = [p for r, s in zip(held, scores, strict=True) for p, ok in zip(s, r["labels"], strict=True) if not ok]
    auc = sum((g > b) + 0.5 * (g == b) for g in good for b in bad) / (len(good) * len(bad))
    print(f"held-out step AUC {auc:.3f} ({len(good)} good, {len(bad)} bad steps)")
    assert auc > 0.6

    rng = random.Random(7)
    wins = 0
    for _ in range(100):
        start = rng.randint(1, 9)
        cands = [chain(rng, wrong=k > 0, small=True, start=start) for k in range(4)]  # the correct one first
        prompt = [{"role": "user", "content": cands[0]["prompt"]}]
        picked = prm.score([prompt] * 4, ["\n".join(c["completions"]) for c in cands], [None] * 4)
        best = max(picked)
        wins += picked[0] == best and picked.count(best) == 1  # a tie is no win
    prm.close()
    print(f"best-of-4 reranked by the PRM picks the correct chain {wins}/100 (random: 25)")
    assert wins > 40

    # the PRM as the judge of eval --task reward: per-step scores aggregated with min, in [0, 1]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in held[:3]))
    out = tmp_path / "reward.json"
    assert_ok(run_cli(
        "eval", "--model", str(TINY_MODEL), "--reward-model", str(tmp_path / "out"), "--data", str(prompts),
        "--task", "reward", "--max-samples", "3", "--max-new-tokens", "8", "--output", str(out),
    ))  # fmt: skip
    report = json.loads(out.read_text())
    assert report["examples"] == 3 and 0.0 <= report["min_reward"] <= report["max_reward"] <= 1.0
