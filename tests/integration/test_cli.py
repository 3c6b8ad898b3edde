"""The real ``llmtune`` command in a fresh process: help, validate, and the exit codes of bad recipes.

Bad recipes, bad data paths and bad arguments exit 2 with a message and never a traceback; ``validate``
and ``--help`` import no torch. No test here trains (that is for the stage tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, assert_refused, base_recipe, run_cli, write_recipe

HEAVY = ("torch", "deepspeed", "peft", "transformers", "bitsandbytes", "matplotlib")


def _misspelled_key(tmp_path: Path) -> dict[str, Any]:
    return base_recipe(tmp_path, train={"lrr": 1e-4})


def _wrong_type(tmp_path: Path) -> dict[str, Any]:
    return base_recipe(tmp_path, train={"micro_batch_size": "four"})


def _missing_data(tmp_path: Path) -> dict[str, Any]:
    recipe = base_recipe(tmp_path)
    recipe["data"]["train"][0]["path"] = str(tmp_path / "missing.jsonl")
    return recipe


# (recipe builder, what stderr must contain)
BAD_RECIPES: dict[str, tuple[Callable[[Path], dict[str, Any]], list[str]]] = {
    "misspelled-key": (_misspelled_key, ["train.lrr", "Did you mean 'lr'?"]),
    "wrong-type": (_wrong_type, ["train.micro_batch_size", "expected a whole number, got 'four'"]),
    "missing-data": (_missing_data, ["data.train.0.path", "missing.jsonl does not exist", "fix:"]),
}


def _assert_clean_failure(proc: subprocess.CompletedProcess, expected: list[str]) -> None:
    assert assert_refused(proc, *expected, fix=False).startswith("error:"), proc.stderr


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "llmtune"
    if not exe.exists():
        pytest.skip("the llmtune console script is not installed next to this Python")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "validate" in proc.stdout


def test_module_help() -> None:
    proc = run_cli("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "validate" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_validate_good_recipe_prints_resolved(tmp_path: Path) -> None:
    # a long output_dir: the printed YAML must not be wrapped at the terminal width
    out = tmp_path / ("a-rather-long-directory-name-" * 4) / "out"
    path = write_recipe(tmp_path, base_recipe(tmp_path, output_dir=str(out)))
    proc = run_cli("validate", str(path), "--set", "train.lr=1e-4", timeout=120)
    assert proc.returncode == 0, proc.stderr
    head, sep, body = proc.stdout.partition(" recipe. Resolved:\n")
    assert sep, proc.stdout
    assert head.endswith(f"ok: {path} is a valid sft")
    # what follows is the resolved recipe as YAML: the override applied, every default filled in
    resolved = yaml.safe_load(body)
    assert resolved["output_dir"] == str(out)
    assert resolved["train"]["lr"] == 1e-4
    assert resolved["train"]["lr_scheduler"] == "cosine"
    assert resolved["train"]["keep_checkpoints"] == 2
    assert resolved["distributed"] == {"zero_stage": 0, "offload": "none", "backend": "auto"}
    assert not out.exists()  # validate writes nothing


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_exits_2_without_traceback(tmp_path: Path, command: str, case: str) -> None:
    build, expected = BAD_RECIPES[case]
    path = write_recipe(tmp_path, build(tmp_path))
    proc = run_cli(command, str(path), timeout=300)
    _assert_clean_failure(proc, expected)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_bad_set_exits_2(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, base_recipe(tmp_path))
    proc = run_cli("validate", str(path), "--set", "foo", timeout=120)
    _assert_clean_failure(proc, ["--set 'foo' is not of the form key.path=value"])


def test_error_text_in_brackets_is_printed_as_is(tmp_path: Path) -> None:
    # rich markup would swallow "[q_proj, v_proj]" if the message were not escaped
    path = write_recipe(tmp_path, base_recipe(tmp_path, finetuning={"target_modules": []}))
    proc = run_cli("validate", str(path), timeout=120)
    _assert_clean_failure(proc, ["finetuning.target_modules", "(e.g. [q_proj, v_proj])"])


def test_train_fp16_on_cpu_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU even where a GPU is present
    path = write_recipe(tmp_path, base_recipe(tmp_path, train={"max_steps": 1}))
    proc = run_cli("train", str(path), "--set", "precision=fp16", timeout=300)
    _assert_clean_failure(proc, ["fp16 is not supported on CPU", "bf16", "fp32"])


# Recipes that validate but name what cannot work on this machine or model: refused before training.
RUNTIME_BAD: dict[str, tuple[dict[str, Any], list[str]]] = {
    "nccl-on-cpu": ({"distributed": {"backend": "nccl"}}, ["distributed.backend nccl", "gloo"]),
    "missing-reference": (
        {"stage": "dpo", "dpo": {"reference": "/nonexistent/ref-model"}},
        ["dpo.reference: /nonexistent/ref-model does not exist"],
    ),
    "unknown-module-to-save": (
        {"finetuning": {"method": "lora", "modules_to_save": ["lm_haed"]}},
        ["finetuning.modules_to_save", "'lm_haed'", "lm_head"],
    ),
}


@pytest.mark.parametrize("case", list(RUNTIME_BAD))
def test_train_refuses_what_cannot_run_here_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    sections, expected = RUNTIME_BAD[case]
    recipe = base_recipe(tmp_path, train={"max_steps": 1}, **sections)
    if recipe["stage"] == "dpo":
        recipe["data"]["train"] = [{"path": str(ROOT / "recipes" / "quickstart" / "pairs.jsonl")}]
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), timeout=300)
    _assert_clean_failure(proc, expected)
    assert not (tmp_path / "out" / "checkpoints").exists()


# Runs the CLI in-process (--help, validate, validate as the deepspeed launcher calls it, init) and reports which heavy modules got imported.
_NO_TORCH_PROBE = """
import json, runpy, sys
recipe, heavy_roots = sys.argv[1], set(json.loads(sys.argv[2]))
codes = []
for argv in (
    ["llmtune", "--help"],
    ["llmtune", "validate", recipe],
    ["llmtune", "--local_rank=0", "validate", recipe],  # the deepspeed launcher puts it first
    ["llmtune", "init", "sft"],
):
    sys.argv = argv
    try:
        runpy.run_module("llmtune", run_name="__main__", alter_sys=True)
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code or 0)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in heavy_roots)
print("PROBE" + json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_validate_and_help_do_not_import_torch(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, base_recipe(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_PROBE, str(path), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE"))
    result = json.loads(line.removeprefix("PROBE"))
    assert result["codes"] == [0, 0, 0, 0], proc.stdout + proc.stderr
    assert "is a valid sft recipe" in proc.stdout  # validate really ran
    assert result["heavy"] == [], f"imported by --help / validate: {result['heavy']}"


@pytest.mark.parametrize("case", ["a-file", "under-a-file", "the-model", "inside-the-model"])
def test_an_output_dir_that_cannot_be_ours_is_refused(tmp_path: Path, case: str) -> None:
    recipe = base_recipe(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text((ROOT / "recipes" / "quickstart" / "sft.jsonl").read_text())
    recipe["data"]["train"] = [{"path": str(data)}]
    (tmp_path / "afile").write_text("x")
    recipe["output_dir"] = {
        "a-file": str(tmp_path / "afile"),
        "under-a-file": str(tmp_path / "afile" / "out"),
        "the-model": recipe["model"]["path"],
        "inside-the-model": str(Path(recipe["model"]["path"]) / "out"),
    }[case]
    path = write_recipe(tmp_path, recipe)
    for command in ("validate", "train"):
        proc = run_cli(command, str(path), "--overwrite") if command == "train" else run_cli(command, str(path))
        _assert_clean_failure(proc, ["output_dir:"])


def test_a_reward_model_as_model_path_is_refused(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.conftest import TINY_MODEL

    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(TINY_MODEL, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(rm)
    recipe = base_recipe(tmp_path, model={"path": str(rm)}, train={"max_steps": 1})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), timeout=300)
    _assert_clean_failure(proc, ["is a reward model (LlamaForSequenceClassification)", "no language-model head"])


def test_an_adapter_records_its_base_so_that_it_is_found_from_anywhere(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, model={"path": "recipes/quickstart/model"}, train={"max_steps": 1})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), timeout=300)  # run from the repository root
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = Path(recipe["output_dir"])
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base) == (ROOT / "recipes" / "quickstart" / "model").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("merge-lora", "--adapter", str(out), "--out", str(tmp_path / "merged"), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-2000:]
