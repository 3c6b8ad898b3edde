"""The five eval tasks. Each reads the data, runs the model(s) in batches and returns the report's metrics
(plain names) plus per-example rows for the JSONL file.

perplexity  loss = sum of -log p over learned tokens / their count (labels as training puts them:
            assistant replies for conversations, every token for text); perplexity = exp(loss)
preference  accuracy = share of pairs with score(chosen) > score(rejected); margin = mean difference.
            score = a reward model's score, or a policy's implicit DPO reward
            beta * (log pi(y|x) - log pi_ref(y|x)), summed over the reply tokens
reward      generate, then score with reward models and rules: mean / std of the weighted total
generate    generate, then exact_match / contains / gsm8k_accuracy (/ regex_match) against `answer`
compare     generate with two models; a judge reward model scores both: win / tie / loss rates
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.console import Console

from llmtune.eval.base import Env, TaskResult
from llmtune.eval.config import EvalConfig
from llmtune.eval.generate import compare, generate_task, reward
from llmtune.eval.likelihood import perplexity, preference
from llmtune.model.resolve import (
    is_reward_model,
    pick_device,
    pick_dtype,
    require_causal_lm,
    require_reward_model,
)


def run_task(cfg: EvalConfig, console: Console) -> TaskResult:
    device = pick_device(cfg.device)
    env = Env(cfg, console, device, pick_dtype(cfg.dtype, device))
    check_models(cfg)
    torch.manual_seed(cfg.seed)
    tasks: dict[str, Callable[[Env], TaskResult]] = {
        "perplexity": perplexity,
        "preference": preference,
        "reward": reward,
        "generate": generate_task,
        "compare": compare,
    }
    return tasks[cfg.task](env)


def check_models(cfg: EvalConfig) -> None:
    """Each model is of the kind its role needs, from configs only (before any data is read or model loaded):
    generating and token log-probabilities need a causal LM (a reward model's lm_head would be random), and
    judging needs a reward model (a causal LM's score head would be random)."""
    if cfg.task == "preference":
        if is_reward_model(cfg.model, cfg.adapter):
            return  # a reward model scores the pairs itself
        policy_hint = (
            "task preference takes a reward model as --model (scored directly) or a causal-LM policy "
            "(scored by its implicit DPO reward against --reference)"
        )
        require_causal_lm(cfg.model, cfg.adapter, "--model", policy_hint)
        if cfg.reference is not None:
            require_causal_lm(cfg.reference, None, "--reference", "pass the causal LM the policy was trained from")
        return
    require_causal_lm(cfg.model, cfg.adapter, "--model", _causal_hint(cfg.task))
    if cfg.task == "compare" and cfg.model_b is not None:
        require_causal_lm(cfg.model_b, cfg.adapter_b, "--model-b", _causal_hint(cfg.task))
    if cfg.task in ("reward", "compare"):
        from llmtune.rewards.prm import is_prm, require_prm

        for path in cfg.reward_models:
            if is_prm(path):  # a process reward model: scored per step (llmtune.rewards.prm)
                require_prm(path, "--reward-model")
            else:
                require_reward_model(path, "--reward-model")


def _causal_hint(task: str) -> str:
    if task == "perplexity":
        return "task perplexity scores a causal LM; for a reward model use --task preference on pairs"
    judge = "; a reward model goes in --reward-model" if task in ("reward", "compare") else ""
    return f"task {task} generates with a causal LM (a cpt / sft / dpo output, or a base model){judge}"
