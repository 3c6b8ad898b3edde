"""What a run tells its user: the data summary, a progress bar, log lines and metrics.jsonl."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from llmtune.data.filters import is_filter_reason
from llmtune.data.formats import UNDESIRABLE


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def run_console(is_main: bool) -> Console:
    """The run's console: quiet on every process but rank 0; in a log file (not a terminal) wide lines, so
    that paths and tables are not cut."""
    import sys

    wide = None if sys.stdout.isatty() else 200
    return Console(quiet=not is_main, highlight=False, soft_wrap=True, width=wide)


class MetricsLog:
    """One JSON object per line: step, loss, lr, ... and eval/* metrics. Only the main process writes."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None, trackers: Any = None) -> None:
        """A fresh log, or (resume_step) the old one cut back to the records up to the resumed step, so that
        steps a killed run logged after its last checkpoint are not listed twice. trackers (engine.trackers):
        they get every row written here."""
        self.path, self.enabled, self.trackers = path, enabled, trackers
        if not enabled:
            return
        kept: list[str] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
                except ValueError:
                    continue  # a line cut short by a kill
        path.write_text("".join(kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
        if self.trackers is not None:
            self.trackers.log(clean)


# The keys a log line shows first, in this order; the rest follow as they come, while the line is short.
KEY_METRICS = (
    "skipped",
    "loss",
    "lr",
    "grad_norm",
    "reward",
    "reward_std",
    "kl",
    "completion_length",
    "ended",
    "clip_fraction",
    "entropy",
    "epoch",
)
LINE_LIMIT = 160  # characters of one log line (every metric still goes to metrics.jsonl)
_COUNTS = ("tokens", "samples", "units", "pairs", "rows", "nan_skips", "overflow_skips", "step", "round")


def format_value(key: str, v: Any) -> str:
    """One metric as a log line shows it: counts as integers, learning rates always as 1.00e-03, rates
    (x_per_s) and durations (x_s) with few decimals, the epoch with two, other numbers with 4 decimals (or
    3 significant digits in exponent form when very small or large)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    name = key.rsplit("/", 1)[-1]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if name in _COUNTS:
        return str(round(v))
    if name == "lr" or name.endswith("_lr"):
        return f"{v:.2e}"
    if name.endswith("_per_s"):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"
    if name.endswith("_s"):
        return f"{v:.2f}"
    if name == "epoch":
        return f"{v:.2f}"
    return f"{v:.3e}" if (abs(v) < 1e-3 and v != 0) or abs(v) >= 1e5 else f"{v:.4f}"


def format_duration(seconds: float) -> str:
    """0:07, 12:34, 1:02:03 (hours:minutes:seconds, as a clock)."""
    s = max(0, round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_record(record: dict[str, Any], total: int, timing: str = "", limit: int = LINE_LIMIT) -> str:
    """A metrics record as one log line: `step N/TOTAL (timing): key=value ...`, the key metrics first; the
    line stops before `limit` characters and says how many more metrics.jsonl holds."""
    keys = [k for k in record if k != "step" and record[k] is not None]
    keys.sort(key=lambda k: KEY_METRICS.index(k) if k in KEY_METRICS else len(KEY_METRICS))
    head = f"step {record['step']}/{total}" + (f" ({timing})" if timing else "") + ":"
    line = head
    for i, k in enumerate(keys):
        part = f" {k}={format_value(k, record[k])}"
        more = len(keys) - i - 1
        reserve = len(f" (+{more} more in metrics.jsonl)") if more else 0
        if i and len(line) + len(part) + reserve > limit:
            return line + f" (+{len(keys) - i} more in metrics.jsonl)"
        line += part
    return line


class Progress:
    """A rich progress bar (loss, lr, ETA) on a terminal; log lines everywhere, each with the step out of the
    total, the time since training started and the time left (so that a piped or logged run says it too)."""

    def __init__(self, console: Console, total: int, start: int) -> None:
        self.console, self.total, self.start = console, total, start
        self.bar = RichProgress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=console.quiet or not console.is_terminal,
            transient=False,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", lr="-")
        self.bar.start()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float | None, lr: float) -> None:
        self.bar.update(
            self.task, completed=step, loss="-" if loss is None else f"{loss:.4f}", lr=format_value("lr", lr)
        )

    def timing(self, step: int) -> str:
        """ "0:12 elapsed, ETA 1:15": the rate of this session's steps so far, over the steps left."""
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        if done <= 0:
            return f"{format_duration(elapsed)} elapsed"
        return f"{format_duration(elapsed)} elapsed, ETA {format_duration(elapsed / done * (self.total - step))}"

    def log(self, record: dict[str, Any]) -> None:
        evaluation = any(k.startswith("eval/") for k in record)
        timing = "eval" if evaluation else self.timing(record["step"])
        self.console.print(format_record(record, self.total, timing), markup=False)

    def stop(self) -> None:
        self.bar.stop()


def _longest(sample: Any) -> int:
    """The longest sequence of a train row: a preference row holds several (prompt + each reply) in its
    input_ids and says its longest itself; any other row is one sequence."""
    longest = getattr(sample, "longest", None)
    if callable(longest):
        longest = longest()
    return int(longest) if isinstance(longest, int) else len(sample.input_ids)


def _first_dropped(report: Any, n: int) -> list[str]:
    if hasattr(report, "first_dropped"):
        return report.first_dropped(n)
    return [f"row {i + 1}: {why}" for i, why in report.first[:n]]


def print_data_summary(console: Console, data: Any, recipe: Any) -> None:
    """Rows read / kept / dropped per source, the examples each gives after its weight, the first dropped
    rows with reasons, and the shape."""
    weighted = any(getattr(r, "weight", 1.0) != 1.0 for r in data.reports)
    table = Table(title="data", title_justify="left", show_edge=False)
    cols = ("source", "rows", "kept", "dropped", *(("weight",) if weighted else ()), "examples", "cached")
    for col in cols:
        table.add_column(col, justify="left" if col == "source" else "right")
    for r in data.reports:
        weight = (f"{getattr(r, 'weight', 1.0):g}",) if weighted else ()
        table.add_row(
            r.name, str(r.rows), str(r.kept), str(r.dropped), *weight, str(r.examples), "yes" if r.cached else ""
        )
    console.print(table)
    for r in data.reports:
        if r.dropped:
            reasons = "; ".join(f"{why} ({n}x)" for why, n in r.reasons.most_common(4))
            first = ", ".join(_first_dropped(r, 3))
            console.print(f"[yellow]dropped[/] {r.dropped} of {r.rows} rows of {r.name}: {reasons}. First: {first}")
    for r in data.reports:
        filtered = [(why, n) for why, n in r.reasons.items() if is_filter_reason(why)]
        if filtered:
            counts = "; ".join(f"{why}: {n}" for why, n in filtered)
            console.print(f"filtered {sum(n for _, n in filtered)} rows of {r.name}: {counts}")
    for r in data.reports:
        n = r.reasons.get(UNDESIRABLE, 0)
        if n:
            console.print(
                f"[yellow]note:[/] {n} of {r.rows} rows of {r.name} have label false (undesirable replies: KTO "
                "data) and are not trained on; sft learns the rows with label true. To learn from both, train "
                "the file with stage dpo and dpo.loss: kto"
            )
    for note in getattr(data, "notes", []):
        console.print(note)
    summary = getattr(data.train, "summary", None)
    if summary is not None:  # a memory-mapped corpus: counted from its index, not by reading every row
        c = summary()
        console.print(
            f"train rows: {c['rows']:,} (max_length {recipe.data.max_length}, packing "
            f"{'on' if recipe.data.packing else 'off'}, memory-mapped), tokens: "
            f"{c['tokens']:,}, learned tokens: {c['learned']:,}, longest row: {c['longest']}; eval rows: "
            f"{len(data.eval):,}"
        )
        return
    lengths = [len(s.input_ids) for s in data.train]
    if any(lengths):  # (rejection sampling's prompts are not tokenized when they are read)
        learned = sum(sum(1 for x in s.labels[1:] if x != -100) for s in data.train)
        console.print(
            f"train rows: {len(lengths):,} (max_length {recipe.data.max_length}, packing "
            f"{'on' if recipe.data.packing else 'off'}), tokens: {sum(lengths):,}, learned tokens: {learned:,}, "
            f"longest row: {max(_longest(s) for s in data.train)}; eval rows: {len(data.eval):,}"
        )
