"""train.kernels: liger. Triton kernels run on CUDA only, so on this CPU machine the tests check the refusal
(a clear message before anything loads) and the patching itself (in a child process: liger patches
transformers' modeling module, which would leak into later tests), not the kernels' numbers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from llmtune.errors import UserError
from llmtune.model.kernels import apply_kernels, kernels_problem


def test_none_is_always_fine() -> None:
    assert kernels_problem("none", cuda=False) is None
    assert apply_kernels(torch.nn.Linear(2, 2), "none") == []


def test_refused_without_a_gpu_with_the_fix() -> None:
    msg = kernels_problem("liger", cuda=False)
    assert msg is not None and "NVIDIA GPU" in msg and "remove train.kernels" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_apply_refuses_on_cpu() -> None:
    with pytest.raises(UserError, match="NVIDIA GPU"):
        apply_kernels(torch.nn.Linear(2, 2), "liger")


def test_not_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a)
    )
    msg = kernels_problem("liger", cuda=True)
    assert msg is not None and "llmtune[liger]" in msg


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_patch_swaps_norms_and_mlp_and_refuses_unknown_architectures() -> None:
    code = textwrap.dedent(
        """
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
        from llmtune.errors import UserError
        from llmtune.model.kernels import patch_liger

        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128)
        m = LlamaForCausalLM(cfg)
        assert m.model.norm._get_name() == "LlamaRMSNorm"
        parts = patch_liger(m)
        assert set(parts) == {"rope", "rms_norm", "swiglu"}, parts
        assert m.model.norm._get_name() == "LigerRMSNorm"
        for layer in m.model.layers:
            assert layer.mlp._get_name() == "LigerSwiGLUMLP"
            assert layer.input_layernorm._get_name() == "LigerRMSNorm"
        try:
            patch_liger(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)))
        except UserError as e:
            assert "model type 'gpt2'" in str(e) and "llama" in str(e)
        else:
            raise AssertionError("gpt2 was not refused")
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_validate_refuses_liger_on_a_machine_without_a_gpu() -> None:
    from pathlib import Path

    from llmtune.commands.preflight import check_kernels_here, clearly_no_gpu
    from llmtune.errors import RecipeError
    from llmtune.recipe import load_recipe

    root = Path(__file__).resolve().parents[2]
    recipe = load_recipe(root / "recipes" / "quickstart.yaml", ["train.kernels=liger"])
    assert recipe.train.kernels == "liger"
    check_kernels_here(load_recipe(root / "recipes" / "quickstart.yaml", []))  # none: always fine
    if not clearly_no_gpu():
        pytest.skip("this machine may have a GPU")
    with pytest.raises(RecipeError, match=r"remove train\.kernels"):
        check_kernels_here(recipe)
