"""The first rows of each local data source, read the way train reads them (llmtune.data.sources) but without
reading a large file whole: malformed rows are flagged (refused with data.on_bad_row: error), and a source
that names its format must have that format's keys (part of validate's preflight checks; no torch)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from llmtune.errors import DataError, RecipeError
from llmtune.recipe.data import DataSource
from llmtune.recipe.schema import RecipeBase
from llmtune.recipe.stages import STAGE_RECIPES

SAMPLE_ROWS = 100
_FULL_READ_BYTES = 2**20  # a file up to this size is read whole, as train reads it; larger ones line by line
_JSON_READ_BYTES = 64 * 2**20  # a .json document (one array) has no first lines: read whole up to this size

# per format: alternatives, each the keys a row needs (llmtune.data.formats / preference / data.prompts)
FORMAT_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "text": (("text",),),
    "alpaca": (("instruction", "output"),),
    "sharegpt": (("conversations",),),
    "messages": (("messages",),),
    "pairs": (("chosen", "rejected"),),
    "ranked": (("responses",), ("chosen", "rejected")),
    "pointwise": tuple(("score", k) for k in ("response", "completion", "messages", "conversations")),
    "unpaired": tuple(("label", k) for k in ("completion", "response", "messages", "conversations")),
    "prompts": (("prompt",), ("question",), ("instruction",), ("messages",), ("conversations",)),
    "stepwise": (("completions", "labels"), ("input", "label"), ("question", "label")),
}
FORMAT_NEEDS = {
    "text": "text",
    "alpaca": "instruction and output",
    "sharegpt": "conversations",
    "messages": "messages",
    "pairs": "chosen and rejected",
    "ranked": "responses (or chosen and rejected)",
    "pointwise": "score and one of response, completion, messages, conversations",
    "unpaired": "label and one of completion, response, messages, conversations",
    "prompts": "one of prompt, question, instruction, messages, conversations",
    "stepwise": "completions and labels (or Math-Shepherd's input and label, or PRM800K's question and label)",
}

Parsed = tuple[dict | None, str | None, str]  # (row, None, place) or (None, reason, place)


def has_format_keys(row: dict, fmt: str) -> bool:
    return any(all(k in row for k in keys) for keys in FORMAT_KEYS.get(fmt, ((),)))


def detected_format(rows: list[dict]) -> str | None:
    """The format train would detect for these rows (preference formats first, then the conversation
    formats, then prompts); None when none fits."""
    from llmtune.data.formats import detect_format
    from llmtune.data.preference import detect_preference_format

    found = detect_preference_format(rows)
    if found is not None:
        return found
    try:
        return detect_format(rows)
    except DataError:
        pass
    if any(isinstance(r, dict) and ("prompt" in r or "question" in r) for r in rows[:20]):
        return "prompts"
    return None


def sample_rows(src: DataSource, limit: int = SAMPLE_ROWS) -> tuple[list[Parsed], bool]:
    """The first ``limit`` rows of a local source as (row, None, place) / (None, reason, place), ``columns:`` applied,
    and whether they are all of its rows. Raises DataError for what train refuses about the whole source."""
    from llmtune.data import sources as S

    path = Path(src.path).expanduser()
    if not path.exists():
        return [], True
    parsed: list[Parsed] = []
    complete = True
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and not S._hidden(p.relative_to(path))),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        data_files = [p for p in files if S.supported_suffix(p) is not None]
        if not data_files:
            others = ", ".join(p.relative_to(path).as_posix() for p in files[:5]) or "nothing"
            raise DataError(
                f"data directory {path} has no data files (found {others}{', ...' if len(files) > 5 else ''})",
                hint=f"put files ending in one of {', '.join(S.SUPPORTED_SUFFIXES)} in it, or point to a file",
            )
        for n, p in enumerate(data_files):
            rows, whole = _sample_file(p, S.supported_suffix(p) or "", f"{p.relative_to(path).as_posix()} ", limit)
            parsed.extend(rows)
            complete = complete and whole
            if len(parsed) >= limit:
                complete = complete and n == len(data_files) - 1  # later files may hold rows too
                break
    else:
        suffix = S.supported_suffix(path)
        if suffix is None:
            raise DataError(
                f"data file {path} has an unsupported suffix {''.join(path.suffixes) or '(none)'!r}",
                hint=f"convert it to, or rename it as, one of {', '.join(S.SUPPORTED_SUFFIXES)}",
            )
        parsed, complete = _sample_file(path, suffix, "", limit)
    if len(parsed) > limit:
        parsed, complete = parsed[:limit], False
    if src.columns:
        parsed = S._rename(parsed, src.columns, src.path)  # as train renames them
    return parsed, complete


def _parsed(rows: list[tuple], label: str) -> list[Parsed]:
    """(row, error, place) of llmtune.data.sources' parsed rows; the place ("line 3") where they give none."""
    return [(t[0], t[1], str(t[2]) if len(t) > 2 else f"{label}row {n}") for n, t in enumerate(rows, start=1)]


