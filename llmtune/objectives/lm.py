"""Causal language-model loss, as a sum over learned tokens so that the trainer can normalise it over
the whole optimizer step (all micro-batches and all ranks): the result is then the same whatever the
split into micro-batches, accumulation steps and processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of predicted tokens in a batch. labels: (B, T), IGNORE_INDEX where nothing is learned.
    Position 0 is never a target (nothing precedes it)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy and the number of targets.

    logits: (B, T, V) for positions 0..T-1; labels: (B, T) aligned with the inputs, so
    logits[:, t] predicts labels[:, t + 1]:  loss = -sum_t log p(x_{t+1} | x_{<=t}) over learned t+1.

    >>> logits = torch.zeros(1, 3, 4)                  # uniform over 4 tokens
    >>> loss, n = lm_loss_sum(logits, torch.tensor([[1, 2, -100]]))
    >>> round(loss.item() / n.item(), 4)               # log 4
    1.3863
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()
