"""Resumable JSONL outputs of the data commands (data label, data revise): rows are appended as they are made,
each with the index of the input row it came from (``row``), and ``<first output>.state.json`` records how many
input rows are done and the per-reason drop counts. A rerun of the same command reads both and continues
with the first input row not done: the larger of the state's count and one past the last ``row`` written (a
kill between writing rows and the state loses nothing and repeats nothing)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtune.errors import DataError


class ResumableOutputs:
    """Named JSONL outputs (name -> path) that a command appends to, with their shared state file."""

    def __init__(self, paths: dict[str, Path], command: str) -> None:
        self.paths, self.command = paths, command
        first = next(iter(paths.values()))
        self.state_path = first.with_name(first.name + ".state.json")
        self.written: dict[str, int] = {}
        self.done = 0
        self.dropped: dict[str, int] = {}
        last_row = -1
        for name, path in paths.items():
            rows = self._read(path)
            self.written[name] = len(rows)
            for r in rows:
                if isinstance(r.get("row"), int):
                    last_row = max(last_row, r["row"])
        if self.state_path.is_file():
            try:
                state = json.loads(self.state_path.read_text(encoding="utf-8"))
                self.done, self.dropped = int(state["done"]), {k: int(v) for k, v in state["dropped"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DataError(
                    f"{self.state_path} is not a state file {command} wrote",
                    hint="remove it (and the outputs) to start again, or choose another --out",
                ) from None
        self.done = max(self.done, last_row + 1)

    def _read(self, path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path} line {n} is not a JSON object: it is not a file {self.command} wrote",
                    hint="choose another output path, or remove the file to start again",
                )
            rows.append(row)
        return rows

    @property
    def resumed(self) -> bool:
        return self.done > 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def commit(self, rows: dict[str, list[dict[str, Any]]], done: int) -> None:
        """Append each output's new rows (flushed to disk), then record ``done`` input rows and the drops."""
        for name, new in rows.items():
            if not new:
                continue
            with open(self.paths[name], "a", encoding="utf-8") as f:
                for row in new:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.written[name] += len(new)
        self.done = done
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps({"done": self.done, "dropped": self.dropped}), encoding="utf-8")
        os.replace(tmp, self.state_path)

    def dropped_text(self) -> str:
        return ", ".join(f"{why} {n}" for why, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])))


def run_with_status(console: Any, verb: str, total: int, run: Callable[..., Any], kept: Callable[[], str]) -> Any:
    """run(advance) under a status line "<verb>: done / total rows, <kept()>", advance(n) after each batch."""
    seen = 0
    with console.status(f"{verb}: 0 / {total} rows") as status:

        def advance(n: int) -> None:
            nonlocal seen
            seen += n
            status.update(f"{verb}: {seen} / {total} rows, {kept()}")

        return run(advance)
