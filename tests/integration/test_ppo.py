"""stage: ppo through the real CLI on the tiny model: it learns a rule reward and a reward model's score in both
memory layouts, keeps the KL bounded, resumes exactly after a SIGKILL (the adaptive KL controller included),
runs every option, holds one base in shared mode, and refuses bad input before training."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    TINY_MODEL,
    as_if_killed,
    assert_ok,
    assert_refused,
    base_recipe,
    read_metrics,
    run_cli,
    write_recipe,
)
from tests.integration.test_grpo import held_out_prompts, prompts_file

CAPITAL = "regex:^ ?[A-Z]"  # 1 when the reply starts with a capital letter: about one in five at the start
LORA = {"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
# a random tiny model's logits hardly move through low-rank updates of its 64-wide layers alone: its output
# layer trains in full too (saved with the adapter, and off in the reference like the adapter)
LORA_HEAD = {**LORA, "modules_to_save": ["lm_head"]}


def ppo_recipe(tmp_path: Path, **sections) -> dict:
    """A ppo recipe on the tiny model: one rollout of 32 completions a step, full weights, a rule reward."""
    defaults = {
        "finetuning": {"method": "full"},
        "data": {"train": [{"path": str(prompts_file(tmp_path / "prompts.jsonl", n=64))}], "max_length": 96},
        "ppo": {"reward": {"rule": CAPITAL}, "ppo_epochs": 1, "prompts_per_step": 32, "rollout_batch_size": 32},
        "generation": {"max_new_tokens": 4, "temperature": 1.0},
        "train": {"max_steps": 4, "micro_batch_size": 32, "lr": 3e-3, "log_every": 1, "lr_scheduler": "constant"},
    }
    merged = {k: {**v, **sections.pop(k, {})} for k, v in defaults.items()}
    return base_recipe(tmp_path, stage="ppo", **merged, **sections)


def _train(tmp_path: Path, recipe: dict, *extra: str, nproc: int = 1):
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), *extra, nproc=nproc)
    assert_ok(proc)
    return Path(recipe["output_dir"]), proc


def _rollout_rewards(out: Path) -> list[float]:
    return [m["reward"] for m in read_metrics(out) if "reward" in m]


def _rises(rewards: list[float], k: int = 10) -> tuple[float, float]:
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    assert last >= 1.2 * first and last > first + 0.15, (first, last, rewards)
    return first, last


def _trained(tmp_path: Path, method: str, memory: str, steps: int, **ppo) -> Path:
    recipe = ppo_recipe(
        tmp_path,
        finetuning=LORA_HEAD if method == "lora" else {"method": method},
        ppo={"memory": memory, **ppo},
        train={"max_steps": steps, "eval_every": 10, "lr": 3e-3},
        data={"eval": [{"path": str(held_out_prompts(tmp_path / "held.jsonl"))}]},
    )
    out, _ = _train(tmp_path, recipe)
    return out


@pytest.mark.parametrize(("method", "memory"), [("full", "separate"), ("lora", "shared")])
def test_ppo_raises_a_rule_reward_with_bounded_kl(tmp_path: Path, method: str, memory: str) -> None:
    """From the random tiny model, ppo must raise the mean reward of its rollouts by at least 20% relative
    (and by 0.15 absolute), and the reward of greedy answers to held-out prompts, while the KL to the starting
    model stays bounded (k1 in the reward, its coefficient adapted toward ppo.target_kl)."""
    out = _trained(tmp_path, method, memory, 80, target_kl=2.0, kl_horizon=2000)
    metrics = read_metrics(out)
    _rises(_rollout_rewards(out))
    evals = [m["eval/reward"] for m in metrics if "eval/reward" in m]
    assert len(evals) == 8 and evals[-1] >= 0.8, evals
    # the same held-out prompts, answered greedily by `llmtune eval` from the starting model and from ppo's
    start = _held_out_reward(tmp_path, str(TINY_MODEL))
    end = (
        _held_out_reward(tmp_path, str(TINY_MODEL), str(out))
        if method == "lora"
        else _held_out_reward(tmp_path, str(out))
    )
    assert end >= 0.8 and end >= start + 0.3, (start, end)
    steps = [m for m in metrics if "reward" in m]
    assert max(m["kl"] for m in steps) < 8.0
    assert steps[-1]["kl_coef"] != steps[0]["kl_coef"]  # the adaptive controller acted
    for key in (
        "policy_loss",
        "value_loss",
        "clip_fraction",
        "value_clip_fraction",
        "entropy",
        "approx_kl",
        "explained_variance",
        "completion_length",
        "ended",
        "non_score_reward",
        "rollout_s",
        "train_s",
        f"reward/rule/{CAPITAL}",
    ):
        assert key in steps[0], key
    if method == "full":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)  # the policy loads as an sft output does
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        config = json.loads((out / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM" and not (out / "critic").exists()
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), out)
        assert str(TINY_MODEL) not in (out / "README.md").read_text()  # no local path in the model card


def _held_out_reward(tmp_path: Path, model: str, adapter: str | None = None) -> float:
    report = tmp_path / "report.json"
    args = ["--model", model, *(["--adapter", adapter] if adapter else [])]
    proc = run_cli(
        "eval",
        *args,
        "--data",
        str(tmp_path / "held.jsonl"),
        "--task",
        "reward",
        "--rule",
        CAPITAL,
        "--max-new-tokens",
        "4",
        "--output",
        str(report),
    )
    assert_ok(proc)
    return json.loads(report.read_text())["mean_reward"]


def _rm(tmp_path: Path, method: str) -> Path:
    """A reward model from the rm stage, trained on the tiny model's base (polite vs rude replies)."""
    from tests.integration.test_preference import _rm_recipe, polite_pairs

    d = tmp_path / f"rm-{method}"
    d.mkdir()
    out, _ = _train(d, _rm_recipe(d, polite_pairs(d / "pairs.jsonl"), method))
    return out