def _sample_file(path: Path, suffix: str, label: str, limit: int) -> tuple[list[Parsed], bool]:
    """The first rows of one data file (at least ``limit`` when it has them) and whether that is all of it."""
    from llmtune.data import sources as S

    try:
        size = path.stat().st_size
    except OSError:
        return [], False
    base = suffix[: -len(".gz")] if suffix.endswith(".gz") else suffix
    if size <= (_JSON_READ_BYTES if base == ".json" else _FULL_READ_BYTES):
        try:
            rows = _parsed(S._read_file(path, suffix, label), label)
        except OSError as e:
            raise _unreadable(path, e) from None
        return rows, len(rows) <= limit
    if base == ".parquet":
        return _sample_parquet(path, label, limit)
    if base == ".json":
        return [], False  # one very large JSON document: read whole by train only
    lines: list[bytes] = []
    wanted = limit + 2 if base in (".csv", ".tsv") else limit
    complete, filled = True, 0
    try:
        with gzip.open(path, "rb") if suffix.endswith(".gz") else path.open("rb") as f:
            for line in f:
                lines.append(line)
                filled += bool(line.strip())
                if filled >= wanted:
                    complete = not f.read(1)
                    break
    except (OSError, EOFError, zlib.error) as e:
        if suffix.endswith(".gz") and not isinstance(e, (FileNotFoundError, PermissionError)):
            raise DataError(
                f"data file {path} is not a valid gzip file ({e})",
                hint="re-compress it with gzip, or decompress it and drop the .gz suffix",
            ) from None
        raise _unreadable(path, e) from None
    text = S._decode(b"".join(lines), path)
    if base == ".jsonl":
        if text.lstrip().startswith("["):
            return [], False  # a large JSON array saved as .jsonl: read whole only by train
        rows = _parsed(S._read_jsonl(text, path, label), label)
    elif base in (".csv", ".tsv"):
        rows = _parsed(S._read_csv(text, path, label, delimiter="\t" if base == ".tsv" else ","), label)
        if not complete and rows:
            rows = rows[:-1]  # the last record may be cut at the end of the sample
    else:
        rows = [
            ({"text": line.rstrip("\r")}, None, f"{label}line {n}")
            for n, line in enumerate(text.split("\n"), start=1)
            if line.strip()
        ]
    return rows, complete


def _unreadable(path: Path, e: OSError) -> DataError:
    return DataError(
        f"data file {path} cannot be read ({e.strerror or e})",
        hint="check that the file is there and readable by you (its permissions)",
    )


def _sample_parquet(path: Path, label: str, limit: int) -> tuple[list[Parsed], bool]:
    try:
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path)
        batch = next(f.iter_batches(batch_size=limit), None)
    except Exception as e:
        text = str(e).strip()
        raise DataError(
            f"data file {path} could not be read as parquet: {text.splitlines()[0] if text else type(e).__name__}",
            hint="check that the file is a complete parquet file (re-export or re-download it)",
        ) from None
    rows = [] if batch is None else batch.to_pylist()
    return [(row, None, f"{label}row {n}") for n, row in enumerate(rows, start=1)], f.metadata.num_rows <= limit


