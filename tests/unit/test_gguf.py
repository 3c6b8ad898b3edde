"""Which model paths name a GGUF checkpoint, and where its one conversion is kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmtune.errors import UserError
from llmtune.model.gguf import cache_dir, gguf_file, resolve_gguf


def test_gguf_paths(tmp_path: Path) -> None:
    f = tmp_path / "m" / "model.Q4.gguf"
    f.parent.mkdir()
    f.write_bytes(b"GGUF")
    assert gguf_file(str(f)) == f  # the file
    assert gguf_file(str(f.parent)) == f  # the only one in a folder without config.json
    (f.parent / "config.json").write_text("{}")
    assert gguf_file(str(f.parent)) is None  # a transformers model folder that also holds a gguf
    (f.parent / "config.json").unlink()
    (f.parent / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"2 \.gguf files"):
        gguf_file(str(f.parent))
    assert gguf_file(None) is None and gguf_file("Qwen/Qwen2.5-0.5B") is None
    assert resolve_gguf("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # anything else is left as it is


def test_conversion_is_cached_by_path_size_and_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "a.gguf"
    f.write_bytes(b"GGUF one")
    first = cache_dir(f)
    assert first.parent == tmp_path / "cache" / "gguf" and cache_dir(f) == first
    f.write_bytes(b"GGUF two, longer")
    assert cache_dir(f) != first  # a changed file is converted again
    done = cache_dir(f)
    done.mkdir(parents=True)
    (done / "CONVERTED").write_text("x")
    assert resolve_gguf(str(f)) == str(done)  # found: nothing is converted (not even imported)
