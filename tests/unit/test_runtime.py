"""llmtune.runtime: standard streams that outlive their reader, and output files readable like normal files."""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

import pytest

from llmtune.runtime import GuardedStream, file_mode, readable_like_normal_files


def _pipe_without_reader() -> tuple[io.TextIOWrapper, int]:
    read, write = os.pipe()
    os.close(read)  # the reader is gone (`| tee` ended by Ctrl-C, `| head` done)
    return io.TextIOWrapper(io.FileIO(write, "w"), encoding="utf-8"), write


def test_a_pipe_without_reader_raises_without_the_guard() -> None:
    raw, _ = _pipe_without_reader()
    raw.write("step 1\n")
    with pytest.raises(BrokenPipeError):
        raw.flush()


def test_writes_to_a_pipe_without_reader_are_dropped_and_the_descriptor_goes_to_devnull() -> None:
    raw, fd = _pipe_without_reader()
    out = GuardedStream(raw)
    assert out.write("step 1\n") == len("step 1\n")
    out.flush()  # EPIPE: swallowed
    assert out.broken
    assert os.readlink(f"/proc/self/fd/{fd}") == os.devnull  # later writes (C code, the final flush) go nowhere
    out.write("step 2\n")
    out.writelines(["a\n", "b\n"])
    out.flush()
    raw.close()  # the interpreter's own final flush: no error either


def test_other_write_errors_still_raise() -> None:
    class Full(io.StringIO):
        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    out = GuardedStream(Full())
    with pytest.raises(OSError, match="No space"):
        out.flush()
    assert not out.broken


def test_the_guard_passes_the_stream_through() -> None:
    buf = io.StringIO()
    out = GuardedStream(buf)
    out.write("hello")
    assert buf.getvalue() == "hello" and out.isatty() is False and out.getvalue() == "hello"


def test_files_get_the_mode_of_normal_files(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert file_mode() == 0o644
        (tmp_path / "ema").mkdir()
        weights, nested, wide = tmp_path / "model.safetensors", tmp_path / "ema" / "w.safetensors", tmp_path / "x"
        for p in (weights, nested, wide):
            p.write_bytes(b"0")
        weights.chmod(0o600)  # as safetensors' temporary file leaves it
        nested.chmod(0o600)
        wide.chmod(0o755)
        readable_like_normal_files(tmp_path)
        assert stat.S_IMODE(weights.stat().st_mode) == 0o644
        assert stat.S_IMODE(nested.stat().st_mode) == 0o644
        assert stat.S_IMODE(wide.stat().st_mode) == 0o755  # never narrowed
        os.umask(0o077)  # a user who wants private files keeps them private
        weights.chmod(0o600)
        readable_like_normal_files(tmp_path)
        assert stat.S_IMODE(weights.stat().st_mode) == 0o600
    finally:
        os.umask(old)
