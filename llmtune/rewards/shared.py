"""Reward models that live as adapters on the policy's own base (ppo.memory: shared).

Such a reward model is what the rm stage writes with finetuning.method lora / qlora on the same base the
policy starts from: a SEQ_CLS adapter with its score head. Anything else (a full reward model, an adapter
of another base) would need a second base in memory, which shared mode exists to avoid: it is refused
before any model loads, with the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtune.errors import RecipeError, UserError


def check_shared_rewards(recipe: Any) -> None:
    from llmtune.model.resolve import resolve
    from llmtune.paths import same_path

    for path in recipe.ppo.reward.models():
        try:
            base, adapter, cfg = resolve(path, None, "ppo.reward.model")
        except UserError as e:
            raise RecipeError(e.message, hint=e.hint) from None
        if (Path(path).expanduser() / "prm.json").is_file():
            raise RecipeError(
                f"ppo.memory shared: the reward model {path} is a process reward model (prm.json): shared mode puts "
                "sequence-score adapters on the policy's base",
                hint="use ppo.memory: separate with a process reward model",
            )
        if adapter is None or cfg is None:
            raise RecipeError(
                f"ppo.memory shared: the reward model {path} is a full model, so it would need its own copy of a "
                "base in memory",
                hint="train the reward model with finetuning.method lora on the same base as model.path, or use "
                "ppo.memory: separate",
            )
        if cfg.get("peft_type") != "LORA":
            raise RecipeError(
                f"ppo.memory shared: the reward model {path} is a {cfg.get('peft_type')} adapter; shared mode puts "
                "LoRA reward adapters on the policy's base",
                hint="train the reward model with finetuning.method lora (or dora / rslora), or use ppo.memory: "
                "separate with its merged/ model",
            )
        if not same_path(str(base), recipe.model.path):
            raise RecipeError(
                f"ppo.memory shared: the reward model {path} is an adapter of {base}, not of the policy's base "
                f"{recipe.model.path}: shared mode keeps one base in memory for every model",
                hint="train the reward model on model.path (e.g. the sft model the policy starts from), or use "
                "ppo.memory: separate",
            )
        if not (Path(path).expanduser() / "adapter_model.safetensors").is_file():
            raise RecipeError(
                f"ppo.reward.model {path} has no adapter_model.safetensors",
                hint="give the output directory of a finished rm run",
            )


def shared_reward_source(path: str, model: Any, recipe: Any) -> Any:
    """A reward source over a SharedRewardModel: texts rendered with the reward model's own saved tokenizer
    and chat template (the same vocabulary as the policy's: it is the same base)."""
    from llmtune.model.tokenizer import compare_vocabularies, tokenizer_from
    from llmtune.rewards.model import RewardModelSource

    tokenizer = tokenizer_from(path, recipe.model.path)
    import torch

    device = next(model.score.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None)
    source = RewardModelSource.from_model(
        path,
        model,
        tokenizer,
        device=torch.device(device),
        batch_size=recipe.ppo.reward.batch_size,
        max_length=limit if isinstance(limit, int) else None,
    )
    policy_tok = tokenizer_from(recipe.model.tokenizer or recipe.model.path)
    compare_vocabularies(
        policy_tok,
        "the policy",
        tokenizer,
        f"the reward model {path}",
        hint="train the reward model with the policy's tokenizer",
    )
    return source
