"""What `llmtune validate` checks so that train does not refuse it after loading (issue 15): a local model
directory's config.json, weights and tokenizer files, the precision against this machine, and the first rows
of each data source (unreadable lines, and the keys of an explicit format:). No torch, no weights read.

The refusals run through the real CLI (exit 2, `error:` and `fix:` lines, no traceback); the variations run
check_paths in-process, which is what validate (and the start of train) calls.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import llmtune.commands.data_sample as data_sample
import llmtune.commands.preflight as checks
from llmtune.commands.preflight import check_paths
from llmtune.errors import DataError, RecipeError, UserError
from llmtune.recipe import load_recipe
from tests.conftest import ROOT, TINY_MODEL, assert_ok, assert_refused, base_recipe, run_cli, write_recipe

SFT_DATA = ROOT / "recipes" / "quickstart" / "sft.jsonl"  # messages rows
PAIRS_DATA = ROOT / "recipes" / "quickstart" / "pairs.jsonl"  # prompt / chosen / rejected rows


def _model_copy(tmp_path: Path, *drop: str) -> Path:
    """A copy of the tiny model without the named files."""
    d = tmp_path / "model"
    shutil.copytree(TINY_MODEL, d)
    for name in drop:
        (d / name).unlink()
    return d


def _validate(tmp_path: Path, recipe: dict[str, Any], *args: str, env: dict[str, str] | None = None) -> Any:
    return run_cli("validate", str(write_recipe(tmp_path, recipe)), *args, env=env)


def _check(tmp_path: Path, recipe: dict[str, Any]) -> list[str]:
    return check_paths(load_recipe(write_recipe(tmp_path, recipe)))


def _refusal(tmp_path: Path, recipe: dict[str, Any], error: type[UserError] = UserError) -> str:
    with pytest.raises(error) as info:
        _check(tmp_path, recipe)
    assert info.value.exit_code == 2 and info.value.hint, str(info.value)
    return str(info.value)


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _with_data(tmp_path: Path, path: Path, **source: Any) -> dict[str, Any]:
    recipe = base_recipe(tmp_path)
    recipe["data"]["train"] = [{"path": str(path), **source}]
    return recipe


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "clearly_no_gpu", lambda: True)


# ------------------------------------------------------------------------------------------- the good cases
def test_tiny_model_recipe_validates_without_notes_or_torch(tmp_path: Path) -> None:
    """The usual test recipe (the tiny model, the quickstart data) validates as before, with no note, and the
    new checks import no torch."""
    proc = _validate(tmp_path, base_recipe(tmp_path), env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert_ok(proc)
    assert "is a valid sft recipe" in proc.stdout and "note:" not in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "llmtune.commands.preflight" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "validate imported torch"


def test_explicit_formats_that_fit_their_rows_validate(tmp_path: Path) -> None:
    assert _check(tmp_path, _with_data(tmp_path, SFT_DATA, format="messages")) == []
    dpo = _with_data(tmp_path, PAIRS_DATA, format="pairs")
    dpo["stage"] = "dpo"
    assert _check(tmp_path, dpo) == []
    cpt = _with_data(tmp_path, ROOT / "recipes" / "quickstart" / "cpt.txt", format="text")
    cpt["stage"] = "cpt"
    assert _check(tmp_path, cpt) == []


def test_format_error_in_validate_imports_no_torch(tmp_path: Path) -> None:
    """The refusal of a format that does not fit (which detects the rows' format) imports no torch either."""
    proc = _validate(tmp_path, _with_data(tmp_path, SFT_DATA, format="alpaca"), env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert_refused(proc, "format: alpaca")
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "llmtune.commands.preflight" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "validate imported torch"


# ---------------------------------------------------------------------------------------- model directory
def test_model_dir_without_config_json_is_refused(tmp_path: Path) -> None:
    d = _model_copy(tmp_path, "config.json")
    proc = _validate(tmp_path, base_recipe(tmp_path, model={"path": str(d)}))
    err = assert_refused(proc, f"model.path: {d} has no config.json", "model.safetensors", "hub id")
    assert "Couldn't instantiate" not in err


def test_model_dir_without_config_json_names_a_model_dir_below_it(tmp_path: Path) -> None:
    shutil.copytree(TINY_MODEL, tmp_path / "download" / "snapshot")
    msg = _refusal(tmp_path, base_recipe(tmp_path, model={"path": str(tmp_path / "download")}), RecipeError)
    assert "has no config.json" in msg and "likely the one meant" in msg
    assert str(tmp_path / "download" / "snapshot") in msg


def test_model_dir_without_weights_is_refused(tmp_path: Path) -> None:
    d = _model_copy(tmp_path, "model.safetensors")
    (d / "training_args.bin").write_bytes(b"x")  # not weights
    proc = _validate(tmp_path, base_recipe(tmp_path, model={"path": str(d)}))
    assert_refused(proc, f"model.path: {d} has a config.json but no weights", "*.safetensors", "model.safetensors")


def test_sharded_weights_need_every_shard_the_index_names(tmp_path: Path) -> None:
    d = _model_copy(tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = _refusal(tmp_path, base_recipe(tmp_path, model={"path": str(d)}), RecipeError)
    assert "model.safetensors.index.json names 2 weight files, and 1 of them are missing" in msg
    assert "model-00002-of-00002.safetensors" in msg
    (d / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert _check(tmp_path, base_recipe(tmp_path, model={"path": str(d)})) == []


def test_bin_weights_are_weights(tmp_path: Path) -> None:
    d = _model_copy(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    assert _check(tmp_path, base_recipe(tmp_path, model={"path": str(d)})) == []


def test_adapter_dir_is_refused_with_merge_lora_and_its_base(tmp_path: Path) -> None:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(TINY_MODEL), "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(b"")
    shutil.copy(TINY_MODEL / "tokenizer.json", d)
    proc = _validate(tmp_path, base_recipe(tmp_path, model={"path": str(d)}))
    assert_refused(proc, "is a LoRA adapter", f"llmtune merge-lora --adapter {d}", f"its base model ({TINY_MODEL})")


def test_model_dir_without_tokenizer_files_is_refused(tmp_path: Path) -> None:
    d = _model_copy(tmp_path, "tokenizer.json", "tokenizer_config.json")
    proc = _validate(tmp_path, base_recipe(tmp_path, model={"path": str(d)}))
    assert_refused(proc, f"model.path: {d} has no tokenizer files", "tokenizer.json", "model.tokenizer")
    # a tokenizer from elsewhere: model.path needs none of its own
    assert _check(tmp_path, base_recipe(tmp_path, model={"path": str(d), "tokenizer": str(TINY_MODEL)})) == []


def test_model_tokenizer_dir_without_tokenizer_files_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "README.md").write_text("no tokenizer here")
    proc = _validate(tmp_path, base_recipe(tmp_path, model={"tokenizer": str(empty)}))
    assert_refused(proc, f"model.tokenizer: {empty} has no tokenizer files", "README.md", "remove it")


@pytest.mark.parametrize("name", ["tokenizer.model", "vocab.json", "tokenizer_config.json"])
def test_any_tokenizer_file_is_enough(tmp_path: Path, name: str) -> None:
    d = _model_copy(tmp_path, "tokenizer.json", "tokenizer_config.json")
    (d / name).write_text("{}")
    assert _check(tmp_path, base_recipe(tmp_path, model={"path": str(d)})) == []


def test_gguf_is_not_refused_for_a_missing_config_json(tmp_path: Path) -> None:
    """A .gguf (a file, or a folder holding one) may be loadable in future: no config.json message for it."""
    d = tmp_path / "gguf"
    d.mkdir()
    (d / "model-q4_k_m.gguf").write_bytes(b"GGUF")
    assert _check(tmp_path, base_recipe(tmp_path, model={"path": str(d)})) == []
    assert _check(tmp_path, base_recipe(tmp_path, model={"path": str(d / "model-q4_k_m.gguf")})) == []


def test_model_path_naming_a_weights_file_is_refused(tmp_path: Path) -> None:
    d = _model_copy(tmp_path)
    proc = _validate(tmp_path, base_recipe(tmp_path, model={"path": str(d / "model.safetensors")}))
    assert_refused(proc, "is a file, not a model directory", f"set model.path: {d}")


def test_dpo_reference_dir_is_checked_too(tmp_path: Path) -> None:
    d = _model_copy(tmp_path, "config.json")
    recipe = _with_data(tmp_path, PAIRS_DATA)
    recipe.update(stage="dpo", dpo={"reference": str(d)})
    assert "dpo.reference: " in _refusal(tmp_path, recipe, RecipeError)


# ---------------------------------------------------------------------------------------------- precision
def test_fp16_without_a_gpu_is_refused_like_train(tmp_path: Path) -> None:
    if not checks.clearly_no_gpu():
        pytest.skip("this machine has a GPU (or may have one): fp16 is not refused here")
    proc = _validate(tmp_path, base_recipe(tmp_path, precision="fp16"))
    # the wording of llmtune.engine.config.check_precision, which train refuses with after loading
    assert_refused(proc, "precision fp16 is not supported on CPU", "use precision: bf16 or precision: fp32 on CPU")


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_and_fp32_are_fine_without_a_gpu(tmp_path: Path, precision: str) -> None:
    assert _check(tmp_path, base_recipe(tmp_path, precision=precision)) == []


def test_fp16_is_not_refused_where_a_gpu_may_be(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "clearly_no_gpu", lambda: False)
    assert _check(tmp_path, base_recipe(tmp_path, precision="fp16")) == []
    monkeypatch.setattr(checks, "clearly_no_gpu", lambda: True)
    assert "fp16 is not supported on CPU" in _refusal(tmp_path, base_recipe(tmp_path, precision="fp16"), RecipeError)


def test_gpu_detection_by_tools_and_device_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks.sys, "platform", "linux")
    marker = tmp_path / "nvidia"
    monkeypatch.setattr(checks, "GPU_MARKERS", (str(marker),))
    monkeypatch.setattr(checks.shutil, "which", lambda name: None)
    assert checks.clearly_no_gpu() is True
    marker.mkdir()  # /proc/driver/nvidia
    assert checks.clearly_no_gpu() is False
    marker.rmdir()
    monkeypatch.setattr(checks.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert checks.clearly_no_gpu() is False
    monkeypatch.setattr(checks.sys, "platform", "win32")  # unsure: never refuse
    monkeypatch.setattr(checks.shutil, "which", lambda name: None)
    assert checks.clearly_no_gpu() is False


# ------------------------------------------------------------------------------------ format against rows
def test_alpaca_format_on_text_rows_is_refused_with_the_keys_and_detected_format(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "text.jsonl", [{"text": "one"}, {"text": "two"}])
    proc = _validate(tmp_path, _with_data(tmp_path, data, format="alpaca"))
    err = assert_refused(
        proc, f"data.train.0 ({data}) has format: alpaca", "instruction and output", "keys found: text"
    )
    assert "detected format: text" in err and "stage cpt" not in err.split("fix:")[0]


def test_wrong_format_fix_names_the_detected_format(tmp_path: Path) -> None:
    proc = _validate(tmp_path, _with_data(tmp_path, SFT_DATA, format="alpaca"))
    assert_refused(proc, "keys found: messages", "detected format: messages", "set data.train.0.format: messages")


def test_columns_are_applied_before_the_format_check(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    recipe = _with_data(tmp_path, data, format="alpaca")
    assert "keys found: answer, question" in _refusal(tmp_path, recipe, DataError)
    recipe["data"]["train"][0]["columns"] = {"instruction": "question", "output": "answer"}
    assert _check(tmp_path, recipe) == []
    recipe["data"]["train"][0]["columns"] = {"instruction": "query", "output": "answer"}
    assert "no row of" in _refusal(tmp_path, recipe, DataError)


def test_preference_format_on_conversations_is_refused(tmp_path: Path) -> None:
    recipe = _with_data(tmp_path, SFT_DATA, format="pairs")
    recipe["stage"] = "dpo"
    msg = _refusal(tmp_path, recipe, DataError)
    assert "has format: pairs" in msg and "chosen and rejected" in msg and "detected format: messages" in msg
    assert "stage dpo does not train on" in msg


def test_sft_with_format_text_is_refused(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "text.jsonl", [{"text": "one"}])
    proc = _validate(tmp_path, _with_data(tmp_path, data, format="text"))
    assert_refused(proc, "data.train.0.format: text is not a format stage sft trains on", "stage cpt")


def test_online_stages_read_any_prompt_row(tmp_path: Path) -> None:
    """grpo reads each row as a prompt whatever format: it names, so only rows with no prompt are refused."""
    data = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    recipe = _with_data(tmp_path, data, format="alpaca")
    recipe.update(stage="grpo", grpo={"num_generations": 4})
    assert _check(tmp_path, recipe) == []
    recipe["data"]["train"][0]["path"] = str(_jsonl(tmp_path / "text.jsonl", [{"text": "a"}]))
    msg = _refusal(tmp_path, recipe, DataError)
    assert "one of prompt, question" in msg and "reads each row as a prompt" in msg


def test_some_rows_without_the_keys_are_a_note_or_refused_with_on_bad_row_error(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "mixed.jsonl", [{"instruction": "a", "output": "b"}, {"text": "c"}])
    recipe = _with_data(tmp_path, data, format="alpaca")
    proc = _validate(tmp_path, recipe)
    assert_ok(proc)
    assert "note: data.train.0" in proc.stdout and "1 of the 2 rows lack the keys instruction and output" in proc.stdout
    recipe["data"]["on_bad_row"] = "error"
    err = assert_refused(_validate(tmp_path, recipe), "1 of the 2 rows lack them", "data.on_bad_row: drop")
    assert "line 2 has keys text" in err or "row 2 has keys text" in err


def test_an_empty_data_file_is_left_to_train(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").touch()
    assert _check(tmp_path, _with_data(tmp_path, tmp_path / "empty.jsonl", format="alpaca")) == []


def test_data_directory_rows_are_checked(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    _jsonl(d / "a.jsonl", [{"text": "x"}])
    _jsonl(d / "b.jsonl", [{"text": "y"}])
    assert "keys found: text" in _refusal(tmp_path, _with_data(tmp_path, d, format="messages"), DataError)
    (d / "a.jsonl").unlink()
    (d / "b.jsonl").rename(d / "b.yaml")
    assert "has no data files" in _refusal(tmp_path, _with_data(tmp_path, d), DataError)


def test_an_unsupported_suffix_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "rows.yaml"
    data.write_text("- a\n")
    assert "unsupported suffix" in _refusal(tmp_path, _with_data(tmp_path, data), DataError)


# ---------------------------------------------------------------------------------------- malformed rows
def test_malformed_json_lines_are_flagged_with_their_line_number(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "bad.jsonl", [json.loads(SFT_DATA.read_text().splitlines()[0]), "{oops", "[1, 2]"])
    proc = _validate(tmp_path, _with_data(tmp_path, data))
    assert_ok(proc)
    note = next(line for line in proc.stdout.splitlines() if line.startswith("note:"))
    assert "2 of the 3 rows cannot be read" in note and "line 2: not valid JSON" in note and "line 3" in note
    assert "train drops them" in note


def test_malformed_json_lines_are_refused_with_on_bad_row_error(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "bad.jsonl", [json.loads(SFT_DATA.read_text().splitlines()[0]), "{oops"])
    recipe = _with_data(tmp_path, data)
    recipe["data"]["on_bad_row"] = "error"
    assert_refused(_validate(tmp_path, recipe), "data.train.0.path", "line 2: not valid JSON", "on_bad_row: drop")


def test_a_file_of_which_no_row_parses_is_refused(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "bad.jsonl", ["instruction,output", "a,b"])  # a CSV saved as .jsonl
    assert_refused(_validate(tmp_path, _with_data(tmp_path, data)), "none of its 2 rows can be read", "line 1")


def test_only_the_first_rows_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large files are read line by line up to the sample (100 rows, or max_samples), not whole; a bad line
    after the sample is train's to count."""
    monkeypatch.setattr(data_sample, "_FULL_READ_BYTES", 0)  # every file counts as large
    row = json.loads(SFT_DATA.read_text().splitlines()[0])
    rows: list[Any] = [row] * 150
    rows[2], rows[120] = "{bad", "{bad"
    data = _jsonl(tmp_path / "big.jsonl", rows)
    notes = _check(tmp_path, _with_data(tmp_path, data))
    assert len(notes) == 1 and "1 of the first 100 rows cannot be read (line 3:" in notes[0]
    assert _check(tmp_path, _with_data(tmp_path, data, max_samples=2)) == []
    gz = tmp_path / "big.jsonl.gz"
    gz.write_bytes(gzip.compress(data.read_bytes()))
    assert "line 3:" in _check(tmp_path, _with_data(tmp_path, gz))[0]
    csv_file = tmp_path / "big.csv"
    csv_file.write_text("text\n" + "".join(f"row {i}\n" for i in range(300)))
    cpt = _with_data(tmp_path, csv_file, format="text")
    cpt["stage"] = "cpt"
    assert _check(tmp_path, cpt) == []
    assert "keys found: text" in _refusal(tmp_path, _with_data(tmp_path, csv_file, format="alpaca"), UserError)


def test_a_large_file_and_a_small_one_give_the_same_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jsonl(tmp_path / "t.jsonl", [{"text": "a"}, "{bad", {"text": "b"}])
    small = _check(tmp_path, _with_data(tmp_path, data))
    monkeypatch.setattr(data_sample, "_FULL_READ_BYTES", 0)
    assert _check(tmp_path, _with_data(tmp_path, data)) == small and len(small) == 1


def test_a_large_parquet_file_is_sampled_by_its_first_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(250)]}), data)
    monkeypatch.setattr(data_sample, "_FULL_READ_BYTES", 0)
    parsed, complete = data_sample.sample_rows(
        load_recipe(write_recipe(tmp_path, _with_data(tmp_path, data))).data.train[0]
    )
    assert len(parsed) == 100 and not complete and parsed[0][0] == {"text": "row 0"}
    assert "keys found: text" in _refusal(tmp_path, _with_data(tmp_path, data, format="alpaca"), DataError)
