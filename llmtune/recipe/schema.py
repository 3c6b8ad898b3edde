"""The recipe's shared blocks: model, finetuning (full, freeze and the peft methods), train, distributed and
precision, assembled in ``RecipeBase``; the data block is in llmtune.recipe.data, the online stages' reward
and generation blocks in llmtune.recipe.online, each stage's own blocks and recipe class in
llmtune.recipe.stages.

Every block forbids unknown keys, every field has a default and a description, and cross-field
checks say how to fix what they reject. This module imports only pydantic (``llmtune validate``
and ``llmtune --help`` must not import torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from llmtune.paths import looks_local
from llmtune.recipe.block import Block
from llmtune.recipe.data import DataConfig


class ModelConfig(Block):
    path: str = Field(description="Hub id (e.g. Qwen/Qwen2.5-0.5B) or local directory of the model to start from.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="Dtype the weights are loaded in. auto: follow `precision` (fp32 when precision is fp32).",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        default="sdpa", description="Attention kernel. auto lets transformers choose."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run Python code shipped with the model. Only for models you trust."
    )
    chat_template: str | None = Field(
        default=None,
        description="null: the tokenizer's own template; else a built-in name (chatml, llama3, alpaca) or a "
        ".jinja file.",
    )
    tokenizer: str | None = Field(default=None, description="Tokenizer path if it differs from the model path.")
    hub_token: SecretStr | None = Field(
        default=None, description="Hub access token (never written to outputs; HF_TOKEN also works)."
    )


class AdaLoraOptions(Block):
    """AdaLoRA (method: adalora): LoRA whose rank budget shrinks over training to the most important
    singular directions (peft's AdaLoraConfig; its total_step is the run's real optimizer-step count)."""

    init_r: int = Field(default=12, ge=1, description="Rank every adapted matrix starts with.")
    target_r: int = Field(default=8, ge=1, description="Average rank the budget shrinks to.")
    tinit: int = Field(default=0, ge=0, description="Optimizer steps at full rank before the budget starts to shrink.")
    tfinal: int = Field(
        default=0,
        ge=0,
        description="Last optimizer steps at the final rank pattern (tinit + tfinal < the run's steps).",
    )
    delta_t: int = Field(default=1, ge=1, description="Steps between two rank re-allocations (peft's deltaT).")
    beta1: float = Field(default=0.85, gt=0, lt=1, description="EMA factor of the sensitivity.")
    beta2: float = Field(default=0.85, gt=0, lt=1, description="EMA factor of the uncertainty.")

    @model_validator(mode="after")
    def _budget(self) -> AdaLoraOptions:
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r {self.target_r} is above init_r {self.init_r}: the budget only "
                "shrinks; lower target_r or raise init_r"
            )
        return self


class Ia3Options(Block):
    """(IA)^3 (method: ia3): learned vectors that rescale keys, values and feed-forward activations."""

    target_modules: list[str] | None = Field(
        default=None,
        description="Modules that get a scaling vector; null: peft's default for the model type "
        "(llama: k_proj, v_proj, down_proj).",
    )
    feedforward_modules: list[str] | None = Field(
        default=None,
        description="Those of target_modules whose input (not output) is scaled; null: peft's default "
        "(llama: down_proj), or those of target_modules that peft's default names. A subset of target_modules.",
    )

    @model_validator(mode="after")
    def _subset(self) -> Ia3Options:
        t, f = self.target_modules, self.feedforward_modules
        if f is not None and t is None:
            raise ValueError(
                "feedforward_modules is set without target_modules: name target_modules too "
                "(feedforward_modules must be a subset of them)"
            )
        if t is not None and f is not None and not set(f) <= set(t):
            raise ValueError(
                f"feedforward_modules {sorted(set(f) - set(t))} are not in target_modules: "
                "add them to target_modules or remove them"
            )
        if t is not None and not t:
            raise ValueError("target_modules is empty: name at least one module, or use null")
        return self


class PromptOptions(Block):
    """Virtual tokens (methods prefix, prompt, ptuning): trained vectors in front of every sequence."""

    num_virtual_tokens: int = Field(default=16, ge=1, description="prefix / prompt / ptuning: virtual tokens.")
    encoder_hidden_size: int = Field(
        default=128,
        ge=1,
        description="ptuning: hidden size of the prompt encoder; prefix: of the projection (prefix_projection).",
    )
    encoder_type: Literal["mlp", "lstm"] = Field(default="mlp", description="ptuning: the prompt encoder.")
    prefix_projection: bool = Field(
        default=False, description="prefix: reparameterise the prefix through a 2-layer MLP."
    )
    init_text: str | None = Field(
        default=None,
        description="prompt: initialise the virtual tokens from this text's token embeddings (null: random).",
    )


LORA_METHODS = ("lora", "qlora")  # after the dora / rslora aliases are resolved
PROMPT_METHODS = ("prefix", "prompt", "ptuning")  # virtual tokens: nothing to merge into the weights
PEFT_METHODS = (*LORA_METHODS, "adalora", "ia3", *PROMPT_METHODS)  # the trained model is a peft adapter
MERGEABLE_METHODS = (*LORA_METHODS, "adalora", "ia3")
# which keys of FinetuningConfig each peft method reads beyond modules_to_save (the others must keep their
# defaults, so that a key set for another method is not silently ignored)
_METHOD_KEYS = {
    "lora": {"lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora"},
    "adalora": {"lora_alpha", "lora_dropout", "target_modules", "adalora"},
    "ia3": {"ia3"},
    "prefix": {"prompt"},
    "prompt": {"prompt"},
    "ptuning": {"prompt"},
}
_METHOD_KEYS["qlora"] = _METHOD_KEYS["lora"] | {"quant_type", "double_quant"}
_PROMPT_KEYS = {
    "num_virtual_tokens": PROMPT_METHODS,
    "encoder_hidden_size": ("ptuning", "prefix"),
    "encoder_type": ("ptuning",),
    "prefix_projection": ("prefix",),
    "init_text": ("prompt",),
}


class FinetuningConfig(Block):
    method: Literal[
        "full", "freeze", "lora", "qlora", "dora", "rslora", "adalora", "ia3", "prefix", "prompt", "ptuning"
    ] = Field(
        default="lora",
        description="full: all weights; freeze: only the last layers / named modules; "
        "lora: low-rank adapters; qlora: lora on a 4-bit NF4 base; dora / rslora: lora with use_dora / "
        "use_rslora (read back as method lora); adalora: lora with a rank budget over training; ia3: "
        "learned rescaling vectors; prefix: prefix tuning (trained keys / values per layer); prompt: prompt "
        "tuning (trained input embeddings); ptuning: P-tuning (virtual tokens from a prompt encoder). "
        "All but full / freeze train a peft adapter.",
    )
    lora_r: int = Field(default=16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(default=32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        default="all-linear",
        description="Modules that get adapters: all-linear, or a list of module names (q_proj, v_proj, ...).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(
        default=False, description="lora / qlora: DoRA, weight-decomposed LoRA (a learned magnitude per output)."
    )
    adalora: AdaLoraOptions = Field(default_factory=AdaLoraOptions, description="method adalora: its schedule.")
    ia3: Ia3Options = Field(default_factory=Ia3Options, description="method ia3: which modules are rescaled.")
    prompt: PromptOptions = Field(
        default_factory=PromptOptions, description="methods prefix / prompt / ptuning: the virtual tokens."
    )
    trainable_layers: int = Field(
        default=2, ge=0, description="freeze: number of last decoder layers that are trained."
    )
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="freeze: extra parameter-name substrings that are trained (e.g. embed_tokens, lm_head).",
    )
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="qlora: 4-bit data type.")
    double_quant: bool = Field(default=True, description="qlora: quantize the quantization constants too.")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v != "all-linear":
            return [v]
        if isinstance(v, list) and not v:
            raise ValueError("is empty: name at least one module (e.g. [q_proj, v_proj]) or use all-linear")
        return v

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: object) -> object:
        """method dora / rslora: lora with use_dora / use_rslora (one code path, one saved form)."""
        if isinstance(data, dict) and data.get("method") in ("dora", "rslora"):
            key = f"use_{data['method']}"
            if data.get(key) is False:
                raise ValueError(f"method {data['method']} with {key}: false: remove {key}, or use method: lora")
            data = {**data, "method": "lora", key: True}
        return data

    @model_validator(mode="after")
    def _keys_of_other_methods(self) -> FinetuningConfig:
        """A key that only another method reads must keep its default: set, it would be silently ignored.
        (full / freeze ignore the lora keys, as they always did; the keys of the other peft methods are new.)"""
        if self.method in _METHOD_KEYS:
            used = _METHOD_KEYS[self.method] | {"method", "modules_to_save"}
            checked = set().union(*_METHOD_KEYS.values()) - used
        else:
            checked = {"use_dora", "adalora", "ia3", "prompt"}
        for name in sorted(checked):
            if getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True):
                users = [m for m, keys in _METHOD_KEYS.items() if name in keys]
                raise ValueError(
                    f"{name} is not used by method {self.method} (it is for {' / '.join(users)}): "
                    "remove it, or choose that method"
                )
        if self.method in PROMPT_METHODS:
            fresh = PromptOptions()
            for key, methods in _PROMPT_KEYS.items():
                if self.method not in methods and getattr(self.prompt, key) != getattr(fresh, key):
                    raise ValueError(
                        f"prompt.{key} is not used by method {self.method} (it is for "
                        f"{' / '.join(methods)}): remove it, or choose that method"
                    )
        return self


class EmaConfig(Block):
    decay: float = Field(
        default=0.999, gt=0, lt=1, description="Weight of the old average at each update (0.999: ~1000 updates)."
    )
    every: int = Field(default=1, ge=1, description="Update the average every N optimizer steps.")


class TrainConfig(Block):
    epochs: float = Field(default=1, gt=0, description="Passes over the training data (max_steps wins when set).")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps to run; overrides epochs.")
    micro_batch_size: int = Field(default=4, ge=1, description="Sequences per forward pass per process.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(default=2.0e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="LR decay after warmup."
    )
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Fraction of steps for linear warmup.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Warmup steps; overrides warmup_ratio.")
    warmup_start_ratio: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="LR at the first warmup step as a fraction of lr. Re-warming for continued pretraining: "
        "warm up from a floor (e.g. the min_lr_ratio the earlier run ended at), then decay to min_lr_ratio.",
    )
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="Final LR as a fraction of lr (cosine, linear).")
    optimizer: Literal["adamw", "adamw_8bit", "sgd"] = Field(default="adamw", description="Optimizer.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay.")
    adam_beta1: float = Field(default=0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(default=0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(default=1.0, description="Clip gradients to this norm; null or 0 = off.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    kernels: Literal["none", "liger"] = Field(
        default="none",
        description="Fused GPU kernels for the model's layers. liger: liger-kernel's RMSNorm, SwiGLU and RoPE "
        "(NVIDIA GPUs only; pip install 'llmtune[liger]'); the LM head's loss is llmtune's chunked one either way.",
    )
    log_every: int = Field(default=10, ge=1, description="Log every N optimizer steps.")
    eval_every: int | None = Field(default=None, ge=1, description="Evaluate every N steps (and at the end).")
    save_every: int | None = Field(default=None, ge=1, description="Write a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(
        default=2,
        ge=1,
        description="Keep the newest N checkpoints. Given in the recipe, they also stay after the run finishes "
        "(e.g. to --resume-from one with a longer schedule); not given, a finished run removes its checkpoints: "
        "the exported model is the output (the best_metric checkpoint stays).",
    )
    best_metric: str | None = Field(
        default=None,
        description="An evaluation metric (e.g. eval/loss): the checkpoint with its best value is kept as well.",
    )
    best_mode: Literal["min", "max"] = Field(default="min", description="best_metric: lower or higher is better.")
    eval_batch_size: int | None = Field(default=None, ge=1, description="Eval micro-batch (default micro_batch_size).")
    on_nan: Literal["stop", "skip"] = Field(
        default="stop",
        description="A step whose loss or gradient is NaN / Inf: stop (the newest checkpoint is kept, nothing is "
        "exported) or skip (that step changes no weight and no optimizer state; skips are counted in "
        "metrics.jsonl and run.json).",
    )
    max_nan_skips: int = Field(
        default=10, ge=1, description="on_nan: skip stops the run once more than this many steps were skipped."
    )
    ema: EmaConfig | None = Field(
        default=None,
        description="An exponential moving average of the trained weights, exported to output_dir/ema/ "
        "({decay, every}); null: off.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Trackers that get every metrics.jsonl row and the resolved recipe (rank 0 only): tensorboard "
        "(output_dir/tensorboard), wandb (offline in output_dir/wandb unless WANDB_MODE is set), mlflow (a local "
        "file store output_dir/mlruns unless MLFLOW_TRACKING_URI is set). One name, a list, or none. "
        "pip install llmtune[trackers].",
    )
    run_name: str | None = Field(
        default=None, description="The trackers' run name (default: the output_dir's folder name)."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v: object) -> object:
        if v is None or v == "none":
            return []
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]  # "wandb" or "tensorboard,wandb" (--set)
        if v == ["all"]:
            return ["tensorboard", "wandb", "mlflow"]
        if isinstance(v, list):
            return list(dict.fromkeys(v))  # each tracker once, in order
        return v

    @field_validator("max_grad_norm")
    @classmethod
    def _clip(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError("must be >= 0 (0 or null turns clipping off)")
        return v

    @model_validator(mode="after")
    def _best(self) -> TrainConfig:
        if self.best_metric is not None and not self.best_metric.startswith("eval/"):
            raise ValueError(
                f"best_metric {self.best_metric!r} must name an evaluation metric such as eval/loss "
                "(and needs data.eval or data.eval_split, eval_every and save_every)"
            )
        if self.best_metric is not None and (self.eval_every is None or self.save_every is None):
            raise ValueError(
                f"best_metric {self.best_metric!r} keeps the checkpoint with the best evaluation: set eval_every and "
                "save_every too (e.g. both 500)"
            )
        return self


class DistributedConfig(Block):
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="DeepSpeed ZeRO stage.")
    offload: Literal["none", "optimizer", "all"] = Field(
        default="none",
        description="ZeRO CPU offload: optimizer states (stage >= 1), or also parameters (stage 3).",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="Process-group backend. auto: nccl on GPU, gloo on CPU."
    )

    @model_validator(mode="after")
    def _offload(self) -> DistributedConfig:
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise ValueError("offload: optimizer needs zero_stage 1, 2 or 3 (set distributed.zero_stage: 2)")
        if self.offload == "all" and self.zero_stage != 3:
            raise ValueError("offload: all (parameters too) needs zero_stage: 3")
        return self


class RecipeBase(Block):
    """The blocks every stage's recipe shares (each stage's recipe, in llmtune.recipe.stages, adds its own)."""

    output_dir: str = Field(description="Everything the run writes goes here.")
    seed: int = Field(default=42, description="Seed for data order, dropout and initialisation.")
    model: ModelConfig
    finetuning: FinetuningConfig = Field(default_factory=FinetuningConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    precision: Literal["bf16", "fp16", "fp32"] = Field(default="bf16", description="Training precision.")

    @model_validator(mode="after")
    def _cross(self) -> RecipeBase:
        if self.finetuning.method == "qlora" and self.distributed.zero_stage == 3:
            raise ValueError(
                "finetuning.method qlora cannot be combined with distributed.zero_stage 3 in this version: "
                "use zero_stage 0-2 (4-bit weights are already small), or method: lora with zero_stage 3"
            )
        if self.finetuning.method == "qlora" and self.precision == "fp16" and self.model.dtype == "bf16":
            raise ValueError("precision fp16 with model.dtype bf16: set both to bf16, or both to fp16")
        d = self.data
        if d.schedule is not None and d.replay is not None:
            raise ValueError(
                "data.replay and data.schedule both mix rows in: list the replay file under data.train and give it "
                "a share in the schedule's weights, or remove data.schedule"
            )
        if d.memory_map is True and (d.dedup or d.filter.active()):
            raise ValueError(
                "data.memory_map reads the corpus as it is: data.dedup and data.filter do not apply to it; "
                "remove them, or set data.memory_map: auto (reads the rows into memory when they are set)"
            )
        if self.train.ema is not None and self.distributed.zero_stage == 3:
            raise ValueError(
                "train.ema cannot be combined with distributed.zero_stage 3 in this version (the average "
                "needs the whole weights on every process): use zero_stage 0-2, or remove train.ema"
            )
        _check_method_fits(self)
        return self

    def data_files(self) -> list[Path]:
        """Local paths named by the data sources (hub ids excluded)."""
        return [Path(s.path) for s in [*self.data.train, *self.data.eval] if looks_local(s.path)]


def _check_method_fits(recipe: RecipeBase) -> None:
    """The combinations of a peft method with ZeRO-3 or packing that cannot work, refused up front (those with
    a stage: llmtune.recipe.stages)."""
    method = recipe.finetuning.method
    if method == "adalora" and recipe.distributed.zero_stage == 3:
        raise ValueError(
            "finetuning.method adalora cannot be combined with distributed.zero_stage 3: its rank allocation "
            "masks whole adapter weights, which ZeRO-3 partitions; use zero_stage 0-2 (adapters are small)"
        )
    if method == "prefix" and recipe.train.gradient_checkpointing:
        raise ValueError(
            "finetuning.method prefix cannot be combined with train.gradient_checkpointing (peft's prefix tuning "
            "passes its prefix as a key / value cache, which checkpointing does not support): set "
            "gradient_checkpointing: false, or use method prompt / ptuning"
        )
    if method in PROMPT_METHODS and recipe.data.packing:
        raise ValueError(
            f"finetuning.method {method} cannot be combined with data.packing: peft ignores the position ids "
            "that keep packed examples apart when it adds virtual tokens; set data.packing: false"
        )


# --- checks that several stages' recipes share (llmtune.recipe.stages)


def require_preference_formats(recipe: RecipeBase, allowed: tuple[str, ...], what: str) -> None:
    if recipe.data.packing:
        raise ValueError(f"data.packing is not supported for stage {recipe.stage}: set data.packing: false")
    for i, s in enumerate([*recipe.data.train, *recipe.data.eval]):
        if s.format is not None and s.format not in allowed:
            raise ValueError(
                f"data source {i} ({s.path}) has format {s.format}: {what} reads format {' or '.join(allowed)} "
                "(or omit format:)"
            )


def require_prompt_formats(recipe: RecipeBase) -> None:
    if recipe.data.packing:
        raise ValueError(f"data.packing does not apply to stage {recipe.stage}: set data.packing: false")
    for i, s in enumerate([*recipe.data.train, *recipe.data.eval]):
        if s.format is not None and s.format not in ("prompts", "alpaca", "sharegpt", "messages"):
            raise ValueError(
                f"data source {i} ({s.path}) has format {s.format}: {recipe.stage} reads prompts "
                "(format prompts, alpaca, sharegpt or messages; or omit format:)"
            )


def require_step_in_prompts(recipe: RecipeBase, stage: str, generations: int) -> None:
    """grpo / ppo count a step in prompts (<stage>.prompts_per_step); train.grad_accum, which used to size
    the step (micro_batch_size x grad_accum completions per process), would now silently mean something
    else: refused unless it is 1, with the setting that keeps the old step."""
    t = recipe.train
    if t.grad_accum != 1:
        old = t.micro_batch_size * t.grad_accum // generations
        raise ValueError(
            f"train.grad_accum {t.grad_accum}: {stage} counts a step in prompts, {stage}.prompts_per_step (all "
            "processes), and splits its rows into micro-batches of train.micro_batch_size by itself; remove "
            f"train.grad_accum (to keep the step of micro_batch_size x grad_accum = "
            f"{t.micro_batch_size * t.grad_accum} completions per process, set {stage}.prompts_per_step: "
            f"{max(old, 1)} x the number of processes)"
        )
