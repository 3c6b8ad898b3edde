"""data.memory_map: cpt reads packed rows from a memory-mapped token file in the cache. The rows, and so
the run, are the ones in-memory packing gives; the file is reused by the next run; bad set-ups are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmtune.data.corpus import PackedCorpus, TokenFile, rows_in
from llmtune.recipe import validate_recipe
from tests.conftest import ROOT, assert_ok, assert_refused, base_recipe, read_metrics, run_cli, write_recipe

FACTS = ROOT / "recipes" / "quickstart" / "facts" / "cpt.txt"


def _corpus(tmp_path: Path) -> Path:
    """Documents as JSONL, with a blank line, a row without text and one that is not JSON among them."""
    docs = [line for line in FACTS.read_text().splitlines() if line.strip()]
    lines = [json.dumps({"text": d}) for d in docs[:120]]
    lines[5:5] = ["", json.dumps({"title": "no text"}), "{not json"]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _recipe(tmp_path: Path, corpus: Path, memory_map: bool, name: str) -> dict:
    sub = tmp_path / name
    sub.mkdir()
    return base_recipe(
        sub,
        stage="cpt",
        finetuning={"method": "full"},
        data={"train": [{"path": str(corpus)}], "max_length": 32, "packing": True, "memory_map": memory_map},
        train={"max_steps": 3, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1},
    )


def test_memory_mapped_rows_train_as_in_memory_packing_does(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    outs, logs = [], []
    for name, mm in (("memory", False), ("mapped", True), ("mapped-again", True)):
        recipe = _recipe(tmp_path, corpus, mm, name)
        proc = run_cli("train", str(write_recipe(tmp_path / name, recipe)))
        assert_ok(proc)
        logs.append(proc.stdout)
        outs.append(Path(recipe["output_dir"]))
    assert "dropped 2 of 122 rows" in logs[1] and "memory-mapped" in logs[1]  # the blank line is no row

    def cached(log: str) -> bool:
        return next(line for line in log.splitlines() if "corpus.jsonl │" in line).rstrip().endswith("yes")

    assert not cached(logs[1]) and cached(logs[2])  # the next run reuses the token file
    losses = [[m["loss"] for m in read_metrics(o) if "loss" in m] for o in outs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[1] == losses[2]
    a, b = load_file(outs[0] / "model.safetensors"), load_file(outs[1] / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_rows_are_slices_of_the_token_file(tmp_path: Path) -> None:
    tokens = np.arange(10, dtype=np.uint16)
    (tmp_path / "t.bin").write_bytes(tokens.tobytes())
    f = TokenFile(tmp_path / "t.bin", "uint16", 10)
    assert rows_in(10, 4) == 3 and rows_in(9, 4) == 2  # a last piece of one token is no row
    # segments (file, start, length): [4..7], [0..2], [8, 9] laid end to end, cut into rows of 4
    seg = (np.array([0, 1, 0]), np.array([4, 0, 8]), np.array([4, 3, 2]))
    corpus = PackedCorpus([f, f], 4, *seg)
    assert [s.input_ids for s in corpus] == [[4, 5, 6, 7], [0, 1, 2, 8]]  # a last piece of 1 token is no row
    assert corpus[1].labels == [0, 1, 2, 8]
    assert corpus.summary() == {"rows": 2, "tokens": 8, "learned": 6, "longest": 4}
    chunks = PackedCorpus([f, f], 4, *seg, packed=False)  # without packing a segment is a row
    assert [s.input_ids for s in chunks] == [[4, 5, 6, 7], [0, 1, 2], [8, 9]]
    assert chunks.summary() == {"rows": 3, "tokens": 9, "learned": 6, "longest": 4}


def test_memory_map_refusals(tmp_path: Path) -> None:
    (tmp_path / "sft").mkdir()
    sft = base_recipe(tmp_path / "sft", data={"memory_map": True, "packing": True})
    with pytest.raises(Exception, match=r"data\.memory_map is for stage cpt"):
        validate_recipe(sft)
    csv = tmp_path / "c.csv"
    csv.write_text("text\nhello world\n")
    recipe = _recipe(tmp_path, csv, True, "csv")
    proc = run_cli("train", str(write_recipe(tmp_path / "csv", recipe)))
    assert_refused(proc, "data.memory_map reads .txt, .jsonl, .jsonl.gz files, not c.csv")
