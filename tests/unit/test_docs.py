"""The recipe reference is generated from the schema: it must match the schema in the tree."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_recipe_reference_is_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_recipe_docs.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_reference_lists_every_train_key() -> None:
    from llmtune.recipe.schema import TrainConfig

    text = (ROOT / "docs" / "recipe-reference.md").read_text()
    for key in TrainConfig.model_fields:
        assert f"| `{key}` |" in text
