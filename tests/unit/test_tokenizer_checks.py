"""Tokenizer vocabulary checks: compare_vocabularies, the run.json fingerprint, and where llmtune applies them
(load_tokenizer, merge-lora / merge, eval), on the tiny model's tokenizer and a copy of the same size with two
ids swapped."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from llmtune.errors import RecipeError, UserError
from llmtune.manifest import TokenizerRecord
from llmtune.model.tokenizer import (
    check_tokenizer_record,
    check_tokenizers_agree,
    compare_vocabularies,
    load_tokenizer,
    own_tokenizer,
    saved_tokenizer_record,
    tokenizer_record,
    vocab_by_id,
)
from llmtune.recipe.schema import ModelConfig
from tests.conftest import TINY_MODEL
from tests.swapped_vocab import SWAP, model_with_swapped_tokenizer, swap_tokenizer_files


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def swapped_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return swap_tokenizer_files(tmp_path_factory.mktemp("swapped"))


@pytest.fixture()
def base():
    return _tok(TINY_MODEL)


@pytest.fixture()
def swapped(swapped_dir: Path):
    return _tok(swapped_dir)


def test_the_swapped_tokenizer_has_the_same_size_and_other_ids(base, swapped) -> None:
    assert len(base) == len(swapped) == 1024
    a, b = SWAP
    assert swapped.convert_tokens_to_ids(a) == base.convert_tokens_to_ids(b)
    assert base("a cat")["input_ids"] != swapped("a cat")["input_ids"]
    assert base.decode(swapped("a cat")["input_ids"]) == "e cat"  # the other tokenizer's ids read as other words


def test_vocab_by_id_lists_every_token_in_id_order(base) -> None:
    tokens = vocab_by_id(base)
    assert len(tokens) == len(base)
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens == base.convert_ids_to_tokens(list(range(len(base))))


def test_compare_vocabularies_accepts_the_same_vocabulary_and_appended_tokens(base) -> None:
    compare_vocabularies(base, "a", _tok(TINY_MODEL), "b")
    longer = _tok(TINY_MODEL)
    longer.add_special_tokens({"pad_token": "<|pad|>"})
    assert len(longer) == len(base) + 1
    compare_vocabularies(base, "a", longer, "b")
    compare_vocabularies(longer, "b", base, "a")


def test_compare_vocabularies_names_both_sources_the_count_examples_and_the_fix(base, swapped) -> None:
    with pytest.raises(RecipeError) as info:
        compare_vocabularies(swapped, "model.tokenizer /x/tok", base, "model.path /x/model")
    msg = str(info.value)
    ids = sorted(base.convert_tokens_to_ids(list(SWAP)))
    assert "tokenizer" in msg and "vocabulary" in msg
    assert "model.tokenizer /x/tok" in msg and "model.path /x/model" in msg
    assert f"2 of the {len(base)} token ids" in msg
    assert f"id {ids[0]}: 'e' vs 'a'" in msg and f"id {ids[1]}: 'a' vs 'e'" in msg
    assert "fix:" in msg and "model.tokenizer unset" in msg
    assert isinstance(info.value, UserError) and info.value.exit_code == 2


def test_tokenizer_record_round_trip(base, swapped) -> None:
    record = tokenizer_record(base)
    assert record.size == len(base) and len(record.vocab_sha256) == 64
    assert TokenizerRecord.parse(json.loads(json.dumps(asdict(record)))) == record  # through run.json and back
    assert tokenizer_record(_tok(TINY_MODEL)) == record  # deterministic
    check_tokenizer_record(base, record, "runs/sft")
    longer = _tok(TINY_MODEL)
    longer.add_special_tokens({"pad_token": "<|pad|>"})
    check_tokenizer_record(longer, record, "runs/sft")  # a pad token appended still matches
    assert tokenizer_record(swapped).vocab_sha256 != record.vocab_sha256


def test_check_tokenizer_record_refuses_another_vocabulary_and_a_smaller_tokenizer(base, swapped) -> None:
    with pytest.raises(RecipeError, match=r"tokenizer mismatch: the new tokenizer has a different vocabulary") as e:
        check_tokenizer_record(swapped, tokenizer_record(base), "runs/sft", tok_label="the new tokenizer")
    assert "runs/sft" in str(e.value) and "fix:" in str(e.value)
    longer = _tok(TINY_MODEL)
    longer.add_special_tokens({"pad_token": "<|pad|>"})
    with pytest.raises(RecipeError, match=re.escape("1024 tokens, fewer than the 1025")):
        check_tokenizer_record(base, tokenizer_record(longer), "runs/sft")


def test_own_tokenizer_is_none_where_there_is_none(tmp_path: Path) -> None:
    assert own_tokenizer(str(TINY_MODEL)) is not None
    assert own_tokenizer(str(tmp_path)) is None  # a directory without tokenizer files
    assert own_tokenizer(str(tmp_path / "missing")) is None
    assert own_tokenizer(None) is None
    assert own_tokenizer("nobody-here/no-such-model-xyz") is None  # a hub id that cannot be loaded (offline)


def test_saved_tokenizer_record_tolerates_missing_and_broken_run_json(tmp_path: Path, base) -> None:
    assert saved_tokenizer_record(str(tmp_path)) is None
    (tmp_path / "run.json").write_text("{not json")
    assert saved_tokenizer_record(str(tmp_path)) is None
    (tmp_path / "run.json").write_text(json.dumps({"status": "done"}))
    assert saved_tokenizer_record(str(tmp_path)) is None
    (tmp_path / "run.json").write_text(json.dumps(["a list"]))
    assert saved_tokenizer_record(str(tmp_path)) is None
    (tmp_path / "run.json").write_text(json.dumps({"tokenizer": {"size": "many"}}))
    assert saved_tokenizer_record(str(tmp_path)) is None
    record = tokenizer_record(base)
    (tmp_path / "run.json").write_text(json.dumps({"status": "done", "tokenizer": asdict(record)}))
    assert saved_tokenizer_record(str(tmp_path)) == record


# ---------------------------------------------------------------------------------------------- load_tokenizer


def _output_dir(tmp_path: Path, record: TokenizerRecord | None) -> Path:
    """A copy of the tiny model standing for an llmtune output, its run.json holding `record`."""
    out = tmp_path / "out"
    shutil.copytree(TINY_MODEL, out)
    manifest = {"stage": "sft", "status": "done", **({"tokenizer": asdict(record)} if record is not None else {})}
    (out / "run.json").write_text(json.dumps(manifest))
    return out


def test_load_tokenizer_refuses_a_run_whose_record_differs_from_its_tokenizer_files(tmp_path: Path, swapped) -> None:
    out = _output_dir(tmp_path, tokenizer_record(swapped))  # the run trained with the swapped vocabulary
    with pytest.raises(RecipeError) as e:
        load_tokenizer(ModelConfig(path=str(out)))
    msg = str(e.value)
    assert f"the tokenizer saved in {out}" in msg and "different vocabulary" in msg and f"model.path {out}" in msg
    assert "fix:" in msg


def test_load_tokenizer_checks_a_model_tokenizer_override_against_the_record(
    tmp_path: Path, base, swapped_dir: Path
) -> None:
    out = _output_dir(tmp_path, tokenizer_record(base))
    assert len(load_tokenizer(ModelConfig(path=str(out)))) == len(base)
    assert load_tokenizer(ModelConfig(path=str(out), tokenizer=str(TINY_MODEL))) is not None
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).unlink()  # no tokenizer beside the model: only the record tells
    with pytest.raises(RecipeError, match=re.escape(f"model.tokenizer {swapped_dir} has a different vocabulary")):
        load_tokenizer(ModelConfig(path=str(out), tokenizer=str(swapped_dir)))


def test_load_tokenizer_tolerates_run_json_without_a_record(tmp_path: Path) -> None:
    out = _output_dir(tmp_path, None)
    assert load_tokenizer(ModelConfig(path=str(out))) is not None
    (out / "run.json").write_text("garbage")
    assert load_tokenizer(ModelConfig(path=str(out))) is not None


def test_load_tokenizer_compares_model_tokenizer_with_the_models_own(swapped_dir: Path) -> None:
    assert load_tokenizer(ModelConfig(path=str(TINY_MODEL), tokenizer=str(TINY_MODEL))) is not None
    with pytest.raises(RecipeError) as e:
        load_tokenizer(ModelConfig(path=str(TINY_MODEL), tokenizer=str(swapped_dir)))
    msg = str(e.value)
    assert f"model.tokenizer {swapped_dir}" in msg and f"model.path {TINY_MODEL}" in msg
    assert "2 of the 1024 token ids" in msg


def test_check_tokenizers_agree(tmp_path: Path, swapped_dir: Path, base) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    check_tokenizers_agree([(str(TINY_MODEL), "a"), (None, "b"), (str(empty), "c")])
    with pytest.raises(RecipeError, match=re.escape(f"--adapter {swapped_dir} differs from that of --base")):
        check_tokenizers_agree([(str(swapped_dir), "--adapter"), (str(TINY_MODEL), "--base")])
    with pytest.raises(RecipeError, match=re.escape("the policy differs from that of dpo.reference")):
        check_tokenizers_agree([(str(swapped_dir), "dpo.reference")], loaded=(base, "the policy"))
    # a model directory without tokenizer files but with a record: the record is checked
    (empty / "run.json").write_text(json.dumps({"tokenizer": asdict(tokenizer_record(base))}))
    check_tokenizers_agree([(str(TINY_MODEL), "a"), (str(empty), "c")])
    with pytest.raises(
        RecipeError, match=re.escape(f"the tokenizer of a {swapped_dir} has a different vocabulary from the ")
    ):
        check_tokenizers_agree([(str(swapped_dir), "a"), (str(empty), "c")])


# --------------------------------------------------------------------------------------------- merge and eval


def _lora(tmp: Path, name: str) -> Path:
    """A LoRA adapter saved like a training output, with the tiny model's tokenizer."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(TINY_MODEL), cfg)
    out = tmp / name
    model.save_pretrained(out)
    _tok(TINY_MODEL).save_pretrained(out)
    return out