@pytest.mark.slow  # an rm run, then 60 / 40 ppo steps
# full weights move the score more slowly against its step-to-step noise (2026-12-04: 40 steps fell just short
# of the bar); lora's KL passes the bound by 60 steps
@pytest.mark.parametrize(("method", "memory", "steps"), [("full", "separate", 60), ("lora", "shared", 40)])
def test_ppo_raises_the_score_of_a_reward_model_from_the_rm_stage(
    tmp_path: Path, method: str, memory: str, steps: int
) -> None:
    """The rm stage's reward model scores the rollouts (separate: its own copy, full; shared: a lora reward
    model as one more adapter on the policy's base); the critic starts from it; ppo raises its mean score
    well beyond the step-to-step noise, with the KL bounded."""
    rm = _rm(tmp_path, method)
    recipe = ppo_recipe(
        tmp_path,
        finetuning=LORA_HEAD if method == "lora" else {"method": "full"},
        ppo={"memory": memory, "reward": {"model": str(rm)}, "save_critic": True},
        generation={"max_new_tokens": 8},
        train={"max_steps": steps},
    )
    out, _ = _train(tmp_path, recipe)
    steps = [m for m in read_metrics(out) if "reward" in m]
    assert all(f"reward/model/{rm.name}" in m for m in steps)
    rewards = [m["reward"] for m in steps]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    noise = sum(abs(rewards[i + 1] - rewards[i]) for i in range(5)) / 5  # step-to-step change at the start
    assert last > first + max(0.2, 2 * noise), (first, last, noise, rewards)
    assert max(m["kl"] for m in steps) < 10.0
    if memory == "shared":
        assert (out / "critic" / "adapter_model.safetensors").is_file()
        assert (out / "critic" / "value_head.safetensors").is_file()
    else:
        from transformers import AutoModelForSequenceClassification

        AutoModelForSequenceClassification.from_pretrained(out / "critic", num_labels=1)


def _params(stdout: str) -> int:
    return int(re.search(r"trainable [\d,]+ / ([\d,]+) params", stdout).group(1).replace(",", ""))


