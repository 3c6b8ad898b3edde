"""Every command's --help exits 0 and shows an example; shell completion is on and completes stage names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llmtune.cli import app
from tests.conftest import ROOT

COMMANDS = [c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands]


def test_the_commands_are_all_listed() -> None:
    assert {"train", "validate", "merge-lora", "merge", "eval", "init", "plot", "chat", "version"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_exits_0_and_shows_an_example(command: str | None) -> None:
    result = CliRunner().invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    examples = result.output.split("Examples:", 1)
    assert len(examples) == 2, result.output
    assert f"llmtune {command or ''}".strip() in examples[1]  # an example of this very command


def test_data_inspect_help_shows_an_example() -> None:
    result = CliRunner().invoke(app, ["data", "inspect", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "llmtune data inspect" in result.output.split("Examples:", 1)[1]


def test_shell_completion_is_offered_and_completes_stages() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert "--install-completion" in result.output and "--show-completion" in result.output
    # what the installed bash completion script asks the program for
    env = {**os.environ, "_LLMTUNE_COMPLETE": "complete_bash", "COMP_WORDS": "llmtune init r", "COMP_CWORD": "2"}
    code = "import sys; sys.argv[0] = 'llmtune'; from llmtune.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.stdout.split() == ["rm", "rejection_sampling"], proc.stdout + proc.stderr
