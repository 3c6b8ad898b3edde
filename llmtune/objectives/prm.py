"""Process reward models (PRM): a per-token head read at the end of each reasoning step.

The head has two classes, like TRL's PRM (``AutoModelForTokenClassification``, num_labels 2): class 1 is a
good step, class 0 a bad one; p_good = softmax(logits)[..., 1]. Only the step-end positions carry a label
(the last token of each step and its separator); every other position holds IGNORE_INDEX (-100) and takes
no part in the loss or the metrics. Pure torch: no llmtune import.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
AGGREGATIONS = ("min", "last", "mean", "product")


def step_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross entropy over the step-end positions and their number.

    logits: (B, T, 2); labels: (B, T) with 1 (good step) / 0 (bad step) at step ends, -100 elsewhere.
    loss = sum over step ends of -log softmax(logits)[label]; units = the number of step ends.
    """
    mask = labels != IGNORE_INDEX  # (B, T)
    picked = logits[mask].float()  # (S, 2)
    target = labels[mask]  # (S,)
    loss = torch.nn.functional.cross_entropy(picked, target, reduction="sum")
    return loss, mask.sum()


def step_good_probs(logits: torch.Tensor) -> torch.Tensor:
    """p(good) per position: softmax over the two classes, class 1. (..., 2) -> (...)."""
    return torch.softmax(logits.float(), dim=-1)[..., 1]


def first_bad(flags: torch.Tensor) -> int:
    """Index of the first False in a 1-D bool tensor of per-step "good" flags; len(flags) when all are good."""
    bad = (~flags).nonzero()
    return int(bad[0].item()) if bad.numel() else int(flags.numel())


def step_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums for the step metrics of a batch.

    correct_steps: step ends whose predicted class (p_good >= 0.5 -> good) equals the label (divide by the
    number of step ends: step accuracy). first_error_correct: chains whose first predicted bad step is
    their first labelled bad step (both "none" for an all-good chain counts as right); chains: their
    number (first_error_correct / chains: first-error accuracy).
    """
    mask = labels != IGNORE_INDEX
    pred = step_good_probs(logits) >= 0.5  # (B, T)
    truth = labels == 1
    correct = ((pred == truth) & mask).sum()
    first_ok = 0
    for b in range(labels.shape[0]):
        m = mask[b]
        if not m.any():
            continue
        first_ok += int(first_bad(pred[b][m]) == first_bad(truth[b][m]))
    chains = mask.any(dim=1).sum()
    return {
        "correct_steps": correct,
        "first_error_correct": torch.tensor(first_ok, device=labels.device),
        "chains": chains,
    }


def aggregate(step_probs: list[float], how: str) -> float:
    """One score for a chain from its per-step p(good): min (the weakest step), last (the final step's),
    mean, or product (the chance that every step is good, steps taken as independent). A chain with no
    step scores 0.0.

    >>> aggregate([0.9, 0.5, 0.8], "min"), aggregate([0.9, 0.5, 0.8], "last")
    (0.5, 0.8)
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {how!r}")
    if not step_probs:
        return 0.0
    if how == "min":
        return min(step_probs)
    if how == "last":
        return step_probs[-1]
    if how == "mean":
        return sum(step_probs) / len(step_probs)
    return math.prod(step_probs)
