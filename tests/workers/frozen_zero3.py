"""Run under `torch.distributed.run --nproc_per_node 2`: frozen models loaded with ZeRO-3 (a reference causal LM
and a reward model) hold only their share of the weights on each process, and give the outputs the same
models give loaded whole. argv: recipe.yaml, reward-model directory, result.json (rank 0 writes it)."""

from __future__ import annotations

import json
import sys

import torch

from llmtune.engine.distributed import setup_distributed
from llmtune.engine.strategy import Strategy
from llmtune.model.load import ModelSpec, load
from llmtune.model.resolve import load_reward_model
from llmtune.model.tokenizer import load_tokenizer
from llmtune.recipe.load import load_recipe
from llmtune.rewards.model import score_conversations


def shares(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model)."""
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    return local, total


def main() -> None:
    recipe_path, reward_dir, result = sys.argv[1:4]
    recipe = load_recipe(recipe_path)
    dist = setup_distributed("gloo")
    strategy = Strategy(recipe, dist)
    part = strategy.partition
    assert part is not None
    tok = load_tokenizer(recipe.model)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2], [4, 8, 15, 16, 23, 42]])
    mask = torch.ones_like(ids)
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": c}] for c in ("yes", "no thanks")]

    ref = strategy.frozen(ModelSpec.frozen(recipe, recipe.model.path, "the reference"), tok)
    with torch.no_grad():
        logits = ref.model(input_ids=ids, attention_mask=mask).logits
    rm = part.apply(load_reward_model(reward_dir, torch.float32, dist.device, zero3=part.config))
    scores = score_conversations(rm.model, rm.tokenizer, convs, template=None, device=dist.device, batch_size=1)
    out = {
        "reference": shares(ref.model),
        "reward": shares(rm.model),
        "engine": ref.engine is not None and rm.engine is not None,
        "trainable": sum(p.requires_grad for p in ref.model.parameters()),
    }
    del ref, rm
    whole = load(ModelSpec.frozen(recipe, recipe.model.path, "the reference"), dist.device, tok)
    with torch.no_grad():
        out["logit_diff"] = (whole.model(input_ids=ids, attention_mask=mask).logits - logits).abs().max().item()
    rm_whole = load_reward_model(reward_dir, torch.float32, dist.device)
    plain = score_conversations(
        rm_whole.model, rm_whole.tokenizer, convs, template=None, device=dist.device, batch_size=1
    )
    out["score_diff"] = max(abs(a - b) for a, b in zip(scores, plain, strict=True))
    if dist.is_main:
        with open(result, "w") as f:
            json.dump(out, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