def check_data_sample(recipe: RecipeBase, src: DataSource, where: str) -> list[str]:
    """Read the first rows of a local source: unreadable rows are a note (refused with data.on_bad_row: error,
    or when no row of the source can be read), and an explicit format: must match the rows' keys."""
    limit = min(SAMPLE_ROWS, src.max_samples or SAMPLE_ROWS)
    try:
        parsed, complete = sample_rows(src, limit)
    except DataError as e:
        raise DataError(f"{where}.path: {e.message}", hint=e.hint) from None
    notes: list[str] = []
    good = [(place, row) for row, _, place in parsed if row is not None]
    bad = [err or f"{place}: unreadable row" for row, err, place in parsed if row is None]
    first = f"the first {len(parsed)} rows" if not complete else f"the {len(parsed)} rows"
    if bad:
        shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
        summary = f"{where}.path {src.path}: {len(bad)} of {first} cannot be read ({shown})"
        if recipe.data.on_bad_row == "error":
            raise DataError(
                summary,
                hint="fix those lines (data.on_bad_row is error: train stops on them), or set data.on_bad_row: drop "
                "to skip them",
            )
        if not good and complete:
            raise DataError(
                f"{where}.path {src.path}: none of its {len(parsed)} rows can be read ({shown})",
                hint="write one JSON object per line (.jsonl), or a JSON array of objects (.json)",
            )
        notes.append(f"{summary}: train drops them (data.on_bad_row: drop)")
    fmt = src.format
    if fmt is None or not good:
        return notes
    info = STAGE_RECIPES[recipe.stage]
    stage_formats = info.formats
    if stage_formats and fmt not in stage_formats:
        raise RecipeError(
            f"{where}.format: {fmt} is not a format stage {recipe.stage} trains on (it reads "
            f"{', '.join(stage_formats)})",
            hint=f"set {where}.format to one of {', '.join(stage_formats)}, or omit it to detect the format"
            + (" (raw text is for stage cpt)" if fmt == "text" else ""),
        )
    # the online stages read every row as a prompt, whatever format it names (llmtune.data.prompts)
    needed = "prompts" if info.online else fmt
    needs = f"the keys {FORMAT_NEEDS[needed]}"
    if needed != fmt:
        needs += f" (stage {recipe.stage} reads each row as a prompt)"
    rows = [row for _, row in good]
    if bad:
        first = f"the {len(rows)} readable rows of {first}"
    lacking = [(place, row) for place, row in good if not has_format_keys(row, needed)]
    if not lacking:
        return notes
    if len(lacking) < len(rows):
        if recipe.data.on_bad_row == "error":
            place, row = lacking[0]
            raise DataError(
                f"{where} ({src.path}): format {fmt} needs {needs}, and {len(lacking)} of {first} lack them "
                f"({place} has keys {_keys([row])})",
                hint="fix those rows (data.on_bad_row is error: train stops on them), or set data.on_bad_row: drop "
                "to skip them",
            )
        notes.append(f"{where} ({src.path}): {len(lacking)} of {first} lack {needs} of format {fmt}: train drops them")
        return notes
    found = detected_format(rows)
    if found is not None and found in stage_formats:
        hint = f"the rows look like format {found}: set {where}.format: {found} (or omit format: to detect it)"
    elif found is not None:
        hint = (
            f"the rows look like format {found}, which stage {recipe.stage} does not train on (it reads "
            f"{', '.join(stage_formats)}): give it data in one of those formats"
        )
    else:
        hint = "no format llmtune reads matches these keys"
    hint += f"; or map your columns to those keys with {where}.columns (e.g. {_columns_example(needed)})"
    raise DataError(
        f"{where} ({src.path}) has format: {fmt}, which needs {needs}, but none of {first} has them "
        f"(keys found: {_keys(rows)}; detected format: {found or 'none'})",
        hint=hint,
    )


def _keys(rows: list[dict]) -> str:
    keys = sorted({str(k) for row in rows[:20] for k in row})
    return ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "") if keys else "(none)"


def _columns_example(fmt: str) -> str:
    return {
        "alpaca": "{instruction: question, output: answer}",
        "text": "{text: content}",
        "sharegpt": "{conversations: dialog}",
        "messages": "{messages: dialog}",
        "pairs": "{chosen: better, rejected: worse}",
        "ranked": "{responses: answers}",
        "pointwise": "{response: answer, score: rating}",
        "unpaired": "{completion: answer, label: good}",
        "prompts": "{prompt: question}",
        "stepwise": "{completions: steps, labels: step_labels}",
    }[fmt]
