"""``llmtune data label``: preference pairs from a judge model (RLAIF, as in UltraFeedback / RLAIF-V).

Each input row holds a prompt (any shape the online stages read: ``prompt``, ``question``, alpaca
``instruction``, ``messages``) and two or more replies: a list under ``responses``, ``completions``,
``replies`` or ``outputs``, or an existing pair's ``chosen`` and ``rejected`` (re-judged). Replies that are
empty, or that repeat another reply of the row, are left out (counted).

- ``pairwise`` (default): the judge compares each pair of replies in both orders
  (:meth:`llmtune.rewards.judge.Judge.compare`). A pair agreed on in both orders is a row; a tie, orders that
  disagree (position bias) and an unparsable verdict are dropped and counted. ``--pairs all`` writes every
  decided pair of a prompt; ``best-worst`` one row per prompt: the reply with the most wins (then the fewest
  losses) over the one with the most losses, when the judge decided that pair itself.
- ``pointwise``: the judge scores each reply (1-10 by default); the best over the worst is a row when both
  scores parsed and the best is strictly higher (else dropped: unparsable, tie).

Rows are ``{prompt (messages), chosen, rejected, row, judge}``: the pairs format that the rm and dpo stages read
as it is (``row`` is the input row, ``judge`` how the judge decided). Written as they are made, resumable
(llmtune.commands.resumable): rerunning the command continues after the last input row done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from llmtune.commands.resumable import ResumableOutputs, run_with_status
from llmtune.errors import DataError, UserError

REPLY_KEYS = ("responses", "completions", "replies", "outputs")


@dataclass
class LabelConfig:
    mode: str = "pairwise"  # pairwise | pointwise
    pairs: str = "all"  # all | best-worst (pairwise)
    batch_size: int = 8  # input rows judged per batch (and written per commit)
    max_rows: int | None = None  # label at most this many input rows (default: all)


@dataclass
class Item:
    row: int  # the input row's index
    messages: list[dict]
    replies: list[str]


def read_items(path: str, on_drop: Callable[[str, str], None]) -> list[Item]:
    """Every input row with a prompt and at least two distinct non-empty replies; the others are dropped
    with a reason (on_drop(reason, where)). No usable row at all is a DataError that names the shapes read."""
    from llmtune.data.formats import RowError
    from llmtune.data.prompts import to_prompt
    from llmtune.data.sources import read_rows
    from llmtune.recipe.data import DataSource

    rows = read_rows(DataSource(path=path))
    items: list[Item] = []
    for r in rows:
        if r.data is None:
            on_drop("unreadable row", r.error or r.where)
            continue
        data = r.data
        replies = _replies(data)
        if replies is None:
            on_drop("no replies", r.where)
            continue
        try:
            probe = {k: v for k, v in data.items() if k not in ("chosen", "rejected", *REPLY_KEYS)}
            messages = to_prompt(probe).messages
        except (RowError, ValueError):
            on_drop("no prompt", r.where)
            continue
        kept: list[str] = []
        for text in replies:
            if not text.strip():
                on_drop("empty reply", r.where)
            elif text.strip() in (k.strip() for k in kept):
                on_drop("repeated reply", r.where)
            else:
                kept.append(text)
        if len(kept) < 2:
            on_drop("fewer than 2 usable replies", r.where)
            continue
        items.append(Item(r.index, messages, kept))
    if not items:
        raise DataError(
            f"{path}: no row has a prompt and two or more different, non-empty replies",
            hint='give rows like {"prompt": ..., "responses": [reply, reply, ...]} (or completions / replies / '
            "outputs, or chosen + rejected)",
        )
    return items


def _replies(row: dict) -> list[str] | None:
    for key in REPLY_KEYS:
        value = row.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    if isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
        return [row["chosen"], row["rejected"]]
    return None


def pairwise_rows(item: Item, outcomes: dict[tuple[int, int], Any], pairs: str) -> tuple[list[dict], list[str]]:
    """(rows, drop reasons) of one item from its pairs' Comparisons (keyed (i, j), i < j; x = reply i)."""
    rows: list[dict] = []
    drops: list[str] = []
    decided: dict[tuple[int, int], str] = {}  # (winner, loser) -> the two verdicts
    for (i, j), c in outcomes.items():
        if c.outcome in ("x", "y"):
            w, l_ = (i, j) if c.outcome == "x" else (j, i)
            decided[(w, l_)] = c
        else:
            drops.append({"tie": "tie", "inconsistent": "inconsistent (position bias)"}.get(c.outcome, "unparsable"))
    if pairs == "all":
        for (w, l_), c in decided.items():
            rows.append(_pair(item, w, l_, {"mode": "pairwise", "verdicts": list(c.verdicts), "pair": [w, l_]}))
        return rows, drops
    wins = [sum(1 for w, _ in decided if w == k) for k in range(len(item.replies))]
    losses = [sum(1 for _, l_ in decided if l_ == k) for k in range(len(item.replies))]
    best = max(range(len(wins)), key=lambda k: (wins[k], -losses[k], -k))
    worst = max(range(len(losses)), key=lambda k: (losses[k], -wins[k], -k))
    c = decided.get((best, worst))
    if c is None:  # no comparison decided, or the judge's verdicts are not transitive
        return [], [*drops, "no decided best-worst pair"]
    meta = {"mode": "pairwise", "verdicts": list(c.verdicts), "pair": [best, worst], "wins": wins, "losses": losses}
    return [_pair(item, best, worst, meta)], drops