@pytest.mark.slow  # several runs: the slow tier
def test_ppo_shared_memory_holds_one_base(tmp_path: Path) -> None:
    """Shared mode: the policy, critic and a lora reward model are adapters on one base (and the reference is
    the base with them off); separate mode loads the critic's backbone and the reward model again. The
    parameters the engine's model holds say so; both layouts score the first rollout alike."""
    rm = _rm(tmp_path, "lora")
    totals, first = {}, {}
    for memory in ("shared", "separate"):
        d = tmp_path / memory
        d.mkdir()
        recipe = ppo_recipe(d, finetuning=LORA, ppo={"memory": memory, "reward": {"model": str(rm)}})
        recipe["train"]["max_steps"] = 1
        out, proc = _train(d, recipe)
        totals[memory] = _params(proc.stdout)
        first[memory] = read_metrics(out)[0]
    from transformers import AutoModelForCausalLM

    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(TINY_MODEL).parameters())
    assert totals["shared"] < 1.5 * base  # one base + adapters + a value head
    assert totals["separate"] > 1.8 * base  # a second backbone for the critic
    assert first["shared"]["reward"] == pytest.approx(first["separate"]["reward"], abs=1e-4)
    assert first["shared"]["loss"] == pytest.approx(first["separate"]["loss"], abs=1e-4)


