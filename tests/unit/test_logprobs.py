"""Chunked token log-probs / entropy / LM loss from hidden states (llmtune.objectives.logprobs).

Each is checked against the plain computation on full float32 logits (objectives.lm.lm_loss_sum,
objectives.preference.token_logps, objectives.rl.entropy_from_logits): values and the gradients w.r.t. the
hidden states and the head's weight, for chunk sizes that divide the number of targets and ones that do not,
with IGNORE_INDEX labels in the middle and at the ends. A hand-worked case pins the shift.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmtune.objectives.lm import lm_loss_sum
from llmtune.objectives.logprobs import chunk_positions, lm_loss_sum_from_hidden, token_logps_from_hidden
from llmtune.objectives.preference import token_logps
from llmtune.objectives.rl import entropy_from_logits

B, T, H, V = 3, 11, 8, 37
CHUNKS = [None, 1, 4, 7, 16, 1000]  # 7 and 4 divide none of the target counts below


def _case(seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).float().requires_grad_()
    head = torch.nn.Linear(H, V, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, 5] = -100  # a hole
    labels[2, -3:] = -100  # padding
    return hidden, head, labels


def _grads(out: torch.Tensor, hidden: torch.Tensor, head: torch.nn.Module) -> list[torch.Tensor]:
    params = [hidden, *head.parameters()]
    return list(torch.autograd.grad(out, params))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("bias", [False, True])
def test_loss_equals_full_logits(chunk, bias):
    """The loss through a plain nn.Linear head: the fused pass (gradients computed with the loss)."""
    hidden, head, labels = _case(1, bias)
    ref, n_ref = lm_loss_sum(head(hidden), labels)
    got, n = lm_loss_sum_from_hidden(hidden, labels, head, chunk)
    assert "FusedLinearCrossEntropy" in type(got.grad_fn).__name__  # a plain linear head: gradients in one pass
    assert n.item() == n_ref.item() == (labels[:, 1:] != -100).sum().item()
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-6)
    for a, b in zip(_grads(got, hidden, head), _grads(ref, hidden, head), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_and_entropy_equal_full_logits(chunk, temperature):
    hidden, head, labels = _case(2)
    logits = head(hidden) / temperature
    ref_lp, ref_mask = token_logps(logits, labels)
    ref_ent = entropy_from_logits(logits[:, :-1]) * ref_mask
    lp, mask, ent = token_logps_from_hidden(hidden, labels, head, chunk, temperature, with_entropy=True)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(lp, ref_lp, atol=1e-5, rtol=1e-6)
    assert torch.allclose(ent, ref_ent, atol=1e-5, rtol=1e-6)
    # a loss that weights every position differently, through both outputs (as ppo's entropy bonus does)
    w = torch.linspace(-1, 2, lp.numel()).reshape(lp.shape)
    got = (lp * w).sum() - 0.3 * (ent * w).sum()
    ref = (ref_lp * w).sum() - 0.3 * (ref_ent * w).sum()
    for a, b in zip(_grads(got, hidden, head), _grads(ref, hidden, head), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_loss_through_a_head_function_recomputes_chunks():
    """Any other head (a function, a peft-wrapped module): the chunks are recomputed in backward."""
    hidden, head, labels = _case(6, bias=True)
    ref, _ = lm_loss_sum(head(hidden), labels)
    got, _ = lm_loss_sum_from_hidden(hidden, labels, lambda h: head(h), 5)
    assert "FusedLinearCrossEntropy" not in type(got.grad_fn).__name__
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-6)
    for a, b in zip(_grads(got, hidden, head), _grads(ref, hidden, head), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_weight_function_head_and_tied_weight():
    """A head given as a function of a weight (the tied input embedding): the weight's gradient is the sum of
    its uses as embedding and as head, as with full logits."""
    hidden, _, labels = _case(3)
    emb = torch.nn.Embedding(V, H)
    x = hidden + emb(labels.clamp(min=0))  # the weight used twice
    ref, _ = lm_loss_sum(x @ emb.weight.T, labels)
    got, _ = lm_loss_sum_from_hidden(x, labels, lambda h: h @ emb.weight.T, chunk_size=5)
    assert torch.allclose(got, ref, atol=1e-5)
    (ga,) = torch.autograd.grad(got, [emb.weight], retain_graph=True)
    (gb,) = torch.autograd.grad(ref, [emb.weight])
    assert torch.allclose(ga, gb, atol=1e-5)


def test_hand_worked_shift():
    """Two tokens, head = identity on 2-d states: h_0 = [0, ln 3] -> p = [1/4, 3/4]; h_1 = [ln 3, 0] ->
    p = [3/4, 1/4]. Labels [x, 1, 0]: log p = [ln 3/4, ln 3/4]; h_2 scores nothing. Entropy of [1/4, 3/4]:
    -(1/4 ln 1/4 + 3/4 ln 3/4) ~ 0.562335 at both positions."""
    ln3 = math.log(3.0)
    hidden = torch.tensor([[[0.0, ln3], [ln3, 0.0], [0.0, 0.0]]])
    lp, mask, ent = token_logps_from_hidden(hidden, torch.tensor([[-100, 1, 0]]), lambda h: h, 1, with_entropy=True)
    assert lp[0].tolist() == pytest.approx([math.log(0.75)] * 2, abs=1e-6)
    assert mask[0].tolist() == [1.0, 1.0]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert ent[0].tolist() == pytest.approx([h, h], abs=1e-6)


def test_nothing_to_learn_gives_zero_with_a_graph():
    hidden, head, labels = _case(4)
    labels[:] = -100
    loss, n = lm_loss_sum_from_hidden(hidden, labels, head, 4)
    assert n.item() == 0 and loss.item() == 0.0
    loss.backward()  # still differentiable: a micro-batch with no target does not break the step
    assert hidden.grad is not None and hidden.grad.abs().sum().item() == 0.0
    lp, mask, _ = token_logps_from_hidden(hidden.detach(), labels, head, 4)
    assert lp.shape == (B, T - 1) and mask.sum().item() == 0


def test_no_grad_path_equals():
    hidden, head, labels = _case(5)
    with torch.no_grad():
        ref, _ = token_logps(head(hidden), labels)
        lp, _, _ = token_logps_from_hidden(hidden, labels, head, 3)
    assert torch.allclose(lp, ref, atol=1e-5)


def test_chunk_positions():
    assert chunk_positions(128_256) == 65
    assert chunk_positions(128_256, cuda=True) == 261
    assert chunk_positions(10, chunk_elements=5) == 1


# --- on real (tiny, random) transformers models, plain and peft-wrapped -------------------------------------------


def _llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    return ids, labels


def _check_model(model, adapter_switching: bool = False, expect_split: bool = True):
    from llmtune.objectives.logprobs import hidden_states_as_logits

    ids, labels = _batch()
    ref, _ = lm_loss_sum(model(input_ids=ids).logits, labels)
    trained = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref, trained)
    with hidden_states_as_logits(model, adapter_switching) as head:
        out = model(input_ids=ids).logits
    assert (head is not None) == expect_split
    assert out.shape[-1] == (16 if expect_split else 97)  # hidden states, or (fallback) the logits
    assert model(input_ids=ids).logits.shape[-1] == 97  # the head is back after the block
    got, _ = lm_loss_sum_from_hidden(out, labels, head, chunk_size=4)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(got, trained), ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_full_and_tied(tied):
    _check_model(_llama(tied))


@pytest.mark.parametrize("lm_head", ["none", "lora", "modules_to_save"])
def test_llama_peft(lm_head):
    """LoRA on the attention; the head plain, LoRA-wrapped, or a trained copy (modules_to_save): the head module
    (whatever peft made of it) runs per chunk."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj"] + (["lm_head"] if lm_head == "lora" else [])
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, modules_to_save=["lm_head"] if lm_head == "modules_to_save" else None
    )
    model = get_peft_model(_llama(), cfg)
    for n, p in model.named_parameters():  # LoRA B starts at 0: give it values so its gradient path matters
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    _check_model(model)
    # one peft model switching adapters (ppo's shared actor-critic): a peft-wrapped head is not split off
    _check_model(model, adapter_switching=True, expect_split=lm_head == "none")


