"""``llmtune data inspect``: what training makes of a data file, shown before any model loads.

Everything goes through the pipeline that training uses (``load_source`` with the stage's encoder: the same
format detection, chat template rendering, label masks, truncation and drop reasons); this module only
chooses that encoder and prints the result: the format, the row counts, the rows that would be dropped (per
reason), a histogram of token lengths and one example with its trained tokens highlighted (rich styles on a
terminal, ``[[...]]`` otherwise).
"""

from __future__ import annotations

import difflib
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from llmtune.data.chat import IGNORE_INDEX
from llmtune.data.formats import RowError, detect_format
from llmtune.data.pipeline import Encoder, Example, SourceReport, dedup_sources, load_source
from llmtune.data.sources import read_rows
from llmtune.errors import DataError, UserError
from llmtune.recipe.data import PREFERENCE_FORMATS, DataSource
from llmtune.recipe.stages import STAGE_RECIPES

UNLIMITED = 1 << 30  # max_length for the pass that measures the rows before truncation
OPEN, CLOSE = "[[", "]]"
TRAINED_STYLE = "bold black on green"


@dataclass
class Inspection:
    """One source as training reads it (``examples``, ``report``) and the same rows before truncation
    (``full``: the example lengths with max_length lifted)."""

    source: DataSource
    stage: str
    default_format: str | None
    report: SourceReport
    examples: list[Example]
    full: list[int]
    max_length: int
    encode: Encoder
    full_by_row: dict[int, list[int]]


def stage_encoder(
    recipe: Any, tokenizer: Any, template: str | None, max_length: int, filters: bool = False
) -> tuple[Encoder, str | None]:
    """The encoder and default format the recipe's stage builds its data with (see each stage's build_data),
    chosen by the format the stage reads by default; filters: with data.filter's token bounds (sft, cpt)."""
    from llmtune.data.pipeline import conversation_encoder, text_encoder
    from llmtune.data.preference import preference_encoder

    fmt = recipe.default_format()
    f = recipe.data.filter
    bounds = (f.min_tokens, f.max_tokens) if filters else (None, None)
    if fmt is None:  # conversations, their format detected
        return conversation_encoder(tokenizer, template, max_length, recipe.sft.train_on_prompt, bounds), None
    if fmt == "text":
        return text_encoder(tokenizer, max_length, recipe.data.packing, bounds), fmt
    if fmt == "stepwise":
        from llmtune.data.stepwise import stepwise_encoder

        return stepwise_encoder(tokenizer, template, max_length, recipe.rm.step_separator), fmt
    if fmt in PREFERENCE_FORMATS:
        return preference_encoder(tokenizer, template, max_length, unpair=fmt == "unpaired"), fmt
    from llmtune.data.prompts import prompt_encoder

    budget = max_length - recipe.generation.max_new_tokens if max_length < UNLIMITED else max_length
    return prompt_encoder(tokenizer, template, max(budget, 8)), "prompts"


def guess_stage(
    path: str, fmt: str | None, columns: dict[str, str], tags: dict[str, str] | None = None
) -> tuple[str, dict[str, Any]]:
    """The stage (and the keys it is read with) to read a file with when no recipe says: from format:, else the
    rows; the stages' ``inspected`` formats in STAGE_RECIPES."""
    from llmtune.data.preference import detect_preference_format

    if fmt is None:
        rows = [
            r.data
            for r in read_rows(DataSource(path=path, columns=columns, tags=tags or {}))[:50]
            if r.data is not None
        ]
        if not rows:
            raise DataError(f"{path}: no readable row in the first 50 rows", hint="check the file's format")
        fmt = detect_preference_format(rows)
        if fmt is None:
            try:
                fmt = detect_format(rows)
            except DataError:
                if not any(isinstance(r, dict) and ("prompt" in r or "question" in r) for r in rows):
                    raise
                fmt = "prompts"  # prompts (and answers) for the online stages
    guessed = [(stage, keys[fmt]) for stage, info in STAGE_RECIPES.items() if fmt in (keys := info.inspected)]
    # a format no stage names (stepwise): read as conversations, the stage that detects them says what is wrong
    return guessed[0] if guessed else (conversation_stage(), {})


def conversation_stage() -> str:
    """The stage that reads conversations (its format detected among alpaca, sharegpt, messages): sft."""
    return next(stage for stage, info in STAGE_RECIPES.items() if info.default_format is None)


