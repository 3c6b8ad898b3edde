"""Token log-probs, entropy and the LM loss from the final hidden states, without the full (B, T, V) logits.

The LM head is applied to a chunk of positions at a time, and only to the positions that have a target
(labels shifted, not logits): each chunk's logits exist in float32 only while that chunk is computed, and
in backward they are recomputed chunk by chunk (activation checkpointing), so neither the forward nor the
backward pass holds more than one chunk's (N_c, V) logits. The head is any callable (N, H) -> (N, V): the
model's lm_head module (plain, LoRA-wrapped or a modules_to_save copy, with or without a bias) or a
function of a weight, e.g. ``lambda h: h @ weight.T``. The LM loss through a plain ``nn.Linear`` head
(lm_loss_sum_from_hidden) needs no recompute: a sum's upstream gradient is one number, so each chunk's
gradients are computed with its loss and only scaled in backward (as liger-kernel's fused linear cross
entropy does).

  log p(y_t | x_<t) = z_t[y_t] - logsumexp_v z_t[v]       (gather first, then logsumexp: no (N, V) log_softmax)
  H_t = logsumexp(z_t) - sum_v p_v z_t[v]                  (computed as -sum_v p_v log p_v, from log_softmax)

with z = head(h) / temperature in float32. The values equal those of the full-logits computation (to float
rounding), and so do the gradients w.r.t. the hidden states and the head's weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Logits per chunk. On CPU, memory is what a chunk costs and the per-chunk overhead is nothing next to its
# matmul: 8M floats (32 MB in float32; 65 positions of a 128k vocabulary). On a GPU the chunk's 128 MB is
# nothing next to the card while every chunk costs a handful of kernel launches: 32M floats (261 positions).
CHUNK_ELEMENTS = 1 << 23
CHUNK_ELEMENTS_CUDA = 1 << 25

Head = Callable[[torch.Tensor], torch.Tensor]


def chunk_positions(vocab_size: int, chunk_elements: int | None = None, cuda: bool = False) -> int:
    """Positions per chunk so that a chunk's logits hold about chunk_elements numbers (None: the default for
    the device, CHUNK_ELEMENTS or, with cuda, CHUNK_ELEMENTS_CUDA).

    >>> chunk_positions(128_256), chunk_positions(128_256, cuda=True)
    (65, 261)
    """
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS_CUDA if cuda else CHUNK_ELEMENTS
    return max(1, chunk_elements // max(1, vocab_size))


def _chunk_stats(
    h: torch.Tensor, targets: torch.Tensor, head: Head, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """h: (N, H), targets: (N,) -> log p of the targets (N,) and the entropy (N,) (zeros unless with_entropy)."""
    z = head(h).float()  # (N, V): the only full-vocabulary tensor, one chunk's worth
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # (N,)
    if not with_entropy:
        return picked, torch.zeros_like(picked)
    logp = z - lse.unsqueeze(-1)  # (N, V)
    p = logp.exp()
    # p_v log p_v, with 0 * (-inf) taken as 0 (banned tokens)
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(logp))
    return picked, -plogp.sum(-1)


def _selected_stats(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Head,
    chunk_size: int | None,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-target stats: (flat indices into (B*(T-1),), log-probs (N,), entropies (N,), mask (B, T-1) bool)."""
    d = hidden.shape[-1]
    targets = labels[:, 1:]  # (B, T-1): hidden[:, t] predicts labels[:, t + 1]
    mask = targets != IGNORE_INDEX
    idx = mask.reshape(-1).nonzero().squeeze(-1)  # (N,) positions that have a target
    h = hidden[:, :-1].reshape(-1, d).index_select(0, idx)  # (N, H)
    y = targets.reshape(-1).index_select(0, idx)  # (N,)
    n = idx.numel()
    if n == 0:
        zero = hidden.sum() * 0.0  # keeps the graph (and its dtype) for a batch with nothing to learn
        empty = zero.float().reshape(1).expand(0)
        return idx, empty, empty, mask
    if chunk_size is None:  # about CHUNK_ELEMENTS(_CUDA) logits per chunk
        with torch.no_grad():
            chunk_size = chunk_positions(head(h[:1]).shape[-1], cuda=h.is_cuda)
    step = chunk_size
    recompute = torch.is_grad_enabled() and (h.requires_grad or any(True for _ in _grad_params(head)))
    logps, ents = [], []
    for s in range(0, n, step):
        hc, yc = h[s : s + step], y[s : s + step]
        if recompute:  # backward recomputes this chunk's logits instead of keeping them
            lp, ent = checkpoint(_chunk_stats, hc, yc, head, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_stats(hc, yc, head, temperature, with_entropy)
        logps.append(lp)
        ents.append(ent)
    return idx, torch.cat(logps), torch.cat(ents), mask


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _grad_params(head: Head):
    params = head.parameters() if isinstance(head, torch.nn.Module) else ()
    return (p for p in params if p.requires_grad)


def token_logps_from_hidden(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Head | None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-prob of every label token, the mask of learned tokens and (with_entropy) the entropy per position.

    hidden: (B, T, H) final hidden states for input positions 0..T-1; labels: (B, T) aligned with the inputs
    (IGNORE_INDEX where nothing is learned), so head(hidden[:, t]) predicts labels[:, t + 1]. Returns (B, T-1)
    float32 log-probs, a (B, T-1) float mask and (B, T-1) entropies (or None); all are 0 where the mask is 0.
    head: None when hidden already holds the logits (B, T, V) (a model whose head cannot be split off): they
    are then upcast to float32 one chunk at a time. chunk_size: positions per chunk (None: about CHUNK_ELEMENTS
    logits per chunk).

    >>> w = torch.zeros(4, 2)                                   # every logit 0: uniform over 4 tokens
    >>> lp, m, _ = token_logps_from_hidden(torch.ones(1, 3, 2), torch.tensor([[-100, 1, 2]]), lambda h: h @ w.T)
    >>> [round(x, 4) for x in lp[0].tolist()], m[0].tolist()
    ([-1.3863, -1.3863], [1.0, 1.0])
    """
    idx, lp, ent, mask = _selected_stats(
        hidden, labels, _identity if head is None else head, chunk_size, temperature, with_entropy
    )
    shape = mask.shape
    out = lp.new_zeros(mask.numel()).index_put((idx,), lp).reshape(shape)
    entropy = ent.new_zeros(mask.numel()).index_put((idx,), ent).reshape(shape) if with_entropy else None
    return out, mask.float(), entropy


def lm_loss_sum_from_hidden(
    hidden: torch.Tensor, labels: torch.Tensor, head: Head | None, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy (float32) and the number of targets, as objectives.lm.lm_loss_sum
    computes from the logits:  loss = -sum_t log p(x_{t+1} | x_{<=t}) over learned t+1.

    >>> w = torch.zeros(4, 2)
    >>> loss, n = lm_loss_sum_from_hidden(torch.ones(1, 3, 2), torch.tensor([[1, 2, -100]]), lambda h: h @ w.T)
    >>> round(loss.item() / n.item(), 4)                          # log 4
    1.3863
    """
    n = torch.tensor(int((labels[:, 1:] != IGNORE_INDEX).sum()), device=hidden.device)
    if type(head) is torch.nn.Linear and torch.is_grad_enabled() and n.item() > 0:
        return _fused_linear_loss(hidden, labels, head, chunk_size), n
    idx, lp, _, _ = _selected_stats(hidden, labels, _identity if head is None else head, chunk_size, 1.0, False)
    return -lp.sum(), torch.tensor(idx.numel(), device=hidden.device)


def _fused_linear_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear, chunk_size: int | None):
    d = hidden.shape[-1]
    targets = labels[:, 1:].reshape(-1)
    idx = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    h = hidden[:, :-1].reshape(-1, d).index_select(0, idx)  # (N, H)
    y = targets.index_select(0, idx)
    step = chunk_size or chunk_positions(head.out_features, cuda=h.is_cuda)
    return _FusedLinearCrossEntropy.apply(h, head.weight, head.bias, y, step)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_n CE(h_n W^T + b, y_n) for a plain linear head, one chunk of rows at a time, with the gradients
    computed in the same pass (the loss is a sum, so its upstream gradient is one number that backward only
    multiplies in): no chunk is recomputed, and no (N, V) tensor outlives its chunk.

      dL/dz = softmax(z) - onehot(y)     (z: float32 logits of a row)
      dL/dh = dL/dz W,  dL/dW = sum_n dL/dz_n^T h_n,  dL/db = sum_n dL/dz_n

    The gradient of z is cast to the head's dtype before the matmuls, as autograd does through the
    `.float()` of the plain computation."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, step):
        need_h, need_w = h.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], step):
            hc, yc = h[s : s + step], y[s : s + step]
            z = torch.nn.functional.linear(hc, weight, bias).float()  # (N_c, V)
            lse = torch.logsumexp(z, dim=-1)
            loss += (lse - z.gather(-1, yc.unsqueeze(-1)).squeeze(-1)).sum()
            if not (need_h or need_w or need_b):
                continue
            dz = z.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place of the logits
            dz[torch.arange(len(yc), device=dz.device), yc] -= 1.0
            dz = dz.to(weight.dtype)
            if need_h:
                grad_h[s : s + step] = dz @ weight
            if need_w:
                grad_w += (dz.T @ hc).float()
            if need_b:
                grad_b += dz.float().sum(0)
        # kept on ctx rather than saved: backward scales them in place (a head's float32 gradient is as large
        # as the head, 0.5 GB for a 128k x 1024 one; a copy would double it at the peak of the step)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("the fused LM-head loss was backpropagated twice (retain_graph): compute it again")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h.mul_(g.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(g).to(w_dtype) if grad_w is not None else None
        gb = grad_b.mul_(g).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None


