"""run.json as a typed record: written atomically, read back field by field."""

from __future__ import annotations

import json
from pathlib import Path

from llmtune.manifest import RunManifest, TokenizerRecord, status_of, unfinished_run


def test_round_trip(tmp_path: Path) -> None:
    m = RunManifest(
        llmtune="0.1",
        stage="sft",
        world_size=2,
        device="cpu",
        total_steps=10,
        tokenizer=TokenizerRecord(size=1024, vocab_sha256="ab" * 32),
        started="2026-12-03T10:00:00",
    )
    m.write(tmp_path)
    raw = json.loads((tmp_path / "run.json").read_text())
    assert raw["tokenizer"] == {"size": 1024, "vocab_sha256": "ab" * 32}
    assert "finished" not in raw and "steps" not in raw  # unset fields are not written
    assert not (tmp_path / "run.json.tmp").exists()
    back = RunManifest.read(tmp_path)
    assert back == m and not back.is_finished
    m.status, m.steps = "finished", 10
    m.write(tmp_path)
    assert RunManifest.read(tmp_path).is_finished and status_of(tmp_path) == "finished"


def test_reading_keeps_the_good_fields_of_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(
        json.dumps({"status": "running", "world_size": "two", "steps": True, "tokenizer": {"size": -1}, "extra": 1})
    )
    m = RunManifest.read(tmp_path)
    assert m is not None and m.status == "running"
    assert m.world_size is None and m.steps is None and m.tokenizer is None
    assert unfinished_run(str(tmp_path)) == "running"


def test_no_manifest(tmp_path: Path) -> None:
    assert RunManifest.read(tmp_path) is None and status_of(tmp_path) is None
    assert RunManifest.read(None) is None and RunManifest.read("org/model") is None  # a hub id
    (tmp_path / "run.json").write_text("[1, 2]")
    assert RunManifest.read(tmp_path) is None
    (tmp_path / "run.json").write_text("{broken")
    assert RunManifest.read(tmp_path) is None and unfinished_run(str(tmp_path)) is None
