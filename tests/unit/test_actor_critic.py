"""ppo's models on the tiny model with real peft: adapter routing that leaves requires_grad alone, the shared
critic's values, one optimizer group per learning rate, and the per-token helpers of the stage."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL


@pytest.fixture()
def shared() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmtune.model.actor_critic import ActorCritic, add_critic_adapter, hidden_size

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    add_critic_adapter(policy, copy.deepcopy(policy.peft_config["default"]))
    head = torch.nn.Linear(hidden_size(policy), 1, bias=False)
    torch.nn.init.normal_(head.weight)
    return ActorCritic(policy, value_head=head, policy_lr=1e-3, critic_lr=5e-3)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 2, 2]])
    return {"input_ids": ids, "attention_mask": (torch.arange(5) < torch.tensor([[5], [3]])).long()}


def test_both_adapters_train_and_route_separately(shared: torch.nn.Module) -> None:
    names = {n for n, p in shared.named_parameters() if p.requires_grad}
    assert any(".default." in n for n in names) and any(".critic." in n for n in names)
    assert "value_head.weight" in names
    # only the routed adapter gets a gradient from each part's loss; requires_grad never changes
    b = _batch()
    for lora in shared.modules():
        if hasattr(lora, "lora_B"):
            for k in lora.lora_B:
                torch.nn.init.normal_(lora.lora_B[k].weight)
    shared(**b, part="values").sum().backward()
    grads = {n for n, p in shared.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".critic." in n for n in grads) and not any(".default." in n for n in grads)
    assert "value_head.weight" in grads
    shared.zero_grad(set_to_none=True)
    shared(**b, part="policy").sum().backward()
    grads = {n for n, p in shared.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".default." in n for n in grads) and not any(".critic." in n for n in grads)
    assert {n for n, p in shared.named_parameters() if p.requires_grad} == names


def test_shared_values_are_the_value_head_on_the_critic_routed_base(shared: torch.nn.Module) -> None:
    from llmtune.model.actor_critic import use_adapter

    b = _batch()
    values = shared(**b, part="values")
    assert values.shape == (2, 5)
    with use_adapter(shared.policy, "critic"):
        h = shared.policy(**b, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(values, shared.value_head(h).squeeze(-1))
    # the policy's logits are the default adapter's, and the critic's routing is undone afterwards
    logits = shared(**b, part="policy")
    torch.testing.assert_close(logits, shared.policy(**b).logits)


def test_optimizer_has_one_group_per_learning_rate(shared: torch.nn.Module) -> None:
    from llmtune.engine.config import build_optimizer
    from llmtune.recipe.stages import PpoRecipe
    from tests.conftest import base_recipe

    recipe = PpoRecipe.model_validate(
        base_recipe(Path("/tmp"), stage="ppo", finetuning={"method": "lora"}, train={"lr": 1e-3})
    )
    opt = build_optimizer(recipe, shared, lr_of=shared.lr_of)
    by_lr: dict[float, int] = {}
    for g in opt.param_groups:
        by_lr[g["lr"]] = by_lr.get(g["lr"], 0) + len(g["params"])
    critic = sum(1 for n, p in shared.named_parameters() if p.requires_grad and (".critic." in n or "value_head" in n))
    policy = sum(1 for n, p in shared.named_parameters() if p.requires_grad and ".default." in n)
    assert by_lr == {1e-3: policy, 5e-3: critic}
    assert opt.param_groups[0]["lr"] == 1e-3  # the train.lr groups come first, as for every other stage


def test_last_index_and_padding() -> None:
    from llmtune.stages.ppo import _collate, _last_index

    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float)
    assert _last_index(mask).tolist() == [2, 3, 0]
    rows = [
        {"ids": [1, 2, 3], "labels": [-100, 2, 3], **{k: torch.ones(2) for k in _keys()}},
        {"ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5], **{k: torch.full((4,), 2.0) for k in _keys()}},
    ]
    b = _collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["advantages"].tolist() == [[1, 1, 0, 0], [2, 2, 2, 2]]  # (B, T-1), zero past each row


def _keys() -> tuple[str, ...]:
    from llmtune.stages.ppo import _ROW_KEYS

    return _ROW_KEYS


def test_gradient_checkpointing_recomputes_each_part_through_its_adapter(shared: torch.nn.Module) -> None:
    """Recomputation runs in the backward pass, after the critic's routing is undone: the routing goes with
    it (checkpoint_with_routing), so the gradients equal those without checkpointing."""
    from llmtune.model.actor_critic import checkpoint_with_routing

    for lora in shared.modules():
        if hasattr(lora, "lora_B"):
            for k in lora.lora_B:
                torch.nn.init.normal_(lora.lora_B[k].weight)
    b = _batch()

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model(**b, part="values").pow(2).sum() + model(**b, part="policy").logsumexp(-1).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared.train()
    plain = grads(shared)
    checkpoint_with_routing(shared.policy)
    shared.policy.enable_input_require_grads()
    checked = grads(shared)
    assert plain.keys() == checked.keys()
    for n in plain:
        torch.testing.assert_close(plain[n], checked[n], msg=n)
