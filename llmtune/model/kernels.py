"""Fused GPU kernels for a model's layers: `train.kernels: liger`.

liger-kernel (the `liger` extra) replaces a transformers model's RMSNorm, SwiGLU MLP and rotary embedding with
fused Triton kernels: less activation memory and fewer kernel launches per layer on NVIDIA GPUs. The LM head
and its loss stay llmtune's own chunked computation (objectives/logprobs.py), which never holds the full
logits whether or not kernels are on, so liger's own loss patches are not applied.

Triton kernels run on CUDA only: on a machine without a GPU the key is refused before anything loads
(`kernels_problem`, used by validate and by the loader), as it is when liger-kernel is not installed or has
no kernels for the model's architecture.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

from llmtune.errors import UserError

KERNELS = ("none", "liger")
INSTALL = "pip install 'llmtune[liger]' (liger-kernel and Triton, on a machine with an NVIDIA GPU)"


def kernels_problem(kernels: str, cuda: bool) -> str | None:
    """Why `train.kernels` cannot be used here (None: it can). Imports no torch: validate calls it."""
    if kernels == "none":
        return None
    if not cuda:
        return (
            f"train.kernels: {kernels} runs Triton kernels, which need an NVIDIA GPU, and this machine has none; "
            "remove train.kernels (or set it to none) to train here"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        return f"train.kernels: {kernels} needs liger-kernel, which is not installed: {INSTALL}"
    return None


def liger_supported(model_type: str) -> bool:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def patch_liger(model: Any) -> list[str]:
    """Swap the model's RMSNorm, SwiGLU MLP and rotary embedding for liger-kernel's, in place (and, as liger
    does, in transformers' modeling module of that architecture, so that a reference or reward model of the
    same architecture loaded later in this process gets them too). Returns the patched parts. No device check:
    `apply_kernels` is the entry point."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        supported = ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))
        raise UserError(
            f"train.kernels: liger has no kernels for model type {model_type!r}",
            hint=f"remove train.kernels for this model; liger-kernel supports: {supported}",
        )
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    wanted = {
        "rope": True,
        "rms_norm": True,
        "swiglu": True,
        "geglu": True,
        "layer_norm": True,
        # the loss stays llmtune's chunked head (objectives/logprobs.py): liger's loss patches off
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
    }
    accepted = inspect.signature(apply).parameters
    kwargs = {k: v for k, v in wanted.items() if k in accepted}
    apply(model=model, **kwargs)
    return [k for k, v in kwargs.items() if v]


def apply_kernels(model: Any, kernels: str) -> list[str]:
    """`train.kernels` on a loaded (not yet peft-wrapped) transformers model. Returns the patched parts."""
    if kernels == "none":
        return []
    import torch

    problem = kernels_problem(kernels, torch.cuda.is_available())
    if problem:
        raise UserError(problem)
    return patch_liger(model)