def inspect_source(recipe: Any, src: DataSource, tokenizer: Any, template: str | None) -> Inspection:
    max_length = recipe.data.max_length
    # the rows training keeps: with data.dedup and data.filter's token bounds (not the perplexity filter,
    # which needs a model's scores); the histogram below shows every usable row
    d = recipe.data
    encode, default_format = stage_encoder(recipe, tokenizer, template, max_length, filters=True)
    examples, report = load_source(src, encode, default_format, None, "inspect", d.dedup is not None)
    if d.dedup is not None:
        examples = dedup_sources([(examples, report)], d.dedup, d.dedup_threshold)[0]
    full_encode, _ = stage_encoder(recipe, tokenizer, template, UNLIMITED)
    full_examples, _ = load_source(src, full_encode, default_format, None, "inspect")
    full = [e.longest for e in full_examples]
    if default_format == "prompts":  # prompts are cut to leave room for the generated tokens
        max_length = max(max_length - recipe.generation.max_new_tokens, 8)
    by_row: dict[int, list[int]] = {}
    for e in full_examples:
        by_row.setdefault(e.row, []).append(e.longest)
    return Inspection(src, recipe.stage, default_format, report, examples, full, max_length, encode, by_row)


# --- printing ----------------------------------------------------------------------------------------------------


