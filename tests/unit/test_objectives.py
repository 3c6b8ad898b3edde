"""The causal LM loss (llmtune.objectives.lm), against values worked out by hand.

Two-token vocabulary, logits chosen so that the log-softmax is known exactly:

* ``A = [0, ln 3]`` -> softmax ``[1/4, 3/4]``: ``-log p(0) = ln 4 ~ 1.386294``, ``-log p(1) = ln 4/3 ~ 0.287682``
* ``B = [ln 3, 0]`` -> softmax ``[3/4, 1/4]``: ``-log p(0) = ln 4/3``, ``-log p(1) = ln 4``
* ``U = [0, 0]`` -> uniform: ``-log p(x) = ln 2 ~ 0.693147``

Labels are aligned with the inputs: ``logits[:, t]`` scores ``labels[:, t + 1]``; ``labels[:, 0]`` is
never a target. So with logits ``[A, B, U]`` and labels ``[x, 1, 0]``:
``loss = -log_A(1) - log_B(0) = 2 ln 4/3 ~ 0.575364`` over 2 targets; the last position's logits score
nothing. Without the shift (logits[:, t] scoring labels[:, t]) the same inputs would give
``-log_B(1) - log_U(0) = ln 4 + ln 2``, so the test tells the two apart.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmtune.objectives.lm import IGNORE_INDEX, count_targets, lm_loss_sum

LN3 = math.log(3.0)
A = [0.0, LN3]
B = [LN3, 0.0]
U = [0.0, 0.0]
LN4_3 = math.log(4 / 3)
LN4 = math.log(4.0)
LN2 = math.log(2.0)


def logits(*rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def labels(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def test_shifted_targets():
    loss, n = lm_loss_sum(logits([A, B, U]), labels([0, 1, 0]))
    assert n.item() == 2
    assert loss.item() == pytest.approx(2 * LN4_3, abs=1e-6)
    assert loss.item() != pytest.approx(LN4 + LN2, abs=1e-3)  # what an unshifted loss would give


def test_shift_direction_matters():
    # same logits, labels swapped: both targets are now the unlikely token
    loss, n = lm_loss_sum(logits([A, B, U]), labels([0, 0, 1]))
    assert n.item() == 2
    assert loss.item() == pytest.approx(2 * LN4, abs=1e-6)


def test_position_zero_is_never_a_target():
    # an out-of-vocabulary label at position 0 is ignored (it would make cross entropy fail if used)
    loss, n = lm_loss_sum(logits([A, B, U]), labels([7, 1, 0]))
    assert n.item() == 2 and loss.item() == pytest.approx(2 * LN4_3, abs=1e-6)
    assert count_targets(labels([7, 1, 0])).item() == 2


def test_ignore_index():
    loss, n = lm_loss_sum(logits([A, B, U]), labels([0, IGNORE_INDEX, 0]))
    assert n.item() == 1 and loss.item() == pytest.approx(LN4_3, abs=1e-6)
    loss, n = lm_loss_sum(logits([A, B, U]), labels([0, 1, IGNORE_INDEX]))
    assert n.item() == 1 and loss.item() == pytest.approx(LN4_3, abs=1e-6)
    loss, n = lm_loss_sum(logits([A, B, U]), labels([0, IGNORE_INDEX, IGNORE_INDEX]))
    assert n.item() == 0 and loss.item() == 0.0  # a sum: nothing learned is 0, not NaN


def test_sum_over_batch_rows_not_mean():
    # row 0: 2 ln 4/3 (2 targets); row 1: logits[U, U, A], labels [x, 1, IGNORE] -> ln 2 (1 target)
    lg = logits([A, B, U], [U, U, A])
    lb = labels([0, 1, 0], [0, 1, IGNORE_INDEX])
    loss, n = lm_loss_sum(lg, lb)
    assert n.item() == 3 == count_targets(lb).item()
    assert loss.item() == pytest.approx(2 * LN4_3 + LN2, abs=1e-6)
    # the same batch twice: twice the sum, twice the targets
    loss2, n2 = lm_loss_sum(torch.cat([lg, lg]), torch.cat([lb, lb]))
    assert n2.item() == 6 and loss2.item() == pytest.approx(2 * loss.item(), abs=1e-6)


def test_uniform_logits_give_log_vocab_per_target():
    lg = torch.zeros(2, 5, 11)
    lb = labels([1, 2, 3, IGNORE_INDEX, 4], [IGNORE_INDEX, IGNORE_INDEX, 9, 10, 0])
    loss, n = lm_loss_sum(lg, lb)
    assert n.item() == 6
    assert loss.item() == pytest.approx(6 * math.log(11), abs=1e-5)


def test_low_precision_logits_are_summed_in_fp32():
    loss, _ = lm_loss_sum(logits([A, B, U]).to(torch.bfloat16), labels([0, 1, 0]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2 * LN4_3, abs=2e-2)


def test_gradient_is_softmax_minus_one_hot():
    lg = logits([A, B, U]).requires_grad_(True)
    loss, _ = lm_loss_sum(lg, labels([0, 1, 0]))
    loss.backward()
    assert lg.grad is not None
    expected = torch.tensor([[[0.25, 0.75 - 1], [0.75 - 1, 0.25], [0.0, 0.0]]])
    torch.testing.assert_close(lg.grad, expected, atol=1e-6, rtol=0)


def test_count_targets():
    assert count_targets(labels([5, 5, 5])).item() == 2
    assert count_targets(labels([IGNORE_INDEX] * 4, [1, IGNORE_INDEX, 2, 3])).item() == 2
    assert count_targets(labels([1])).item() == 0
