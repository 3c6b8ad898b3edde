"""Training curves: the loss (train and eval) and, where a run logs them, reward, accuracy and KL, drawn from
``metrics.jsonl`` to a PNG. Every run writes ``curves.png`` to its output_dir when it finishes; ``llmtune plot``
draws one run again or compares several (one line per run, labelled by its directory name).

``curve_data`` is pure (run directories in, panels of (x, y) lines out) so that what a plot shows can be
checked against the metrics; ``draw`` is the only part that imports matplotlib (headless, the Agg backend).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.errors import UserError

CURVES_FILE = "curves.png"  # written to output_dir at the end of every run

# The default panels: a panel is drawn when some run logged one of its metrics. Train metrics are solid
# lines, eval/ metrics dashed with markers (they are logged every eval_every steps only).
DEFAULT_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "eval/loss")),
    (
        "reward",
        ("reward", "reward_chosen", "reward_rejected", "eval/reward", "eval/reward_chosen", "eval/reward_rejected"),
    ),
    ("accuracy", ("accuracy", "eval/accuracy")),
    ("kl", ("kl", "eval/kl")),
)
# rejection sampling's rounds.jsonl: one point per round (generation and scoring, before that round's sft)
ROUND_METRICS = ("mean_reward", "mean_best_reward")
_NOT_CURVES = {"step", "epoch", "round", "skipped"}  # row keys that are no metric to plot


@dataclass
class Line:
    """One curve: ``metric`` of run ``run`` at the steps ``x``."""

    run: str
    metric: str
    x: list[float]
    y: list[float]

    @property
    def is_eval(self) -> bool:
        return self.metric.startswith("eval/")


@dataclass
class Panel:
    title: str
    xlabel: str
    lines: list[Line] = field(default_factory=list)


@dataclass
class RunCurves:
    """What one run directory holds for plotting: its metrics.jsonl rows and (rejection sampling) rounds."""

    path: Path
    name: str
    stage: str | None
    rows: list[dict[str, Any]]
    rounds: list[dict[str, Any]]

    def metrics(self) -> list[str]:
        """The numeric metrics some row logs, sorted."""
        names = {k for row in self.rows for k, v in row.items() if k not in _NOT_CURVES and _number(v) is not None}
        return sorted(names)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_run(run_dir: Path | str) -> RunCurves:
    """A run directory's metrics.jsonl (and rounds.jsonl, run.json's stage); a clear error when there is none."""
    path = Path(run_dir).expanduser()
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise UserError(
            f"{run_dir}: " + ("does not exist" if not path.exists() else "is not a directory"),
            hint="pass a run's output_dir (the directory `llmtune train` wrote)",
        )
    if not metrics.is_file():
        raise UserError(
            f"{run_dir} has no metrics.jsonl: it is not the output_dir of an llmtune run (or the run logged nothing)",
            hint="pass a run's output_dir (the directory that holds run.json and metrics.jsonl)",
        )
    rows = [r for r in _read_jsonl(metrics) if _number(r.get("step")) is not None]
    if not rows:
        raise UserError(
            f"{metrics} holds no logged step yet",
            hint="plot the run once it has logged a step (train.log_every sets how often it does)",
        )
    rounds = _read_jsonl(path / "rounds.jsonl") if (path / "rounds.jsonl").is_file() else []
    stage = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        stage = json.loads((path / "run.json").read_text(encoding="utf-8")).get("stage")
    return RunCurves(path=path, name=path.resolve().name or str(path), stage=stage, rows=rows, rounds=rounds)


def _steps(rows: list[dict[str, Any]]) -> list[float]:
    """Each row's x: its step, and for a rejection-sampling run (rows with ``round``, each round's sft
    counting from step 1) the steps of the rounds before added, so that the rounds follow each other."""
    if not any("round" in r for r in rows):
        return [float(r["step"]) for r in rows]
    last: dict[Any, float] = {}
    for r in rows:
        last[r.get("round")] = max(last.get(r.get("round"), 0.0), float(r["step"]))
    offsets, total = {}, 0.0
    for k in sorted(last, key=lambda k: (k is None, k)):
        offsets[k], total = total, total + last[k]
    return [offsets[r.get("round")] + float(r["step"]) for r in rows]


def _line(run: RunCurves, metric: str) -> Line | None:
    xs, ys = [], []
    for x, row in zip(_steps(run.rows), run.rows, strict=True):
        y = _number(row.get(metric))
        if y is not None:
            xs.append(x)
            ys.append(y)
    return Line(run.name, metric, xs, ys) if xs else None


def _labels(runs: list[RunCurves]) -> None:
    """Directory names label the runs; where two runs share one, their paths do."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = str(r.path)


