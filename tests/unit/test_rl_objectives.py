"""objectives/rl.py against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llmtune.objectives.rl import (
    AdaptiveKLController,
    aggregate_loss,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    rloo_advantages,
    whiten,
    zero_std_groups,
)


def close(a: torch.Tensor, b: list | float, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


def test_group_advantages_by_hand() -> None:
    """Groups [1, 0, 0, 1] (mean 0.5, unbiased std sqrt(1/3) = 0.57735) and [2, 2, 2, 2] (std 0)."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    close(group_advantages(r, 4, scale="none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    s = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(group_advantages(r, 4, scale="group"), [s, -s, -s, s, 0, 0, 0, 0])
    # batch: the std of all 8 rewards: mean 1.25, sum of squares of deviations 0.5625*2 + 1.5625*2 + 0.5625*4
    std = math.sqrt((2 * 0.0625 + 2 * 1.5625 + 4 * 0.5625) / 7)
    b = 0.5 / (std + 1e-4)
    close(group_advantages(r, 4, scale="batch"), [b, -b, -b, b, 0, 0, 0, 0])
    assert zero_std_groups(r, 4).tolist() == [False, True]
    with pytest.raises(ValueError):
        group_advantages(r, 3)
    with pytest.raises(ValueError):
        group_advantages(r, 4, scale="minmax")


def test_rloo_is_leave_one_out() -> None:
    """[3, 0, 0]: 3 - mean(0, 0) = 3; 0 - mean(3, 0) = -1.5. Equals K / (K - 1) (r - mean)."""
    r = torch.tensor([3.0, 0.0, 0.0, 1.0, 2.0, 6.0])
    close(rloo_advantages(r, 3)[:3], [3.0, -1.5, -1.5])
    close(rloo_advantages(r, 3), 1.5 * group_advantages(r, 3, scale="none"))
    with pytest.raises(ValueError):
        rloo_advantages(r, 1)


