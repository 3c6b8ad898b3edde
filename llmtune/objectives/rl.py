"""Policy-gradient maths for the online stages (grpo / rloo, ppo): pure torch, tensors in, tensors out.

Shapes: N rewards (one per completion), G = N / K groups of K completions of one prompt; B sequences,
T completion positions; masks are 1.0 where a token counts. Log-probs are per token
(``objectives.preference.token_logps``).

Advantages (one number per completion):
    group (GRPO)       A_i = (r_i - mean_g) / (std_g + eps)                   (Shao et al. 2024; std unbiased)
    batch / none       A_i = (r_i - mean_g) / (std_all + eps)  or  r_i - mean_g   (Dr. GRPO, Liu et al. 2025)
    rloo               A_i = r_i - mean_{j != i} r_j = K / (K - 1) (r_i - mean_g) (Ahmadian et al. 2024)
KL(pi || ref) per token, log_ratio = log pi - log ref (Schulman 2020):
    k1 = log_ratio     k2 = log_ratio^2 / 2     k3 = exp(-log_ratio) - 1 + log_ratio  (>= 0)
Policy loss per token (Schulman et al. 2017; asymmetric clip: DAPO, Yu et al. 2025; dual clip: Ye et al. 2020):
    ratio = exp(log pi - log pi_old);  l = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A);  A < 0: min(l, -c A)
Aggregation over tokens (returned as loss_sum and units; the engine divides step sums):
    grpo    mean_i (sum_t l_it / |o_i|)     dr_grpo  sum_it l_it / (B L_max)     dapo  sum_it l_it / sum_i |o_i|
PPO (Schulman et al. 2016, Ziegler et al. 2019):
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  R_t = A_t + V_t
    value loss 0.5 max((V - R)^2, (V_clip - R)^2);  adaptive KL beta <- beta (1 + clip(KL / target - 1, ±0.2) n / H)
"""

from __future__ import annotations

import torch

# --- advantages ---------------------------------------------------------------------------------------------


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards -> (G, K) view, K = group_size; ValueError unless N is a multiple of K >= 1."""
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    return r.reshape(-1, group_size)  # (G, K)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages. rewards (N,), consecutive rows of ``group_size`` belong to one prompt. Returns (N,).

    A_i = r_i - mean(group), divided by std(group) + eps ("group"), by std(all) + eps ("batch"), or not at
    all ("none"; Dr. GRPO). std is the unbiased one, as TRL takes it (0 for a single value).

    >>> group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, scale="none").tolist()
    [0.5, -0.5, 0.0, 0.0]
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown scale {scale!r}: group, batch or none")
    g = _groups(rewards, group_size)  # (G, K)
    # A_i = r_i - mean_g
    centred = (g - g.mean(dim=1, keepdim=True)).reshape(-1)  # (N,)
    if scale == "none":
        return centred
    if scale == "group":
        # std_g, unbiased: sqrt(sum_k (r_k - mean_g)^2 / (K - 1)), repeated over the group's K rows
        std = g.std(dim=1, keepdim=True).expand_as(g).reshape(-1) if group_size > 1 else torch.zeros_like(centred)
    else:
        # std over all N rewards, unbiased
        std = g.reshape(-1).std() if g.numel() > 1 else centred.new_zeros(())
    # A_i = (r_i - mean_g) / (std + eps)
    return centred / (std + eps)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline. rewards (N,) in groups of K = group_size >= 2 -> (N,).

    A_i = r_i - mean_{j != i} r_j = K / (K - 1) * (r_i - mean(group)).

    >>> rloo_advantages(torch.tensor([3.0, 0.0, 0.0]), 3).tolist()
    [3.0, -1.5, -1.5]
    """
    if group_size < 2:
        raise ValueError("rloo needs at least 2 completions per prompt")
    g = _groups(rewards, group_size)  # (G, K)
    # mean of the others: (sum_g - r_i) / (K - 1)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards -> (G,) bool, True for groups whose rewards are all equal: their advantages are 0, so
    they teach nothing (DAPO's dynamic sampling drops them)."""
    g = _groups(rewards, group_size)  # (G, K)
    # all equal  <=>  max_g == min_g
    return (g.max(dim=1).values - g.min(dim=1).values) == 0


def best_of_n(rewards: torch.Tensor, threshold: float | None = None) -> dict[str, torch.Tensor]:
    """Best-of-N selection (rejection sampling) over (G, K) rewards, K samples of each of G prompts.

    Returns (G,) tensors: ``best`` and ``worst`` (the first index of the highest / lowest reward), ``spread``
    (True when best > worst: the samples disagree, so the best beat something), ``clears`` (best >= threshold;
    all True without one) and ``keep`` = spread & clears: the groups whose best completion is worth learning.
    A group without spread has nothing better to learn (all right: nothing to fix; all wrong: only failures).

        >>> s = best_of_n(torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.2, 0.5]]), threshold=1.0)
        >>> s["keep"].tolist(), s["spread"].tolist(), s["clears"].tolist()
        ([True, False, False], [True, False, True], [True, False, False])
    """
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"best_of_n takes (G, K) rewards with K >= 1, got shape {tuple(rewards.shape)}")
    best, worst = rewards.argmax(dim=1), rewards.argmin(dim=1)  # the first index of equal values
    hi, lo = rewards.gather(1, best[:, None])[:, 0], rewards.gather(1, worst[:, None])[:, 0]
    spread = hi > lo
    clears = torch.ones_like(spread) if threshold is None else hi >= threshold
    return {"best": best, "worst": worst, "spread": spread, "clears": clears, "keep": spread & clears}