def histogram(lengths: list[int], max_length: int, width: int = 40, buckets: int = 10) -> list[str]:
    """Text histogram of token lengths (round bucket widths up to twice max_length, the rest in one last
    bucket), then max / median / share over max_length."""
    if not lengths:
        return ["  no example"]
    top = max(lengths)
    span = min(top, 2 * max_length)
    step = _round_step(max(span, 1) / buckets)
    last = span // step  # lengths beyond the span go to this bucket ("and more")
    counts = [0] * (last + 1)
    for n in lengths:
        counts[min(n // step, last)] += 1
    most = max(counts)
    digits = len(str((last + 1) * step))
    lines = []
    for b, n in enumerate(counts):
        lo, hi = b * step, (b + 1) * step - 1
        more = top > hi and b == last
        label = f"{lo:>{digits}}-{'' if more else hi:<{digits}}" if not more else f"{lo:>{digits}}+{'':<{digits}}"
        mark = "  <- max_length" if lo <= max_length <= hi else ""
        bar = "█" * max(1 if n else 0, round(width * n / most))
        lines.append(f"  {label} {bar:<{width}} {n}{mark}")
    over = sum(1 for n in lengths if n > max_length)
    lines.append(
        f"  max {top}, median {statistics.median(lengths):g}, over max_length {max_length}: {over} of "
        f"{len(lengths)} ({100 * over / len(lengths):.1f}%)"
    )
    return lines


def _round_step(x: float) -> int:
    for scale in (10**k for k in range(10)):
        for base in (1, 2, 5):
            if base * scale >= x:
                return base * scale
    return 10**10  # pragma: no cover


def render_example(tokenizer: Any, input_ids: list[int], labels: list[int], markers: bool) -> Text:
    """The tokens as text, the trained ones (label != IGNORE_INDEX) styled, or between [[ and ]]."""
    out = Text()
    run: list[int] = []
    trained = None

    def flush() -> None:
        if not run:
            return
        piece = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if trained and markers:
            out.append(OPEN + piece + CLOSE)
        else:
            out.append(piece, style=TRAINED_STYLE if trained else None)

    for tok, lab in zip(input_ids, labels, strict=True):
        is_trained = lab != IGNORE_INDEX
        if is_trained != trained:
            flush()
            run, trained = [], is_trained
        run.append(tok)
    flush()
    return out


def _part_names(default_format: str | None, fmt: str, n: int, values: list[float] | None) -> list[str]:
    if n == 1:
        if fmt == "unpaired" or (default_format == "unpaired" and values is not None):  # kto splits pairs
            return [f"completion (label {'desirable' if values and values[0] else 'undesirable'})"]
        if fmt == "pointwise" and values:
            return [f"response (score {values[0]:g})"]
        return [""]
    if n == 2 and fmt == "pairs":
        return ["chosen", "rejected"]
    return [f"response {i + 1}" + (" (best)" if i == 0 else "") for i in range(n)]


def print_inspection(
    out: Console, ins: Inspection, tokenizer: Any, *, row: int | None, markers: bool, rows: list[Any] | None = None
) -> None:
    r = ins.report
    how = (
        "detected from the first rows" if r.detected else ("the stage's default" if not ins.source.format else "given")
    )
    shape = _shape(ins, rows)
    out.print(f"format: {r.format} ({how}){shape}", markup=False)
    out.print(
        f"rows: {r.rows} read, {r.kept} kept, {r.dropped} would be dropped; examples: {len(ins.examples)}",
        markup=False,
    )
    if r.dropped:
        out.print("dropped rows, by reason:", markup=False)
        for why, n in r.reasons.most_common():
            firsts = [w for w, (_, reason) in zip(r.first_dropped(), r.first, strict=False) if reason == why]
            where = f"  (e.g. {firsts[0].split(':')[0]})" if firsts else ""
            out.print(f"  {n:>6}  {why}{where}", markup=False)
    unit = {
        "pairs": "the longer sequence of each row",
        "ranked": "the longest sequence of each row",
        "text": "each document",
    }.get(ins.report.format, "each example")
    out.print(f"token lengths before truncation ({unit}):", markup=False)
    for line in histogram(ins.full, ins.max_length):
        out.print(line, markup=False)
    _print_example(out, ins, tokenizer, row, markers)


def _shape(ins: Inspection, rows: list[Any] | None) -> str:
    if ins.report.format != "pairs" or not rows:
        return ""
    from llmtune.data.preference import pairs_shape

    first = next((x.data for x in rows if x.data is not None), None)
    return f"; rows shaped as {pairs_shape(first)}" if first is not None else ""


def _print_example(out: Console, ins: Inspection, tokenizer: Any, row: int | None, markers: bool) -> None:
    if row is None:
        if not ins.examples:
            out.print("no example to show: every row is dropped", markup=False)
            return
        index = ins.examples[0].row
    else:
        index = row - 1
    picked = read_rows(ins.source)[index]
    where = f" ({picked.where})" if picked.where and picked.where != f"row {index + 1}" else ""
    if picked.data is None:
        out.print(f"row {index + 1}{where} would be dropped: {picked.error}", markup=False)
        return
    try:
        examples = ins.encode(picked.data, ins.report.format, ins.source)
    except RowError as e:
        out.print(f"row {index + 1}{where} would be dropped: {e}", markup=False)
        return
    how = "between double square brackets" if markers else "highlighted"
    full = ins.full_by_row.get(index, [])
    if len(examples) == 1 and len(full) == 1 and full[0] > ins.max_length:
        out.print(f"row {index + 1}{where} has {full[0]} tokens: training cuts it to max_length {ins.max_length}")
    if ins.default_format == "text" and len(examples) > 1:
        out.print(f"row {index + 1}{where} is {len(examples)} chunks of max_length {ins.max_length}; the first:")
        examples = examples[:1]
    for e in examples:
        seqs = e.sequences()
        names = _part_names(ins.default_format, ins.report.format, len(seqs), e.values)
        for name, (ids, labels) in zip(names, seqs, strict=True):
            if not labels:  # a prompt of the online stages: the model generates what is learned
                out.print(f"prompt, row {index + 1}{where}: {len(ids)} tokens (nothing in it is trained)")
                out.print(render_example(tokenizer, ids, [IGNORE_INDEX] * len(ids), markers))
                continue
            n_trained = sum(1 for x in labels if x != IGNORE_INDEX)
            label = f" {name}:" if name else ":"
            out.print(
                f"example, row {index + 1}{where}{label} {len(ids)} tokens, {n_trained} trained ({how})",
                markup=False,
            )
            out.print(render_example(tokenizer, ids, labels, markers))


def inspect_command(
    file: Path | None,
    recipe_path: Path | None,
    overrides: list[str],
    model: str | None,
    stage: str | None,
    fmt: str | None,
    max_length: int | None,
    chat_template: str | None,
    row: int | None,
    max_rows: int | None,
    markers: bool | None,
    registry: str | None = None,
) -> None:
    from llmtune.recipe import load_recipe, validate_recipe

    if recipe_path is None:  # with --recipe, --model is refused below (the recipe names its model)
        from llmtune.model.hub import check_model_options

        check_model_options([("--model", model)])
    out = Console(highlight=False, soft_wrap=True)
    formats = get_args(get_args(DataSource.model_fields["format"].annotation)[0])
    if fmt is not None and fmt not in formats:
        close = difflib.get_close_matches(fmt, formats, n=1)
        raise UserError(
            f"--format {fmt}: unknown format" + (f". Did you mean {close[0]!r}?" if close else ""),
            hint=f"use one of {', '.join(formats)}, or leave it out to detect it",
        )
    default_model = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "model"
    if recipe_path is not None:
        for opt, value in (("--model", model), ("--stage", stage), ("--chat-template", chat_template)):
            if value is not None:
                raise UserError(
                    f"{opt} and --recipe both say which {opt[2:]} to use",
                    hint=f"drop {opt}, or change the recipe with --set (e.g. --set model.path=...)",
                )
        recipe = load_recipe(recipe_path, overrides)
        if max_length is not None:
            recipe.data.max_length = max_length
        said = f"recipe {recipe_path}: stage {recipe.stage}, model {recipe.model.path}"
    else:
        if overrides:
            raise UserError("--set changes a recipe: it needs --recipe", hint="pass --recipe R, or drop --set")
        if registry is not None and file is None:
            raise UserError(
                "--registry needs the NAME of one of its datasets", hint="llmtune data inspect NAME --registry R"
            )
        if file is None:
            raise UserError("give a data FILE, or --recipe R to inspect its training sources", hint="see --help")
        extra: dict[str, Any] = {}
        guessed = stage is None
        source: dict[str, Any] = {"path": str(file), "format": fmt}
        if registry is not None:  # FILE is a name of the registry
            data = validate_recipe(
                {"stage": conversation_stage(), "output_dir": "inspect", "model": {"path": "-"},
                 "data": {"registry": registry, "train": [{"name": str(file), "format": fmt}]}},
                "data inspect --registry",
            ).data  # fmt: skip
            source = data.train[0].model_dump()
            file = Path(source["path"])
        variants = {
            name: (st.stage, st.stage_values) for info in STAGE_RECIPES.values() for name, st in info.variants.items()
        }
        if stage in variants:  # kto: dpo with loss kto
            stage, extra = variants[stage]
        elif stage is None:
            stage, extra = guess_stage(str(file), fmt, source.get("columns") or {}, source.get("tags") or {})
        raw = {
            "stage": stage,
            "output_dir": "inspect",
            "model": {"path": model or str(default_model), "chat_template": chat_template},
            "data": {"train": [source], "max_length": max_length or 2048},
            **extra,
        }
        recipe = validate_recipe(raw, "data inspect")
        loss = "".join(f" ({key} {value})" for key, value in extra.get(stage, {}).items())  # dpo (loss kto)
        why = " (guessed from the rows: pass --stage to choose)" if guessed else ""
        said = f"stage {stage}{loss}{why}, model {recipe.model.path}"
        if model is None:
            said += " (the repository's tiny model: pass --model PATH or --recipe R for your tokenizer)"
    sources = _sources(recipe, file, fmt)
    for src in sources:
        if max_rows is not None:
            src.max_samples = max_rows
        if row is not None:  # before the tokenizer loads: a wrong --row fails fast
            n = len(read_rows(src)[: src.max_samples])
            if not 1 <= row <= n:
                raise UserError(f"--row {row}: {src.path} has rows 1 to {n}", hint="pick a row in that range")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()  # the measuring pass tokenizes rows longer than the model's positions
    from llmtune.data.chat import resolve_chat_template
    from llmtune.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    needs_template = recipe.default_format() != "text"
    template = resolve_chat_template(tokenizer, recipe.model.chat_template, required=needs_template)
    if template is not None:
        tokenizer.chat_template = template
    which = recipe.model.chat_template or ("the tokenizer's" if template is not None else "none")
    out.print(f"{said}; chat template: {which}; max_length {recipe.data.max_length}", markup=False)
    use_markers = markers if markers is not None else not out.is_terminal
    for src in sources:
        named = f" (dataset {src.name} of the registry)" if src.name else ""
        out.print(f"\n[bold]{escape(src.path)}[/]{escape(named)}")
        ins = inspect_source(recipe, src, tokenizer, template)
        print_inspection(out, ins, tokenizer, row=row, markers=use_markers, rows=read_rows(src))


def _sources(recipe: Any, file: Path | None, fmt: str | None) -> list[DataSource]:
    """The recipe's source for FILE (its columns / system / format kept), a new source, or all train sources."""
    if file is None:
        return [s.model_copy() for s in recipe.data.train]
    named = [s for s in [*recipe.data.train, *recipe.data.eval] if s.name == str(file)]
    if named:
        return [named[0].model_copy(update={"format": fmt or named[0].format})]
    target = file.expanduser().resolve()
    for s in [*recipe.data.train, *recipe.data.eval]:
        p = Path(s.path).expanduser()
        if p.exists() and p.resolve() == target:
            return [s.model_copy(update={"format": fmt or s.format})]
    return [DataSource(path=str(file), format=fmt)]  # type: ignore[arg-type]