def test_softcapped_head_falls_back():
    """Gemma-2 caps its logits after the head: the head is not split off; the logits come out as usual."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=5.0,
    )  # fmt: skip
    _check_model(Gemma2ForCausalLM(cfg), expect_split=False)


def test_split_reaches_a_model_held_by_a_wrapper():
    """A DeepSpeed engine holds the model as its submodule `module` (and forwards attribute reads to it): the
    swap must happen on the model itself, not as a new attribute of the wrapper."""
    from llmtune.objectives.logprobs import hidden_states_as_logits

    model = _llama()
    wrapper = torch.nn.Module()
    wrapper.module = model
    head = model.lm_head
    with hidden_states_as_logits(wrapper) as got:
        assert got is head and model.lm_head is not head
        assert wrapper.module(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 16)
    assert model.lm_head is head and "lm_head" not in wrapper._modules


def test_fused_loss_scales_its_gradient_once_and_refuses_a_second_backward():
    """The fused head loss scales its stored gradients in place (no copy of a head-sized gradient): the
    upstream gradient (here 3) is applied exactly once, and a second backward through the same graph is
    refused with a message instead of returning doubly scaled gradients."""
    hidden, head, labels = _case(4)
    loss, _ = lm_loss_sum_from_hidden(hidden, labels, head, 3)
    (3.0 * loss).backward(retain_graph=True)
    got = head.weight.grad.clone()
    head.weight.grad = None
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    logits = head(ref_hidden[:, :-1]).float()
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    (3.0 * ref).backward()
    assert torch.allclose(got, head.weight.grad, atol=1e-5)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        (3.0 * loss).backward()