def pick_groups_with_spread(zero_std: list[bool], need: int) -> list[int]:
    """Dynamic sampling (DAPO, Yu et al. 2025): from the groups sampled so far (in the order drawn; True = no
    reward spread), the indices of `need` groups to train on: groups with spread first, in order, then, when
    the extra draws ran out, groups without spread (advantage 0: they add no gradient) to keep the batch
    shape. Fewer than `need` groups sampled is an error of the caller.

        >>> pick_groups_with_spread([True, False, True, False, False], 2)
        [1, 3]
        >>> pick_groups_with_spread([True, False, True], 2)
        [1, 0]
    """
    if need > len(zero_std):
        raise ValueError(f"{len(zero_std)} groups sampled, {need} needed")
    useful = [i for i, z in enumerate(zero_std) if not z]
    filler = [i for i, z in enumerate(zero_std) if z]
    return (useful + filler)[:need]


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (all when mask is None); x, mask: any same shape.

    mean and var are the (population) moments of the masked entries, so the output has mean 0 and std 1
    there. With shift_mean False the mean is added back (only the scale changes). Entries outside the mask
    come out as 0.
    """
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    # mean = sum(m x) / sum(m);  var = sum(m (x - mean)^2) / sum(m)
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# --- KL and the policy objective -------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence").

    logp, ref_logp: (B, T) (any same shape) -> same shape. With log_ratio = logp - ref_logp:
    k1 = log_ratio (unbiased, can be < 0);  k2 = log_ratio^2 / 2;  k3 = exp(-log_ratio) - 1 + log_ratio
    (unbiased and >= 0, since e^y >= 1 + y).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}: k1, k2 or k3")
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(-log_ratio) - 1 + log_ratio


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token. logp, old_logp (B, T); advantages (B,) (broadcast over T) or (B, T).

    ratio = exp(logp - old_logp);  loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
    (eps_high defaults to eps); dual clip c > 1 (Ye et al. 2020): for A < 0 the loss is min(loss, -c * A).
    Returns the loss (B, T) and a (B, T) 0/1 float: 1 where a clipped term was taken (its gradient is 0).
    """
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    adv = adv.to(logp.dtype)
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    # -min(ratio A, clip(ratio) A) = max(-ratio A, -clip(ratio) A)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1 - epsilon, 1 + high) * adv
    loss = torch.maximum(unclipped, clipped)
    took_clip = (clipped > unclipped).to(logp.dtype)
    if dual_clip is not None:
        # A < 0: loss = min(loss, -c A), a constant where it binds
        capped = torch.minimum(loss, -dual_clip * adv)
        negative = (adv < 0).expand_as(loss)
        took_clip = torch.where(negative & (capped < loss), torch.ones_like(took_clip), took_clip)
        loss = torch.where(negative, capped, loss)
    return loss, took_clip


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / max(sum(mask), 1), over everything (scalar) or along dim (x, mask: same shape)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


