"""Memory said plainly (llmtune.engine.memory): the expected memory of a recipe, the measured peak, and a CUDA
out-of-memory error as one message with the levers; the trainer's handling of it in a real tiny run."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmtune.engine.memory import estimate_memory, out_of_memory_error, peak_line, peak_memory
from llmtune.recipe.load import validate_recipe
from tests.conftest import ROOT, base_recipe, cli_command, write_recipe


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


OOM_AT_STEP_3 = """
import sys, torch
from llmtune.stages.lm import LanguageModelStep
calls, step = 0, LanguageModelStep.step
def failing_step(self, model, batch):  # the third training micro-batch runs out of memory
    global calls
    calls += torch.is_grad_enabled()
    if calls == 3:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has 79 GiB in use")
    return step(self, model, batch)
LanguageModelStep.step = failing_step
from llmtune.cli import main
sys.argv = ["llmtune", *sys.argv[1:]]
main()
"""


def test_trainer_turns_out_of_memory_into_one_message_and_keeps_the_checkpoint(tmp_path):
    """A real tiny sft run whose third step raises torch.OutOfMemoryError from inside the stage's step: exit 1,
    one message with the levers, no traceback, the checkpoint of step 2 kept, run.json failed with its peak."""
    recipe = base_recipe(tmp_path, train={"max_steps": 5, "save_every": 2, "micro_batch_size": 2, "log_every": 1})
    path = write_recipe(tmp_path, recipe)
    script = tmp_path / "oom.py"
    script.write_text(OOM_AT_STEP_3)
    _, env = cli_command("train", str(path))
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, str(script), "train", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = proc.stderr + proc.stdout
    assert "error: CUDA out of memory at step 3 (tried to allocate 20.00 GiB)" in err
    assert "fix: lower the memory a step needs: train.micro_batch_size 2 -> 1" in err
    assert "step-00000002" in err and "is kept" in err
    out = tmp_path / "out"
    assert (out / "checkpoints" / "step-00000002").is_dir()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["peak_memory"]["peak_rss_gb"] > 0
