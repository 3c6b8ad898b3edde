"""stage: grpo through the real CLI on the tiny model: it learns a rule reward, resumes exactly at a rollout
boundary, runs every loss / advantage variant, and refuses bad input before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    as_if_killed,
    assert_curves,
    assert_ok,
    assert_refused,
    base_recipe,
    read_metrics,
    run_cli,
    write_recipe,
)

WORDS = ["apple", "river", "green", "stone", "cloud", "tiger", "piano", "lemon"]


def prompts_file(path: Path, n: int = 32, seed: int = 0) -> Path:
    """Prompts with an answer: "Say the word X." -> X."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append({"prompt": f"Say the word {w}.", "answer": w})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def held_out_prompts(path: Path) -> Path:
    words = ["house", "bread", "chair", "water", "music", "smile", "train", "candle", "forest", "window", "garden"]
    path.write_text("".join(json.dumps({"prompt": f"Say the word {w}.", "answer": w}) + "\n" for w in words))
    return path


def grpo_recipe(tmp_path: Path, **sections) -> dict:
    """A grpo recipe on the tiny model: 2 prompts x 4 completions a step (one micro-batch of 8), full weights, a
    rule reward."""
    defaults = {
        "finetuning": {"method": "full"},
        "data": {"train": [{"path": str(prompts_file(tmp_path / "prompts.jsonl"))}], "max_length": 96},
        "grpo": {"num_generations": 4, "prompts_per_step": 2, "reward": {"rule": "regex:^[A-Z]"}},
        "generation": {"max_new_tokens": 4, "temperature": 1.0},
        "train": {"max_steps": 4, "micro_batch_size": 8, "lr": 1e-3, "log_every": 1, "lr_scheduler": "constant"},
    }
    merged = {k: {**v, **sections.pop(k, {})} for k, v in defaults.items()}
    return base_recipe(tmp_path, stage="grpo", **merged, **sections)


def _train(tmp_path: Path, recipe: dict, *extra: str, nproc: int = 1):
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), *extra, nproc=nproc)
    assert_ok(proc)
    return Path(recipe["output_dir"]), proc


def test_grpo_raises_a_rule_reward_with_bounded_kl(tmp_path: Path) -> None:
    """A completion earns 1 when it starts with a capital letter. From the random tiny model (about one in
    five do), grpo must raise the mean reward of its rollouts by at least 20% relative, and the reward of
    greedy answers to held-out prompts, with the k3 KL to the starting model (beta > 0 loads a frozen
    reference copy) small."""
    recipe = grpo_recipe(
        tmp_path,
        grpo={"num_generations": 8, "prompts_per_step": 4, "beta": 0.01, "reward": {"rule": "regex:^ ?[A-Z]"}},
        train={"max_steps": 40, "micro_batch_size": 32, "lr": 3e-3, "eval_every": 1},
        data={"eval": [{"path": str(held_out_prompts(tmp_path / "held.jsonl"))}]},
    )
    out, _ = _train(tmp_path, recipe)
    # held-out prompts (words never trained on), answered greedily after every step
    evals = [m["eval/reward"] for m in read_metrics(out) if "eval/reward" in m]
    assert len(evals) == 40 and evals[-1] >= evals[0] + 0.5, evals
    steps = [m for m in read_metrics(out) if "reward" in m]
    assert [m["step"] for m in steps] == list(range(1, 41))
    first = sum(m["reward"] for m in steps[:5]) / 5  # 4 prompts x 8 completions a step
    last = sum(m["reward"] for m in steps[-5:]) / 5
    assert last >= 1.2 * first and last > first + 0.1, (first, last)
    assert max(m["kl"] for m in steps) < 2.0
    for key in ("reward_std", "frac_reward_zero_std", "completion_length", "clip_fraction", "entropy", "rollout_s"):
        assert key in steps[0], key
    assert "reward/rule/regex:^ ?[A-Z]" in steps[0]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # the policy loads as an sft output does


def test_grpo_resumes_exactly_at_a_rollout_boundary(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = grpo_recipe(tmp_path / "a", train={"max_steps": 4})
    out_a, _ = _train(tmp_path / "a", straight)
    resumed = grpo_recipe(tmp_path / "b", train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 2})
    out_b, _ = _train(tmp_path / "b", resumed)
    as_if_killed(out_b, drop=("step-00000004",))  # died after the step-2 checkpoint
    out_b, proc = _train(tmp_path / "b", resumed)
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    a, b = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    rewards_a = [m["reward"] for m in read_metrics(out_a) if "reward" in m]
    rewards_b = [m["reward"] for m in read_metrics(out_b) if "reward" in m]
    assert rewards_a == rewards_b  # the resumed run sampled the same rollouts


