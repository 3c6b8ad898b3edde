"""Running an eval: the task, then the report (JSON + table) and the per-example JSONL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from llmtune.eval.config import EvalConfig, check_eval_paths
from llmtune.eval.report import print_table, write_json, write_jsonl


def run_eval(cfg: EvalConfig, console: Console, progress_console: Console) -> dict[str, Any]:
    check_eval_paths(cfg)  # before torch: a mistyped path fails at once
    from llmtune.eval.tasks import run_task
    from llmtune.runtime import quiet_libraries

    quiet_libraries()
    _no_load_bars()
    from llmtune.model.gguf import resolve_gguf

    cfg.model = resolve_gguf(cfg.model, progress_console)  # a .gguf file: its converted model
    t0 = time.perf_counter()
    result = run_task(cfg, progress_console)
    report: dict[str, Any] = {"task": cfg.task, **result.metrics}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["settings"] = cfg.model_dump(mode="json", exclude_none=True)
    gen_path = cfg.generations_path()
    if result.rows and gen_path is not None:
        write_jsonl(result.rows, gen_path)
        report["generations"] = str(gen_path)
    if result.notes:
        report["notes"] = result.notes
    if cfg.output:
        write_json(report, Path(cfg.output))
    print_table(report, console)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    if cfg.output:
        console.print(f"report: {cfg.output}", markup=False)
    if "generations" in report:
        console.print(f"per-example output: {gen_path}", markup=False)
    return report


def _no_load_bars() -> None:
    """transformers' per-load progress bars would drown the report; the task has its own."""
    from transformers.utils import logging

    logging.disable_progress_bar()
