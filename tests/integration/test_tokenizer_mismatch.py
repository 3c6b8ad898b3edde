"""A stage, merge or eval whose input model was trained with another tokenizer fails fast, through the real CLI:
exit 2, a message naming the tokenizers and the fix, no traceback, and nothing trained. The other tokenizer has
the tiny model's size (1024 tokens) and two ids swapped, which a size check cannot see."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tests.conftest import ROOT, TINY_MODEL, assert_refused, base_recipe, run_cli, write_recipe
from tests.swapped_vocab import model_with_swapped_tokenizer, swap_tokenizer_files

PAIRS = ROOT / "recipes" / "quickstart" / "pairs.jsonl"


def _refused(proc, *phrases: str) -> str:
    """A clean refusal that is about the tokenizers' vocabularies."""
    return assert_refused(proc, "tokenizer", "vocabular", *phrases)


def _not_trained(out: Path) -> None:
    assert not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()
    assert not any((out / f).exists() for f in ("adapter_model.safetensors", "model.safetensors"))


def test_train_refuses_a_model_tokenizer_with_another_vocabulary(tmp_path: Path) -> None:
    tok = swap_tokenizer_files(tmp_path / "tok")
    recipe = base_recipe(tmp_path, model={"path": str(TINY_MODEL), "tokenizer": str(tok)}, train={"max_steps": 1})
    start = time.monotonic()
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    msg = _refused(proc, f"model.tokenizer {tok}", str(TINY_MODEL), "2 of the 1024 token ids", "model.tokenizer unset")
    assert "id " in msg and " vs " in msg
    _not_trained(Path(recipe["output_dir"]))
    assert time.monotonic() - start < 60


def test_train_with_a_tokenizer_of_the_same_vocabulary_still_trains(tmp_path: Path) -> None:
    """model.tokenizer set to another directory holding the model's own vocabulary: compared, and accepted."""
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_MODEL / f, tok / f)
    recipe = base_recipe(tmp_path, model={"path": str(TINY_MODEL), "tokenizer": str(tok)}, train={"max_steps": 1})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (Path(recipe["output_dir"]) / "adapter_model.safetensors").is_file()


def _dpo_recipe(tmp_path: Path, reference: Path) -> dict:
    return base_recipe(
        tmp_path,
        stage="dpo",
        data={"train": [{"path": str(PAIRS), "max_samples": 8}], "max_length": 64},
        dpo={"beta": 0.1, "reference": str(reference)},
        train={"max_steps": 1, "micro_batch_size": 4},
    )


def test_dpo_refuses_a_reference_trained_with_another_tokenizer(tmp_path: Path) -> None:
    ref = model_with_swapped_tokenizer(tmp_path / "ref")
    recipe = _dpo_recipe(tmp_path, ref)
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    msg = _refused(proc, f"the policy (model.path {TINY_MODEL})", f"dpo.reference {ref}")
    assert "2 of the 1024 token ids" in msg and "dpo.reference" in msg.split("fix:")[1]
    _not_trained(Path(recipe["output_dir"]))


def test_merge_lora_refuses_an_adapter_whose_tokenizer_differs_from_the_base(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, train={"max_steps": 1, "micro_batch_size": 2})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    adapter = Path(recipe["output_dir"])
    saved = (adapter / "tokenizer.json").read_bytes()
    swap_tokenizer_files(adapter)  # the adapter now carries another tokenizer than its base
    out = tmp_path / "merged"
    proc = run_cli("merge-lora", "--base", str(TINY_MODEL), "--adapter", str(adapter), "--out", str(out))
    _refused(proc, str(adapter))
    assert not out.exists()

    # the adapter as trained, merged into a base of the same size with the swapped tokenizer
    (adapter / "tokenizer.json").write_bytes(saved)
    other = model_with_swapped_tokenizer(tmp_path / "other")
    proc = run_cli("merge-lora", "--base", str(other), "--adapter", str(adapter), "--out", str(out))
    _refused(proc, f"--adapter {adapter}", f"--base {other}")
    assert not out.exists()


def test_merge_and_eval_refuse_models_with_other_tokenizers(tmp_path: Path) -> None:
    other = model_with_swapped_tokenizer(tmp_path / "other")
    out = tmp_path / "soup"
    proc = run_cli("merge", "--model", str(TINY_MODEL), "--model", str(other), "--out", str(out))
    _refused(proc, f"--model {TINY_MODEL}", f"--model {other}")
    assert not out.exists()

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:4]))
    proc = run_cli(
        "eval", "--model", str(TINY_MODEL), "--reference", str(other), "--data", str(data), "--task", "preference"
    )
    _refused(proc, f"--reference {other}")


def test_an_llmtune_output_whose_tokenizer_files_were_replaced_is_refused(tmp_path: Path) -> None:
    """run.json records the vocabulary a run trained with; a next stage reading that directory checks it."""
    import json

    first = base_recipe(tmp_path, finetuning={"method": "full"}, train={"max_steps": 1})
    proc = run_cli("train", str(write_recipe(tmp_path, first, "first.yaml")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(first["output_dir"])
    record = json.loads((out / "run.json").read_text())["tokenizer"]
    assert record["size"] == 1024 and len(record["vocab_sha256"]) == 64

    swapped = swap_tokenizer_files(tmp_path / "swapped", src=out)
    shutil.copy(swapped / "tokenizer.json", out / "tokenizer.json")  # the output's tokenizer, another vocabulary
    second = base_recipe(tmp_path, output_dir=str(tmp_path / "second"), model={"path": str(out)})
    proc = run_cli("train", str(write_recipe(tmp_path, second, "second.yaml")))
    _refused(proc, f"model.path {out}", "run.json")
    _not_trained(tmp_path / "second")
