"""Judge models through the real CLI on the tiny model (its own random judge, so most judgements are garbage:
this is the unparsable path, counted and reported): grpo and rejection sampling log the judge's scores and
counts per source, eval scores and compares with a judge, data label / data revise report their drops and
exit 2 when nothing passed, and bad input is refused before any model loads. The real model (SmolLM2) runs
the same paths in tests/integration/test_judge_real.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, assert_ok, assert_refused, base_recipe, read_metrics, run_cli, write_recipe

WORDS = ["apple", "river", "green", "stone", "cloud", "tiger"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _prompts(path: Path) -> Path:
    return _jsonl(path, [{"prompt": f"Say the word {w}.", "answer": w} for w in WORDS])


JUDGE = {"model": str(TINY_MODEL), "max_new_tokens": 6, "batch_size": 16}


def _grpo_recipe(tmp_path: Path, reward: dict, **extra: object) -> dict:
    """grpo on the tiny model: 2 steps of 2 prompts x 4 completions of 4 tokens, scored by ``reward``."""
    return base_recipe(
        tmp_path,
        stage="grpo",
        finetuning={"method": "full"},
        data={"train": [{"path": str(_prompts(tmp_path / "p.jsonl"))}], "max_length": 96},
        grpo={"num_generations": 4, "prompts_per_step": 2, "reward": reward},
        generation={"max_new_tokens": 4},
        train={"max_steps": 2, "micro_batch_size": 8, "lr": 1e-3, "log_every": 1},
        **extra,
    )


def test_grpo_logs_the_judge_per_step(tmp_path: Path) -> None:
    recipe = _grpo_recipe(tmp_path, {"judge": JUDGE, "rule": "contains"})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_ok(proc)
    steps = [m for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert len(steps) == 2
    first = steps[0]["reward/judge/model/unparsable"] / steps[0]["reward/judge/model/judged"]
    assert ("of judge/model's judgements had no usable score" in proc.stdout) == (first >= 0.5)
    for m in steps:
        assert m["reward/judge/model/judged"] == 8  # 2 prompts x 4 completions, each judged
        assert 0.0 <= m["reward/judge/model"] <= 1.0  # unit scale
        assert 0 <= m["reward/judge/model/unparsable"] <= 8  # of 2 prompts x 4 completions
        assert 0 <= m["reward/judge/model/cached"] <= 8 - 1  # the first of a reply is always judged
        # total = judge + contains (weights 1), both logged per source
        assert abs(m["reward"] - m["reward/judge/model"] - m["reward/rule/contains"]) < 1e-6


def test_grpo_with_a_pairwise_judge_against_each_answer(tmp_path: Path) -> None:
    """mode pairwise: every completion is compared with its row's answer in both orders (16 judgements for
    8 completions, fewer when cached); the source's score is a share of wins in [0, 1]."""
    recipe = _grpo_recipe(tmp_path, {"judge": {**JUDGE, "mode": "pairwise"}})
    assert_ok(run_cli("train", str(write_recipe(tmp_path, recipe))))
    steps = [m for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["reward/judge/model/judged"] == 8 and 0 <= m["reward/judge/model/unparsable"] <= 8
        assert 0.0 <= m["reward/judge/model"] <= 1.0 and m["reward"] == m["reward/judge/model"]
    # rows without an answer: refused with the reason
    bare = _jsonl(tmp_path / "bare.jsonl", [{"prompt": f"Say {w}."} for w in WORDS])
    recipe["data"]["train"] = [{"path": str(bare)}]
    recipe["output_dir"] = str(tmp_path / "bare-out")
    proc = run_cli("train", str(write_recipe(tmp_path, recipe, "bare.yaml")))
    assert proc.returncode == 2 and "compares each reply with its prompt's `answer`" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_grpo_with_a_judge_under_zero3_on_two_processes(tmp_path: Path) -> None:
    """ZeRO-3 partitions the policy over two processes; the judge is loaded whole on each (inference only),
    judges its process's completions, and the counts are summed over both."""
    recipe = _grpo_recipe(tmp_path, {"judge": JUDGE, "rule": "contains"}, distributed={"zero_stage": 3})
    recipe["train"]["micro_batch_size"] = 4
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), nproc=2)
    assert_ok(proc)
    assert "x 2 proc" in proc.stdout
    steps = [m for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["reward/judge/model/judged"] == 8  # 2 prompts x 4 completions over both processes
        assert 0.0 <= m["reward/judge/model"] <= 1.0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_ppo_logs_the_judge_per_step(tmp_path: Path) -> None:
    recipe = base_recipe(
        tmp_path,
        stage="ppo",
        finetuning={"method": "full"},
        data={"train": [{"path": str(_prompts(tmp_path / "p.jsonl"))}], "max_length": 96},
        ppo={"reward": {"judge": JUDGE}, "ppo_epochs": 1, "prompts_per_step": 4, "rollout_batch_size": 4},
        generation={"max_new_tokens": 4},
        train={"max_steps": 2, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1},
    )
    assert_ok(run_cli("train", str(write_recipe(tmp_path, recipe))))
    rollouts = [m for m in read_metrics(tmp_path / "out") if "reward/judge/model" in m]
    assert len(rollouts) == 2
    for m in rollouts:
        assert m["reward/judge/model/judged"] == 4 and 0 <= m["reward/judge/model/unparsable"] <= 4
        assert m["reward"] == m["reward/judge/model"]  # the judge is the only source


def test_rejection_sampling_records_the_judge_per_round(tmp_path: Path) -> None:
    recipe = base_recipe(
        tmp_path,
        stage="rejection_sampling",
        finetuning={"method": "full"},
        data={"train": [{"path": str(_prompts(tmp_path / "p.jsonl")), "format": "prompts"}], "max_length": 64},
        rejection_sampling={"num_samples": 4, "rounds": 1, "reward": {"judge": JUDGE, "rule": "length_penalty:6"}},
        generation={"max_new_tokens": 8, "temperature": 1.0},
        train={"epochs": 1, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1},
    )
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_ok(proc)
    out = tmp_path / "out"
    [stats] = _read(out / "rounds.jsonl")
    samples = _read(out / "round-1" / "samples.jsonl")
    assert len(samples) == len(WORDS) * 4
    judged = [s["rewards"]["judge/model"] for s in samples]
    assert abs(stats["reward/judge/model"] - sum(judged) / len(judged)) < 1e-9  # the round's mean of the samples'
    assert 0 <= stats["reward/judge/model/unparsable"] <= len(samples)
    assert f"judge/model unparsable {stats['reward/judge/model/unparsable']:.0f}" in proc.stdout


def test_eval_reward_and_compare_with_a_judge(tmp_path: Path) -> None:
    data = _prompts(tmp_path / "p.jsonl")
    m = str(TINY_MODEL)
    common = ("--data", str(data), "--max-new-tokens", "6")
    assert_ok(run_cli("eval", "--task", "reward", "--model", m, "--judge", m, *common, "-o", str(tmp_path / "r.json")))
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["rewards"]) == {"judge/model"} and 0 <= report["judge_unparsable"] <= len(WORDS)
    assert sum(report["judge_unparsable_reasons"].values()) == report["judge_unparsable"]
    proc = run_cli(
        "eval", "--task", "compare", "--model", m, "--model-b", m, "--judge", m, *common, "-o", str(tmp_path / "c.json")
    )  # fmt: skip
    assert_ok(proc)
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["wins"] + c["ties"] + c["losses"] == len(WORDS)
    assert c["ties"] == c["agreed_ties"] + c["inconsistent"] + c["unparsable"]
    rows = _read(tmp_path / "c.generations.jsonl")
    assert all(len(r["judge_texts"]) == 2 for r in rows)  # both orders asked
    assert_refused(
        run_cli("eval", "--task", "perplexity", "--model", m, "--judge", m, "--data", str(data)),
        "uses no judge",
        fix=False,
    )


