"""LM samples from a text or sft data file outside a training run (eval's perplexity, Fisher-weighted
merging), and the row reading eval's tasks share: rows read whole and converted, the bad ones dropped and
counted; samples labelled as training labels them. Messages name the command line's options (--format,
--chat-template), not recipe keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmtune.data.chat import encode_conversation, encode_text, resolve_chat_template
from llmtune.data.formats import RowError, detect_format, to_conversation, to_text
from llmtune.data.packing import Sample
from llmtune.data.pipeline import SourceReport
from llmtune.data.sources import read_rows
from llmtune.errors import DataError, UserError
from llmtune.recipe.data import DataSource


def read_data(path: str, max_samples: int | None) -> list[Any]:
    """The rows of a data file (sources.Row: data, or the error that made it unreadable), the first max_samples."""
    rows = read_rows(DataSource(path=path))
    return rows[:max_samples] if max_samples is not None else rows


def convert(
    rows: list[Any], fn: Callable[[dict], Any], name: str, what: str
) -> tuple[list[tuple[int, Any]], SourceReport]:
    """Apply fn to every readable row; bad rows are dropped and counted. No usable row is a DataError."""
    report = SourceReport(name=name, rows=len(rows))
    out: list[tuple[int, Any]] = []
    for row in rows:
        if row.data is None:
            report.drop(row.index, row.error or "unreadable row", row.where)
            continue
        try:
            out.append((row.index, fn(row.data)))
            report.kept += 1
        except RowError as e:
            report.drop(row.index, str(e), row.where)
    if not out:
        top = in_option_terms("; ".join(report.first_dropped(3)))
        raise DataError(f"{name}: no row is usable as {what} ({report.rows} rows; e.g. {top})", hint=format_hint(what))
    return out, report


def format_hint(what: str) -> str:
    return {
        "prompts": "rows need a prompt: prompt / question / instruction (+input) / messages, and `answer` to score",
        "pairs": "rows need prompt, chosen and rejected (or LLaMA-Factory's conversations + chosen / rejected)",
    }.get(what, "check --format and the file's columns")


def resolve_template(tokenizer: Any, override: str | None, required: bool) -> str | None:
    """data.chat.resolve_chat_template, its messages in the command line's terms (in_option_terms)."""
    try:
        return resolve_chat_template(tokenizer, override, required=required)
    except UserError as e:  # the shared message names the recipe key; eval's is --chat-template
        raise type(e)(in_option_terms(e.message), hint=in_option_terms(e.hint) if e.hint else None) from None


def in_option_terms(text: str) -> str:
    """A shared (recipe-side) message in the command line's terms: its options rather than recipe keys."""
    for recipe_key, option in (
        ("set model.chat_template to", "pass --chat-template"),
        ("check model.chat_template", "check --chat-template"),
        ("model.chat_template", "--chat-template"),
        ("this stage renders", "this task renders"),
    ):
        text = text.replace(recipe_key, option)
    return text


def _detect_format(rows: list[Any], path: str) -> str:
    """detect_format, with the command line's fix: the --format option (the shared hint names a recipe's `format:`)."""
    try:
        return detect_format([r.data for r in rows[:50] if r.data is not None])
    except DataError as e:
        raise DataError(
            f"{path}: {e.message}",
            hint="pass --format text|alpaca|sharegpt|messages (format: in an eval file), "
            "or rename the file's columns to the names of one of those formats",
        ) from None


def lm_rows(path: str, fmt: str | None, max_samples: int | None = None) -> tuple[list[Any], str]:
    """The rows of a text or sft data file and their format (detected when None); other data is refused."""
    rows = read_data(path, max_samples)
    if fmt is None:
        fmt = _detect_format(rows, path)
    if fmt in ("prompts", "pairs"):
        raise UserError(
            f"{path} holds {fmt} rows: perplexity and Fisher weights are computed on text or sft data "
            "(text, alpaca, sharegpt, messages)",
            hint="use --task generate for prompts, --task preference for pairs",
        )
    return rows, fmt


def lm_samples(
    rows: list[Any],
    fmt: str,
    path: str,
    tok: Any,
    chat_template: str | None,
    max_length: int,
    system: str | None = None,
) -> tuple[list[Sample], SourceReport]:
    """Rows (from lm_rows) as scored token samples, labelled as training labels them: every token of a text
    document, cut into max_length pieces; the assistant replies of a conversation. Used by task perplexity
    and by Fisher-weighted merging."""
    template = resolve_template(tok, chat_template, required=fmt != "text")

    def encode(row: dict) -> list[Sample]:
        if fmt == "text":  # a document, cut into max_length pieces as cpt does; every token is learned
            ids = encode_text(tok, to_text(row))
            return [
                Sample(c, list(c))
                for c in (ids[i : i + max_length] for i in range(0, len(ids), max_length))
                if len(c) >= 2
            ]
        assert template is not None
        conv = to_conversation(row, fmt, default_system=system)
        ids, labels = encode_conversation(tok, template, conv, max_length, train_on_prompt=False)
        return [Sample(ids, labels)]

    encoded, report = convert(rows, encode, path, fmt)
    return [s for _, ss in encoded for s in ss], report