def test_ppo_sigkill_then_the_same_command_finishes_with_the_same_weights(tmp_path: Path) -> None:
    """A real SIGKILL after a checkpoint at a rollout boundary; the same command resumes from it, the KL
    controller's coefficient restored, and ends with the uninterrupted run's weights and rollouts."""
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    from tests.conftest import start_cli

    ppo = {"ppo_epochs": 2, "prompts_per_step": 16, "rollout_batch_size": 32, "target_kl": 0.5, "kl_horizon": 100}
    train = {"max_steps": 24, "micro_batch_size": 16, "save_every": 4, "keep_checkpoints": 2}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out_a, _ = _train(tmp_path / "a", ppo_recipe(tmp_path / "a", ppo=ppo, train=train))
    recipe = ppo_recipe(tmp_path / "b", ppo=ppo, train=train)
    path = write_recipe(tmp_path / "b", recipe)
    out_b = Path(recipe["output_dir"])
    proc = start_cli("train", str(path), output=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any((p / "COMPLETE").exists() for p in (out_b / "checkpoints").glob("step-*")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out_b / "model.safetensors").exists()
    again = run_cli("train", str(path))
    assert_ok(again)
    assert "resumed from" in again.stdout
    a, b = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    coef_a = [m["kl_coef"] for m in read_metrics(out_a) if "kl_coef" in m]
    coef_b = {m["step"]: m["kl_coef"] for m in read_metrics(out_b) if "kl_coef" in m}
    assert len(set(coef_a)) > 2  # the coefficient moved, so its restore matters
    assert coef_b[24] == pytest.approx(coef_a[-1], rel=1e-9)


@pytest.mark.slow  # several runs: the slow tier
def test_ppo_resume_at_a_rollout_boundary_restores_the_kl_controller(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ppo = {"ppo_epochs": 2, "prompts_per_step": 16, "rollout_batch_size": 32, "target_kl": 0.5, "kl_horizon": 100}
    train = {"max_steps": 8, "micro_batch_size": 16}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out_a, _ = _train(tmp_path / "a", ppo_recipe(tmp_path / "a", ppo=ppo, train=train))
    resumed = ppo_recipe(tmp_path / "b", ppo=ppo, train={**train, "save_every": 4, "keep_checkpoints": 2})
    out_b, _ = _train(tmp_path / "b", resumed)
    state = json.loads((out_b / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["stage_state"]["kl_controller"]["value"] != 0.05  # moved after the first rollout
    as_if_killed(out_b, drop=("step-00000008",))
    out_b, proc = _train(tmp_path / "b", resumed)
    assert "resumed from" in proc.stdout and "step 4" in proc.stdout
    a, b = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert [m["kl_coef"] for m in read_metrics(out_a) if "kl_coef" in m] == [
        m["kl_coef"] for m in read_metrics(out_b) if "kl_coef" in m
    ]


@pytest.mark.parametrize(
    "ppo",
    [
        {"kl_estimator": "k3", "dual_clip": 3.0, "whiten_rewards": True, "entropy_coef": 0.01, "reward_clip": 0.5},
        {"cliprange_value": None, "whiten_advantages": False, "gamma": 0.9, "lam": 0.8, "critic_lr": 1e-2},
    ],
    ids=["k3-dualclip-whiten-entropy", "unclipped-value-gae"],
)
def test_ppo_variants_run(tmp_path: Path, ppo: dict) -> None:
    recipe = ppo_recipe(
        tmp_path,
        ppo={"ppo_epochs": 2, "prompts_per_step": 16, **ppo},
        train={"max_steps": 4, "micro_batch_size": 16, "eval_every": 4},
        data={"eval": [{"path": str(prompts_file(tmp_path / "held.jsonl", n=3, seed=5))}]},
    )
    out, _ = _train(tmp_path, recipe)
    train = [m for m in read_metrics(out) if "loss" in m]
    assert len(train) == 4 and all(math.isfinite(m["loss"]) for m in train)
    evals = [m for m in read_metrics(out) if "eval/reward" in m]
    assert evals and 0.0 <= evals[-1]["eval/reward"] <= 1.0


def test_ppo_early_stop_skips_the_rest_of_a_rollout_without_updates(tmp_path: Path) -> None:
    """ppo.early_stop_kl: once a step's approximate KL to the sampling policy passes the bound, the rollout's
    remaining steps change nothing (logged as skipped), and the next rollout trains again."""
    recipe = ppo_recipe(
        tmp_path,
        ppo={"ppo_epochs": 4, "early_stop_kl": 1e-6},
        train={"max_steps": 8, "lr": 1e-2},
    )
    out, _ = _train(tmp_path, recipe)
    metrics = read_metrics(out)
    skipped = [m["step"] for m in metrics if m.get("skipped") == "early_stop"]
    trained = [m["step"] for m in metrics if m.get("loss") is not None]
    # the first step of a rollout has the sampling policy itself (ratio 1, no KL); the second moves it past the
    # bound; the third and fourth are skipped
    assert skipped == [3, 4, 7, 8] and trained == [1, 2, 5, 6], (skipped, trained)


def test_ppo_qlora_shared_with_gradient_checkpointing_runs(tmp_path: Path) -> None:
    """The 4-bit base shared by the policy and critic adapters; checkpointing recomputes each through its own."""
    recipe = ppo_recipe(
        tmp_path,
        finetuning={"method": "qlora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        ppo={"ppo_epochs": 2, "prompts_per_step": 16},
        train={"max_steps": 2, "micro_batch_size": 16, "gradient_checkpointing": True},
    )
    out, _ = _train(tmp_path, recipe)
    train = [m for m in read_metrics(out) if "loss" in m]
    assert len(train) == 2 and all(math.isfinite(m["loss"]) and math.isfinite(m["kl"]) for m in train)
    assert (out / "adapter_model.safetensors").is_file()


def test_ppo_without_reward_spread_warns_and_logs_finite_figures(tmp_path: Path) -> None:
    """exact_match, which the untrained tiny model never satisfies: every completion scores 0, so the run warns
    (with what to change) that the policy gets no reward signal; explained_variance stays a number. A step is
    8 prompts, cut into micro-batches of 3 (accumulation 3)."""
    recipe = ppo_recipe(
        tmp_path,
        ppo={"reward": {"rule": "exact_match"}, "prompts_per_step": 8, "rollout_batch_size": 8},
        train={"max_steps": 2, "micro_batch_size": 3},
        data={"train": [{"path": str(prompts_file(tmp_path / "p.jsonl", n=16))}]},
    )
    out, proc = _train(tmp_path, recipe)
    assert "8 prompts x 1 generation per step" in proc.stdout and "batch 3 x accum 3 x 1 proc = 8 rows/step" in (
        proc.stdout
    )
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "100% of the rollout's completions scored alike" in text and "a graded reward" in text
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert len(steps) == 2 and all(m["reward"] == 0.0 and m["frac_reward_zero_std"] == 1.0 for m in steps)
    assert all(math.isfinite(m["explained_variance"]) for m in steps)


def test_ppo_bad_input_is_refused_before_training(tmp_path: Path) -> None:
    def refused(recipe: dict, *phrases: str, command: str = "train") -> None:
        # validate's schema messages carry the fix in their sentence; train's errors have a fix: line
        assert_refused(run_cli(command, str(write_recipe(tmp_path, recipe))), *phrases, fix=command == "train")

    refused(ppo_recipe(tmp_path, ppo={"memory": "shared"}), "ppo.memory shared", "lora", command="validate")
    refused(
        ppo_recipe(tmp_path, ppo={"rollout_batch_size": 48}, train={"micro_batch_size": 32}),
        "rollout_batch_size 48",
        "multiple of the 32 completions",
    )
    refused(ppo_recipe(tmp_path, ppo={"prompts_per_step": 64}), "rollout_batch_size 32", "multiple of 64")
    refused(
        ppo_recipe(tmp_path, train={"grad_accum": 2}), "train.grad_accum 2", "ppo.prompts_per_step", command="validate"
    )
    refused(ppo_recipe(tmp_path, ppo={"critic_init": "reward"}), "critic_init reward", command="validate")
    refused(ppo_recipe(tmp_path, ppo={"reward": {"rule": "exact_matsh"}}), "ppo.reward.rule", command="validate")
    refused(ppo_recipe(tmp_path, ppo={"reward": {"model": str(TINY_MODEL)}}), "not a reward model")

    full_rm = _rm(tmp_path, "full")
    refused(
        ppo_recipe(tmp_path, finetuning=LORA, ppo={"memory": "shared", "reward": {"model": str(full_rm)}}),
        "ppo.memory shared",
        "full model",
    )
    # a lora reward model of another base: the tiny model saved again elsewhere is another path
    import shutil

    other = tmp_path / "other-base"
    shutil.copytree(TINY_MODEL, other)
    d = tmp_path / "rm-other"
    d.mkdir()
    from tests.integration.test_preference import _rm_recipe, polite_pairs

    rm_recipe = _rm_recipe(d, polite_pairs(d / "pairs.jsonl"), "lora")
    rm_recipe["model"]["path"] = str(other)
    rm_recipe["train"]["max_steps"] = 1
    rm_other, _ = _train(d, rm_recipe)
    refused(
        ppo_recipe(tmp_path, finetuning=LORA, ppo={"memory": "shared", "reward": {"model": str(rm_other)}}),
        "not of the policy's base",
    )
    # a policy whose tokenizer has no chat template
    bare = tmp_path / "bare"
    shutil.copytree(TINY_MODEL, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in bare.glob("*.jinja"):
        f.unlink()
    recipe = ppo_recipe(tmp_path)
    recipe["model"]["path"] = str(bare)
    refused(recipe, "chat template")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("zero", "method", "memory"), [(2, "full", "separate"), (3, "full", "separate"), (3, "lora", "shared")]
)
def test_ppo_two_processes(tmp_path: Path, zero: int, method: str, memory: str) -> None:
    """Two processes: each generates and scores its own prompts; whitening and the logged figures are over
    both; the final export gathers ZeRO-3's partitions."""
    recipe = ppo_recipe(
        tmp_path,
        finetuning=LORA if method == "lora" else {"method": method},
        ppo={"memory": memory, "ppo_epochs": 2, "prompts_per_step": 16, "rollout_batch_size": 16, "save_critic": True},
        train={"max_steps": 4, "micro_batch_size": 8, "eval_every": 4},
        distributed={"zero_stage": zero},
        data={"eval": [{"path": str(prompts_file(tmp_path / "held.jsonl", n=4, seed=5))}]},
    )
    out, proc = _train(tmp_path, recipe, nproc=2)
    assert "x 2 proc" in proc.stdout
    train = [m for m in read_metrics(out) if "loss" in m]
    assert len(train) == 4 and all(math.isfinite(m["loss"]) for m in train)
    assert (out / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).is_file()
    assert (out / "critic").is_dir()
