"""Preference objectives, as pure torch functions of log-probs / scores and masks (never of models).

Reward-model losses (scores r from a scalar head):
    pairwise (Bradley-Terry)   l = -log sigmoid(r_c - r_r)              (Ouyang et al. 2022)
    with a margin m            l = -log sigmoid(r_c - r_r - m)          (Touvron et al. 2023, Llama 2)
    ranked (K responses)       all K(K-1)/2 pairs i better than j:  l_ij = -log sigmoid(r_i - r_j)
    pointwise                  l = (r - score)^2
    reward centering           c * (r_c + r_r)^2                        (Eisenstein et al. 2023)

Direct preference optimisation (log-probs are sums over the response tokens, pi = policy, ref = reference):
    h = (log pi(y_c) - log pi(y_r)) - (log ref(y_c) - log ref(y_r))
    sigmoid (DPO)              l = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)   (e: label smoothing, cDPO)
    robust                     l = [-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)] / (1 - 2e)
    ipo                        l = (h - 1 / (2 beta))^2
    hinge                      l = max(0, 1 - beta h)
    simpo (reference-free)     l = -log sigmoid(beta (log pi(y_c) / |y_c| - log pi(y_r) / |y_r|) - gamma)
    kto (unpaired)             desirable:   l = w_d (1 - sigmoid(beta (log pi(y)/ref(y) - z0)))
                               undesirable: l = w_u (1 - sigmoid(beta (z0 - log pi(y)/ref(y))))
Implicit rewards: beta (log pi(y) - log ref(y)) (simpo: beta log pi(y) / |y|).

Every loss returns per-example values (no reduction): the trainer sums them and divides by the number of
pairs in the whole optimizer step, so the result does not depend on how rows are split over micro-batches,
accumulation steps and processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge")


# --- log-probs -----------------------------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every label token under the logits, and the mask of learned tokens.

    logits: (B, T, V) for input positions 0..T-1; labels: (B, T) aligned with the inputs (IGNORE_INDEX where
    nothing is learned), so logits[:, t] predicts labels[:, t + 1]. Returns (B, T-1) log-probs and (B, T-1)
    float mask; log-probs are 0 where the mask is 0.

    >>> lp, m = token_logps(torch.zeros(1, 3, 4), torch.tensor([[-100, 1, 2]]))   # uniform over 4 tokens
    >>> [round(x, 4) for x in lp[0].tolist()], m[0].tolist()
    ([-1.3863, -1.3863], [1.0, 1.0])
    """
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)  # (B, T-1, V)
    picked = torch.gather(logp, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked * mask, mask.float()


def sequence_logps(token_logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the token log-probs of each sequence and its number of tokens.

    token_logp, mask: (B, T). Returns (B,) sums  sum_t mask_t * logp_t  and (B,) lengths  sum_t mask_t.

    >>> sequence_logps(torch.tensor([[-1.0, -2.0, -5.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    (tensor([-3.]), tensor([2.]))
    """
    return (token_logp * mask).sum(-1), mask.sum(-1)


# --- reward-model losses -----------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Pairwise reward loss: -log sigmoid(r_c - r_r - m) per pair.

    chosen, rejected: (B,) rewards of the preferred and the other response; margin: (B,) or None (0).
    Returns (B,) losses.

    >>> bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))   # log(1 + e^-1)
    tensor([0.3133])
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def ranked_pairs(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs of a ranking: for every row, each response i is preferred to every later response j > i.

    scores: (B, K) rewards in preference order (best first); mask: (B, K) bool, False for the padding of rows
    with fewer than K responses. Returns (better, worse, valid), each (B, K, K): better[b, i, j] = scores[b, i],
    worse[b, i, j] = scores[b, j], valid[b, i, j] = i < j and both responses exist.
    """
    k = scores.size(1)
    upper = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(diagonal=1)  # i < j
    valid = upper.unsqueeze(0) & mask.unsqueeze(2) & mask.unsqueeze(1)
    better = scores.unsqueeze(2).expand(-1, k, k)
    worse = scores.unsqueeze(1).expand(-1, k, k)
    return better, worse, valid


def ranked_loss(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry over all K(K-1)/2 pairs of each ranking.

    scores: (B, K) in preference order; mask: (B, K) bool. Returns (B,) per-row sums of the pair losses and
    (B,) numbers of pairs, so that a mean over pairs is sum(losses) / sum(pairs).

    >>> ranked_loss(torch.tensor([[2.0, 1.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool))  # 2 log(1+e^-1) + log(1+e^-2)
    (tensor([0.7535]), tensor([3.]))
    """
    better, worse, valid = ranked_pairs(scores, mask)
    losses = -F.logsigmoid(better - worse) * valid
    return losses.sum(dim=(1, 2)), valid.sum(dim=(1, 2)).to(scores.dtype)


def pointwise_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Regression of the reward on a given score: (r - s)^2 per response. scores, targets: (B,) -> (B,).

    >>> pointwise_loss(torch.tensor([1.0, 0.5]), torch.tensor([3.0, 0.5]))
    tensor([4., 0.])
    """
    return (scores - targets) ** 2


def reward_centering(chosen: torch.Tensor, rejected: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Auxiliary term that keeps rewards centred on zero: c * (r_c + r_r)^2 per pair. (B,), (B,) -> (B,).

    >>> reward_centering(torch.tensor([1.0]), torch.tensor([2.0]), 0.01)
    tensor([0.0900])
    """
    return coefficient * (chosen + rejected) ** 2


# --- direct preference optimisation ------------------------------------------------------------------------------


@dataclass
class PreferenceLoss:
    """Per-example losses and the implicit rewards of the two responses, all (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """The DPO family on sequence log-probs (B,) of the policy and the reference.

    h = (pi_c - pi_r) - (ref_c - ref_r);
      sigmoid: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)   (Rafailov et al. 2023; e > 0: cDPO)
      robust:  [-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)] / (1 - 2e)   (Chowdhury et al. 2024)
      ipo:     (h - 1 / (2 beta))^2                                     (Azar et al. 2023)
      hinge:   max(0, 1 - beta h)                                        (SLiC, Zhao et al. 2023)
    Rewards: beta (pi - ref) per response (detached). With the policy equal to the reference h = 0 and the
    sigmoid loss is log 2.

    >>> out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.5)
    >>> round(out.losses.item(), 4), out.chosen_rewards.item(), out.rejected_rewards.item()   # log(1 + e^-0.5)
    (0.4741, 0.25, -0.25)
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
            1 - 2 * label_smoothing
        )
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * (policy_chosen - ref_chosen)).detach(),
        rejected_rewards=(beta * (policy_rejected - ref_rejected)).detach(),
    )


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin gamma.

    policy_*: (B,) summed log-probs; *_lengths: (B,) response token counts.
      d = log pi(y_c) / |y_c| - log pi(y_r) / |y_r|
      l = -(1 - e) log sigmoid(beta d - gamma) - e log sigmoid(-(beta d - gamma))
    Rewards: beta log pi(y) / |y| (detached).

    >>> out = simpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([2.0]), torch.tensor([3.0]), 2.0, 0.5)
    >>> round(out.losses.item(), 4)   # d = -1 - (-2) = 1; -log sigmoid(2 * 1 - 0.5) = log(1 + e^-1.5)
    0.2014
    """
    chosen = policy_chosen / chosen_lengths.clamp(min=1)
    rejected = policy_rejected / rejected_lengths.clamp(min=1)
    z = beta * (chosen - rejected) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024) on unpaired completions.

    policy, ref: (B,) summed log-probs of each completion; desirable: (B,) bool; kl: () the reference point
    z0 (an estimate of KL(pi || ref), detached, >= 0). With r = log pi(y) - log ref(y):
      desirable:   l = w_d (1 - sigmoid(beta (r - z0)))
      undesirable: l = w_u (1 - sigmoid(beta (z0 - r)))
    Returns (B,) losses and (B,) rewards beta r (detached).

    >>> loss, rew = kto_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -2.0]),
    ...                      torch.tensor([True, False]), torch.tensor(0.0), 1.0)
    >>> [round(x, 4) for x in loss.tolist()], rew.tolist()   # 1 - sigmoid(1), 1 - sigmoid(-1)
    ([0.2689, 0.7311], [1.0, 1.0])
    """
    r = policy - ref
    kl = kl.detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable, good, bad), (beta * r).detach()


def kto_reference_point(policy: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """z0 for KTO: the batch mean of log pi(y) - log ref(y), clamped at 0 and detached. (B,), (B,) -> ().

    >>> kto_reference_point(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]))   # mean(1, -1) = 0
    tensor(0.)
    """
    return (policy - ref).mean().clamp(min=0).detach()
