"""An exponential moving average of the trained weights (``train.ema``).

Every ``every`` optimizer steps: ``ema = decay * ema + (1 - decay) * weights``, over the parameters that
train (a LoRA run averages its adapter, a full run every weight), starting from the weights training starts
with. The average is kept in fp32 next to the weights, saved in each checkpoint (``ema.pt``) so that a
resumed run continues it exactly, and exported beside the model as ``output_dir/ema/`` in the same shape
(a full model, or an adapter) by the stage's own export, with the averaged values swapped in.

Under ZeRO 0-2 every process holds the whole updated weights after a step, so each keeps the same average
and process 0 writes it; ZeRO-3, which partitions them, is refused when the recipe is checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

FILE = "ema.pt"


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float, every: int) -> None:
        self.decay, self.every = decay, every
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after optimizer step number ``step`` (1-based)."""
        if step % self.every:
            return
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after it."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.shadow[n].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def save(self, ckpt: Path) -> None:
        torch.save({"shadow": self.shadow, "updates": self.updates}, ckpt / FILE)

    def load(self, ckpt: Path) -> None:
        from llmtune.errors import TrainingError

        path = ckpt / FILE
        if not path.is_file():
            raise TrainingError(
                f"checkpoint {ckpt} has no {FILE}: it was written without train.ema, so the average cannot "
                "continue exactly\n  fix: resume with the recipe the checkpoint was written with (no train.ema), "
                "or start a fresh run (--no-resume)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise TrainingError(
                f"{path} averages other parameters than this run trains ({len(missing)} differ, e.g. "
                f"{sorted(missing)[0]})\n  fix: resume with the recipe the checkpoint was written with"
            )
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)
        self.updates = int(state["updates"])
