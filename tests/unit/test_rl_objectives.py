"""objectives/rl.py against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llmtune.objectives.rl import (
    AdaptiveKLController,
    aggregate_loss,
    best_of_n,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    explained_variance_of_moments,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    pick_groups_with_spread,
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
    with pytest.raises(ValueError):
        group_advantages(r, 0)
    # one completion per prompt: r - mean = 0 and std is taken as 0, so A = 0 / eps = 0 (no nan)
    close(group_advantages(torch.tensor([3.0, -1.0]), 1), [0.0, 0.0])


def test_zero_std_groups_by_hand() -> None:
    """Groups [1, 0, 0, 1] (max 1 != min 0) -> False; [2, 2, 2, 2] -> True; integer rewards work too."""
    assert zero_std_groups(torch.tensor([1, 0, 0, 1, 2, 2, 2, 2]), 4).tolist() == [False, True]
    assert zero_std_groups(torch.tensor([5.0, 5.0, 0.0, 1.0, 7.0, 7.0]), 2).tolist() == [True, False, True]
    # integer rewards [1, 0, 0, 1]: mean 0.5 -> A = [0.5, -0.5, -0.5, 0.5]
    close(group_advantages(torch.tensor([1, 0, 0, 1]), 4, scale="none"), [0.5, -0.5, -0.5, 0.5])
    with pytest.raises(ValueError):
        zero_std_groups(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_best_of_n_keeps_a_best_that_beats_the_worst_and_clears_the_threshold() -> None:
    """Four prompts x 3 samples, exact_match-like scores and one graded group:
    [0, 1, 0]       spread, best 1 (index 1) >= 1.0                 -> kept, worst index 0
    [0, 0, 0]       no spread (every answer wrong)                  -> not kept
    [1, 1, 1]       no spread (every answer right: nothing to fix)  -> not kept
    [0.2, 0.7, 0.5] spread, but best 0.7 < 1.0                      -> under threshold"""
    r = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.2, 0.7, 0.5]])
    s = best_of_n(r, threshold=1.0)
    assert s["best"].tolist() == [1, 0, 0, 1] and s["worst"].tolist() == [0, 0, 0, 0]
    assert s["spread"].tolist() == [True, False, False, True]
    assert s["clears"].tolist() == [True, False, True, False]
    assert s["keep"].tolist() == [True, False, False, False]
    # no threshold (a reward model): only the spread decides
    assert best_of_n(r, threshold=None)["keep"].tolist() == [True, False, False, True]
    # ties: the first of equals is the best and the worst
    t = best_of_n(torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.1]]), threshold=0.5)
    assert (t["best"].item(), t["worst"].item(), t["keep"].item()) == (1, 3, True)
    with pytest.raises(ValueError, match="G, K"):
        best_of_n(torch.tensor([1.0, 2.0]))


def test_dynamic_sampling_picks_groups_with_spread_first() -> None:
    """Rewards of 5 groups of 2 drawn in order (two draws): zero-spread groups 0, 2 and 3 are dropped while
    groups with spread are left; when the draws ran short, zero-spread groups fill in, in order."""
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.3])
    zero = zero_std_groups(rewards, 2).tolist()
    assert zero == [True, False, True, True, False]
    assert pick_groups_with_spread(zero, 2) == [1, 4]
    assert pick_groups_with_spread(zero, 3) == [1, 4, 0]
    assert pick_groups_with_spread([False, False, False], 2) == [0, 1]
    with pytest.raises(ValueError):
        pick_groups_with_spread(zero, 6)


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
    with pytest.raises(ValueError):
        clipped_policy_loss(logp, old, adv, dual_clip=1.0)


def test_clipped_tokens_have_zero_gradient() -> None:
    """d loss / d logp = -ratio * A where the unclipped term is taken, 0 where a clipped one is.
    Same ratios [1.5, 0.5, 1.1], eps 0.2 / eps_high 0.28:
    A = +1: [0 (clipped), -0.5, -1.1];  A = -1: [1.5, 0 (clipped), 1.1];  with dual clip 1.4 also 1.5 -> 0."""
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]])
    adv = torch.tensor([1.0, -1.0])
    for dual, want in ((None, [[0.0, -0.5, -1.1], [1.5, 0.0, 1.1]]), (1.4, [[0.0, -0.5, -1.1], [0.0, 0.0, 1.1]])):
        logp = torch.log(ratios).requires_grad_()
        loss, clipped = clipped_policy_loss(logp, torch.zeros(2, 3), adv, 0.2, 0.28, dual_clip=dual)
        loss.sum().backward()
        close(logp.grad, want)
        assert torch.equal(clipped == 1, logp.grad == 0)
    # (B, T) advantages work the same as (B,) broadcast over T
    lp = torch.log(ratios)
    a, b = (
        clipped_policy_loss(lp, torch.zeros(2, 3), adv),
        clipped_policy_loss(lp, torch.zeros(2, 3), adv[:, None].expand(2, 3)),
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # at ratio 1 the gradient of the loss is -A d logp
    lp = torch.zeros(1, 2, requires_grad=True)
    clipped_policy_loss(lp, torch.zeros(1, 2), torch.tensor([2.0]))[0].sum().backward()
    close(lp.grad, [[-2.0, -2.0]])


def test_aggregations_by_hand() -> None:
    """Sequences with token losses [1, 2, 3] and [5] (mask 1 1 1 / 1 0 0).
    grpo: mean(mean(1,2,3), 5) = (2 + 5) / 2 = 3.5; dapo: (1 + 2 + 3 + 5) / 4 = 2.75;
    dr_grpo with max_tokens 3: 11 / (2 * 3) = 1.8333."""
    per = torch.tensor([[1.0, 2.0, 3.0], [5.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    want = {"grpo": 3.5, "dapo": 2.75, "dr_grpo": 11 / 6}
    got = {}
    for kind, value in want.items():
        s, n = aggregate_loss(per, mask, kind, max_tokens=3)
        got[kind] = (s / n).item()
        close(s / n, value)
    # unequal lengths: the long sequence has 3/4 of the tokens (dapo) but 1/2 of the weight (grpo)
    assert abs(got["grpo"] - got["dapo"]) > 0.7
    with pytest.raises(ValueError):
        aggregate_loss(per, mask, "dr_grpo")
    with pytest.raises(ValueError):
        aggregate_loss(per, mask, "sum")


def test_aggregations_do_not_depend_on_the_micro_batch_split() -> None:
    """Four sequences of lengths 5, 2, 1, 3 (padding holds 100, which must not count):
    [1 1 1 1 1] sum 5 mean 1;  [2 4] sum 6 mean 3;  [6] sum 6 mean 6;  [1 2 3] sum 6 mean 2.
    grpo = (1 + 3 + 6 + 2) / 4 = 3;  dapo = 23 / 11;  dr_grpo (max_tokens 5) = 23 / (4 * 5) = 1.15.
    One micro-batch of 4, two of 2 and four of 1 all give these (sum of loss_sum / sum of units)."""
    pad = 100.0
    per = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0, 1.0], [2.0, 4.0, pad, pad, pad], [6.0, pad, pad, pad, pad], [1.0, 2.0, 3.0, pad, pad]]
    )
    mask = (per != pad).float()
    want = {"grpo": 3.0, "dapo": 23 / 11, "dr_grpo": 1.15}
    for kind, value in want.items():
        for size in (4, 2, 1):
            parts = [aggregate_loss(per[i : i + size], mask[i : i + size], kind, 5) for i in range(0, 4, size)]
            total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
            close(total, value, tol=1e-6)
    # grpo (3) and dapo (23 / 11 = 2.09) differ: lengths are unequal
    (gs, gn), (ds, dn) = aggregate_loss(per, mask, "grpo"), aggregate_loss(per, mask, "dapo")
    assert abs((gs / gn).item() - (ds / dn).item()) > 0.9
    # units: B for grpo / dr_grpo, the token count for dapo; float tensors
    assert aggregate_loss(per, mask, "grpo")[1].item() == 4.0
    assert aggregate_loss(per, mask, "dapo")[1].item() == 11.0
    assert aggregate_loss(per, mask, "dapo")[1].is_floating_point()
    # a sequence with no token adds 0 to the grpo sum (and 1 to its units)
    s, n = aggregate_loss(torch.tensor([[4.0, 4.0], [9.0, 9.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]]), "grpo")
    close(s, 4.0)
    close(n, 2.0)
    # gradients flow to the counted tokens only: d grpo / d l_it = 1 / |o_i| (before the engine divides by B)
    leaf = per.clone().requires_grad_()
    aggregate_loss(leaf, mask, "grpo")[0].backward()
    close(leaf.grad[1], [0.5, 0.5, 0.0, 0.0, 0.0])


def test_masked_mean_whiten_entropy() -> None:
    """masked_mean([1, 3, (100)]) = 2; whiten([1, 3, 5, (100)]): mean 3, population var (4 + 0 + 4) / 3 = 8/3."""
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    close(masked_mean(x, m), 2.0)
    close(masked_mean(x, m, dim=-1), [2.0])
    w = whiten(torch.tensor([1.0, 3.0, 5.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # mean 3, population var 8/3: (x - 3) / sqrt(8/3)
    close(w, [-2 / math.sqrt(8 / 3), 0.0, 2 / math.sqrt(8 / 3), 0.0], tol=1e-4)
    close(whiten(torch.tensor([1.0, 3.0]), shift_mean=False), [2 - 1, 2 + 1], tol=1e-4)
    # random entries: mean 0, (population) std 1 over the masked ones, 0 elsewhere
    torch.manual_seed(1)
    x, m = torch.randn(3, 7) * 5 + 2, (torch.rand(3, 7) > 0.3).float()
    w = whiten(x, m)
    sel = w[m.bool()]
    close(sel.mean(), 0.0)
    close(sel.std(unbiased=False), 1.0, tol=1e-4)
    assert (w[~m.bool()] == 0).all()
    # shift_mean False keeps the masked mean of x
    close(whiten(x, m, shift_mean=False)[m.bool()].mean(), x[m.bool()].mean(), tol=1e-4)
    # uniform over 4 tokens: entropy ln 4; one certain token: 0
    close(entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]])
    close(entropy_from_logits(torch.tensor([[[0.0, -1e4, -1e4]]])), [[0.0]])
    # a banned token (-inf) adds nothing: two equal tokens left -> ln 2; huge logits do not overflow
    close(entropy_from_logits(torch.tensor([[[0.0, 0.0, -math.inf]]])), [[math.log(2)]])
    close(entropy_from_logits(torch.tensor([[[1e4, 1e4]]])), [[math.log(2)]])
    # p = softmax([ln 3, 0]) = [3/4, 1/4]: H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    close(
        entropy_from_logits(torch.tensor([[[math.log(3), 0.0]]])), [[-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]]
    )


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


def test_gae_random_padding_and_monte_carlo() -> None:
    """Two sequences of lengths 3 and 1 padded to 5; padding filled with random numbers, then nan / inf,
    gives the same outputs (0 at the padding). The length-1 sequence: A_0 = r_0 - V_0 (nothing follows).
    gamma = lam = 1: A_t = sum_{s >= t} r_s - V_t (Monte Carlo return minus the value)."""
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]])
    v = torch.tensor([[0.5, 0.4, 0.3, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    close(adv, [[0.12928, 0.374, 0.7, 0, 0], [1.5, 0, 0, 0, 0]])
    close(ret, [[0.62928, 0.774, 1.0, 0, 0], [2.0, 0, 0, 0, 0]])
    torch.manual_seed(2)
    pad = m == 0
    for fill in (
        lambda: torch.randn(2, 5) * 50,
        lambda: torch.full((2, 5), math.nan),
        lambda: torch.full((2, 5), math.inf),
    ):
        noisy_r, noisy_v = torch.where(pad, fill(), r), torch.where(pad, fill(), v)
        adv2, ret2 = gae(noisy_r, noisy_v, m, gamma=0.9, lam=0.8)
        assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    # gamma = lam = 1, first sequence: returns-to-go [1, 1, 1] minus V -> [0.5, 0.6, 0.7]; returns = [1, 1, 1]
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    close(adv[0], [0.5, 0.6, 0.7, 0, 0])
    close(ret[0], [1.0, 1.0, 1.0, 0, 0])


def test_value_loss_and_explained_variance() -> None:
    """old 0, new [0.5, -0.1], returns [1, 1], clip 0.2: clipped values [0.2, -0.1].
    token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64 -> 0.32 (clipped won); token 1: (1.1)^2 / 2 = 0.605."""
    values, old = torch.tensor([[0.5, -0.1]]), torch.zeros(1, 2)
    returns, mask = torch.ones(1, 2), torch.ones(1, 2)
    loss, frac = clipped_value_loss(values, old, returns, mask, clip=0.2)
    close(loss, [[0.32, 0.605]])
    close(frac, 0.5)
    close(clipped_value_loss(values, old, returns, mask, clip=None)[0], [[0.125, 0.605]])
    # a masked token is 0 in the loss and out of the clip fraction: only token 0 (clipped) counts -> 1.0
    loss, frac = clipped_value_loss(values, old, returns, torch.tensor([[1.0, 0.0]]), clip=0.2)
    close(loss, [[0.32, 0.0]])
    close(frac, 1.0)
    r = torch.tensor([[1.0, 2.0, 3.0]])
    close(explained_variance(r, r, torch.ones(1, 3)), 1.0)
    # V = [1, 2, 2]: Var[R] = 2/3; R - V = [0, 0, 1], mean 1/3, Var = (1/9 + 1/9 + 4/9) / 3 = 2/9 -> 1 - 1/3
    close(explained_variance(torch.tensor([[1.0, 2.0, 2.0]]), r, torch.ones(1, 3)), 2 / 3)
    # the masked-out 4th token (V far off) does not count
    close(
        explained_variance(
            torch.tensor([[1.0, 2.0, 2.0, 50.0]]),
            torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
            torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        ),
        2 / 3,
    )
    close(explained_variance(torch.zeros(1, 3), r, torch.ones(1, 3)), 0.0)
    # constant returns: 0, never nan (ppo logs it every rollout)
    assert explained_variance(r, torch.ones(1, 3), torch.ones(1, 3)).item() == 0.0
    # the same from all-reduced token means: R = [1, 2, 3], V = [1, 2, 2] -> E = [0, 0, 1]
    # Var R = 14/3 - 4 = 2/3, Var E = 1/3 - 1/9 = 2/9 -> 1 - (2/9) / (2/3) = 2/3
    assert explained_variance_of_moments(2.0, 14 / 3, 1 / 3, 1 / 3) == pytest.approx(2 / 3)
    assert explained_variance_of_moments(1.0, 1.0, 0.5, 0.25) == 0.0  # Var R = 0
    assert explained_variance_of_moments(0.0, 0.0, 0.0, 0.0) == 0.0  # no tokens at all


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
    c.update(5.7, n_steps=100)  # error -0.05 -> x 0.95
    assert c.value == pytest.approx(0.102 * 0.98 * 1.1 * 0.95)
    assert c.value < 0.102 * 0.98 * 1.1
    d = AdaptiveKLController(1.0, target=None)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()
    # resumed: the same updates give bit-identical coefficients
    for kl in (7.0, 1.0, 6.2):
        c.update(kl, 37)
        d.update(kl, 37)
        assert d.value == c.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=6.0, horizon=0)
    with pytest.raises(ValueError):
        AdaptiveKLController(-0.1, target=6.0)
    fixed = AdaptiveKLController(0.05, target=None)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
