"""Reading the rows of one data source: a local file, a directory of files, or a hub dataset.

Rows come back as they are in the file (after ``columns:`` renaming); turning them into text or
conversations is ``llmtune.data.formats``' job, and sampling (``max_samples``, ``weight``) is the caller's.
A row that cannot be parsed (a JSONL line that is not JSON, an array element that is not an object) is a
``Row`` with an ``error`` rather than an exception, so one bad line does not stop a run; problems with the
whole source (missing path, unknown suffix, a file that is not JSON or not UTF-8, nothing to read) raise
``DataError`` naming the file and the fix. This module imports neither torch nor ``datasets`` at import time.

Where a row is, in messages: ``line N`` (the file's line, from 1) in line-based files (JSONL, CSV / TSV,
TXT), ``row N`` (from 1) in JSON arrays, parquet files and hub datasets; in a directory the file's path
relative to it comes first (``sub/a.jsonl line 3``). ``Row.where`` holds that text for every row.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.errors import DataError
from llmtune.paths import looks_local
from llmtune.recipe.data import DataSource

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".json.gz", ".jsonl.gz")
_WRAPPER_KEYS = ("data", "rows", "examples", "records", "instances", "samples", "items", "train")

Parsed = tuple[dict | None, str | None, str]  # (row, None, where) or (None, "where: reason", where)


@dataclass
class Row:
    """One row of a source: ``data`` is the row, or ``error`` says why the row could not be parsed.

    ``index`` is the 0-based position of the row in the source (across the files of a directory, in
    sorted file order), for the program; ``where`` is the row's place for the user ("line 41", "row 3",
    "sub/a.jsonl line 2"), and an ``error`` starts with it.
    """

    index: int
    data: dict | None
    error: str | None = None
    where: str = field(default="", compare=False)


def read_rows(src: DataSource) -> list[Row]:
    """All rows of ``src`` (a file, a directory of data files, or a hub id), with ``src.columns`` and
    ``src.tags`` (sharegpt role names, see llmtune.recipe.registry) applied."""
    if not looks_local(src.path):
        parsed: list[Parsed] = [(row, None, f"row {i}") for i, row in enumerate(_read_hub(src), start=1)]
    else:
        parsed = _read_local(Path(src.path).expanduser(), src.path)
    if src.columns:
        parsed = _rename(parsed, src.columns, src.path)
    if src.tags:
        from llmtune.recipe.registry import apply_tags

        parsed = [(row if row is None else apply_tags(row, src.tags), err, where) for row, err, where in parsed]
    return [Row(i, data, err, where) for i, (data, err, where) in enumerate(parsed)]


def supported_suffix(path: Path) -> str | None:
    """The data suffix of ``path`` (``.jsonl``, ``.json.gz``, ...) if it is one this module reads."""
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


# ---------------------------------------------------------------------------------------------- local


def _read_local(path: Path, shown: str) -> list[Parsed]:
    if not path.exists():
        raise DataError(
            f"data path {shown} does not exist",
            hint="check the path (relative paths are read from the current directory) or give an absolute path",
        )
    if path.is_dir():
        return _read_dir(path)
    suffix = supported_suffix(path)
    if suffix is None:
        raise DataError(
            f"data file {path} has an unsupported suffix {''.join(path.suffixes) or '(none)'!r}",
            hint=f"convert it to, or rename it as, one of {', '.join(SUPPORTED_SUFFIXES)}",
        )
    rows = _read_file(path, suffix, label="")
    if not rows:
        raise DataError(f"data file {path} is empty (no rows)", hint="point the source at a file with data rows")
    return rows


def _read_dir(path: Path) -> list[Parsed]:
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    data_files = [p for p in files if supported_suffix(p) is not None]
    if not data_files:
        others = ", ".join(p.relative_to(path).as_posix() for p in files[:5]) or "nothing"
        raise DataError(
            f"data directory {path} has no data files (found {others}{', ...' if len(files) > 5 else ''})",
            hint=f"put files ending in one of {', '.join(SUPPORTED_SUFFIXES)} in it, or point to a file",
        )
    rows: list[Parsed] = []
    for p in data_files:
        rows.extend(_read_file(p, supported_suffix(p) or "", label=f"{p.relative_to(path).as_posix()} "))
    if not rows:
        raise DataError(
            f"data directory {path}: all of its data files are empty",
            hint="point the source at files with data rows",
        )
    return rows


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _read_file(path: Path, suffix: str, label: str) -> list[Parsed]:
    """Rows of one file; ``label`` ("sub/file.jsonl " in a directory, else "") prefixes the rows' places."""
    if suffix == ".parquet":
        return _read_parquet(path, label)
    raw = path.read_bytes()
    if suffix.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"data file {path} is not a valid gzip file ({e})",
                hint="re-compress it with gzip, or decompress it and drop the .gz suffix",
            ) from None
        suffix = suffix[: -len(".gz")]
    text = _decode(raw, path)
    if suffix == ".json":
        return _read_json(text, path, label)
    if suffix == ".jsonl":
        return _read_jsonl(text, path, label)
    if suffix in (".csv", ".tsv"):
        return _read_csv(text, path, label, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix == ".txt":
        return [
            ({"text": line.rstrip("\r")}, None, f"{label}line {n}")
            for n, line in enumerate(text.split("\n"), start=1)
            if line.strip()
        ]
    raise AssertionError(f"unhandled suffix {suffix}")  # pragma: no cover


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"data file {path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
            f"(line {line}) cannot be decoded",
            hint="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)",
        ) from None