def test_data_label_and_revise_count_what_the_tiny_judge_got_wrong(tmp_path: Path) -> None:
    rows = [{"prompt": f"Say {w}.", "responses": [w, w.upper() + "!", "no"]} for w in WORDS[:3]]
    data = _jsonl(tmp_path / "c.jsonl", [*rows, {"prompt": "x", "responses": ["one"]}])
    out = tmp_path / "pairs.jsonl"
    proc = run_cli("data", "label", "--data", str(data), "--judge", str(TINY_MODEL), "--out", str(out),
                   "--max-new-tokens", "4")  # fmt: skip
    state = json.loads((tmp_path / "pairs.jsonl.state.json").read_text())
    assert state["done"] == 3 and state["dropped"]["fewer than 2 usable replies"] == 1
    judged = sum(v for k, v in state["dropped"].items() if k != "fewer than 2 usable replies")
    written = len(_read(out)) if out.exists() else 0
    assert judged + written == 3 * 3  # 3 prompts x 3 pairs: each a pair or a counted drop
    if written == 0:
        assert_refused(proc, "the judge decided no pair")
    else:
        assert_ok(proc)
    assert f"{written} pairs in {out} from 3 input rows" in proc.stdout

    sft, pairs = tmp_path / "rev.jsonl", tmp_path / "revp.jsonl"
    prompts = _prompts(tmp_path / "p.jsonl")
    proc = run_cli("data", "revise", "--data", str(prompts), "--model", str(TINY_MODEL), "--out", str(sft),
                   "--pairs-out", str(pairs), "--max-new-tokens", "4")  # fmt: skip
    state = json.loads((tmp_path / "rev.jsonl.state.json").read_text())
    kept = len(_read(sft)) if sft.exists() else 0
    assert state["done"] == len(WORDS) and kept + sum(state["dropped"].values()) == len(WORDS)
    assert kept == (len(_read(pairs)) if pairs.exists() else 0)
    if kept == 0:
        assert_refused(proc, "no revision was kept")
    again = run_cli("data", "revise", "--data", str(prompts), "--model", str(TINY_MODEL), "--out", str(sft),
                    "--pairs-out", str(pairs), "--max-new-tokens", "4")  # fmt: skip
    assert "continuing" in again.stderr and json.loads((tmp_path / "rev.jsonl.state.json").read_text()) == state


