"""The eval report: one JSON object (metrics under plain names, then counts and settings), a table on
the terminal, and per-example JSONL."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def print_table(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"llmtune eval: {report.get('task')}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.items():
        if key in ("settings",) or isinstance(value, (dict, list)):
            continue
        if isinstance(value, float):
            text = f"{value:.6g}"
        else:
            text = str(value)
        table.add_row(key, text)
    for key, value in report.items():
        if isinstance(value, dict) and key != "settings":
            for sub, v in value.items():
                if isinstance(v, dict):
                    text = ", ".join(f"{k} {x:.4g}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items())
                else:
                    text = f"{v:.6g}" if isinstance(v, float) else str(v)
                table.add_row(f"{key}.{sub}", text)
    console.print(table)