# --- the hidden states of a causal LM, and its head -------------------------------------------------------------
# Duck-typed (no llmtune import): a transformers causal LM, possibly inside a peft model, a DeepSpeed engine
# (.module) or an actor-critic (.policy).


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    m = model
    for _ in range(8):
        subs = m._modules
        if isinstance(subs.get("module"), torch.nn.Module):  # a DeepSpeed engine (its getattr reaches inside)
            m = subs["module"]
        elif isinstance(subs.get("policy"), torch.nn.Module) and "value_head" in subs:  # an actor-critic
            m = subs["policy"]
        elif hasattr(type(m), "get_base_model"):  # peft
            m = m.get_base_model()
        else:
            break
    return m


_PLAIN_FORWARD: dict[type, bool] = {}


def _plain_forward(cls: type) -> bool:
    """Whether cls.forward computes its logits as `logits = self.lm_head(...)` and nothing else (no softcap,
    scale or upcast after it): only then are the head's outputs on the hidden states the model's logits."""
    if cls not in _PLAIN_FORWARD:
        import inspect
        import re

        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        lines = [
            ln.strip()
            for ln in src.splitlines()
            if re.match(r"\s*logits\s*=[^=]", ln) and not ln.rstrip().endswith(",")
        ]
        _PLAIN_FORWARD[cls] = len(lines) == 1 and lines[0].startswith("logits = self.lm_head(")
    return _PLAIN_FORWARD[cls]


