"""The models ppo trains, in one module: the policy (a causal LM) and the critic (a value per token).

One DeepSpeed engine holds this module, with one optimizer whose parameter groups give each model its own
learning rate (``ActorCritic.lr_of``); checkpoints, the NaN vote and ZeRO partitioning then cover both at once.
Two memory layouts (``ppo.memory``):

- ``separate``: the critic is a model of its own, an ``AutoModelForSequenceClassification`` (one label) whose
  score head is read at every position. It starts from a reward model of the rm stage (its backbone and
  head), or from the starting model with a new head. Each model holds its own weights: the layout for full
  fine-tuning and ZeRO-3.
- ``shared`` (lora / qlora): one base in memory. The policy is the peft adapter ``default`` on it, the critic
  the adapter ``critic`` on the same base with a value head (a linear layer on the last hidden state), the
  reference the base with the adapters disabled, and a reward model trained by rm with LoRA on the same base
  one more (frozen) adapter ``reward`` with its score head (``SharedRewardModel``).

Switching adapters here never touches ``requires_grad`` (peft's ``set_adapter`` would freeze the others):
both adapters train, in separate forward passes of the same step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

POLICY, CRITIC, REWARD = "default", "critic", "reward"


_ROUTE: list[tuple[nn.Module, str]] = []  # the routing in force (innermost last), for checkpoint recomputation


@contextmanager
def use_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Route every peft layer of model through the adapter `name` for the duration (a modules_to_save copy
    that adapter lacks falls back to the original module); requires_grad unchanged."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    before = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [name]
    _ROUTE.append((model, name))
    try:
        yield
    finally:
        _ROUTE.pop()
        for m, a in zip(layers, before, strict=True):
            m._active_adapter = a


def routing_context() -> tuple[Any, Any]:
    """torch.utils.checkpoint's context_fn: gradient checkpointing recomputes a layer's forward during the
    backward pass, when the routing of that forward (critic or policy adapter) is long undone; this puts it
    back for the recomputation."""
    from contextlib import nullcontext

    if not _ROUTE:
        return nullcontext(), nullcontext()
    model, name = _ROUTE[-1]
    return nullcontext(), use_adapter(model, name)


def checkpoint_with_routing(policy: nn.Module) -> None:
    """Re-enable gradient checkpointing on the shared base so that recomputation follows the adapter routing."""
    base = policy.get_base_model()
    base.llmtune_checkpointing_kwargs = {"use_reentrant": False, "context_fn": routing_context}  # kept by generation
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=base.llmtune_checkpointing_kwargs)


def hidden_size(model: nn.Module) -> int:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    config = getattr(config, "text_config", None) or config
    return int(config.hidden_size)


def decoder_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last hidden states (B, T, H) of a causal LM's decoder, without its language-model head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


class ActorCritic(nn.Module):
    """policy: a causal LM (peft model in shared mode); critic: a sequence classifier (separate mode), or None
    with value_head set (shared mode: the policy's base through the critic adapter)."""

    def __init__(
        self,
        policy: nn.Module,
        critic: nn.Module | None = None,
        value_head: nn.Linear | None = None,
        policy_lr: float = 1e-5,
        critic_lr: float = 1e-5,
    ) -> None:
        super().__init__()
        assert (critic is None) != (value_head is None), "a critic model (separate) or a value head (shared)"
        self.policy, self.critic, self.value_head = policy, critic, value_head
        self.policy_lr, self.critic_lr = policy_lr, critic_lr
        self.config = policy.config  # DeepSpeed and the trainer read the model's config

    @property
    def shared(self) -> bool:
        return self.critic is None

    def lr_of(self, name: str) -> float:
        """Learning rate of a parameter by name: the critic's (its model, its adapter, the value head) or the
        policy's."""
        if name.startswith(("critic.", "value_head.")) or f".{CRITIC}." in name:
            return self.critic_lr
        return self.policy_lr

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, part: str = "policy", **_: Any
    ) -> torch.Tensor:
        """part policy: the logits (B, T, V); part values: the critic's value at every position (B, T)."""
        if part == "policy":
            if self.shared:
                with use_adapter(self.policy, POLICY):
                    return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        if part != "values":
            raise ValueError(f"part must be policy or values, not {part!r}")
        if self.shared:
            assert self.value_head is not None
            with use_adapter(self.policy, CRITIC):
                h = decoder_states(self.policy, input_ids, attention_mask)
            return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()
        assert self.critic is not None
        return per_position_scores(self.critic, input_ids, attention_mask)


