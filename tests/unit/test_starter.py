"""`llmtune init STAGE`: every stage's starter recipe validates as written, with the tiny model and with the
default hub id; its stage blocks follow the schema; --out refuses to overwrite without --force."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmtune.cli import app
from llmtune.recipe.starter import (
    DEFAULT_MODEL,
    STARTERS,
    render,
    stage_blocks,
    stage_models,
    starter_names,
    yaml_value,
)
from tests.conftest import ROOT, assert_refused, run_cli

TINY = "recipes/quickstart/model"


def test_every_stage_of_the_schema_has_a_starter() -> None:
    """A stage added to the schema (a new member of the Recipe union) fails here until it gets a starter."""
    stages = set(stage_models())
    assert {"cpt", "sft", "rm", "dpo", "ppo", "grpo", "rejection_sampling"} <= stages
    assert stages <= set(STARTERS), f"no llmtune init starter for: {sorted(stages - set(STARTERS))}"
    assert set(starter_names()) == set(STARTERS)


@pytest.mark.parametrize("model", [TINY, None], ids=["tiny-model", "default-model"])
@pytest.mark.parametrize("name", starter_names())
def test_init_output_validates_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, model: str | None
) -> None:
    monkeypatch.chdir(ROOT)  # the starter names the quickstart data relative to the repository root
    out = tmp_path / f"{name}.yaml"
    runner = CliRunner()
    args = ["init", name, "--out", str(out), *(["--model", model] if model else [])]
    made = runner.invoke(app, args)
    assert made.exit_code == 0, made.output
    text = out.read_text()
    checked = runner.invoke(app, ["validate", str(out)])
    assert checked.exit_code == 0, f"{checked.output}\n{checked.exception!r}\n{text}"
    stage = STARTERS[name].stage or name
    assert f"is a valid {stage} recipe" in checked.output

    raw = yaml.safe_load(text)
    assert raw["stage"] == stage and raw["model"]["path"] == (model or DEFAULT_MODEL)
    assert (ROOT / raw["data"]["train"][0]["path"]).is_file()  # real data, not a placeholder
    assert "docs/recipe-reference.md" in text
    # the stage's own blocks come from the schema: every key, at its default (or the variant's value)
    cls = stage_models()[stage]
    for block in stage_blocks(cls):
        default = cls.model_fields[block].annotation().model_dump(mode="json")
        default.update(STARTERS[name].stage_values.get(block, {}))
        assert raw[block] == default, block
    # every key given a value is explained by the comment above it (the schema's description)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        key = line.strip().split(":")[0]
        if re.fullmatch(r"\s*[a-z_0-9]+: .+", line) and key not in ("stage", "format"):
            assert lines[i - 1].lstrip().startswith("#"), line


def test_kto_is_dpo_with_the_kto_loss() -> None:
    raw = yaml.safe_load(render("kto", TINY, root=ROOT))
    assert raw["stage"] == "dpo" and raw["dpo"]["loss"] == "kto"


def test_init_prints_to_stdout_and_out_never_overwrites_without_force(tmp_path: Path) -> None:
    proc = run_cli("init", "sft", "--model", TINY, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["stage"] == "sft"

    out = tmp_path / "sft.yaml"
    out.write_text("mine\n")
    assert_refused(run_cli("init", "sft", "--out", str(out), timeout=120), f"--out {out} exists", "--force")
    assert out.read_text() == "mine\n"
    proc = run_cli("init", "grpo", "--out", str(out), "--force", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(out.read_text())["stage"] == "grpo"
    assert_refused(run_cli("init", "dpp", timeout=120), "no stage 'dpp'", "'dpo'")


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        42,
        0.1,
        1e-5,
        2.0e-4,
        1e20,
        "none",
        "yes",
        "off",
        "null",
        "a: b",
        "x#y",
        "",
        "all-linear",
        [1, "q_proj"],
    ],
)
def test_yaml_values_read_back_as_written(value: object) -> None:
    assert yaml.safe_load(f"k: {yaml_value(value)}")["k"] == value
