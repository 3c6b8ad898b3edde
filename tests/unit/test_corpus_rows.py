"""The memory-mapped cpt path (data.memory_map, on by default for cpt) gives the rows the in-memory pipeline
gives, in the same order, with and without packing, with eval_split and fractional / whole weights and several
sources; the default cpt recipe takes it, and falls back (saying why) where it cannot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.data.corpus import PackedCorpus, memory_map_plan
from llmtune.recipe import validate_recipe
from llmtune.stages.cpt import CptStage
from tests.conftest import ROOT, base_recipe

FACTS = ROOT / "recipes" / "quickstart" / "facts" / "cpt.txt"


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    docs = [line for line in FACTS.read_text().splitlines() if line.strip()]
    a = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": d}) for d in docs[:60]]
    lines[3:3] = ["", json.dumps({"title": "no text"}), "{not json"]
    a.write_text("\n".join(lines) + "\n")
    b = tmp_path / "b.txt"
    b.write_text("\n".join(docs[60:100]) + "\n")
    return a, b


def _recipe(tmp_path: Path, memory_map: object, **data: object) -> object:
    a, b = _sources(tmp_path)
    d = {"train": [{"path": str(a)}, {"path": str(b)}], "max_length": 24, **data}
    if memory_map is not None:
        d["memory_map"] = memory_map
    return validate_recipe(base_recipe(tmp_path, stage="cpt", finetuning={"method": "full"}, data=d))


def _rows(data: object) -> list[list[int]]:
    return [s.input_ids for s in data]


@pytest.mark.parametrize(
    "data",
    [
        {"packing": True},
        {"packing": False},
        {"packing": True, "eval_split": 0.1},
        {"packing": False, "eval_split": 0.2},
        {"packing": True, "train": None, "weights": (2.0, 0.5)},
        {"packing": False, "eval_split": 0.1, "weights": (1.5, 0.3)},
    ],
    ids=["packed", "chunked", "packed-eval-split", "chunked-eval-split", "packed-weights", "chunked-all"],
)
def test_memory_mapped_rows_are_the_in_memory_rows(tmp_path: Path, tokenizer: object, data: dict) -> None:
    data = dict(data)
    weights = data.pop("weights", None)
    data.pop("train", None)
    out = {}
    for mm in (False, True):
        recipe = _recipe(tmp_path, mm, **data)
        if weights:
            for src, w in zip(recipe.data.train, weights, strict=True):
                src.weight = w
        out[mm] = CptStage().build_data(recipe, tokenizer, None)
    assert isinstance(out[True].train, PackedCorpus) and not isinstance(out[False].train, PackedCorpus)
    assert len(out[True].train) > 10
    assert _rows(out[True].train) == _rows(out[False].train)
    assert _rows(out[True].eval) == _rows(out[False].eval)
    assert [(r.rows, r.kept, r.examples, r.fingerprint) for r in out[True].reports] == [
        (r.rows, r.kept, r.examples, r.fingerprint) for r in out[False].reports
    ]
    lengths = [len(r) for r in _rows(out[True].train)]
    assert out[True].train.summary() == {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "learned": sum(lengths) - len(lengths),
        "longest": max(lengths),
    }


def test_default_cpt_recipe_takes_the_memory_mapped_path(tmp_path: Path, tokenizer: object) -> None:
    recipe = _recipe(tmp_path, None)
    assert recipe.data.memory_map == "auto" and not recipe.data.packing
    assert memory_map_plan(recipe) == (True, None)
    data = CptStage().build_data(recipe, tokenizer, None)
    assert isinstance(data.train, PackedCorpus) and not data.notes


def test_auto_falls_back_to_memory_and_says_why(tmp_path: Path, tokenizer: object) -> None:
    recipe = _recipe(tmp_path, None, dedup="exact")
    mapped, note = memory_map_plan(recipe)
    assert not mapped and "data.dedup need" in note
    data = CptStage().build_data(recipe, tokenizer, None)
    assert isinstance(data.train, list) and note in data.notes
    parquet = tmp_path / "sub"
    parquet.mkdir()
    (parquet / "x.csv").write_text("text\nhello world\n")
    recipe = _recipe(tmp_path / "sub", None, eval=[{"path": str(parquet)}])
    mapped, note = memory_map_plan(recipe)
    assert not mapped and "data.eval[0]" in note and "not x.csv" in note
    sft = validate_recipe(base_recipe(tmp_path))  # other stages never take it
    assert sft.data.memory_map == "auto" and memory_map_plan(sft) == (False, None)
