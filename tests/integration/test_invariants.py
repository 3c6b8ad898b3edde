"""Invariants every stage keeps: the split of a step into micro-batches does not change the update (micro-batch
8 x accumulation 1 = micro-batch 2 x accumulation 4, KTO's batch reference point included), nor its split
over processes (one process = two with the same global batch), and a seed fixes the run (the same seed
twice: identical losses; another seed: other ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY_MODEL, assert_ok, base_recipe, read_metrics, run_cli, write_recipe

FACTS = ROOT / "recipes" / "quickstart" / "facts"
DATA = {
    "cpt": {"train": [{"path": str(FACTS / "cpt.txt"), "format": "text"}], "packing": True},
    "sft": {"train": [{"path": str(FACTS / "sft.jsonl"), "format": "messages"}]},
    "rm": {"train": [{"path": str(FACTS / "pairs.jsonl"), "format": "pairs"}]},
    "dpo": {"train": [{"path": str(FACTS / "pairs.jsonl"), "format": "pairs"}]},
    "online": {"train": [{"path": str(FACTS / "prompts.jsonl"), "format": "prompts"}]},
}
# The online stages sample their batches: the sampler's batch is fixed (generation.batch_size) so that both
# runs draw the same completions, and a reward that needs no answer spreads their scores on a random model
# (short completions score higher), so that the update is not zero.
REWARD = {"rule": "length_penalty:12"}
# grpo and ppo count a step in prompts (8 rows a step here); micro_batch_size alone cuts it (8 x 1 = 2 x 4).
ONLINE = {
    "grpo": {"grpo": {"num_generations": 4, "prompts_per_step": 2, "beta": 0.1, "reward": REWARD}},
    "ppo": {"ppo": {"ppo_epochs": 2, "prompts_per_step": 8, "reward": REWARD}},
    "rejection_sampling": {
        "rejection_sampling": {"num_samples": 4, "threshold": "none", "reward": REWARD},
    },
}
STEP_IN_PROMPTS = ("grpo", "ppo")


def _run(tmp_path: Path, stage: str, mb: int, ga: int, seed: int = 0, nproc: int = 1, **extra: dict) -> Path:
    sub = tmp_path / f"{stage}-mb{mb}-ga{ga}-s{seed}-p{nproc}"
    sub.mkdir()
    online = stage in ONLINE
    if online:
        extra = {**ONLINE[stage], "generation": {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 8}, **extra}
    recipe = base_recipe(
        sub,
        stage="dpo" if stage == "kto" else stage,
        seed=seed,
        finetuning={"method": "full"},
        data={**DATA["online" if online else "dpo" if stage == "kto" else stage], "max_length": 64, "shuffle": True},
        train={
            "max_steps": 2,
            "micro_batch_size": mb,
            **({} if stage in STEP_IN_PROMPTS else {"grad_accum": ga}),
            "lr": 1e-3,
            "log_every": 1,
        },
        **({"dpo": {"loss": "kto"}} if stage == "kto" else {}),
        **extra,
    )
    assert_ok(run_cli("train", str(write_recipe(sub, recipe)), nproc=nproc))
    return Path(recipe["output_dir"])


def _assert_same_run(a: Path, b: Path, stage: str) -> None:
    """Two runs' final weights and logged losses agree (float tolerance). A weight the runs share with the
    starting model is compared by its update: the two updates differ by under 1% of their size. (AdamW divides
    each gradient element by its own running size, so an element whose gradient is ~0 takes a step of up to lr
    either way on float noise alone, while the update as a whole stays put: 0.15% for rm here. A wrong split,
    e.g. each micro-batch averaged over its own tokens instead of the step's, turns the update's direction.)"""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    start = load_file(TINY_MODEL / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        if k in start and start[k].shape == wa[k].shape:
            update, diff = (wa[k] - start[k]).norm(), (wa[k] - wb[k]).norm()
            assert diff <= 1e-2 * update + 1e-6, f"{stage}: {k}: the updates differ by {diff:.3g} (size {update:.3g})"
        else:  # a new head: initialised alike from the seed
            torch.testing.assert_close(wa[k], wb[k], atol=5e-5, rtol=1e-4, msg=f"{stage}: {k}")
    la = [m["loss"] for m in read_metrics(a) if "loss" in m]
    lb = [m["loss"] for m in read_metrics(b) if "loss" in m]
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["cpt", "sft", "rm", "dpo", "kto", "grpo", "ppo", "rejection_sampling"])
def test_micro_batch_split_does_not_change_the_update(tmp_path: Path, stage: str) -> None:
    a = _run(tmp_path, stage, 8, 1)
    b = _run(tmp_path, stage, 2, 4)
    _assert_same_run(a, b, stage)
    if stage in ONLINE:  # the sampled batches gave an update to compare, not none
        start, end = load_file(TINY_MODEL / "model.safetensors"), load_file(a / "model.safetensors")
        assert any(not torch.equal(start[k], end[k]) for k in start), f"{stage}: the weights did not move"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["cpt", "sft", "rm", "dpo", "kto"])
def test_one_process_and_two_give_the_same_weights(tmp_path: Path, stage: str) -> None:
    """The same global batch (8 rows a step) on one process (4 x accumulation 2) and on two (4 x 1 each)."""
    a = _run(tmp_path, stage, 4, 2)
    b = _run(tmp_path, stage, 4, 1, nproc=2)
    _assert_same_run(a, b, stage)


@pytest.mark.slow
def test_a_seed_fixes_the_run(tmp_path: Path) -> None:
    losses = []
    for i, seed in enumerate((0, 0, 1)):
        (tmp_path / str(i)).mkdir()
        out = _run(tmp_path / str(i), "sft", 4, 1, seed=seed)
        assert json.loads((out / "run.json").read_text())["status"] == "finished"
        losses.append([m["loss"] for m in read_metrics(out) if "loss" in m])
    assert len(losses[0]) == 2
    assert losses[0] == losses[1]  # bit for bit
    assert losses[0] != losses[2]  # another data order