def _read_json(text: str, path: Path, label: str) -> list[Parsed]:
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except RecursionError:
        if _looks_like_jsonl(text):
            return _read_jsonl(text, path, label)
        raise DataError(
            f"data file {path} is nested too deeply to read as JSON",
            hint="rows are flat objects (a .json file holds one array of them; a .jsonl file one per line)",
        ) from None
    except json.JSONDecodeError as e:
        if _looks_like_jsonl(text):
            return _read_jsonl(text, path, label)
        raise DataError(
            f"data file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
            hint="fix the file there (a .json file holds one array of row objects; "
            "one object per line belongs in a .jsonl file)",
        ) from None
    if isinstance(obj, dict):
        obj = _unwrap(obj, path)
    if not isinstance(obj, list):
        raise DataError(
            f"data file {path} holds a JSON {_kind(obj)}, not an array of rows",
            hint='write the rows as a JSON array of objects: [{"instruction": ..., "output": ...}, ...]',
        )
    rows: list[Parsed] = []
    for n, item in enumerate(obj, start=1):
        where = f"{label}row {n}"
        if isinstance(item, dict):
            rows.append((item, None, where))
        else:
            rows.append((None, f"{where}: a JSON {_kind(item)}, not an object", where))
    return rows


def _looks_like_jsonl(text: str) -> bool:
    """True when the first two non-blank lines each parse as a JSON object on their own."""
    lines = [line for line in text.split("\n") if line.strip()][:2]
    if len(lines) < 2:
        return False
    try:
        return all(isinstance(json.loads(line), dict) for line in lines)
    except (json.JSONDecodeError, RecursionError):
        return False


def _unwrap(obj: dict, path: Path) -> Any:
    """The row list inside ``{"data": [...]}``-style wrappers; a lone object with row keys is one row."""
    lists = [k for k, v in obj.items() if isinstance(v, list)]
    if len(obj) == 1 and lists:
        return obj[lists[0]]
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), list):
            return obj[key]
    if set(obj) & {"text", "instruction", "conversations", "messages"}:
        return [obj]
    raise DataError(
        f"data file {path} holds one JSON object with keys {sorted(obj)} and no list of rows",
        hint='write the rows as a JSON array of objects, or as {"data": [...]}',
    )


def _read_jsonl(text: str, path: Path, label: str) -> list[Parsed]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array saved as .jsonl
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            pass
        else:
            if isinstance(obj, list):
                return _read_json(text, path, label)
    rows: list[Parsed] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{label}line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((None, f"{where}: not valid JSON ({e.msg} at column {e.colno})", where))
            continue
        except RecursionError:
            rows.append((None, f"{where}: JSON nested too deeply", where))
            continue
        if isinstance(item, dict):
            rows.append((item, None, where))
        else:
            rows.append((None, f"{where}: a JSON {_kind(item)}, not an object", where))
    return rows


def _read_csv(text: str, path: Path, label: str, delimiter: str) -> list[Parsed]:
    if not text.strip():
        return []
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    if not any(h and h.strip() for h in header):
        raise DataError(
            f"data file {path} has no header row",
            hint="the first line must name the columns (e.g. instruction,output)",
        )
    rows: list[Parsed] = []
    try:
        for rec in reader:
            extra = rec.pop(None, None)  # type: ignore[call-overload]
            missing = [k for k, v in rec.items() if v is None]
            where = f"{label}line {reader.line_num}"
            if extra or missing:
                n = len(header) + len(extra or []) - len(missing)
                rows.append((None, f"{where}: {n} fields, but the header has {len(header)}", where))
            else:
                rows.append((dict(rec), None, where))
    except csv.Error as e:
        raise DataError(
            f"data file {path} is not valid {'TSV' if delimiter == chr(9) else 'CSV'}: {e} (line {reader.line_num})",
            hint="fix the quoting on that line, or convert the file to JSONL",
        ) from None
    return rows


def _read_parquet(path: Path, label: str) -> list[Parsed]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(
            f"data file {path} could not be read as parquet: {_first_line(e)}",
            hint="check that the file is a complete parquet file (re-export or re-download it)",
        ) from None
    return [(row, None, f"{label}row {n}") for n, row in enumerate(table.to_pylist(), start=1)]


# ------------------------------------------------------------------------------------------------ hub


def _read_hub(src: DataSource) -> Iterator[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(src.path, src.subset, split=src.split)
    except Exception as e:
        raise DataError(
            f"dataset {src.path!r} (subset {src.subset}, split {src.split}) could not be loaded from the hub: "
            f"{_first_line(e)}",
            hint="check the id, subset and split; an offline machine needs a local file "
            "(download the data and set path: to the file or directory)",
        ) from None
    for row in ds:
        yield dict(row)


# --------------------------------------------------------------------------------------------- helpers


def _rename(parsed: list[Parsed], columns: dict[str, str], shown: str) -> list[Parsed]:
    """Rename file columns to the canonical names (``columns`` maps canonical name -> file column)."""
    good = [row for row, _, _ in parsed if row is not None]
    for canonical, col in columns.items():
        if good and not any(col in row for row in good):
            present = sorted({k for row in good[:100] for k in row})
            raise DataError(
                f"columns: maps {canonical} to {col!r}, but no row of {shown} has a column {col!r} "
                f"(columns found: {', '.join(present)})",
                hint=f"set columns.{canonical} to one of the columns found",
            )
    sources = set(columns.values())
    out: list[Parsed] = []
    for row, err, where in parsed:
        if row is None:
            out.append((row, err, where))
            continue
        new = {k: v for k, v in row.items() if k not in sources}
        for canonical, col in columns.items():
            if col in row:
                new[canonical] = row[col]
        out.append((new, None, where))
    return out


def _kind(obj: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
    }.get(type(obj), "null" if obj is None else type(obj).__name__)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
