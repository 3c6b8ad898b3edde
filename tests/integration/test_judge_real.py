"""Judge models on a real instruct model, SmolLM2-135M-Instruct (the `real` extra's GGUF file), as policy and as
judge. It is a weak judge (it rates a wrong answer as high as a right one), which is fine here: these tests
check the path, not its wisdom. With its verdict prefilled ("Score:") it answers with a number, so its
judgements parse; a judge-scored grpo run and a judge-scored rejection-sampling run log its scores per
reward source, and what `data label` and `data revise` write trains with the rm, dpo and sft stages as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_ok, base_recipe, read_metrics, run_cli, write_recipe
from tests.integration.test_real_model import GGUF, QA

pytestmark = pytest.mark.slow

JUDGE_NAME = "judge/SmolLM2-135M-Instruct.Q4_1"
WRONG = ["Berlin.", "Green.", "Six.", "Five."]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _recipe(tmp_path: Path, stage: str, data: Path, **sections) -> dict:
    train = {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-4, "log_every": 1, **sections.pop("train", {})}
    return base_recipe(
        tmp_path,
        stage=stage,
        model={"path": str(GGUF)},
        finetuning={"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        data={"train": [{"path": str(data)}], "max_length": 256},
        train=train,
        **sections,
    )


def _train(tmp_path: Path, recipe: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    assert_ok(run_cli("train", str(write_recipe(tmp_path, recipe))))
    return Path(recipe["output_dir"])


JUDGE = {"model": str(GGUF), "max_new_tokens": 4, "batch_size": 8}


def test_grpo_and_rejection_sampling_scored_by_the_real_judge(tmp_path: Path) -> None:
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": q, "answer": a} for q, a in QA])
    grpo = _recipe(
        tmp_path / "grpo",
        "grpo",
        prompts,
        grpo={"num_generations": 2, "prompts_per_step": 2, "reward": {"judge": JUDGE}},
        generation={"max_new_tokens": 12},
        train={"micro_batch_size": 4},
    )
    out = _train(tmp_path / "grpo", grpo)
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert len(steps) == 2
    for m in steps:
        assert 0.0 <= m[f"reward/{JUDGE_NAME}"] <= 1.0 and m["reward"] == pytest.approx(m[f"reward/{JUDGE_NAME}"])
        assert m[f"reward/{JUDGE_NAME}/unparsable"] < 4  # of 2 prompts x 2 completions: the real judge gives scores

    rs = _recipe(
        tmp_path / "rs",
        "rejection_sampling",
        prompts,
        rejection_sampling={
            "num_samples": 3,
            "rounds": 1,
            # the judge, and a little length penalty to break its ties (a weak judge gives many equal scores)
            "reward": {"judge": JUDGE, "rule": "length_penalty:10", "weights": [1.0, 0.1]},
        },
        generation={"max_new_tokens": 16, "temperature": 1.0},
        train={"max_steps": None, "epochs": 1},
    )
    out = _train(tmp_path / "rs", rs)
    [stats] = _read(out / "rounds.jsonl")
    samples = _read(out / "round-1" / "samples.jsonl")
    assert len(samples) == len(QA) * 3
    scores = [s["rewards"][JUDGE_NAME] for s in samples]
    assert stats[f"reward/{JUDGE_NAME}"] == pytest.approx(sum(scores) / len(scores))
    assert stats[f"reward/{JUDGE_NAME}/unparsable"] < len(samples)
    assert stats["kept"] >= 1 and (out / "adapter_model.safetensors").is_file()


def test_data_label_pairs_train_rm_and_dpo(tmp_path: Path) -> None:
    rows = [{"prompt": q, "responses": [a, w]} for (q, a), w in zip(QA, WRONG, strict=True)]
    data = _jsonl(tmp_path / "candidates.jsonl", rows)
    pairs = tmp_path / "pairs.jsonl"
    proc = run_cli("data", "label", "--data", str(data), "--judge", str(GGUF), "--out", str(pairs),
                   "--mode", "pointwise", "--max-new-tokens", "4")  # fmt: skip
    assert_ok(proc)
    made = _read(pairs)
    state = json.loads((tmp_path / "pairs.jsonl.state.json").read_text())
    assert len(made) + sum(state["dropped"].values()) == len(QA)  # each prompt: a pair or a counted drop
    assert all(r["judge"]["scores"][0] != r["judge"]["scores"][1] for r in made)
    assert f"{len(made)} pairs in {pairs} from {len(QA)} input rows (pointwise)" in proc.stdout

    # the same rows pairwise, in both orders: every comparison is a pair or a counted drop (a 135M judge is
    # mostly position-biased: inconsistent)
    both = tmp_path / "pairwise.jsonl"
    proc = run_cli("data", "label", "--data", str(data), "--judge", str(GGUF), "--out", str(both),
                   "--max-new-tokens", "4")  # fmt: skip
    state = json.loads((tmp_path / "pairwise.jsonl.state.json").read_text())
    written = len(_read(both)) if both.exists() else 0
    assert written + sum(state["dropped"].values()) == len(QA)
    assert proc.returncode == (0 if written else 2), proc.stderr

    for stage in ("rm", "dpo"):
        out = _train(tmp_path / stage, _recipe(tmp_path / stage, stage, pairs))
        losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
        assert len(losses) == 2, stage


def test_data_revise_rows_train_sft_and_dpo(tmp_path: Path) -> None:
    rows = [{"prompt": q, "response": w} for (q, _), w in zip(QA, WRONG, strict=True)]
    data = _jsonl(tmp_path / "replies.jsonl", rows)
    sft, pairs = tmp_path / "revised.jsonl", tmp_path / "cai_pairs.jsonl"
    # one principle that asks for a short answer: with the built-in ones, this 135M model rambles past any
    # short token budget (every revision cut off) or echoes its critique
    principle = {"name": "correct", "critique": "Is your last reply correct? Say in one sentence what is wrong with it.",
                 "revision": "Now write the correct answer in one short sentence. Reply with that sentence only."}  # fmt: skip
    rules = _jsonl(tmp_path / "principles.jsonl", [principle])
    proc = run_cli("data", "revise", "--data", str(data), "--model", str(GGUF), "--out", str(sft), "--pairs-out",
                   str(pairs), "--principles", str(rules), "--max-new-tokens", "48")  # fmt: skip
    assert_ok(proc)  # (resuming is tested on the tiny model: tests/integration/test_judge.py, unit tests)
    made, dpo = _read(sft), _read(pairs)
    state = json.loads((tmp_path / "revised.jsonl.state.json").read_text())
    assert state["done"] == len(QA) and len(made) + sum(state["dropped"].values()) == len(QA)
    assert f"{len(made)} revisions in {sft} and {len(dpo)} pairs" in proc.stdout
    assert len(dpo) == len(made) and all(p["rejected"] == rows[p["row"]]["response"] for p in dpo)
    assert all(r["messages"][-1]["content"].strip() != rows[r["row"]]["response"] for r in made)
    assert all(r["principles"] == ["correct"] for r in made)

    for stage, file in (("sft", sft), ("dpo", pairs)):
        out = _train(tmp_path / stage, _recipe(tmp_path / stage, stage, file))
        losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
        assert len(losses) == 2, stage