def pointwise_rows(item: Item, judged: list[Any], low: float, high: float) -> tuple[list[dict], list[str]]:
    """(rows, drop reasons) of one item from its replies' Judgements: the best over the worst."""
    scores = [j.score for j in judged]
    if any(s is None for s in scores):
        return [], ["unparsable"]
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    worst = min(range(len(scores)), key=lambda k: (scores[k], k))
    if scores[best] == scores[worst]:
        return [], ["tie"]
    return [_pair(item, best, worst, {"mode": "pointwise", "scores": scores, "scale": [low, high]})], []


def _pair(item: Item, chosen: int, rejected: int, judge: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": item.messages,
        "chosen": item.replies[chosen],
        "rejected": item.replies[rejected],
        "row": item.row,
        "judge": judge,
    }


class Labeler:
    """Labels ``items`` with ``judge`` (a llmtune.rewards.judge.Judge), appending to ``out`` (see the module
    docstring); ``run`` returns {"pairs", "rows", "done", "dropped"}."""

    def __init__(self, judge: Any, items: list[Item], out: Path, cfg: LabelConfig) -> None:
        if cfg.mode not in ("pairwise", "pointwise"):
            raise UserError(f"--mode {cfg.mode!r} is not one of pairwise, pointwise")
        if cfg.pairs not in ("all", "best-worst"):
            raise UserError(f"--pairs {cfg.pairs!r} is not one of all, best-worst")
        self.judge, self.items, self.cfg = judge, items, cfg
        self.outputs = ResumableOutputs({"pairs": out}, "data label")

    def todo(self) -> list[Item]:
        items = [it for it in self.items if it.row >= self.outputs.done]
        if self.cfg.max_rows is not None:
            done = sum(1 for it in self.items if it.row < self.outputs.done)
            items = items[: max(0, self.cfg.max_rows - done)]
        return items

    def run(self, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
        todo = self.todo()
        for start in range(0, len(todo), self.cfg.batch_size):
            batch = todo[start : start + self.cfg.batch_size]
            rows: list[dict] = []
            for new, drops in self._label(batch):
                rows += new
                for why in drops:
                    self.outputs.drop(why)
            self.outputs.commit({"pairs": rows}, batch[-1].row + 1)
            if on_batch is not None:
                on_batch(len(batch))
        return {
            "pairs": self.outputs.written["pairs"],
            "done": self.outputs.done,
            "dropped": dict(self.outputs.dropped),
        }

    def _label(self, batch: list[Item]) -> list[tuple[list[dict], list[str]]]:
        if self.cfg.mode == "pointwise":
            flat = [(it, r) for it in batch for r in it.replies]
            judged = self.judge.score([it.messages for it, _ in flat], [r for _, r in flat])
            out, at = [], 0
            for it in batch:
                out.append(pointwise_rows(it, judged[at : at + len(it.replies)], self.judge.low, self.judge.high))
                at += len(it.replies)
            return out
        asks = [(it, i, j) for it in batch for i, j in combinations(range(len(it.replies)), 2)]
        results = self.judge.compare(
            [it.messages for it, _, _ in asks],
            [it.replies[i] for it, i, _ in asks],
            [it.replies[j] for it, _, j in asks],
        )
        by_item: dict[int, dict[tuple[int, int], Any]] = {id(it): {} for it in batch}
        for (it, i, j), c in zip(asks, results, strict=True):
            by_item[id(it)][(i, j)] = c
        return [pairwise_rows(it, by_item[id(it)], self.cfg.pairs) for it in batch]


def label_command(
    data: str,
    out: Path,
    judge_model: str,
    *,
    cfg: LabelConfig,
    rubric: str | None,
    scale: tuple[float, float],
    max_new_tokens: int,
    judge_batch_size: int,
    chat_template: str | None,
    console: Any,
    prefill: bool = True,
) -> dict[str, Any]:
    """The command: checks (before the judge loads), reads the rows, labels what is not done yet, prints the
    summary. A run that made no pair at all is a UserError (exit 2) naming the drops."""
    from llmtune.paths import check_path_length, looks_local
    from llmtune.rewards.judge import Judge, model_completer, read_rubric, require_judge_model

    for key, value in (("--out", out), ("--data", data), ("--judge", judge_model)):
        check_path_length(key, str(value))
    if scale[0] >= scale[1]:
        raise UserError(f"--scale {scale[0]:g} {scale[1]:g}: give low < high, e.g. --scale 1 10")
    if cfg.mode not in ("pairwise", "pointwise") or cfg.pairs not in ("all", "best-worst"):
        raise UserError(f"--mode {cfg.mode!r} / --pairs {cfg.pairs!r}: use pairwise | pointwise and all | best-worst")
    from llmtune.runtime import quiet_libraries

    quiet_libraries(loading_bars=False)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory", hint="name a .jsonl file")
    if looks_local(judge_model) and not Path(judge_model).expanduser().exists():
        raise UserError(f"--judge {judge_model} does not exist", hint="give an instruct model directory or .gguf file")
    pairwise = cfg.mode == "pairwise"
    text = read_rubric(rubric, pairwise=pairwise, what="--rubric")
    require_judge_model(judge_model, "--judge")
    first_drops: dict[str, str] = {}
    read_drops: dict[str, int] = {}

    def on_drop(why: str, where: str) -> None:
        read_drops[why] = read_drops.get(why, 0) + 1
        first_drops.setdefault(why, where)

    items = read_items(data, on_drop)
    out.parent.mkdir(parents=True, exist_ok=True)
    labeler = Labeler(None, items, out, cfg)
    todo = labeler.todo()
    if labeler.outputs.resumed:
        console.print(
            f"{out} holds {labeler.outputs.written['pairs']} pairs from an earlier run ({labeler.outputs.done} "
            f"input rows done): continuing"
        )
    if read_drops and not labeler.outputs.resumed:
        for why, n in read_drops.items():
            labeler.outputs.drop(why, n)
    for why, where in first_drops.items():
        console.print(f"note: {read_drops[why]} x {why} (first: {where})")
    if todo:
        from llmtune.model.resolve import pick_device

        device = pick_device("auto")
        with console.status(f"loading the judge {judge_model}"):
            complete, close = model_completer(
                judge_model, max_new_tokens=max_new_tokens, batch_size=judge_batch_size, chat_template=chat_template,
                device=device, dtype="auto", what="--judge", console=console,
            )  # fmt: skip
        try:
            labeler.judge = Judge(
                complete,
                rubric=None if pairwise else text,
                pairwise_rubric=text if pairwise else None,
                scale=scale,
                prefill=prefill,
            )
            result = run_with_status(
                console, "labelling", len(todo), labeler.run, lambda: f"{labeler.outputs.written['pairs']} pairs"
            )
        finally:
            close()
    else:
        result = labeler.run()
    dropped = labeler.outputs.dropped_text()
    print(
        f"{result['pairs']} pairs in {out} from {result['done']} input rows ({cfg.mode})"
        + (f"; dropped: {dropped}" if dropped else "")
    )
    if result["pairs"] == 0:
        raise UserError(
            f"the judge decided no pair ({dropped or 'nothing was judged'})",
            hint="use a stronger instruct model as --judge, raise --max-new-tokens if its verdicts are cut, or "
            "check the rubric (--rubric) asks for the answer the parser reads (Verdict: A / B / tie; Score: N)",
        )
    return result
