"""Paths a user names (issue 27): a mistyped local model path is not taken for a hub id (it is refused at
once, naming close existing folders), and a path the filesystem cannot hold (a component over 255 bytes, a
whole path over the OS limit) is one clear line, exit 2, from validate, train and eval.

The rules run in-process (llmtune.paths, check_paths, the eval checks); one CLI run each shows the command
stops before importing torch (the import log), so no model was loaded and no hub download was tried."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llmtune.commands.preflight import check_paths
from llmtune.errors import RecipeError, UserError
from llmtune.eval.config import EvalConfig, check_eval_paths
from llmtune.paths import check_path_length, close_siblings, looks_local, missing_path_message
from llmtune.recipe import load_recipe
from tests.conftest import ROOT, TINY_MODEL, assert_refused, base_recipe, cli_command, run_cli, write_recipe

SFT_DATA = ROOT / "recipes" / "quickstart" / "sft.jsonl"


def _imported(stderr: str) -> set[str]:
    """Modules named in a PYTHONPROFILEIMPORTTIME=1 log."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _no_torch(stderr: str) -> None:
    imported = _imported(stderr)
    assert "llmtune.cli" in imported  # the import log is there to read
    assert "torch" not in imported and "transformers" not in imported, "the command loaded torch before refusing"


def _message_lines(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


# ------------------------------------------------------------------------------------------------ looks_local


@pytest.mark.parametrize(
    ("path", "local"),
    [
        ("Qwen/Qwen2.5-0.5B", False),
        ("gpt2", False),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
        ("runs/quickstart-merge", True),  # runs/ is a folder here (made by the test)
        ("model.gguf", True),
        ("owner/model.safetensors", True),
        ("a b/c", True),  # a space: no hub id has one
        ("owner/na--me", True),  # the hub forbids -- and ..
        ("o" * 97, True),  # longer than a hub id can be
        ("./x", True),
        ("~/x", True),
        ("a/b/c", True),
        ("x" * 300 + "/y", True),  # too long for the filesystem: no exception, local
    ],
)
def test_looks_local(path: str, local: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert looks_local(path) is local


def test_close_siblings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "runs" / "quickstart-merged").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart").mkdir()
    (tmp_path / "runs" / "unrelated").mkdir()
    monkeypatch.chdir(tmp_path)
    assert close_siblings("runs/quickstart-merge")[0] == "runs/quickstart-merged"
    assert "runs/unrelated" not in close_siblings("runs/quickstart-merge")
    assert close_siblings("./runs/quickstart-merge")[0] == "./runs/quickstart-merged"  # written as the user did
    assert close_siblings("runs/quickstart-merge/final")[0] == "runs/quickstart-merged"  # the first missing part
    assert close_siblings(str(tmp_path / "runz" / "x")) == [str(tmp_path / "runs")]
    assert close_siblings("nothing/like/it") == []


def test_mistyped_model_path_is_refused_with_the_close_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: runs/quickstart-merge was a hub id (a note), and train spent a minute on hub retries."""
    (tmp_path / "runs" / "quickstart-merged").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    recipe = base_recipe(tmp_path, model={"path": "runs/quickstart-merge"})
    with pytest.raises(RecipeError) as info:
        check_paths(load_recipe(write_recipe(tmp_path, recipe)))
    assert info.value.message.startswith("model.path: runs/quickstart-merge does not exist (looked in ")
    assert "runs/ is a folder here, so this is a local path, not a hub id" in info.value.message
    assert info.value.hint == "did you mean runs/quickstart-merged? (--set model.path=runs/quickstart-merged)"


def test_missing_path_without_close_names_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    msg, hint = missing_path_message("--model", "./nowhere")
    assert msg == f"--model: ./nowhere does not exist (looked in {tmp_path})"
    assert str(tmp_path) in hint and "hub id" in hint


def test_validate_and_eval_refuse_a_mistyped_model_path(tmp_path: Path) -> None:
    (tmp_path / "runs" / "quickstart-merged").mkdir(parents=True)
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, model={"path": "runs/quickstart-merge"}))
    proc = run_cli("validate", str(recipe), cwd=tmp_path)
    assert_refused(proc, "model.path: runs/quickstart-merge does not exist", "did you mean runs/quickstart-merged?")
    proc = run_cli(
        "eval", "--model", "runs/quickstart-merge", "--data", str(SFT_DATA), "--task", "perplexity",
        cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = _message_lines(proc.stderr)
    assert "error: --model: runs/quickstart-merge does not exist" in text
    assert "fix: did you mean runs/quickstart-merged? (--model runs/quickstart-merged)" in text
    assert "Traceback" not in text
    _no_torch(proc.stderr)  # refused before anything loads: no hub lookup, no model


# ---------------------------------------------------------------------------------------------- path lengths

LONG = "sweep-" + "lr1e-4_bs32_" * 25  # 306 characters: a realistic sweep name gone too far


def test_path_component_too_long() -> None:
    with pytest.raises(UserError) as info:
        check_path_length("output_dir", f"runs/{LONG}")
    e = info.value
    assert e.exit_code == 2 and len(e.message.splitlines()) == 1
    assert e.message.startswith("output_dir: the path component 'sweep-lr1e-4_bs32_lr1e-4...lr1e-4_bs32_'")
    assert f"is {len(LONG)} characters long; the filesystem allows at most 255 bytes" in e.message
    assert "shorten that part of output_dir" in (e.hint or "")
    with pytest.raises(UserError, match=r"'é+\.\.\.é+' is 150 characters \(300 bytes in UTF-8\) long"):
        check_path_length("data.train.0.path", "é" * 150)
    check_path_length("output_dir", "runs/" + "a" * 255)  # at the limit: fine


def test_whole_path_too_long() -> None:
    deep = "/".join(["d" * 200] * 25)  # every part fits, the whole does not
    with pytest.raises(UserError, match=r"^output_dir: the path is \d+ bytes long as an absolute path; the "
                       r"filesystem allows at most 4096"):  # fmt: skip
        check_path_length("output_dir", deep)


def test_check_paths_names_the_key_of_a_long_path(tmp_path: Path) -> None:
    """Before: an OSError (File name too long) traceback out of Path.exists."""
    for key, recipe in [
        ("output_dir", base_recipe(tmp_path, output_dir=str(tmp_path / LONG))),
        ("data.train.0.path", base_recipe(tmp_path, data={"train": [{"path": str(tmp_path / f"{LONG}.jsonl")}]})),
        ("model.path", base_recipe(tmp_path, model={"path": str(tmp_path / LONG)})),
    ]:
        with pytest.raises(UserError) as info:
            check_paths(load_recipe(write_recipe(tmp_path, recipe)))
        assert info.value.message.startswith(f"{key}: the path component "), info.value.message


def test_eval_checks_long_output_and_missing_models(tmp_path: Path) -> None:
    cfg = EvalConfig(task="perplexity", model=str(TINY_MODEL), data=str(SFT_DATA), output=str(tmp_path / LONG))
    with pytest.raises(UserError, match=r"^--output: the path component"):
        check_eval_paths(cfg)
    cfg = EvalConfig(task="perplexity", model=str(TINY_MODEL), data=str(SFT_DATA), reference=str(tmp_path / "ref"))
    with pytest.raises(UserError, match=r"^--reference: .*/ref does not exist"):
        check_eval_paths(cfg)
    check_eval_paths(EvalConfig(task="perplexity", model=str(TINY_MODEL), data=str(SFT_DATA)))  # all there: fine


@pytest.mark.parametrize("command", ["validate", "train"])
def test_validate_and_train_refuse_a_long_output_dir(command: str, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, output_dir=str(tmp_path / LONG)))
    proc = run_cli(command, str(recipe), env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = _message_lines(proc.stderr)
    assert "Traceback" not in text
    assert (
        f"error: output_dir: the path component 'sweep-lr1e-4_bs32_lr1e-4...lr1e-4_bs32_' is {len(LONG)} characters"
        in text
    )
    assert "fix: shorten that part of output_dir" in text
    _no_torch(proc.stderr)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["init", "sft", "--out"], "--out"),
        (["merge-lora", "--adapter", str(TINY_MODEL), "--out"], "--out"),
        (["plot", str(TINY_MODEL), "--out"], "--out"),
    ],
    ids=["init", "merge-lora", "plot"],
)
def test_commands_refuse_a_long_out_path(args: list[str], key: str, tmp_path: Path) -> None:
    proc = run_cli(*args, str(tmp_path / LONG / "x"), env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = _message_lines(proc.stderr)
    assert f"error: {key}: the path component 'sweep-lr1e-4_bs32_lr1e-4...lr1e-4_bs32_' is" in text, text
    assert "Traceback" not in text
    _no_torch(proc.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ("chat", "runs/quickstart-merge"),
        ("data", "inspect", "sft.jsonl", "--model", "runs/quickstart-merge"),
        ("data", "synth", "--model", "runs/quickstart-merge", "--seeds", "s.jsonl", "--out", "o.jsonl"),
    ],
    ids=["chat", "data-inspect", "data-synth"],
)
def test_chat_and_data_commands_refuse_a_mistyped_model_path(tmp_path: Path, args: tuple[str, ...]) -> None:
    (tmp_path / "runs" / "quickstart-merged").mkdir(parents=True)
    (tmp_path / "sft.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    cmd, env = cli_command(*args)
    proc = subprocess.run(
        cmd, cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "runs/quickstart-merge does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert "did you mean runs/quickstart-merged? (" in proc.stderr and "--set" not in proc.stderr
