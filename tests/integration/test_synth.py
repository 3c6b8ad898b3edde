"""`llmtune data synth` through the CLI on the tiny model: real generation writes rows of a valid sft file,
a rerun continues from the attempts it recorded, and bad options are refused before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import ROOT, TINY_MODEL, assert_ok, assert_refused, base_recipe, run_cli, write_recipe

SEEDS = ROOT / "recipes" / "quickstart" / "sft.jsonl"


def _synth(out: Path, *extra: str):
    return run_cli("data", "synth", "--model", str(TINY_MODEL), "--seeds", str(SEEDS), "--out", str(out),
                   "--num", "2", "--max-new-tokens", "16", *extra)  # fmt: skip


def test_synth_writes_a_valid_sft_file_and_continues(tmp_path: Path) -> None:
    out = tmp_path / "synth.jsonl"
    first = _synth(out, "--max-attempts", "8")
    assert_ok(first)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["instruction"].strip() and r["output"].strip() for r in rows)
    assert json.loads((tmp_path / "synth.jsonl.state.json").read_text())["attempts"] == 8
    assert f"{len(rows)} rows in {out} after 8 attempts" in first.stdout
    recipe = base_recipe(tmp_path, data={"train": [{"path": str(out)}]})
    assert_ok(run_cli("validate", str(write_recipe(tmp_path, recipe))))  # an sft file as the stage reads it
    again = _synth(out, "--max-attempts", "8")  # the attempts are spent: nothing more is generated
    assert_ok(again)
    assert "continuing" in again.stderr and len(out.read_text().splitlines()) == len(rows)
    more = _synth(out, "--max-attempts", "16")  # more attempts allowed: it goes on from attempt 8
    assert_ok(more)
    assert json.loads((tmp_path / "synth.jsonl.state.json").read_text())["attempts"] > 8
    assert out.read_text().splitlines()[: len(rows)] == [json.dumps(r, ensure_ascii=False) for r in rows]


def test_synth_bad_options(tmp_path: Path) -> None:
    out = str(tmp_path / "o.jsonl")
    base = ["data", "synth", "--model", str(TINY_MODEL), "--out", out]
    assert_refused(run_cli(*base, "--seeds", str(tmp_path / "none.jsonl")), "none.jsonl")
    assert_refused(run_cli(*base, "--seeds", str(SEEDS), "--method", "magic"), "--method 'magic'", fix=False)
    assert_refused(run_cli(*base, "--seeds", str(SEEDS), "--similarity", "0"), "--similarity 0.0", fix=False)
    assert not Path(out).exists()
