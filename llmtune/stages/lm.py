"""The step shared by the two language-modelling stages (cpt and sft): next-token loss on learned tokens."""

from __future__ import annotations

import torch

from llmtune.engine.contract import StepOutput
from llmtune.objectives.lm import count_targets
from llmtune.stages.base import StageDefaults, lm_loss


class LanguageModelStep(StageDefaults):
    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return count_targets(batch["labels"])

    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        loss_sum, n = lm_loss(model, batch)  # no (B, T, V) logits: the head runs per chunk of positions
        return StepOutput(loss_sum=loss_sum, units=n)
