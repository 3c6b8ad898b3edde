"""merge-lora and weighted averaging, in process on the tiny model with adapters built here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from llmtune.errors import UserError
from llmtune.model.merge import average_models, merge_lora, probe_inputs
from tests.conftest import TINY_MODEL

peft = pytest.importorskip("peft")


def _lora(tmp: Path, name: str, task: str = "CAUSAL_LM", seed: int = 0) -> Path:
    """A LoRA adapter with non-zero B (init_lora_weights=False), saved like a training output."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    if task == "SEQ_CLS":
        base = AutoModelForSequenceClassification.from_pretrained(TINY_MODEL, num_labels=1)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                              modules_to_save=["score"], init_lora_weights=False)  # fmt: skip
    else:
        base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    if task == "SEQ_CLS":
        with torch.no_grad():
            model.base_model.model.score.modules_to_save["default"].weight.normal_(0, 0.5)
    out = tmp / name
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(out)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=probe_inputs(1024, seed=5)).logits.float()


def test_merge_lora_writes_a_standalone_model_equal_to_base_plus_adapter(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    adapter = _lora(tmp_path, "lora")
    r = merge_lora(str(TINY_MODEL), str(adapter), tmp_path / "merged")
    assert r.kind == "causal-lm" and r.max_logit_diff < 1e-4
    files = set(r.files)
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert any(f.endswith(".safetensors") for f in files) and not any(f.startswith("adapter") for f in files)
    # weights readable like every other file (safetensors alone leaves them 0600), as the umask allows
    expected = 0o666 & ~_umask()
    assert all((tmp_path / "merged" / f).stat().st_mode & 0o777 == expected for f in files), expected
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), adapter)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    assert (_logits(merged) - _logits(ref)).abs().max() < 1e-4
    assert (_logits(merged) - _logits(base)).abs().max() > 1e-2  # the adapter changed something

    with pytest.raises(UserError, match="not empty"):
        merge_lora(str(TINY_MODEL), str(adapter), tmp_path / "merged")
    r2 = merge_lora(None, str(adapter), tmp_path / "merged", overwrite=True, dtype="bf16")  # base from config
    assert r2.dtype == "bf16" and r2.max_logit_diff < r2.tolerance
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


def test_merge_lora_small_shards(tmp_path: Path) -> None:
    adapter = _lora(tmp_path, "lora")
    r = merge_lora(str(TINY_MODEL), str(adapter), tmp_path / "merged", max_shard_size="200KB")
    assert "model.safetensors.index.json" in r.files and sum(f.endswith(".safetensors") for f in r.files) > 1


def test_reward_adapter_keeps_its_score_head(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    adapter = _lora(tmp_path, "rm", task="SEQ_CLS")
    r = merge_lora(str(TINY_MODEL), str(adapter), tmp_path / "merged")
    assert r.kind == "reward-model" and r.max_logit_diff < 1e-4
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.num_labels == 1
    ref = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(TINY_MODEL, num_labels=1), adapter
    )
    assert merged.config.pad_token_id is not None  # set from the tokenizer: batches work
    ref.config.pad_token_id = merged.config.pad_token_id
    x = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5)


def test_merge_lora_errors(tmp_path: Path) -> None:
    adapter = _lora(tmp_path, "lora")
    with pytest.raises(UserError, match="does not exist"):
        merge_lora(str(TINY_MODEL), str(tmp_path / "nope"), tmp_path / "o1")
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter_model"):
        merge_lora(str(TINY_MODEL), str(broken), tmp_path / "o2")
    with pytest.raises(UserError, match="no adapter_config"):
        merge_lora(str(TINY_MODEL), str(TINY_MODEL), tmp_path / "o3")
    # a base of another shape
    other = tmp_path / "other"
    shutil.copytree(TINY_MODEL, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="intermediate_size"):
        merge_lora(str(other), str(adapter), tmp_path / "o4")
    with pytest.raises(UserError, match="is one of the inputs"):
        merge_lora(str(TINY_MODEL), str(adapter), adapter, overwrite=True)


def test_average_full_models_and_adapters(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    a, b = _lora(tmp_path, "a", seed=1), _lora(tmp_path, "b", seed=2)
    merge_lora(str(TINY_MODEL), str(a), tmp_path / "ma")
    merge_lora(str(TINY_MODEL), str(b), tmp_path / "mb")
    # full checkpoints: 0.25 * A + 0.75 * B, per tensor (weights given as 1 : 3, normalised)
    r = average_models([str(tmp_path / "ma"), str(tmp_path / "mb")], [1, 3], tmp_path / "soup")
    assert r.weights == [0.25, 0.75]
    sa, sb = load_file(tmp_path / "ma" / "model.safetensors"), load_file(tmp_path / "mb" / "model.safetensors")
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    for k in sa:
        assert torch.allclose(soup[k], 0.25 * sa[k] + 0.75 * sb[k], atol=1e-6), k
    # adapters: merged into the base first, so the same soup comes out
    r2 = average_models([str(a), str(b)], [1, 3], tmp_path / "soup2")
    assert r2.weights == [0.25, 0.75]
    m1, m2 = (AutoModelForCausalLM.from_pretrained(tmp_path / d) for d in ("soup", "soup2"))
    assert (_logits(m1) - _logits(m2)).abs().max() < 1e-4
    with pytest.raises(UserError, match="weights"):
        average_models([str(a), str(b)], [1.0], tmp_path / "soup3")
    with pytest.raises(UserError, match="two or more"):
        average_models([str(a)], None, tmp_path / "soup3")


def test_average_weights_must_be_finite_and_non_negative(tmp_path: Path) -> None:
    from llmtune.model.merge import check_weights

    models = ["a", "b"]  # nothing is read: the weights are checked before any input
    for bad in ([float("nan"), 1.0], [float("inf"), 1.0], [1.0, float("-inf")]):
        with pytest.raises(UserError, match="not a finite number"):
            average_models(models, bad, tmp_path / "soup")
    with pytest.raises(UserError, match="negative"):
        average_models(models, [-1.0, 2.0], tmp_path / "soup")
    with pytest.raises(UserError, match="sum to 0"):
        average_models(models, [0.0, 0.0], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    assert check_weights(models, [1, 3]) == [0.25, 0.75]
    assert check_weights(models, None) == [0.5, 0.5]
    assert check_weights(models, [2.0, 0.0]) == [1.0, 0.0]
    assert check_weights(models, [1e308, 1e308]) == [0.5, 0.5]  # a finite sum would overflow: no NaN


def test_merge_lora_tolerance_and_missing_base(tmp_path: Path) -> None:
    adapter = _lora(tmp_path, "lora")
    for tol in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="finite number above 0"):
            merge_lora(str(TINY_MODEL), str(adapter), tmp_path / "o1", tolerance=tol)
    assert not (tmp_path / "o1").exists()
    with pytest.raises(UserError, match="does not exist") as e:
        merge_lora(str(tmp_path / "no" / "base"), str(adapter), tmp_path / "o2")
    assert "repo" not in str(e.value).lower()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some/relative/base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="relative to the directory training ran in") as e:
        merge_lora(None, str(adapter), tmp_path / "o3")
    assert "--base" in str(e.value)