@pytest.mark.slow
def test_sigterm_while_sampling_ends_the_rollout_and_checkpoints_the_last_step(tmp_path: Path) -> None:
    """A scheduler's SIGTERM that lands while a rollout samples (a model that never ends a reply, so each
    rollout takes seconds) stops the sampling within a token instead of finishing the rollout and its step:
    the run writes the last finished step's checkpoint and exits 143 in a fraction of a rollout's time; the
    same command then resumes from that step."""
    import signal
    import time

    from tests.conftest import start_cli
    from tests.integration.test_chat import endless_model

    recipe = grpo_recipe(
        tmp_path,
        model={"path": str(endless_model(tmp_path))},
        data={"max_length": 700},
        grpo={"num_generations": 4, "prompts_per_step": 2},
        generation={"max_new_tokens": 600},
        train={"max_steps": 2, "micro_batch_size": 8},
    )
    path = write_recipe(tmp_path, recipe)
    out = Path(recipe["output_dir"])
    proc = start_cli("train", str(path))
    deadline = time.time() + 600
    first: dict = {}
    while time.time() < deadline and proc.poll() is None and not first:
        if (out / "metrics.jsonl").is_file():
            lines = (out / "metrics.jsonl").read_text().splitlines()
            done = [json.loads(x) for x in lines if x.endswith("}")]
            first = next((m for m in done if m.get("step") == 1), {})
        time.sleep(0.02)
    assert first, f"the run did not finish step 1 (exit {proc.poll()})"
    time.sleep(min(1.0, first["rollout_s"] / 4))  # well inside the next rollout
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    took = time.perf_counter() - sent
    assert proc.returncode == 143, stdout[-2000:] + stderr[-3000:]
    assert "stopped: by SIGTERM after step 1;" in stderr, stderr[-2000:]
    assert (out / "checkpoints" / "step-00000001" / "COMPLETE").is_file()
    assert [m["step"] for m in read_metrics(out)] == [1]  # step 2 never ran
    # stopping mid-rollout: much less than the rollout it cut short (writing the checkpoint included)
    assert took < max(0.6 * first["rollout_s"], 3.0), (took, first["rollout_s"])
    again = run_cli("train", str(path))
    assert_ok(again)
    assert "resumed from" in again.stdout and "step 1" in again.stdout
    assert [m["step"] for m in read_metrics(out)][-1] == 2


