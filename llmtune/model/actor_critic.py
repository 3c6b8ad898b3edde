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

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtune.errors import RecipeError
from llmtune.model.load import LoadedModel, ModelSpec, load
from llmtune.recipe.stages import PpoRecipe

POLICY, CRITIC, REWARD = "default", "critic", "reward"


class AdapterRoute:
    """The adapter routing in force on one peft model (innermost last), kept on the model itself: gradient
    checkpointing recomputes a layer's forward during the backward pass, when the routing of that forward
    (critic or policy adapter) is long undone, and ``context`` puts it back for the recomputation."""

    ATTR = "llmtune_route"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names: list[str] = []

    @classmethod
    def of(cls, model: nn.Module) -> AdapterRoute | None:
        return model.__dict__.get(cls.ATTR)

    def context(self) -> tuple[Any, Any]:
        """torch.utils.checkpoint's context_fn: (forward context, recomputation context)."""
        from contextlib import nullcontext

        if not self.names:
            return nullcontext(), nullcontext()
        return nullcontext(), use_adapter(self.model, self.names[-1])


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
    route = AdapterRoute.of(model)
    if route is not None:
        route.names.append(name)
    try:
        yield
    finally:
        if route is not None:
            route.names.pop()
        for m, a in zip(layers, before, strict=True):
            m._active_adapter = a


def checkpoint_with_routing(policy: nn.Module) -> None:
    """Re-enable gradient checkpointing on the shared base so that recomputation follows the adapter routing."""
    route = AdapterRoute(policy)
    policy.__dict__[AdapterRoute.ATTR] = route  # a plain attribute: not a submodule, not in the state dict
    base = policy.get_base_model()
    base.llmtune_checkpointing_kwargs = {"use_reentrant": False, "context_fn": route.context}  # kept by generation
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


# --- assembly: the models ppo trains, as ppo.memory lays them out ---------------------------------------------


def build_actor_critic(
    recipe: PpoRecipe, device: torch.device, tokenizer: Any
) -> tuple[LoadedModel, dict[str, SharedRewardModel]]:
    """The policy and critic in one ActorCritic (the critic with its own learning rate, ppo.critic_lr), and
    with ppo.memory shared the reward models that are adapters on the policy's base, by path (the caller
    makes them reward sources)."""
    p = recipe.ppo
    policy = load(ModelSpec.trained(recipe), device, tokenizer).model
    critic_lr = p.critic_lr or recipe.train.lr
    from_reward = p.critic_init == "reward" or (p.critic_init == "auto" and bool(p.reward.models()))
    if from_reward and (Path(p.reward.models()[0]).expanduser() / "prm.json").is_file():
        if p.critic_init == "reward":  # a process reward model has a per-step head, not a sequence score
            raise RecipeError(
                f"ppo.critic_init reward: {p.reward.models()[0]} is a process reward model (prm.json), whose "
                "two-class step head cannot start a value head",
                hint="set ppo.critic_init: policy (or auto), or put an outcome reward model first in reward.model",
            )
        from_reward = False  # auto: the critic starts from the policy
    rewards: dict[str, SharedRewardModel] = {}
    if p.memory == "shared":
        model = _shared(recipe, policy, device, from_reward, critic_lr, rewards)
    else:
        critic = _separate_critic(recipe, device, tokenizer, from_reward)
        model = ActorCritic(policy, critic=critic, policy_lr=recipe.train.lr, critic_lr=critic_lr)
    trainable = sum(_numel(x) for x in model.parameters() if x.requires_grad)
    total = sum(_numel(x) for x in model.parameters())
    return LoadedModel(model=model, tokenizer=tokenizer, trainable_params=trainable, total_params=total), rewards


def _shared(
    recipe: PpoRecipe,
    policy: nn.Module,
    device: torch.device,
    from_reward: bool,
    critic_lr: float,
    rewards: dict[str, SharedRewardModel],
) -> ActorCritic:
    """One base: the policy adapter, the reward adapters (into ``rewards``), and the critic adapter with a value
    head, started from the first reward model (from_reward) or like the policy's adapter with a zero head."""
    init, score = None, None
    for i, path in enumerate(recipe.ppo.reward.models()):
        lora, head = load_reward_adapter(policy, path, device, i)
        rewards[path] = SharedRewardModel(policy, head, i)
        if i == 0 and from_reward:
            init, score = (lora, path), head
    # the critic adapter: a copy of the reward adapter (its settings and weights), or a new one like the policy's
    config = _adapter_config(init[1]) if init is not None else copy.deepcopy(policy.peft_config[POLICY])
    config.inference_mode = False
    add_critic_adapter(policy, config, init[0] if init is not None else None)
    if recipe.train.gradient_checkpointing:
        checkpoint_with_routing(policy)
    value_head = nn.Linear(hidden_size(policy), 1, bias=False).to(device)
    with torch.no_grad():
        if score is not None:  # the reward model's score head: the critic starts as the reward model
            value_head.weight.copy_(score.weight)
        else:
            value_head.weight.zero_()
    value_head.weight.requires_grad_(True)
    return ActorCritic(policy, value_head=value_head, policy_lr=recipe.train.lr, critic_lr=critic_lr)


def _separate_critic(recipe: PpoRecipe, device: torch.device, tokenizer: Any, from_reward: bool) -> nn.Module:
    """separate memory: the critic, a sequence classifier with the policy's fine-tuning method, from the
    first reward model (a full rm output, or the merged/ model a lora rm run writes) or the starting model."""
    source = recipe.model.path
    if from_reward:
        source = critic_source(recipe.ppo.reward.models()[0])
    spec = dataclasses.replace(
        ModelSpec.trained(recipe, head="value"),
        path=source,
        what="the critic",
        # the policy's modules_to_save (e.g. lm_head) are not the critic's: its head is new
        finetuning=recipe.finetuning.model_copy(update={"modules_to_save": []}),
    )
    return load(spec, device, tokenizer).model


def critic_source(path: str) -> str:
    """Where a separate critic loads from: a full rm output itself, or the merged/ model a lora rm run writes."""
    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return path
    if (p / "merged" / "config.json").is_file():
        return str(p / "merged")
    raise RecipeError(
        f"ppo: the critic starts from the reward model {path}, a lora adapter without the merged/ model "
        "(rm.export_merged was false)",
        hint="use ppo.memory: shared (the reward adapter on the policy's base), set ppo.critic_init: policy, or "
        "retrain the reward model with rm.export_merged: true",
    )


def _adapter_config(path: str) -> Any:
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(path)
    config.modules_to_save = None
    config.task_type = "CAUSAL_LM"
    return config


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave an empty local tensor