def test_bad_input_is_refused_before_the_judge_loads(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "responses": ["a", "b"]}])
    m = str(TINY_MODEL)
    base = ["data", "label", "--data", str(data), "--out", str(tmp_path / "o.jsonl")]
    assert_refused(run_cli(*base, "--judge", str(tmp_path / "nojudge")), "nojudge")
    assert_refused(run_cli(*base, "--judge", m, "--rubric", "Rate {reply}."), "no {reply_a} / {reply_b}")
    assert_refused(run_cli(*base, "--judge", m, "--mode", "pointwise", "--rubric", str(tmp_path / "r.txt")), "r.txt")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "text": "no replies"}])
    assert_refused(
        run_cli("data", "label", "--data", str(bad), "--judge", m, "--out", str(tmp_path / "o.jsonl")),
        "no row has a prompt and two or more",
    )
    principles = tmp_path / "rules.json"
    principles.write_text("[{")
    assert_refused(
        run_cli("data", "revise", "--data", str(data), "--model", m, "--out", str(tmp_path / "a.jsonl"),
                "--pairs-out", str(tmp_path / "b.jsonl"), "--principles", str(principles)),
        "does not parse",
    )  # fmt: skip
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "a.jsonl").exists()

    recipe = base_recipe(
        tmp_path,
        stage="grpo",
        data={"train": [{"path": str(_prompts(tmp_path / "p.jsonl"))}], "max_length": 96},
        grpo={"num_generations": 2, "prompts_per_step": 2, "reward": {"judge": {"model": str(tmp_path / "gone")}}},
    )
    assert_refused(run_cli("validate", str(write_recipe(tmp_path, recipe))), "grpo.reward.judge.model")
    recipe["grpo"]["reward"]["judge"] = {"model": m, "rubric": str(tmp_path / "missing.txt")}
    assert_refused(run_cli("train", str(write_recipe(tmp_path, recipe))), "missing.txt")
    assert not (tmp_path / "out").exists()