def score_module(model: nn.Module) -> nn.Module:
    for name, mod in model.named_modules():
        if name.split(".")[-1] == "score":
            return mod
    raise ValueError("the model has no `score` head")


def per_position_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A sequence classifier's score head at every position (B, T), read through a hook on the head (its own
    forward keeps only the last real token's)."""
    captured: list[torch.Tensor] = []
    handle = score_module(model).register_forward_hook(lambda _m, _i, out: captured.append(out[..., 0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return captured[-1].float()


class SharedRewardModel(nn.Module):
    """A reward model trained by rm with LoRA, as one more adapter on the policy's base: called like a sequence
    classifier (input_ids, attention_mask), it runs the base through the `reward` adapter and its score head
    (a submodule named `score`, so reward scoring reads it like any reward model's)."""

    def __init__(self, base: nn.Module, score: nn.Linear, index: int = 0) -> None:
        super().__init__()
        self.score = score
        self._base = [base]  # not a submodule: the base belongs to the engine's model
        self.adapter = reward_adapter_name(index)
        self.config = base.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        base = self._base[0]
        with use_adapter(base, self.adapter), torch.no_grad():
            h = decoder_states(base, input_ids, attention_mask)
            return self.score(h.to(self.score.weight.dtype))


def reward_adapter_name(index: int) -> str:
    return REWARD if index == 0 else f"{REWARD}{index}"


def load_reward_adapter(policy: nn.Module, path: str, device: torch.device, index: int = 0) -> tuple[dict, nn.Linear]:
    """Add the rm LoRA adapter saved in path to the policy's peft model as a frozen adapter (`reward`, then
    `reward1`, ...); returns its lora state dict (keys as peft saves them) and its score head (a frozen
    nn.Linear)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    from llmtune.model.peft import adapter_config_or_none

    cfg = adapter_config_or_none(path) or {}
    state = load_file(f"{path}/adapter_model.safetensors")
    head_keys = [k for k in state if ".score." in k or k.endswith("score.weight")]
    score_w = next(state[k] for k in head_keys if k.endswith("weight"))
    lora = {k: v for k, v in state.items() if k not in head_keys}
    config = LoraConfig(
        r=cfg.get("r", 8),
        lora_alpha=cfg.get("lora_alpha", 8),
        target_modules=cfg.get("target_modules"),
        use_rslora=cfg.get("use_rslora", False),
        use_dora=cfg.get("use_dora", False),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    name = reward_adapter_name(index)
    policy.add_adapter(name, config)
    set_peft_model_state_dict(policy, lora, adapter_name=name)
    for n, p in policy.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)
    head = nn.Linear(score_w.shape[1], score_w.shape[0], bias=False)
    head.weight.data.copy_(score_w)
    head.requires_grad_(False)
    return lora, head.to(device)


def add_critic_adapter(policy: nn.Module, config: Any, init: dict | None = None) -> None:
    """The trainable adapter `critic` on the policy's base (its lora B starts at 0: the critic starts as the
    base), or a copy of `init` (the reward adapter's weights); every critic weight trains."""
    from peft import set_peft_model_state_dict

    config.modules_to_save = None  # the critic reads hidden states: no copy of the policy's saved modules
    policy.add_adapter(CRITIC, config)
    if init is not None:
        set_peft_model_state_dict(policy, init, adapter_name=CRITIC)
    for n, p in policy.named_parameters():
        if f".{CRITIC}." in n or f".{POLICY}." in n:
            p.requires_grad_(True)