LOSS_AGGREGATIONS = ("grpo", "dr_grpo", "dapo")


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, kind: str, max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, units) of a micro-batch. per_token, mask: (B, T). Both are scalars; units is float64.

    The engine divides the step's summed loss_sum by its summed units (over micro-batches and processes),
    so each kind is the same whatever the micro-batch split:

    - grpo: the mean over sequences of each sequence's token mean  (loss_sum = sum_i mean_i, units = B)
    - dr_grpo: token sum / (B * max_tokens)                        (loss_sum = sum / max_tokens, units = B)
    - dapo: the mean over every token of the step                  (loss_sum = sum, units = tokens)

    A sequence with no token adds 0 to loss_sum (and, for grpo and dr_grpo, 1 to units).
    """
    if kind not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {kind!r}: grpo, dr_grpo or dapo")
    m = mask.to(per_token.dtype)
    b = torch.tensor(float(per_token.shape[0]), dtype=torch.float64, device=per_token.device)
    if kind == "grpo":
        # sum_i (sum_t m_it l_it / max(sum_t m_it, 1))
        return masked_mean(per_token, m, dim=-1).sum(), b
    if kind == "dr_grpo":
        if not max_tokens:
            raise ValueError("dr_grpo needs max_tokens (the completion length budget)")
        # sum_it m_it l_it / L_max
        return (per_token * m).sum() / max_tokens, b
    # dapo: sum_it m_it l_it, units sum_it m_it
    return (per_token * m).sum(), m.sum().double()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits -> (B, T) entropy  H = -sum_v p_v log p_v,  log p = log_softmax(z) = z - logsumexp(z).

    Computed in float32 from log_softmax (which subtracts the max first), so large logits lose no precision
    (logsumexp(z) - sum p z would cancel); logits of -inf (banned tokens) have p = 0 and add nothing.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    p = logp.exp()
    # p_v log p_v, with 0 * (-inf) taken as 0
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(logp))
    return -plogp.sum(-1)


# --- PPO pieces ------------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded completions. rewards, values, mask (B, T).

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1};
    returns = A + V. Returns (advantages, returns), each (B, T). Values and rewards at masked positions
    never enter (not even as nan or inf); outputs are 0 there.
    """
    keep = mask.bool()
    m = keep.to(values.dtype)
    r = torch.where(keep, rewards.to(values.dtype), torch.zeros_like(values))
    v = torch.where(keep, values, torch.zeros_like(values))
    n = v.shape[1]
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])  # A_{t+1}, 0 past the end
    for t in reversed(range(n)):
        nxt_m = m[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        nxt_v = v[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        # delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        delta = r[:, t] + gamma * nxt_v * nxt_m - v[:, t]
        # A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}
        last = delta + gamma * lam * nxt_m * last
        adv[:, t] = last
    adv = adv * m
    # R_t = A_t + V_t
    return adv, (adv + v) * m


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss. values, old_values, returns, mask: (B, T).

    V_clip = V_old + clamp(V - V_old, -clip, clip);  loss = 0.5 * max((V - R)^2, (V_clip - R)^2)
    (0.5 * (V - R)^2 when clip is None). Returns the (B, T) loss (0 outside the mask) and a scalar: the
    share of masked tokens where the clipped term was the larger (0 when clip is None).
    """
    m = mask.to(values.dtype)
    plain = (values - returns) ** 2
    if clip is None:
        return 0.5 * plain * m, values.new_zeros(())
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * torch.maximum(plain, clipped) * m
    return loss, masked_mean((clipped > plain).to(values.dtype), m)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the masked tokens. values, returns, mask: (B, T) -> scalar
    (0 when Var[R] is 0): 1 is a perfect critic, 0 one no better than a constant."""
    m = mask.to(values.dtype)

    def var(x: torch.Tensor) -> torch.Tensor:
        # Var[x] = sum(m (x - mean)^2) / sum(m)
        mean = masked_mean(x, m)
        return masked_mean((x - mean) ** 2, m)

    v_r = var(returns)
    if v_r.item() <= 1e-12:  # constant returns: nothing to explain (0, never nan)
        return values.new_tensor(0.0)
    return 1 - var(returns - values) / v_r


def explained_variance_of_moments(mean_r: float, mean_r2: float, mean_e: float, mean_e2: float) -> float:
    """explained_variance from token means of R, R^2, E = R - V and E^2 (what processes sum and all-reduce):
    1 - (E[E^2] - E[E]^2) / (E[R^2] - E[R]^2); 0.0 when the returns have no variance (never nan)."""
    var_r = mean_r2 - mean_r**2
    if not var_r > 1e-12:
        return 0.0
    return 1 - (mean_e2 - mean_e**2) / var_r


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * n_steps / horizon). target None keeps the coefficient fixed."""

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int = 10000) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target is not None and target <= 0:
            raise ValueError(f"target KL must be > 0 (or None for a fixed coefficient), got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """One adjustment after n_steps samples (or steps) whose mean KL was current_kl."""
        if self.target is None:
            return
        # e = clip(KL / target - 1, -0.2, 0.2)
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        # beta <- beta * (1 + e * n / H)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        target = d["target"]
        self.value, self.horizon = float(d["value"]), int(d["horizon"])
        self.target = None if target is None else float(target)