def test_merge_lora_and_merge_refuse_an_adapter_trained_with_another_tokenizer(tmp_path: Path) -> None:
    from llmtune.model.merge import average_models, merge_lora

    adapter = _lora(tmp_path, "lora")
    swap_tokenizer_files(adapter)
    with pytest.raises(RecipeError, match=re.escape(f"--adapter {adapter} differs from that of --base {TINY_MODEL}")):
        merge_lora(str(TINY_MODEL), str(adapter), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()  # refused before any loading or writing

    other = model_with_swapped_tokenizer(tmp_path / "other")
    with pytest.raises(RecipeError, match=re.escape(f"--model {TINY_MODEL} differs from that of --model {other}")):
        average_models([str(TINY_MODEL), str(other)], None, tmp_path / "soup")
    with pytest.raises(RecipeError, match=re.escape("the adapters' base")):  # the adapter's own base disagrees with it
        average_models([str(adapter), str(other)], None, tmp_path / "soup", base=str(TINY_MODEL))
    assert not (tmp_path / "soup").exists()


def test_eval_refuses_an_adapter_or_reference_with_another_tokenizer(tmp_path: Path) -> None:
    from llmtune.model.resolve import check_reference_tokenizer, load_causal_lm

    adapter = _lora(tmp_path, "lora")
    other = model_with_swapped_tokenizer(tmp_path / "other")
    check_reference_tokenizer(str(TINY_MODEL), str(adapter), str(TINY_MODEL))
    with pytest.raises(RecipeError, match=re.escape(f"--reference {other}")):
        check_reference_tokenizer(str(TINY_MODEL), str(adapter), str(other))
    swap_tokenizer_files(adapter)
    with pytest.raises(RecipeError, match=re.escape(f"the adapter {adapter} differs from that of the base model")):
        load_causal_lm(str(TINY_MODEL), str(adapter), torch.float32, torch.device("cpu"), "--model")
