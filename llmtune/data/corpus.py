"""Continued pretraining on corpora larger than memory (``data.memory_map: true``).

Each text source is read line by line (``.txt``: a document a line; ``.jsonl`` / ``.jsonl.gz``: a ``text``
field a line, after ``columns`` renames) and tokenized in batches by the fast tokenizer's own threads, the
documents' tokens (each ending in EOS) appended to one flat token file in the data cache. It is written once
(keyed by the file contents, the source's settings and the tokenizer) to a temporary name and then renamed,
so a killed run never leaves half a cache. Training then reads it through a memory map: a row is the slice
``[i * max_length, (i + 1) * max_length)``, the same packed rows ``pack_stream`` makes in memory, built when
a batch asks for it. What stays in memory is an index of rows (8 bytes per row), not the tokens, so memory
does not grow with the corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtune.data.pipeline import PIPELINE_VERSION, Sample, SourceReport, _fingerprint_source, cache_root
from llmtune.errors import DataError
from llmtune.paths import looks_local
from llmtune.recipe.schema import DataSource, RecipeBase

CORPUS_VERSION = "1"
BATCH_BYTES = 1 << 20  # text handed to the tokenizer at a time (its ids are Python lists: keep it small)
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


@dataclass
class TokenFile:
    """One source's tokens in the cache: a flat array of ids, read through a memory map."""

    path: Path
    dtype: str
    tokens: int

    def array(self) -> np.ndarray:
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))


class PackedCorpus(Sequence):
    """Rows of max_length tokens cut from token files, in the order of ``index`` (row numbers over all files,
    as a weight repeats or samples them). Every token is learned, as in cpt's in-memory packing."""

    def __init__(self, files: list[TokenFile], max_length: int, index: np.ndarray) -> None:
        self.files, self.max_length, self.index = files, max_length, index
        self.arrays = [f.array() for f in files]
        counts = [rows_in(f.tokens, max_length) for f in files]
        self.starts = np.cumsum([0, *counts])  # row numbers where each file's rows begin

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = int(self.index[i])
        f = int(np.searchsorted(self.starts, row, side="right")) - 1
        local = row - int(self.starts[f])
        ids = self.arrays[f][local * self.max_length : (local + 1) * self.max_length].tolist()
        return Sample(ids, list(ids))

    def summary(self) -> dict[str, int]:
        """Row, token and learned-token counts without reading the tokens (for the data summary)."""
        if not len(self.index):
            return {"rows": 0, "tokens": 0, "learned": 0, "longest": 0}
        f = np.searchsorted(self.starts, self.index, side="right") - 1
        local = self.index - self.starts[f]
        sizes = np.array([x.tokens for x in self.files], dtype=np.int64)
        lengths = np.minimum(self.max_length, sizes[f] - local * self.max_length)
        n = len(self.index)
        return {
            "rows": n,
            "tokens": int(lengths.sum()),
            "learned": int(lengths.sum()) - n,
            "longest": int(lengths.max()),
        }


def rows_in(tokens: int, max_length: int) -> int:
    """Rows of max_length the tokens give; a last shorter piece counts when it has 2 tokens or more."""
    whole, rest = divmod(tokens, max_length)
    return whole + (1 if rest >= 2 else 0)


def _documents(src: DataSource, report: SourceReport) -> Iterator[str]:
    """The source's documents, one at a time; rows without usable text are dropped and counted."""
    from llmtune.data.formats import RowError, to_text

    path = Path(src.path).expanduser()
    files = sorted(q for q in path.rglob("*") if q.is_file() and q.name.endswith(SUFFIXES)) if path.is_dir() else [path]
    index = 0
    for f in files:
        jsonl = not f.name.endswith(".txt")
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rb") as raw:
            for n, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), start=1):
                where = f"{f.name + ' ' if path.is_dir() else ''}line {n}"
                if src.max_samples is not None and index >= src.max_samples:
                    return
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue  # blank lines are separators, not rows
                report.rows += 1
                index += 1
                if not jsonl:
                    report.kept += 1
                    yield line
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise RowError(f"not a JSON object (got {type(row).__name__})")
                    for canonical, col in src.columns.items():
                        if col in row:
                            row[canonical] = row.pop(col)
                    text = to_text(row)
                except json.JSONDecodeError as e:
                    report.drop(index - 1, f"not valid JSON ({e.msg})", where)
                    continue
                except RowError as e:
                    report.drop(index - 1, str(e), where)
                    continue
                report.kept += 1
                yield text


def _tokenize_to(src: DataSource, tokenizer: Any, target: Path, report: SourceReport) -> TokenFile:
    """Write the source's tokens (each document + EOS) to target; returns its record."""
    dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max else "uint32"
    eos = tokenizer.eos_token_id
    total = 0
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "tokens.bin", "wb") as out:

        def flush(batch: list[str]) -> int:
            ids = tokenizer(batch, add_special_tokens=True)["input_ids"]
            pieces = [
                np.asarray(x + ([eos] if eos is not None and (not x or x[-1] != eos) else []), dtype=dtype) for x in ids
            ]
            flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
            out.write(flat.tobytes())
            return int(flat.size)

        batch: list[str] = []
        size = 0
        for text in _documents(src, report):
            batch.append(text)
            size += len(text)
            if size >= BATCH_BYTES:
                total += flush(batch)
                batch, size = [], 0
        if batch:
            total += flush(batch)
    meta = {"dtype": dtype, "tokens": total, "rows": report.rows, "kept": report.kept}
    meta["reasons"] = dict(report.reasons)
    meta["first"] = report.first
    meta["first_where"] = report.first_where
    (tmp / "meta.json").write_text(json.dumps(meta))
    if target.exists():  # another process finished the same cache first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return TokenFile(target / "tokens.bin", dtype, total)


