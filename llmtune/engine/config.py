"""The DeepSpeed config, optimizer and LR schedule a recipe asks for: plain functions returning plain objects."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from llmtune.errors import RecipeError
from llmtune.recipe.schema import RecipeBase


def check_precision(recipe: RecipeBase, device: torch.device) -> None:
    """Refuse, before any work, a precision the device cannot train in."""
    if device.type == "cpu" and recipe.precision == "fp16":
        raise RecipeError(
            "precision fp16 is not supported on CPU (DeepSpeed has no fp16 training there)",
            hint="use precision: bf16 or precision: fp32 on CPU (fp16 is for older NVIDIA GPUs)",
        )
    if device.type == "cuda" and recipe.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RecipeError(
            f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}",
            hint="use precision: fp16 (with loss scaling) or fp32 on this GPU",
        )
    if recipe.precision == "fp16" and (recipe.model.dtype == "bf16" or saved_dtype(recipe) == torch.bfloat16):
        import warnings

        warnings.warn(
            f"precision fp16 for {recipe.model.path}, a model trained in bf16: activations beyond fp16's range "
            "(65504) overflow and the loss scale collapses; prefer precision: bf16 on a GPU that has it",
            stacklevel=2,
        )


def saved_dtype(recipe: RecipeBase) -> torch.dtype | None:
    """The dtype the model's config records (None when it records none or cannot be read)."""
    from llmtune.model.load import load_config

    try:
        config = load_config(recipe.model.path, "model.path")
    except Exception:
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def deepspeed_config(recipe: RecipeBase, world_size: int, grad_accum: int | None = None) -> dict[str, Any]:
    """grad_accum: micro-batches per optimizer step when the batch source decides it (grpo / ppo: the step's
    rows / micro_batch_size); default train.grad_accum."""
    t, d = recipe.train, recipe.distributed
    accum = grad_accum or t.grad_accum
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if d.zero_stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_param_persistence_threshold=0,
        )
    if d.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "gradient_clipping": float(t.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": recipe.precision == "bf16"},
        "fp16": {
            "enabled": recipe.precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return cfg


def frozen_zero3_config(recipe: RecipeBase, world_size: int) -> dict[str, Any] | None:
    """The DeepSpeed config that partitions a frozen model (a reference, a reward model) over the processes
    when the run trains with ZeRO-3: stage 3 without an optimizer, DeepSpeed's ZeRO-3 inference, which
    gathers each layer's weights for its forward pass. None with ZeRO 0-2 (there each process holds a
    full copy of the frozen models, as of the trained one's weights)."""
    if recipe.distributed.zero_stage != 3:
        return None
    cfg = deepspeed_config(recipe, world_size)
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if "offload_param" in cfg["zero_optimization"]:
        zero["offload_param"] = cfg["zero_optimization"]["offload_param"]
    cfg.update(zero_optimization=zero, gradient_clipping=0.0)
    return cfg


def build_optimizer(
    recipe: RecipeBase, model: torch.nn.Module, lr_of: Callable[[str], float] | None = None
) -> torch.optim.Optimizer:
    """AdamW (or the recipe's optimizer) over the trainable parameters: weight decay on matrices only; with
    lr_of (parameter name -> learning rate; ppo's critic has its own) one group per rate."""
    t = recipe.train
    buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = lr_of(name) if lr_of is not None else t.lr
        buckets.setdefault((lr, p.ndim >= 2), []).append(p)
    groups: list[dict[str, Any]] = [
        {"params": ps, "weight_decay": t.weight_decay if decay else 0.0, "lr": lr}
        for (lr, decay), ps in sorted(buckets.items(), key=lambda kv: (kv[0][0] != t.lr, not kv[0][1], kv[0][0]))
    ]
    betas = (t.adam_beta1, t.adam_beta2)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr)
    if t.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=betas, eps=t.adam_eps)
    if recipe.distributed.offload != "none" and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=betas, eps=t.adam_eps, adamw_mode=True)
    # The fused kernel (CPU and CUDA) does the whole update in one pass per parameter group.
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=t.lr, betas=betas, eps=t.adam_eps, fused=fused or None)


def lr_lambda(recipe: RecipeBase, total_steps: int):
    t = recipe.train
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    floor, start = t.min_lr_ratio, t.warmup_start_ratio

    def factor(step: int) -> float:
        if step < warmup:  # linear from `start` (0: from nothing) toward 1 at the end of the warmup
            return start + (1 - start) * (step + 1) / (warmup + 1)
        if t.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if t.lr_scheduler == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(recipe: RecipeBase, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total_steps))
