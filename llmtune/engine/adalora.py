"""AdaLoRA's rank allocation inside the DeepSpeed loop.

peft's AdaLoRA needs ``update_and_allocate(global_step)`` after every optimizer step, with the step's
gradients still in hand: it scores each singular triplet by |w * grad| (smoothed), and from step tinit on
masks the least important ones to the shrinking budget of its schedule, whose length is ``total_step``.
DeepSpeed's ``engine.step()`` updates and zeroes the gradients in one call, and under ZeRO 1-2 or bf16 / fp16
the gradients and the fp32 master weights live in DeepSpeed's partitions, not in ``p.grad`` / ``p.data``. So
the trainer calls, once per optimizer step:

- ``before_update()`` at the accumulation boundary (after the last backward, before ``engine.step()``): the
  full gradients of the adapter's lora_A / lora_B / lora_E, read through DeepSpeed (``safe_get_full_grad``);
- ``after_update(step)`` after ``engine.step()``: peft's ``update_and_allocate(step)`` on those gradients,
  then the entries it zeroed are zeroed in DeepSpeed's fp32 master copy too (else the next step would bring
  them back from there).

``total_step`` is set to the run's real optimizer-step count, and a checkpoint keeps the allocator's state
(the sensitivity averages and the rank pattern) so that a resumed run continues the very same schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

STATE_FILE = "adalora_state.pt"


class AdaLoraSchedule:
    def __init__(self, engine: Any, total_steps: int) -> None:
        from peft.tuners.adalora import AdaLoraConfig, AdaLoraModel

        model = engine.module
        tuner = getattr(model, "base_model", None)
        if not isinstance(tuner, AdaLoraModel):
            raise TypeError(f"finetuning.method adalora: the trained module is a {type(model).__name__}, not peft's")
        self.tuner = tuner
        self.name = tuner.trainable_adapter_name
        config = tuner.peft_config[self.name]
        assert isinstance(config, AdaLoraConfig)
        self.config = config
        self.config.total_step = total_steps  # the schedule's length: this run's optimizer steps
        tuner.rankallocator.peft_config = self.config
        self.params = [(n, p) for n, p in model.named_parameters() if "lora_" in n and self.name in n]
        self.grads: dict[str, torch.Tensor] = {}

    def before_update(self) -> None:
        """At the accumulation boundary: keep the full gradients of the adapter's weights."""
        from deepspeed.utils import safe_get_full_grad

        self.grads = {}
        for n, p in self.params:
            g = safe_get_full_grad(p)
            if g is not None:
                self.grads[n] = g.detach().to(p.dtype).clone()

    def after_update(self, step: int, applied: bool) -> None:
        """After the optimizer step `step` (1-based): peft's budget update and masking. A step that was not
        applied (NaN / Inf, fp16 overflow) leaves the scores and masks as they were."""
        grads, self.grads = self.grads, {}
        if not applied or len(grads) != len(self.params):
            return
        for n, p in self.params:
            p.grad = grads[n]
        try:
            self.tuner.update_and_allocate(step)
        finally:
            for _, p in self.params:
                p.grad = None
        self._mask_master_weights()

    def _mask_master_weights(self) -> None:
        """The lora_E entries peft zeroed, zeroed in DeepSpeed's fp32 master copy too (ZeRO 1-2, bf16 / fp16)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        for n, p in self.params:
            if "lora_E" not in n:
                continue
            master = safe_get_full_fp32_param(p)
            if master is None:  # no master copy: the optimizer updates p itself
                continue
            zeroed = (p.data == 0).to(master.device)
            if zeroed.any():
                safe_set_full_fp32_param(p, master.masked_fill(zeroed, 0.0))

    # ---------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        alloc = self.tuner.rankallocator
        cpu = {k: {n: t.detach().cpu() for n, t in getattr(alloc, k).items()} for k in _ALLOCATOR_STATE}
        return {"rank_pattern": self.config.rank_pattern, **cpu}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alloc = self.tuner.rankallocator
        devices = {n: p.device for n, p in self.params}
        for k in _ALLOCATOR_STATE:
            setattr(alloc, k, {n: t.to(devices.get(n, "cpu")) for n, t in state[k].items()})
        self.config.rank_pattern = state["rank_pattern"]

    def save(self, ckpt: Path) -> None:
        torch.save(self.state_dict(), ckpt / STATE_FILE)

    def load(self, ckpt: Path) -> None:
        f = ckpt / STATE_FILE
        if not f.is_file():
            from llmtune.errors import TrainingError

            raise TrainingError(
                f"{ckpt} has no {STATE_FILE}: it was not written by an adalora run, so its rank schedule cannot "
                "continue\n  fix: resume with the recipe that wrote it, or start over with --no-resume"
            )
        self.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))


_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")
