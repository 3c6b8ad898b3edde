"""Memory said plainly: the expected memory of a recipe at the start, the measured peak at the end, and a
CUDA out-of-memory error as one message with the levers that lower it.

The estimate is per process and rough on purpose (the activations depend on the kernels): weights as loaded,
gradients of the trained parameters, the optimizer's states (AdamW: two float32 moments, plus a float32
master copy of the trained weights in bf16 / fp16), split over the processes as the ZeRO stage shards them,
and the activations of one micro-batch of data.max_length tokens (Korthikanti et al. 2022: about
34 * s * b * h bytes per layer in 16 bit, the layer inputs only with gradient checkpointing) plus the LM
head's float32 logits of one chunk of positions (objectives/logprobs.py).
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmtune.errors import TrainingError
from llmtune.objectives.logprobs import chunk_positions

GB = 1e9
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit")


@dataclass
class MemoryEstimate:
    """Bytes per process."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def line(self) -> str:
        """One line for the start of a run.

        >>> MemoryEstimate(1.2e9, 0.3e9, 0.6e9, 0.5e9, 0.1e9).line()
        'memory (expected, per process): weights 1.20 GB + gradients 0.30 GB + optimizer 0.60 GB + activations ~0.50 GB + logits ~0.10 GB = ~2.70 GB'
        """
        parts = [
            f"weights {self.weights / GB:.2f} GB",
            f"gradients {self.gradients / GB:.2f} GB",
            f"optimizer {self.optimizer / GB:.2f} GB",
            f"activations ~{self.activations / GB:.2f} GB",
            f"logits ~{self.logits / GB:.2f} GB",
        ]
        return f"memory (expected, per process): {' + '.join(parts)} = ~{self.total / GB:.2f} GB"


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def estimate_memory(model: torch.nn.Module, recipe: Any, world_size: int = 1) -> MemoryEstimate:
    """The expected memory of training `model` (as loaded, before DeepSpeed) with `recipe`."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in trained)
    precision = getattr(recipe, "precision", "fp32")
    half = precision in ("bf16", "fp16")
    grad_bytes = 2 if half else 4
    optimizer_name = str(getattr(recipe.train, "optimizer", "adamw"))
    # AdamW: two float32 moments; 8-bit: two bytes; SGD: a float32 momentum
    state_bytes = 2 if optimizer_name in EIGHT_BIT_OPTIMIZERS else 4 if optimizer_name == "sgd" else 8
    master = 4 if half else 0  # float32 master weights next to 16-bit ones
    zero = getattr(getattr(recipe, "distributed", None), "zero_stage", 0)
    gradients = n_trained * grad_bytes / (world_size if zero >= 2 else 1)
    optimizer = n_trained * (state_bytes + master) / (world_size if zero >= 1 else 1)
    weights_here = weights / (world_size if zero >= 3 else 1)

    cfg = _text_config(getattr(model, "config", None))
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    tokens = recipe.train.micro_batch_size * recipe.data.max_length
    scale = 1.0 if half else 2.0  # the 34 s b h bytes are for 16-bit activations
    if getattr(recipe.train, "gradient_checkpointing", False):
        activations = tokens * hidden * (layers * 2 + 34) * scale  # the layer inputs, and one layer recomputed
    else:
        activations = tokens * hidden * layers * 34 * scale
    # one chunk's float32 logits, their softmax and gradient in backward
    logits = min(chunk_positions(vocab), tokens) * vocab * 4 * 3 if vocab else 0.0
    return MemoryEstimate(float(weights_here), float(gradients), float(optimizer), float(activations), float(logits))


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's measured peak in GB: CUDA allocated and reserved on a GPU; the peak resident set size
    (getrusage) on CPU, where it counts everything the process holds (libraries, data, the model)."""
    if device.type == "cuda":
        return {
            "cuda_max_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 3),
            "cuda_max_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 3),
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports kilobytes
    return {"peak_rss_gb": round(rss_bytes / GB, 3)}


def peak_line(peak: dict[str, float]) -> str:
    """The peak as one line for the end of a run.

    >>> peak_line({"peak_rss_gb": 3.1})
    'peak memory: 3.10 GB resident (CPU)'
    """
    if "cuda_max_allocated_gb" in peak:
        return (
            f"peak memory: {peak['cuda_max_allocated_gb']:.2f} GB allocated, "
            f"{peak['cuda_max_reserved_gb']:.2f} GB reserved (CUDA)"
        )
    return f"peak memory: {peak['peak_rss_gb']:.2f} GB resident (CPU)"


def out_of_memory_error(e: BaseException, step: int, recipe: Any, checkpoints: str) -> TrainingError:
    """A CUDA out-of-memory error as one message: where it happened, what was asked, and the levers, the ones
    this recipe has not pulled yet first."""
    asked = re.search(r"Tried to allocate [\d.]+ \w+", str(e))
    t, ft = recipe.train, recipe.finetuning
    levers = []
    if t.micro_batch_size > 1:
        half = max(1, t.micro_batch_size // 2)
        levers.append(
            f"train.micro_batch_size {t.micro_batch_size} -> {half} with train.grad_accum "
            f"{t.grad_accum} -> {t.grad_accum * t.micro_batch_size // half} (the same rows per step)"
        )
    if not t.gradient_checkpointing:
        levers.append("train.gradient_checkpointing: true")
    if ft.method in ("full", "freeze", "lora"):
        levers.append("finetuning.method: qlora (4-bit base)" if ft.method == "lora" else "finetuning.method: lora")
    zero = recipe.distributed.zero_stage
    if zero < 3:
        levers.append(f"distributed.zero_stage {zero} -> {zero + 1} (with several GPUs)")
    levers.append(f"data.max_length {recipe.data.max_length} -> {max(16, recipe.data.max_length // 2)}")
    where = f" (t{asked.group(0)[1:]})" if asked else ""
    return TrainingError(
        f"CUDA out of memory at step {step}{where}; training stopped ({checkpoints})\n"
        f"  fix: lower the memory a step needs: {'; '.join(levers)}"
    )


def write_peak(manifest: Any, device: torch.device, out: Path, is_main: bool) -> dict[str, float]:
    """Record the peak in run.json (the manifest) and return it."""
    peak = peak_memory(device)
    manifest.peak_memory = peak
    if is_main:
        manifest.write(out)
    return peak
