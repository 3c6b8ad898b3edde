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
from make_prm_data import chain, chains, step


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


def _continued(rng: random.Random, start: int, n_steps: int = 4) -> tuple[list[str], int]:
    """A small chain from start with one wrong step that does not stop there: the steps after it are right
    for the wrong value they start from. Returns the steps (always n_steps) and the wrong step's index, which
    is then anywhere in the chain: the chains of chains() stop at their wrong step, where "the last step is
    the wrong one" locates it without checking any sum (the argmin of an untrained PRM, by position alone, found
    it in 83% of them against a chance of 48% with one initialisation)."""
    row = chain(rng, n_steps, wrong=True, small=True, start=start)
    steps, bad = list(row["completions"]), len(row["completions"]) - 1
    value = int(steps[-1].rsplit("=", 1)[1])
    while len(steps) < n_steps:
        text, value = step(rng, value, small=True)
        steps.append(f"{text}{value}")
    return steps, bad


def _prm_measures(path: Path, seed: int) -> dict[str, float]:
    """The PRM at path as a reward source (aggregation min) on chains generated with seed (not the training
    one): step accuracy on chains() rows and their majority class; the share of _continued chains whose wrong
    step is the argmin of the step scores, or the first step under 0.5, and chance (1 / steps); best-of-4 by
    the reward: the share of right picks over groups of 4 candidates for one start value (1-3 right chains,
    the others with a wrong step, all of 4 steps, in a shuffled order) and the expected share of a random pick."""
    from llmtune.recipe.online import RewardConfig
    from llmtune.rewards import build_rewards

    def ask(start: int) -> list[dict]:
        return [{"role": "user", "content": f"Start from {start} and compute step by step."}]

    rng = random.Random(seed)
    held = chains(300, seed=seed, small=True)
    wrong = [(start, *_continued(rng, start)) for start in [rng.randint(1, 9) for _ in range(200)]]
    groups = []
    for _ in range(100):
        start, n_right = rng.randint(1, 9), rng.randint(1, 3)
        cands = [(chain(rng, 4, wrong=False, small=True, start=start)["completions"], True) for _ in range(n_right)]
        cands += [(_continued(rng, start)[0], False) for _ in range(4 - n_right)]
        rng.shuffle(cands)
        groups.append((start, cands))

    with build_rewards(
        RewardConfig(model=str(path), aggregation="min"), trust_code=False, device="cpu", dtype="fp32"
    ) as rewards:
        source = rewards.sources[0]
        prompts = [[{"role": "user", "content": r["prompt"]}] for r in held]
        scores = source.step_scores(prompts, ["\n".join(r["completions"]) for r in held])
        pairs = [
            (p >= 0.5, good) for s, r in zip(scores, held, strict=True) for p, good in zip(s, r["labels"], strict=True)
        ]
        assert len(pairs) == sum(len(r["labels"]) for r in held)
        n_good = sum(good for _, good in pairs)

        scores = source.step_scores([ask(start) for start, _, _ in wrong], ["\n".join(s) for _, s, _ in wrong])
        assert all(len(s) == len(steps) for s, (_, steps, _) in zip(scores, wrong, strict=True))
        argmin = [min(range(len(s)), key=s.__getitem__) == bad for s, (_, _, bad) in zip(scores, wrong, strict=True)]
        first = [
            next((i for i, p in enumerate(s) if p < 0.5), None) == bad
            for s, (_, _, bad) in zip(scores, wrong, strict=True)
        ]

        right_picks, random_pick = 0, 0.0
        for start, cands in groups:
            total = rewards([ask(start)] * len(cands), ["\n".join(c) for c, _ in cands], [None] * len(cands)).total
            right_picks += cands[max(range(len(cands)), key=total.__getitem__)][1]
            random_pick += sum(ok for _, ok in cands) / len(cands)
    return {
        "step_accuracy": sum(pred == good for pred, good in pairs) / len(pairs),
        "majority": max(n_good, len(pairs) - n_good) / len(pairs),
        "locate_argmin": sum(argmin) / len(wrong),
        "locate_first_below_half": sum(first) / len(wrong),
        "locate_chance": sum(1 / len(steps) for _, steps, _ in wrong) / len(wrong),
        "best_of_4": right_picks / len(groups),
        "random_of_4": random_pick / len(groups),
    }


@pytest.mark.slow  # 2000 full fine-tuning steps of the tiny model (~80-90 s on 2 CPU cores), then ~1000 chains scored
def test_prm_flags_wrong_steps_and_reranks_best_of_n(tmp_path: Path) -> None:
    """A PRM trained in full on 2000 small chains (seed 0) learns the sums' table: on chains of another seed it
    beats the majority class on step accuracy, finds a wrong step followed by right ones far above chance, and
    picks a right chain out of 4 far more often than a random pick.

    Measured with _prm_measures (2000 steps, training seed 0 / 1 / 2 / 3, held-out seed 1000 + it; untrained:
    the same recipe run 1 step at lr 1e-9, the new head as initialised):
      step accuracy  0.975 / 0.990 / 0.948 / 0.972 vs majority 0.841 / 0.835 / 0.851 / 0.828; untrained = majority
      locate, argmin 0.915 / 0.985 / 0.900 / 0.960 vs chance 0.25; untrained 0.185 / 0.270 / 0.255 / 0.275
      locate, first step < 0.5  0.825 / 0.965 / 0.645 / 0.880; untrained 0.0 on every seed
      best-of-4  0.88 / 0.99 / 0.91 / 0.97 vs random 0.490 / 0.482 / 0.525 / 0.512; untrained 0.49 / 0.49 / 0.44 / 0.59
    (1500 steps fell shorter on seed 1: argmin 0.86, best-of-4 0.85; lr 3e-3 at batch 16 learned nothing in 3000.)"""
    recipe = _recipe(
        tmp_path,
        chains(2000, seed=0, small=True),
        max_steps=2000,
        micro_batch_size=32,
        lr=1e-3,
        warmup_steps=20,
        log_every=100,
        eval_every=2000,
    )
    recipe["finetuning"] = {"method": "full"}
    recipe["data"]["eval_split"] = 0.1
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_ok(proc)
    out = tmp_path / "out"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trainer = {k: v for k, v in [r for r in evals if "eval/step_accuracy" in r][-1].items() if k.startswith("eval/")}

    m = _prm_measures(out, seed=1000)
    note = f"held-out: {m}; trainer's eval: {trainer}"
    assert m["step_accuracy"] >= m["majority"] + 0.05, note
    assert m["locate_argmin"] >= max(0.6, 2 * m["locate_chance"]), note
    assert m["locate_first_below_half"] >= 0.4, note
    assert m["best_of_4"] >= m["random_of_4"] + 0.25, note