@pytest.mark.parametrize(
    "grpo",
    [
        {"advantage": "rloo", "loss_type": "grpo"},
        {"loss_type": "dr_grpo", "scale_rewards": "batch", "num_iterations": 2, "epsilon_high": 0.28},
        {"scale_rewards": "none", "mask_truncated_completions": True, "beta": 0.1},
    ],
    ids=["rloo-grpo", "dr_grpo-batch-iter2", "none-masked-beta-lora"],
)
def test_grpo_variants_run(tmp_path: Path, grpo: dict) -> None:
    method = "lora" if grpo.get("beta") else "full"  # lora + beta: the reference is the adapter disabled
    recipe = grpo_recipe(
        tmp_path,
        finetuning={"method": method, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        grpo={"num_generations": 4, "prompts_per_step": 2, "reward": {"rule": "regex:^[A-Z]"}, **grpo},
        train={"max_steps": 2, "eval_every": 2},
        data={"eval": [{"path": str(prompts_file(tmp_path / "held.jsonl", n=3, seed=5))}]},
    )
    out, _ = _train(tmp_path, recipe)
    metrics = read_metrics(out)
    train = [m for m in metrics if "loss" in m]
    assert len(train) == 2 and all(m["loss"] == m["loss"] for m in train)  # finite, logged every step
    if grpo.get("beta"):
        assert all("kl" in m for m in train)
    evals = [m for m in metrics if "eval/reward" in m]
    assert evals and 0.0 <= evals[-1]["eval/reward"] <= 1.0
    assert_curves(out, "loss", "reward", *(["kl"] if grpo.get("beta") else []))


def test_a_run_without_reward_spread_is_warned_and_dynamic_sampling_draws_a_bounded_number_more(
    tmp_path: Path,
) -> None:
    """exact_match, which the untrained tiny model never satisfies: every group scores 0 everywhere, so the
    run warns (with what to change) that it learns nothing; dynamic sampling draws its bounded 2 extra times
    a step, then trains on the zero-spread groups it has. A step is 3 prompts x 2 generations = 6 rows, cut
    into micro-batches of 4 (accumulation 2), whatever the split."""
    recipe = grpo_recipe(
        tmp_path,
        grpo={
            "num_generations": 2,
            "prompts_per_step": 3,
            "loss_type": "grpo",  # counts completions: the rows each step trained on
            "reward": {"rule": "exact_match"},
            "dynamic_sampling": True,
            "dynamic_sampling_draws": 2,
        },
        train={"max_steps": 2, "micro_batch_size": 4},
    )
    out, proc = _train(tmp_path, recipe)
    assert "3 prompts x 2 generations per step (dynamic sampling) | batch 4 x accum 2 x 1 proc = 6 rows/step" in (
        proc.stdout
    )
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "100% of the groups have zero reward spread" in text
    assert "more generations (grpo.num_generations)" in text and "a graded reward" in text
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert [m["completions"] for m in steps] == [6, 12]
    assert all(m["frac_reward_zero_std"] == 1.0 and m["reward"] == 0.0 for m in steps)
    assert all(m["extra_draws"] == 2 and m["frac_trained_zero_std"] == 1.0 for m in steps)
    assert all(m["loss"] == 0.0 for m in steps)


def test_grpo_bad_input_is_refused_before_training(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no prompt here"}\n{"chosen": "x"}\n')
    recipe = grpo_recipe(tmp_path, data={"train": [{"path": str(empty)}]})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_refused(proc, "no usable example")

    recipe = grpo_recipe(tmp_path, grpo={"reward": {"rule": "exact_matsh"}})
    assert_refused(run_cli("train", str(write_recipe(tmp_path, recipe))), "exact_matsh")

    recipe = grpo_recipe(tmp_path, grpo={"reward": {"rule": "os:getcwd"}})
    assert_refused(run_cli("train", str(write_recipe(tmp_path, recipe))), "--trust-reward-code")

    from tests.conftest import TINY_MODEL

    recipe = grpo_recipe(tmp_path, grpo={"reward": {"model": str(TINY_MODEL)}})  # a causal LM, not a reward model
    assert_refused(run_cli("train", str(write_recipe(tmp_path, recipe))), "stage: rm")

    # validate (no torch) already catches a misspelled rule and a missing reward model
    recipe = grpo_recipe(tmp_path, grpo={"reward": {"rule": "exact_matsh"}})
    assert_refused(run_cli("validate", str(write_recipe(tmp_path, recipe))), "grpo.reward.rule", "exact_matsh")
    recipe = grpo_recipe(tmp_path, grpo={"reward": {"model": str(tmp_path / "no-rm")}})
    assert_refused(run_cli("validate", str(write_recipe(tmp_path, recipe))), "grpo.reward.model", "does not exist")


@pytest.mark.slow  # an rm run, then 30 grpo steps
def test_grpo_raises_the_score_of_a_reward_model_from_the_rm_stage(tmp_path: Path) -> None:
    """A reward model trained by the rm stage (polite vs rude replies) scores the rollouts, with its own
    tokenizer and template; grpo raises its mean score well beyond the step-to-step noise."""
    from tests.integration.test_preference import _rm_recipe, polite_pairs

    (tmp_path / "rm").mkdir()
    pairs = polite_pairs(tmp_path / "rm" / "pairs.jsonl")
    rm_out, _ = _train(tmp_path / "rm", _rm_recipe(tmp_path / "rm", pairs, "full"))
    recipe = grpo_recipe(
        tmp_path,
        grpo={"num_generations": 8, "prompts_per_step": 4, "reward": {"model": str(rm_out)}},
        generation={"max_new_tokens": 8},
        train={"max_steps": 30, "micro_batch_size": 32, "lr": 3e-3},
    )
    out, _ = _train(tmp_path, recipe)
    steps = [m for m in read_metrics(out) if "reward" in m]
    name = f"reward/model/{rm_out.name}"
    assert all(name in m for m in steps)
    first = sum(m["reward"] for m in steps[:5]) / 5
    last = sum(m["reward"] for m in steps[-5:]) / 5
    spread = sum(m["reward_std"] for m in steps[:5]) / 5  # the within-step spread of the scores at the start
    assert last > first + 0.3 * spread and last > 1.2 * first, (first, last, spread)


def test_grpo_qlora_runs(tmp_path: Path) -> None:
    recipe = grpo_recipe(
        tmp_path,
        finetuning={"method": "qlora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        grpo={"beta": 0.05},  # the reference: the 4-bit base with the adapter disabled
        train={"max_steps": 2},
    )
    out, _ = _train(tmp_path, recipe)
    train = [m for m in read_metrics(out) if "loss" in m]
    assert len(train) == 2 and all(math.isfinite(m["kl"]) for m in train)
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "method"), [(2, "full"), (3, "full"), (3, "lora")])
def test_grpo_two_processes(tmp_path: Path, zero: int, method: str) -> None:
    """Two processes: each generates its own prompts' groups (ZeRO-3 gathers the weights once per rollout);
    the logged reward is over both; the held-out evaluation runs on both shards."""
    recipe = grpo_recipe(
        tmp_path,
        finetuning={"method": method, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        train={"max_steps": 2, "eval_every": 2},
        data={"eval": [{"path": str(prompts_file(tmp_path / "held.jsonl", n=3, seed=5))}]},
        distributed={"zero_stage": zero},
        precision="bf16",
    )
    out, proc = _train(tmp_path, recipe, nproc=2)
    assert "x 2 proc" in proc.stdout
    metrics = read_metrics(out)
    train = [m for m in metrics if "loss" in m]
    assert len(train) == 2 and all(0.0 <= m["reward"] <= 1.0 for m in train)
    assert [m["step"] for m in metrics if "eval/reward" in m] == [2]
    from transformers import AutoModelForCausalLM

    if method == "lora":
        from peft import PeftModel

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe["model"]["path"]), out)
    else:
        AutoModelForCausalLM.from_pretrained(out)