def test_kl_estimators() -> None:
    """log_ratio = logp - ref = [0, ln 2, -ln 2]: k1 = log_ratio; k2 = log_ratio^2 / 2;
    k3 = exp(-lr) - 1 + lr = [0, 0.5 - 1 + ln 2, 2 - 1 - ln 2]."""
    ln2 = math.log(2)
    logp, ref = torch.tensor([-1.0, -1.0 + ln2, -1.0 - ln2]), torch.tensor([-1.0, -1.0, -1.0])
    close(kl_estimate(logp, ref, "k1"), [0, ln2, -ln2])
    close(kl_estimate(logp, ref, "k2"), [0, ln2**2 / 2, ln2**2 / 2])
    close(kl_estimate(logp, ref, "k3"), [0, ln2 - 0.5, 1 - ln2])
    x = torch.randn(100) * 3
    assert (kl_estimate(x, torch.zeros(100), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_clipped_policy_loss_both_sides_and_dual_clip() -> None:
    """ratios [1.5, 0.5, 1.1] (eps 0.2, eps_high 0.28):
    A = +1: -min(1.5, 1.28) = -1.28 (clipped), -min(0.5, 0.8) = -0.5, -min(1.1, 1.1) = -1.1.
    A = -1: max(-(-1.5), -(-1.28)) = 1.5 (not clipped); max(0.5, 0.8) = 0.8 (clipped); 1.1."""
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]]))
    adv = torch.tensor([1.0, -1.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, epsilon=0.2, epsilon_high=0.28)
    close(loss, [[-1.28, -0.5, -1.1], [1.5, 0.8, 1.1]])
    assert clipped.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    # symmetric clip: the top is 1.2
    close(clipped_policy_loss(logp, old, adv, epsilon=0.2)[0][0], [-1.2, -0.5, -1.1])
    # dual clip c = 1.4 caps the A < 0 loss at -c A = 1.4: 1.5 -> 1.4
    loss, clipped = clipped_policy_loss(logp, old, adv, epsilon=0.2, epsilon_high=0.28, dual_clip=1.4)
    close(loss[1], [1.4, 0.8, 1.1])
    assert clipped[1].tolist() == [1.0, 1.0, 0.0]
    # at ratio 1 the gradient of the loss is -A d logp
    lp = torch.zeros(1, 2, requires_grad=True)
    clipped_policy_loss(lp, torch.zeros(1, 2), torch.tensor([2.0]))[0].sum().backward()
    close(lp.grad, [[-2.0, -2.0]])


def test_aggregations_by_hand_and_split_invariant() -> None:
    """Sequences with token losses [1, 2, 3] and [5] (mask 1 1 1 / 1 0 0).
    grpo: mean(mean(1,2,3), 5) = (2 + 5) / 2 = 3.5; dapo: (1 + 2 + 3 + 5) / 4 = 2.75;
    dr_grpo with max_tokens 3: 11 / (2 * 3) = 1.8333."""
    per = torch.tensor([[1.0, 2.0, 3.0], [5.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    want = {"grpo": 3.5, "dapo": 2.75, "dr_grpo": 11 / 6}
    for kind, value in want.items():
        s, n = aggregate_loss(per, mask, kind, max_tokens=3)
        close(s / n, value)
    # four sequences of different lengths: one micro-batch of 4, two of 2, four of 1 give the same loss
    torch.manual_seed(0)
    per4 = torch.randn(4, 5)
    mask4 = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float)
    for kind in want:
        values = []
        for size in (4, 2, 1):
            parts = [aggregate_loss(per4[i : i + size], mask4[i : i + size], kind, 5) for i in range(0, 4, size)]
            values.append(sum(p[0] for p in parts) / sum(p[1] for p in parts))
        close(torch.stack(values), [values[0].item()] * 3, tol=1e-6)
    with pytest.raises(ValueError):
        aggregate_loss(per, mask, "dr_grpo")
    with pytest.raises(ValueError):
        aggregate_loss(per, mask, "sum")


def test_masked_mean_whiten_entropy() -> None:
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    close(masked_mean(x, m), 2.0)
    close(masked_mean(x, m, dim=-1), [2.0])
    w = whiten(torch.tensor([1.0, 3.0, 5.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # mean 3, population var 8/3: (x - 3) / sqrt(8/3)
    close(w, [-2 / math.sqrt(8 / 3), 0.0, 2 / math.sqrt(8 / 3), 0.0], tol=1e-4)
    close(whiten(torch.tensor([1.0, 3.0]), shift_mean=False), [2 - 1, 2 + 1], tol=1e-4)
    # uniform over 4 tokens: entropy ln 4; one certain token: 0
    close(entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]])
    close(entropy_from_logits(torch.tensor([[[0.0, -1e4, -1e4]]])), [[0.0]])


def test_gae_by_hand_and_masked_positions_ignored() -> None:
    """gamma 0.9, lam 0.8, rewards [0, 0, 1], values [0.5, 0.4, 0.3] (one length-3 sequence):
    delta_2 = 1 - 0.3 = 0.7                        A_2 = 0.7
    delta_1 = 0 + 0.9 * 0.3 - 0.4 = -0.13           A_1 = -0.13 + 0.72 * 0.7 = 0.374
    delta_0 = 0 + 0.9 * 0.4 - 0.5 = -0.14           A_0 = -0.14 + 0.72 * 0.374 = 0.12928"""
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.4, 0.3, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    close(adv, [[0.12928, 0.374, 0.7, 0.0]])
    close(ret, [[0.62928, 0.774, 1.0, 0.0]])
    noisy_r, noisy_v = r.clone(), v.clone()
    noisy_r[0, 3], noisy_v[0, 3] = 123.0, -77.0
    adv2, ret2 = gae(noisy_r, noisy_v, m, gamma=0.9, lam=0.8)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_value_loss_and_explained_variance() -> None:
    """old 0, new [0.5, -0.1], returns [1, 1], clip 0.2: clipped values [0.2, -0.1].
    token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64 -> 0.32 (clipped won); token 1: (1.1)^2 / 2 = 0.605."""
    values, old = torch.tensor([[0.5, -0.1]]), torch.zeros(1, 2)
    returns, mask = torch.ones(1, 2), torch.ones(1, 2)
    loss, frac = clipped_value_loss(values, old, returns, mask, clip=0.2)
    close(loss, [[0.32, 0.605]])
    close(frac, 0.5)
    close(clipped_value_loss(values, old, returns, mask, clip=None)[0], [[0.125, 0.605]])
    r = torch.tensor([[1.0, 2.0, 3.0]])
    close(explained_variance(r, r, torch.ones(1, 3)), 1.0)
    close(explained_variance(torch.zeros(1, 3), r, torch.ones(1, 3)), 0.0)
    assert math.isnan(explained_variance(r, torch.ones(1, 3), torch.ones(1, 3)).item())


def test_adaptive_kl_controller() -> None:
    """target 6, horizon 100: KL 12 -> error clipped to 0.2 -> x (1 + 0.2 * 10 / 100) = x 1.02;
    KL 3 -> error -0.5 clipped to -0.2 -> x 0.98; target None never moves."""
    c = AdaptiveKLController(0.1, target=6.0, horizon=100)
    c.update(12.0, n_steps=10)
    assert c.value == pytest.approx(0.102)
    c.update(3.0, n_steps=10)
    assert c.value == pytest.approx(0.102 * 0.98)
    c.update(6.6, n_steps=100)  # error 0.1 -> x 1.1
    assert c.value == pytest.approx(0.102 * 0.98 * 1.1)
    d = AdaptiveKLController(1.0, target=None)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()
    fixed = AdaptiveKLController(0.05, target=None)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