class _PassThrough(torch.nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def lm_head_of(model: torch.nn.Module, adapter_switching: bool = False) -> torch.nn.Module | None:
    """The LM head module to apply per chunk, or None where the chunked path cannot be exact: a forward that
    changes the logits after the head (softcap, scale), a head partitioned by ZeRO-3 (its weight lives only
    inside the module's own call), or (adapter_switching: an actor-critic sharing one peft model between
    adapters) a peft-wrapped head whose active adapter would differ between forward and backward."""
    lm = _causal_lm(model)
    if not hasattr(lm, "get_output_embeddings") or getattr(lm, "lm_head", None) is None:
        return None
    head = lm.lm_head
    if not _plain_forward(type(lm)):
        return None
    if any(hasattr(p, "ds_id") for p in head.parameters()):
        return None
    if adapter_switching and type(head).__module__.startswith("peft"):
        return None
    return head


class hidden_states_as_logits:
    """Within the block, the model's `.logits` output holds the final hidden states (B, T, H) instead of the
    logits: its lm_head is swapped for a pass-through, so the (B, T, V) logits are never computed. `head` is
    the swapped-out module (apply it with token_logps_from_hidden), None where lm_head_of gives None (then
    nothing is swapped and `.logits` are the logits)."""

    def __init__(self, model: torch.nn.Module, adapter_switching: bool = False) -> None:
        self.head = lm_head_of(model, adapter_switching)
        self.lm = _causal_lm(model)

    def __enter__(self) -> torch.nn.Module | None:
        if self.head is not None:
            self.lm.lm_head = _PassThrough()
        return self.head

    def __exit__(self, *exc: object) -> None:
        if self.head is not None:
            self.lm.lm_head = self.head
