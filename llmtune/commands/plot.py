"""``llmtune plot``: the curves of one run (into its directory) or of several runs (one line each) drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtune.paths import check_path_lengths
from llmtune.plot import CURVES_FILE, draw


def plot_command(run_dirs: list[Path], out: Path | None, metrics: list[str] | None, err: Any) -> None:
    check_path_lengths(("--out", out))
    target = out or (run_dirs[0] / CURVES_FILE if len(run_dirs) == 1 else Path(CURVES_FILE))
    with err.status("drawing"):
        path = draw(run_dirs, target, metrics or None)
    print(f"curves written to {path}")
