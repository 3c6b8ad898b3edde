"""What every eval task shares: its environment, its result, a progress bar, the drop counts of its data and
a reward model's scores."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console

from llmtune.data.lm import resolve_template
from llmtune.data.pipeline import SourceReport
from llmtune.eval.config import EvalConfig
from llmtune.model.load import LoadedModel
from llmtune.rewards.model import score_conversations as score_with_model


@dataclass
class TaskResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # per-example output (JSONL)
    notes: list[str] = field(default_factory=list)


@dataclass
class Env:
    cfg: EvalConfig
    console: Console
    device: torch.device
    dtype: torch.dtype


def drop_metrics(report: SourceReport) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": report.rows, "dropped": report.dropped}
    if report.dropped:
        out["dropped_reasons"] = dict(report.reasons.most_common(5))
    return out


@contextmanager
def progress(console: Console, total: int, label: str) -> Iterator[Callable[[int], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def score_conversations(env: Env, rm: LoadedModel, convs: list[list[dict]], label: str) -> list[float]:
    """A reward model's score of each conversation (prompt turns + the assistant reply): the score head's
    output at the last real token (see llmtune.rewards.model), with a progress bar."""
    cfg = env.cfg
    template = resolve_template(rm.tokenizer, cfg.chat_template, required=False)
    with progress(env.console, len(convs), f"score ({label})") as advance:
        return score_with_model(
            rm.model,
            rm.tokenizer,
            convs,
            template=template,
            device=env.device,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            on_batch=advance,
        )
