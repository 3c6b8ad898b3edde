"""Every peft method beyond lora / qlora (dora, rslora, adalora, ia3, prefix, prompt, ptuning) trains on the tiny
model, saves a peft adapter that reloads with the very function training ended with, and merges where the method
can be merged (merge-lora refuses the others)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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

ADALORA = {"method": "adalora", "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1}}
METHODS = {
    "dora+rslora": {"method": "dora", "use_rslora": True, "lora_r": 4},
    "adalora": ADALORA,
    "ia3": {"method": "ia3"},
    "prefix": {"method": "prefix", "prompt": {"num_virtual_tokens": 4}},
    "prompt": {"method": "prompt", "prompt": {"num_virtual_tokens": 4, "init_text": "Answer briefly:"}},
    "ptuning": {"method": "ptuning", "prompt": {"num_virtual_tokens": 4, "encoder_hidden_size": 32}},
}
MERGEABLE = ("dora+rslora", "adalora", "ia3")
PEFT_TYPE = {
    "dora+rslora": "LORA",
    "adalora": "ADALORA",
    "ia3": "IA3",
    "prefix": "PREFIX_TUNING",
    "prompt": "PROMPT_TUNING",
    "ptuning": "P_TUNING",
}


def _recipe(tmp_path: Path, finetuning: dict[str, Any], **sections: Any) -> dict[str, Any]:
    train = {"max_steps": 4, "save_every": 2, "keep_checkpoints": 2, "lr": 1e-2, **sections.pop("train", {})}
    return base_recipe(tmp_path, finetuning=finetuning, train=train, **sections) | {"finetuning": finetuning}


def _probe_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 250, (2, 12), generator=g)


def _trained_model(out: Path) -> Any:
    """The model exactly as training left it: built as the trainer builds it, with the last checkpoint's
    module weights (for adalora: all init_r ranks, the pruned ones masked to 0)."""
    from llmtune.model.load import ModelSpec, load
    from llmtune.model.tokenizer import load_tokenizer
    from llmtune.recipe.load import load_recipe

    recipe = load_recipe(out / "recipe.yaml")
    tok = load_tokenizer(recipe.model)
    model = load(ModelSpec.trained(recipe), torch.device("cpu"), tok).model
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    state = torch.load(next(last.rglob("mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    missing, unexpected = model.load_state_dict(state["module"], strict=False)
    assert not unexpected and not [k for k in missing if "base_layer" not in k and "lora" in k], (missing, unexpected)
    return model.eval()


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_saves_reloads_and_merges(tmp_path: Path, name: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path, METHODS[name])
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_ok(proc)
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == PEFT_TYPE[name]
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    ids = _probe_ids()
    trained = _logits(_trained_model(out), ids)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    before = _logits(base, ids)
    reloaded_model = PeftModel.from_pretrained(base, out).eval()
    reloaded = _logits(reloaded_model, ids)
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)  # the adapter is what training ended with
    assert (reloaded[:, -ids.shape[1] :] - before).abs().max() > 1e-4  # and training changed the function

    merged_dir = tmp_path / "merged"
    proc = run_cli("merge-lora", "--adapter", str(out), "--out", str(merged_dir))
    if name not in MERGEABLE:
        assert_refused(proc, "cannot be merged", "PeftModel.from_pretrained")
        return
    assert_ok(proc)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not (merged_dir / "adapter_config.json").exists()
    torch.testing.assert_close(_logits(merged, ids), reloaded, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_adalora_schedule_follows_the_real_steps_and_resumes_exactly(tmp_path: Path) -> None:
    """The budget runs over the run's 4 optimizer steps (accumulation 2: 8 micro-batches): init_r 4 -> target 2
    per matrix from step 2, the final pattern fixed at step 3 (= total 4 - tfinal 1). Killed after the step-2
    checkpoint and resumed, the run ends with the same rank pattern and the same adapter as an uninterrupted
    one: the allocator's importance averages from steps 1-2 came back with the checkpoint."""
    from safetensors.torch import load_file

    adalora = {"method": "adalora", "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1}}
    train = {"max_steps": 4, "save_every": 2, "keep_checkpoints": 3, "grad_accum": 2, "micro_batch_size": 2}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_recipe(tmp_path / "a", _recipe(tmp_path / "a", adalora, train=train))
    assert_ok(run_cli("train", str(a)))
    b = write_recipe(tmp_path / "b", _recipe(tmp_path / "b", adalora, train=train))
    assert_ok(run_cli("train", str(b)))
    out_a, out_b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    as_if_killed(out_b, drop=("step-00000004",))
    proc = run_cli("train", str(b))
    assert_ok(proc)
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout

    cfg_a = json.loads((out_a / "adapter_config.json").read_text())
    cfg_b = json.loads((out_b / "adapter_config.json").read_text())
    assert cfg_a["total_step"] == 4  # optimizer steps, not the 8 micro-batches nor peft's placeholder
    # peft's cubic schedule at step 2 of 4 (tinit 1, tfinal 1): (1 - (2 - 1) / (4 - 1 - 1))^3 = 1/8 of the way
    # from init_r to target_r left: int((56 - 28) / 8 + 28) = 31 of the 14 matrices' 56 ranks kept (a
    # 3-step schedule would already be at its final 28)
    at_2 = torch.load(out_a / "checkpoints" / "step-00000002" / "adalora_state.pt", weights_only=True)
    assert len(at_2["rank_pattern"]) == 14 and sum(sum(v) for v in at_2["rank_pattern"].values()) == 31
    pattern = cfg_a["rank_pattern"]
    assert pattern and cfg_b["rank_pattern"] == pattern
    kept = [sum(v) for v in pattern.values()]
    assert sum(kept) == 2 * len(kept)  # the budget reached target_r on average within the run's 4 steps
    assert all(0 <= k <= 4 for k in kept) and len(set(kept)) > 1  # ... spread by importance, not uniformly
    wa, wb = load_file(out_a / "adapter_model.safetensors"), load_file(out_b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    assert [m["loss"] for m in read_metrics(out_a) if "loss" in m] == [
        m["loss"] for m in read_metrics(out_b) if "loss" in m
    ]


def test_adalora_schedule_longer_than_the_run_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, ADALORA, train={"max_steps": 2})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_refused(proc, "tinit 1 + tfinal 1 leave no step of this run's 2", "tinit + tfinal < 2")
    assert "loading" not in proc.stdout


@pytest.mark.parametrize(
    ("stage", "name"), [("rm", "ia3"), ("rm", "adalora"), ("dpo", "prefix"), ("dpo", "ptuning"), ("dpo", "adalora")]
)
def test_method_trains_preference_stages(tmp_path: Path, stage: str, name: str) -> None:
    """rm (score head trained with the adapter, merged/ written for the mergeable methods) and dpo (the reference
    is a frozen copy of the base) train with the new methods; the outputs load as peft adapters."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    from tests.integration.test_preference import polite_pairs

    data = polite_pairs(tmp_path / "pairs.jsonl", n=16)
    recipe = _recipe(tmp_path, METHODS[name], stage=stage, data={"train": [{"path": str(data)}], "max_length": 64})
    assert_ok(run_cli("train", str(write_recipe(tmp_path, recipe))))
    out = tmp_path / "out"
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    ids = _probe_ids()
    if stage == "rm":
        merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
        pad = merged.config.pad_token_id
        adapter = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1, pad_token_id=pad).eval()
        torch.testing.assert_close(_logits(merged, ids), _logits(adapter, ids), atol=1e-4, rtol=1e-4)
    else:
        model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
        assert _logits(model, ids).shape[-1] == model.get_input_embeddings().num_embeddings


@pytest.mark.parametrize("name", ["adalora", "ia3"])
def test_method_trains_grpo(tmp_path: Path, name: str) -> None:
    """grpo samples with the adapter on and (beta > 0) scores against a frozen copy of the base."""
    from peft import AutoPeftModelForCausalLM

    from tests.integration.test_grpo import grpo_recipe

    recipe = grpo_recipe(tmp_path, grpo={"beta": 0.1}, train={"max_steps": 3})
    recipe["finetuning"] = METHODS[name]
    assert_ok(run_cli("train", str(write_recipe(tmp_path, recipe))))
    out = tmp_path / "out"
    assert len([m for m in read_metrics(out) if "loss" in m]) == 3
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == PEFT_TYPE[name]
    AutoPeftModelForCausalLM.from_pretrained(out)