def _cached(target: Path, report: SourceReport) -> TokenFile | None:
    try:
        meta = json.loads((target / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    report.rows, report.kept, report.cached = meta["rows"], meta["kept"], True
    report.reasons.update(meta["reasons"])
    report.first = [tuple(x) for x in meta["first"]]  # type: ignore[misc]
    report.first_where = list(meta["first_where"])
    return TokenFile(target / "tokens.bin", meta["dtype"], meta["tokens"])


def check_source(src: DataSource, where: str) -> None:
    if src.path is None or not looks_local(src.path):
        raise DataError(
            f"{where}: data.memory_map reads local .txt / .jsonl files, not the hub dataset {src.path}",
            hint="download the dataset to .jsonl files first, or set data.memory_map: false",
        )
    p = Path(src.path).expanduser()
    if p.is_file() and not p.name.endswith(SUFFIXES):
        raise DataError(
            f"{where}: data.memory_map reads {', '.join(SUFFIXES)} files, not {p.name}",
            hint="convert it to JSONL with a text field, or set data.memory_map: false",
        )


def token_file(src: DataSource, tokenizer: Any, fingerprint: str, recipe: RecipeBase) -> tuple[TokenFile, SourceReport]:
    """The source's token file: from the cache, or tokenized into it now."""
    report = SourceReport(name=src.path, format="text")
    settings = "|".join(
        [CORPUS_VERSION, PIPELINE_VERSION, _fingerprint_source(src), src.model_dump_json(), fingerprint]
    )
    report.fingerprint = hashlib.sha256(settings.encode()).hexdigest()[:32]
    target = cache_root(recipe) / "corpus" / report.fingerprint
    hit = _cached(target, report)
    if hit is not None:
        return hit, report
    return _tokenize_to(src, tokenizer, target, report), report


def build_corpus(
    recipe: RecipeBase, tokenizer: Any, fingerprint: str
) -> tuple[PackedCorpus, PackedCorpus, list[SourceReport]]:
    """The train and eval rows of a memory-mapped cpt run, mixed by the sources' weights and data.eval_split
    (which holds out whole rows), and the sources' reports."""
    d = recipe.data
    rng = np.random.default_rng(recipe.seed)
    pyrng = random.Random(recipe.seed)
    train_files: list[TokenFile] = []
    eval_files: list[TokenFile] = []
    train_index: list[np.ndarray] = []
    eval_index: list[np.ndarray] = []
    reports: list[SourceReport] = []
    for group, sources in (("train", d.train), ("eval", d.eval)):
        for k, src in enumerate(sources):
            check_source(src, f"data.{group}[{k}]")
            tf, report = token_file(src, tokenizer, fingerprint, recipe)
            reports.append(report)
            n = rows_in(tf.tokens, d.max_length)
            if n == 0:
                raise DataError(
                    f"data source {src.path} yields no usable example ({report.rows} rows read, {report.kept} kept)",
                    hint="check that its rows hold text",
                )
            files, index = (train_files, train_index) if group == "train" else (eval_files, eval_index)
            offset = sum(rows_in(f.tokens, d.max_length) for f in files)
            files.append(tf)
            rows = np.arange(offset, offset + n, dtype=np.int64)
            report.examples = n
            if group == "eval":
                index.append(rows)
                continue
            if d.eval_split > 0:
                n_eval = max(1, round(d.eval_split * n))
                if n_eval >= n:
                    raise DataError(f"data.eval_split {d.eval_split} leaves no training example from {src.path}")
                perm = rng.permutation(n)
                held = np.sort(perm[:n_eval])
                # held-out rows are read from the training file: they join the eval side as its own copy
                eval_files.append(tf)
                eval_offset = sum(rows_in(f.tokens, d.max_length) for f in eval_files[:-1])
                eval_index.append(held + eval_offset)
                rows = rows[np.sort(perm[n_eval:])]
            whole, frac = int(src.weight), src.weight - int(src.weight)
            parts = [rows] * whole
            if frac > 0:  # at least one row, so a small weight never silently removes a source
                parts.append(np.sort(np.array(pyrng.sample(range(len(rows)), max(1, round(frac * len(rows)))))))
                parts[-1] = rows[parts[-1]]
            report.weight = src.weight
            weighted = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            report.examples = len(weighted) + (n - len(rows))
            index.append(weighted)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return (
        PackedCorpus(train_files, d.max_length, cat(train_index)),
        PackedCorpus(eval_files, d.max_length, cat(eval_index)),
        reports,
    )
