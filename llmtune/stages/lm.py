"""The step shared by the two language-modelling stages (cpt and sft): next-token loss on learned tokens."""

from __future__ import annotations

import torch

from llmtune.objectives.lm import count_targets, lm_loss_sum
from llmtune.stages.base import StageDefaults, StepOutput, forward_lm


class LanguageModelStep(StageDefaults):
    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return count_targets(batch["labels"])

    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = forward_lm(model, batch)  # (B, T, V)
        loss_sum, n = lm_loss_sum(logits, batch["labels"])
        return StepOutput(loss_sum=loss_sum, units=n)
