"""Policy-gradient maths for the online stages (grpo / rloo, ppo): pure torch, tensors in, tensors out.

Shapes: B sequences, T completion positions; masks are 1.0 where a token counts. Log-probs are per token
(``objectives.preference.token_logps``).
"""

from __future__ import annotations

import math

import torch

# --- advantages ---------------------------------------------------------------------------------------------


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)  # (G, K)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages. rewards (N,), consecutive rows of ``group_size`` belong to one prompt.

    A_i = r_i - mean(group), divided by std(group) + eps ("group"), by std(all) + eps ("batch"), or not at
    all ("none"; Dr. GRPO). std is the unbiased one, as TRL takes it.

    >>> group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, scale="none").tolist()
    [0.5, -0.5, 0.0, 0.0]
    """
    g = _groups(rewards, group_size)
    centred = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = g.std(dim=1, keepdim=True).expand_as(g).reshape(-1) if group_size > 1 else torch.zeros_like(centred)
        return centred / (std + eps)
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
        return centred / (std + eps)
    raise ValueError(f"unknown scale {scale!r}: group, batch or none")


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline: A_i = r_i - mean_{j != i} r_j = K / (K - 1) * (r_i - mean(group)).

    >>> rloo_advantages(torch.tensor([3.0, 0.0, 0.0]), 3).tolist()
    [3.0, -1.5, -1.5]
    """
    if group_size < 2:
        raise ValueError("rloo needs at least 2 completions per prompt")
    g = _groups(rewards, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(G,) True for groups whose rewards are all equal: their advantages are 0, so they teach nothing."""
    g = _groups(rewards, group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) == 0


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (all when mask is None); with shift_mean False
    the mean is added back (only the scale changes). Entries outside the mask come out as 0."""
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# --- KL and the policy objective -------------------------------------------------------------------------------


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence").

    With log_ratio = logp - ref_logp:  k1 = log_ratio;  k2 = log_ratio^2 / 2;
    k3 = exp(-log_ratio) - 1 + log_ratio  (unbiased and >= 0).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}: k1, k2 or k3")


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token. logp, old_logp (B, T); advantages (B,) or (B, T).

    ratio = exp(logp - old_logp);  loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A);
    dual clip c > 1 (Ye et al. 2020): for A < 0 the loss is at most -c * A.
    Returns the loss (B, T) and a (B, T) 0/1 float: 1 where the clipped term was taken (no gradient).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    adv = adv.to(logp.dtype)
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1 - epsilon, 1 + high) * adv
    loss = torch.maximum(unclipped, clipped)
    took_clip = (clipped > unclipped).to(logp.dtype)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError("dual_clip must be > 1")
        capped = torch.minimum(loss, -dual_clip * adv)
        negative = adv < 0
        took_clip = torch.where(negative & (capped < loss), torch.ones_like(took_clip), took_clip)
        loss = torch.where(negative, capped, loss)
    return loss, took_clip


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / max(sum(mask), 1), over everything or along dim."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, kind: str, max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, units) of a micro-batch; the engine divides the step's summed loss_sum by its summed units
    (over micro-batches and processes), so each kind is the same whatever the micro-batch split:

    - grpo: the mean over sequences of each sequence's token mean  (loss_sum = sum_i mean_i, units = B)
    - dr_grpo: token sum / (B * max_tokens)                        (loss_sum = sum / max_tokens, units = B)
    - dapo: the mean over every token of the step                  (loss_sum = sum, units = tokens)
    """
    m = mask.to(per_token.dtype)
    b = torch.tensor(float(per_token.shape[0]), dtype=torch.float64, device=per_token.device)
    if kind == "grpo":
        return masked_mean(per_token, m, dim=-1).sum(), b
    if kind == "dr_grpo":
        if not max_tokens:
            raise ValueError("dr_grpo needs max_tokens (the completion length budget)")
        return (per_token * m).sum() / max_tokens, b
    if kind == "dapo":
        return (per_token * m).sum(), m.sum().double()
    raise ValueError(f"unknown loss aggregation {kind!r}: grpo, dr_grpo or dapo")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits -> (B, T) entropy  H = logsumexp(z) - sum softmax(z) * z."""
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


# --- PPO pieces ------------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded completions. rewards, values, mask (B, T).

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1};
    returns = A + V. Values and rewards at masked positions never enter; outputs are 0 there.
    """
    m = mask.to(values.dtype)
    r, v = rewards * m, values * m
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        nxt_m = m[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(last)
        nxt_v = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(last)
        delta = r[:, t] + gamma * nxt_v * nxt_m - v[:, t]
        last = delta + gamma * lam * nxt_m * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + v) * m


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (V_clip - R)^2) per token, V_clip = V_old + clamp(V - V_old, -clip, clip);
    returns the (B, T) loss (0 outside the mask) and the share of masked tokens where the clipped term won."""
    m = mask.to(values.dtype)
    plain = (values - returns) ** 2
    if clip is None:
        return 0.5 * plain * m, torch.zeros((), dtype=values.dtype, device=values.device)
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * torch.maximum(plain, clipped) * m
    return loss, masked_mean((clipped > plain).to(values.dtype), m)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the masked tokens (nan when Var[R] is 0)."""
    m = mask.to(values.dtype)

    def var(x: torch.Tensor) -> torch.Tensor:
        mean = masked_mean(x, m)
        return masked_mean((x - mean) ** 2, m)

    v_r = var(returns)
    if v_r.item() == 0:
        return torch.tensor(math.nan)
    return 1 - var(returns - values) / v_r


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * n_steps / horizon). target None keeps the coefficient fixed."""

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = float(init_kl_coef), target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.target, self.horizon = float(d["value"]), d["target"], int(d["horizon"])
