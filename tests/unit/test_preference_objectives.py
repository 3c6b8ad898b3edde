"""Preference losses against values worked out by hand, and against an independent re-computation."""

from __future__ import annotations

import math

import pytest
import torch

from llmtune.objectives.preference import (
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    pointwise_loss,
    ranked_loss,
    ranked_pairs,
    reward_centering,
    sequence_logps,
    simpo_loss,
    token_logps,
)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), in plain Python."""
    return math.log1p(math.exp(x))


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def test_token_and_sequence_logps() -> None:
    """Vocabulary of 2, logits [0, log 3] at every position: p(0) = 1/4, p(1) = 3/4.
    labels [-100, 1, 0, -100]: targets at positions 1 and 2 -> log(3/4) + log(1/4) = -1.6740, 2 tokens."""
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(4, 1).unsqueeze(0)  # (1, 4, 2)
    lp, mask = token_logps(logits, torch.tensor([[-100, 1, 0, -100]]))
    assert mask.tolist() == [[1.0, 1.0, 0.0]]
    total, n = sequence_logps(lp, mask)
    assert total.item() == pytest.approx(math.log(0.75) + math.log(0.25), abs=1e-6)
    assert n.item() == 2


def test_bradley_terry_by_hand() -> None:
    """r_c - r_r = 2 - 0.5 = 1.5: -log sigmoid(1.5) = log(1 + e^-1.5) = 0.201413.
    With a margin 1: -log sigmoid(0.5) = 0.474077. Equal rewards: log 2."""
    assert bradley_terry_loss(t(2.0), t(0.5)).item() == pytest.approx(0.201413, abs=1e-6)
    assert bradley_terry_loss(t(2.0), t(0.5), t(1.0)).item() == pytest.approx(0.474077, abs=1e-6)
    assert bradley_terry_loss(t(0.3), t(0.3)).item() == pytest.approx(math.log(2), abs=1e-12)


def test_ranked_by_hand() -> None:
    """Row 1: scores (3, 1, 2) best first -> pairs (3,1), (3,2), (1,2):
    log(1+e^-2) + log(1+e^-1) + log(1+e^1) = 0.126928 + 0.313262 + 1.313262 = 1.753452, 3 pairs.
    Row 2: two responses (0, 0) and padding -> log 2, 1 pair."""
    scores = t(3.0, 1.0, 2.0, 0.0, 0.0, 99.0).view(2, 3)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    sums, pairs = ranked_loss(scores, mask)
    assert sums.tolist() == pytest.approx([1.753452, math.log(2)], abs=1e-6)
    assert pairs.tolist() == [3.0, 1.0]
    better, worse, valid = ranked_pairs(scores, mask)
    assert valid.sum().item() == 4
    assert better[valid].tolist() == [3.0, 3.0, 1.0, 0.0]
    assert worse[valid].tolist() == [1.0, 2.0, 2.0, 0.0]


def test_ranked_with_two_equals_pairwise() -> None:
    c, r = t(0.7, -1.2), t(0.1, 0.4)
    sums, _ = ranked_loss(torch.stack([c, r], dim=1), torch.ones(2, 2, dtype=torch.bool))
    torch.testing.assert_close(sums, bradley_terry_loss(c, r))


def test_pointwise_and_centering_by_hand() -> None:
    """(1.5 - 0.5)^2 = 1; (-2 - 1)^2 = 9. Centering 0.01 * (1 + 2)^2 = 0.09, 0.01 * (-1 + 1)^2 = 0."""
    assert pointwise_loss(t(1.5, -2.0), t(0.5, 1.0)).tolist() == [1.0, 9.0]
    assert reward_centering(t(1.0, -1.0), t(2.0, 1.0), 0.01).tolist() == pytest.approx([0.09, 0.0])


def test_dpo_is_log2_when_policy_equals_reference() -> None:
    """Step 0 of DPO: the policy is the reference, h = 0, loss = log 2 for every pair, rewards 0."""
    pc, pr = t(-12.5, -3.0, -40.0), t(-11.0, -7.5, -2.0)
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.0, 0.0, 0.0]
    assert dpo_loss(pc, pr, pc, pr, beta=0.1, label_smoothing=0.2).losses.tolist() == pytest.approx([math.log(2)] * 3)


def test_dpo_family_by_hand() -> None:
    """pi_c = -1, pi_r = -3, ref_c = -2, ref_r = -2: h = (-1 + 3) - 0 = 2; beta = 0.5, beta h = 1.
    sigmoid: -log sigmoid(1) = log(1 + e^-1) = 0.313262
    cDPO e = 0.1: 0.9 * 0.313262 + 0.1 * log(1 + e^1) = 0.281936 + 0.131326 = 0.413262
    robust e = 0.1: (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8 = (0.281936 - 0.131326) / 0.8 = 0.188262
    ipo: (2 - 1 / (2 * 0.5))^2 = (2 - 1)^2 = 1
    hinge: max(0, 1 - 1) = 0; with beta 0.25: 1 - 0.5 = 0.5
    rewards: 0.5 * (-1 + 2) = 0.5 and 0.5 * (-3 + 2) = -0.5"""
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))
    assert dpo_loss(*args, beta=0.5).losses.item() == pytest.approx(0.313262, abs=1e-6)
    assert dpo_loss(*args, beta=0.5, label_smoothing=0.1).losses.item() == pytest.approx(0.413262, abs=1e-6)
    assert dpo_loss(*args, 0.5, "robust", 0.1).losses.item() == pytest.approx(0.188262, abs=1e-6)
    assert dpo_loss(*args, 0.5, "ipo").losses.item() == pytest.approx(1.0)
    assert dpo_loss(*args, 0.5, "hinge").losses.item() == pytest.approx(0.0)
    assert dpo_loss(*args, 0.25, "hinge").losses.item() == pytest.approx(0.5)
    out = dpo_loss(*args, beta=0.5)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.5, -0.5))
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(*args, 0.5, "nope")


def test_simpo_by_hand() -> None:
    """pi_c = -4 over 2 tokens (-2 per token), pi_r = -9 over 3 tokens (-3 per token): d = 1.
    beta 2, gamma 0.5: -log sigmoid(2 - 0.5) = log(1 + e^-1.5) = 0.201413; rewards 2 * -2 = -4, 2 * -3 = -6."""
    out = simpo_loss(t(-4.0), t(-9.0), t(2.0), t(3.0), beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(0.201413, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-4.0, -6.0))


def test_kto_by_hand() -> None:
    """r = pi - ref = (1, -1, 0.5); z0 = mean(r) = 1/6 clamped at 0 -> 1/6; beta 1.
    desirable r=1: 1 - sigmoid(1 - 1/6) = 1 - sigmoid(0.833333) = 1 - 0.697059 = 0.302941
    undesirable r=-1: w_u * (1 - sigmoid(1/6 + 1)) = 2 * (1 - 0.762542) = 0.474916
    desirable r=0.5: 1 - sigmoid(1/3) = 0.417430"""
    pol, ref = t(-1.0, -3.0, -1.5), t(-2.0, -2.0, -2.0)
    z0 = kto_reference_point(pol, ref)
    assert z0.item() == pytest.approx(1 / 6)
    losses, rewards = kto_loss(pol, ref, torch.tensor([True, False, True]), z0, 1.0, 1.0, 2.0)
    assert losses.tolist() == pytest.approx([0.302941, 0.474916, 0.417430], abs=1e-6)
    assert rewards.tolist() == pytest.approx([1.0, -1.0, 0.5])
    assert kto_reference_point(t(-5.0), t(-1.0)).item() == 0.0  # a negative KL estimate is clamped


def test_dpo_matches_independent_computation_from_logits() -> None:
    """Random logits -> our token / sequence log-probs -> DPO; recomputed here in float64 with plain loops."""
    g = torch.Generator().manual_seed(0)
    b, tlen, v = 3, 7, 11
    logits = torch.randn(2 * b, tlen, v, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2 * b, tlen, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (2 * b, tlen), generator=g)
    labels[:, :3] = -100  # the prompt
    labels[1, -2:] = -100  # padding
    lp, mask = token_logps(logits, labels)
    ref_lp, _ = token_logps(ref_logits, labels)
    seq, _ = sequence_logps(lp, mask)
    ref_seq, _ = sequence_logps(ref_lp, mask)
    out = dpo_loss(seq[:b], seq[b:], ref_seq[:b], ref_seq[b:], beta=0.3)

    def logp(lg: torch.Tensor, row: int) -> float:
        total = 0.0
        for pos in range(1, tlen):
            y = int(labels[row, pos])
            if y == -100:
                continue
            z = [float(x) for x in lg[row, pos - 1]]
            m = max(z)
            total += z[y] - (m + math.log(sum(math.exp(x - m) for x in z)))
        return total

    for i in range(b):
        h = (logp(logits, i) - logp(logits, b + i)) - (logp(ref_logits, i) - logp(ref_logits, b + i))
        assert out.losses[i].item() == pytest.approx(softplus(-0.3 * h), rel=1e-5)  # log-softmax runs in fp32
