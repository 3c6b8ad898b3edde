"""rm.lm_loss_weight: the reward model's backbone with the base model's frozen output embedding gives the same
token NLL on the preferred responses as the causal LM itself (computed independently by transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmtune.recipe import validate_recipe
from llmtune.stages import get_stage
from tests.conftest import TINY_MODEL, base_recipe


def _pairs(path: Path) -> Path:
    rows = [
        {"prompt": f"Name a colour number {i}.", "chosen": f"Colour {i} is blue.", "rejected": "No."} for i in range(6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lm_regulariser_matches_the_causal_lm(tmp_path: Path, tokenizer) -> None:
    recipe = validate_recipe(
        base_recipe(
            tmp_path,
            stage="rm",
            finetuning={"method": "full"},
            data={"train": [{"path": str(_pairs(tmp_path / "p.jsonl"))}], "max_length": 64},
            rm={"lm_loss_weight": 0.5},
        )
    )
    stage = get_stage("rm")
    data = stage.build_data(recipe, tokenizer, tokenizer.chat_template)
    model = stage.load_model(recipe, torch.device("cpu"), tokenizer).model.eval()
    batch = stage.collate(data.train, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out = stage.step(model, batch)
    pairs = out.units.item()
    assert pairs == 6

    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    best = (batch["rank"] == 0).nonzero().squeeze(-1)
    ids, mask, labels = batch["input_ids"][best], batch["attention_mask"][best], batch["labels"][best]
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    per_row = nll.sum(-1) / (labels[:, 1:] != -100).sum(-1)
    expected = per_row.sum().item()
    assert out.metrics["lm_loss"].item() == pytest.approx(expected, rel=1e-4)
    # the loss is the preference loss plus the weighted regulariser
    stage.lm_weight = 0.0
    with torch.no_grad():
        plain = stage.step(model, batch).loss_sum.item()
    assert out.loss_sum.item() == pytest.approx(plain + 0.5 * expected, rel=1e-4)


def test_pointwise_has_no_preferred_response(tmp_path: Path) -> None:
    from llmtune.errors import RecipeError

    with pytest.raises(RecipeError, match="lm_loss_weight needs a preferred response"):
        validate_recipe(base_recipe(tmp_path, stage="rm", rm={"loss": "pointwise", "lm_loss_weight": 1.0}))
