"""Memory said plainly (llmtune.engine.memory): the expected memory of a recipe, the measured peak, and a CUDA
out-of-memory error as one message with the levers (the trainer's handling of it: tests/integration/test_oom.py)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmtune.engine.memory import estimate_memory, out_of_memory_error, peak_line, peak_memory
from llmtune.recipe.load import validate_recipe
from tests.conftest import base_recipe


def _recipe(tmp_path, **train):
    r = base_recipe(tmp_path, train={"micro_batch_size": 8, "grad_accum": 2, **train})
    return validate_recipe(r)


def _model():
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return LlamaForCausalLM(cfg)


def test_estimate_counts_weights_gradients_optimizer_and_logits(tmp_path):
    """fp32, everything trained: gradients = weights (4 bytes each), AdamW = 2 x weights; the logits of one
    chunk: min(chunk positions, 8 x 128 tokens) x vocab x 4 bytes x 3; activations 8*128 tokens x 64 x 2
    layers x 34 x 2 (fp32 = twice the 16-bit bytes)."""
    model = _model()
    n = sum(p.numel() for p in model.parameters())
    est = estimate_memory(model, _recipe(tmp_path))
    assert est.weights == 4 * n and est.gradients == 4 * n and est.optimizer == 8 * n
    assert est.logits == 8 * 128 * 1000 * 4 * 3  # 1024 tokens < 33554 positions per chunk
    assert est.activations == 8 * 128 * 64 * 2 * 34 * 2
    ckpt = estimate_memory(model, _recipe(tmp_path, gradient_checkpointing=True))
    assert ckpt.activations < est.activations
    for p in model.model.parameters():  # only the head trained: gradients and optimizer shrink with it
        p.requires_grad_(False)
    frozen = estimate_memory(model, _recipe(tmp_path))
    head = model.lm_head.weight.numel()
    assert frozen.gradients == 4 * head and frozen.optimizer == 8 * head
    assert est.line().startswith("memory (expected, per process): weights 0.00 GB + gradients")


def test_peak_memory_on_cpu_is_the_resident_peak():
    peak = peak_memory(torch.device("cpu"))
    assert 0.01 < peak["peak_rss_gb"] < 1000  # this test process holds torch at least
    assert peak_line(peak).startswith("peak memory: ") and "resident (CPU)" in peak_line(peak)
    assert peak_line({"cuda_max_allocated_gb": 1.5, "cuda_max_reserved_gb": 2.0}) == (
        "peak memory: 1.50 GB allocated, 2.00 GB reserved (CUDA)"
    )


def test_out_of_memory_message_names_the_levers(tmp_path):
    e = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 79 GiB in use")
    msg = str(out_of_memory_error(e, 3, _recipe(tmp_path), "the newest checkpoint ... is kept"))
    first, fix = msg.split("\n")
    assert first == (
        "CUDA out of memory at step 3 (tried to allocate 2.00 GiB); training stopped (the newest checkpoint ... is kept)"
    )
    assert fix.startswith("  fix: ")
    for lever in (
        "train.micro_batch_size 8 -> 4 with train.grad_accum 2 -> 4",
        "train.gradient_checkpointing: true",
        "finetuning.method: qlora",
        "distributed.zero_stage 0 -> 1",
        "data.max_length 128 -> 64",
    ):
        assert lever in fix
    # levers already pulled are not offered again
    pulled = _recipe(tmp_path, micro_batch_size=1, gradient_checkpointing=True)
    fix = str(out_of_memory_error(e, 1, pulled, "x")).split("\n")[1]
    assert "micro_batch_size" not in fix and "gradient_checkpointing" not in fix and "data.max_length" in fix