def curve_data(runs: list[RunCurves], metrics: list[str] | None = None) -> list[Panel]:
    """The panels to draw. metrics None: the default panels (loss; reward, accuracy and KL where logged; per
    round reward for rejection sampling); else one panel per named metric, which some run must log."""
    _labels(runs)
    xlabel = "step (rounds one after another)" if any("round" in row for r in runs for row in r.rows) else "step"
    panels: list[Panel] = []
    if metrics:
        present = sorted({m for r in runs for m in r.metrics()})
        unknown = [m for m in metrics if m not in present]
        if unknown:
            raise UserError(
                f"--metric {', '.join(unknown)}: not logged by "
                + ("this run" if len(runs) == 1 else "any of these runs"),
                hint=f"name one of: {', '.join(present)}",
            )
        groups = [(m, (m,)) for m in metrics]
    else:
        groups = list(DEFAULT_PANELS)
    for title, names in groups:
        lines = [line for r in runs for m in names if (line := _line(r, m)) is not None]
        if lines:
            panels.append(Panel(title, xlabel, lines))
    if not metrics:
        lines = []
        for r in runs:
            for m in ROUND_METRICS:
                pts = [(float(s["round"]), v) for s in r.rounds if (v := _number(s.get(m))) is not None]
                if pts:
                    lines.append(Line(r.name, m, [p[0] for p in pts], [p[1] for p in pts]))
        if lines:
            panels.append(Panel("reward per round (sampling)", "round", lines))
    if not panels:
        present = sorted({m for r in runs for m in r.metrics()})
        raise UserError(
            "no curve to draw: the metrics.jsonl logs none of " + ", ".join(m for _, g in groups for m in g[:1]),
            hint=f"name what to plot with --metric: {', '.join(present) or '(no metric logged)'}",
        )
    return panels


def _title(runs: list[RunCurves]) -> str:
    if len(runs) == 1:
        r = runs[0]
        return f"{r.stage}: {r.name}" if r.stage else r.name
    return "comparison of " + ", ".join(r.name for r in runs)


def figure(runs: list[RunCurves], panels: list[Panel]) -> Any:
    """The matplotlib figure of the panels (up to 2 per row). Several runs: one colour per run, one line style
    per metric, the legend names both; one run: one colour per metric. Eval metrics are dashed, with markers."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: no display, no GUI toolkit
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.4 * cols, 4.0 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(runs) > 1
    keys = [r.name for r in runs] if several else list(dict.fromkeys(ln.metric for p in panels for ln in p.lines))
    colour = {k: palette[i % len(palette)] for i, k in enumerate(keys)}  # per run; one run: per metric
    styles = ["-", "-.", ":"]  # train metrics; eval metrics are dashed
    for ax, panel in zip(axes, panels, strict=False):
        train_metrics = list(dict.fromkeys(ln.metric.removeprefix("eval/") for ln in panel.lines))
        for ln in panel.lines:
            style = styles[train_metrics.index(ln.metric.removeprefix("eval/")) % len(styles)]
            label = f"{ln.run}: {ln.metric}" if several else ln.metric
            sparse = ln.is_eval or len(ln.x) <= 20 or panel.xlabel == "round"
            ax.plot(
                ln.x,
                ln.y,
                linestyle="--" if ln.is_eval else style,
                marker="o" if sparse else None,
                markersize=4,
                color=colour[ln.run if several else ln.metric],
                label=label,
            )
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and rounds are whole numbers
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(_title(runs))
    return fig


def draw(run_dirs: list[Path | str], out: Path | str, metrics: list[str] | None = None) -> Path:
    """Read the runs, draw their curves and write the PNG to ``out``; returns its path."""
    runs = [read_run(d) for d in run_dirs]
    panels = curve_data(runs, metrics)
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"--out {out} is a directory", hint=f"name a file, e.g. {out / CURVES_FILE}")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: curves are written as PNG", hint=f"name a .png file, e.g. {out.stem}.png")
    fig = figure(runs, panels)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(out)  # a reader never sees half a PNG
    return out


def write_run_curves(run_dir: Path, console: Any) -> Path | None:
    """End of a run: draw output_dir/curves.png. Never fails a finished run: a problem is one warning line."""
    try:
        path = draw([run_dir], run_dir / CURVES_FILE)
    except Exception as e:  # matplotlib missing or broken, a full disk, ...: the model is written already
        from rich.markup import escape

        why = escape(f"{type(e).__name__}: {e}".splitlines()[0])
        console.print(f"[yellow]warning:[/] {CURVES_FILE} not drawn ({why}); the run is complete")
        return None
    console.print(f"curves: {path}")
    return path
