"""cpt on corpora larger than memory (``data.memory_map``; ``auto``, the default, takes this path for cpt).

Each text source is read line by line (``.txt``: a document a line; ``.jsonl`` / ``.jsonl.gz``: a ``text``
field a line, after ``columns`` renames) and tokenized in batches by the fast tokenizer's own threads, the
documents' tokens (each ending in EOS) appended to one flat token file in the data cache, and each
document's end offset to a second file. Both are written once (keyed by the file contents, the source's
settings and the tokenizer) to a temporary name and then renamed, so a killed run never leaves half a cache.

Training then reads them through memory maps. The run's documents, after data.eval_split (whole documents
held out) and each source's ``weight`` (drawn with the same seeded generator, in the same order, as the
in-memory pipeline), are kept as an array of segments (file, start, length): 20 bytes a document, not its
tokens. With packing a row is the slice ``[i * max_length, (i + 1) * max_length)`` of the segments laid end
to end, as ``pack_stream`` cuts them in memory; without packing a segment is one ``max_length`` chunk of a
document and a row. Either way the rows are the ones the in-memory pipeline makes, built when a batch asks
for them, so memory does not grow with the corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtune.data.packing import Sample
from llmtune.data.pipeline import PIPELINE_VERSION, SourceReport, cache_root, fingerprint_source
from llmtune.errors import DataError
from llmtune.paths import looks_local
from llmtune.recipe.data import DataSource
from llmtune.recipe.schema import RecipeBase
from llmtune.recipe.stages import STAGE_RECIPES

CORPUS_VERSION = "2"  # 2: document end offsets beside the tokens
BATCH_BYTES = 1 << 20  # text handed to the tokenizer at a time (its ids are Python lists: keep it small)
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


@dataclass
class TokenFile:
    """One source's tokens in the cache: a flat array of ids, and each document's end offset in it."""

    path: Path
    dtype: str
    tokens: int
    docs: int = 0

    def array(self) -> np.ndarray:
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))

    def ends(self) -> np.ndarray:
        """The documents' end offsets (int64, read through a memory map)."""
        if self.docs == 0:
            return np.zeros(0, dtype=np.int64)
        return np.memmap(self.path.with_name("ends.bin"), dtype=np.int64, mode="r", shape=(self.docs,))


class PackedCorpus(Sequence):
    """Training or eval rows read from token files. ``seg_file`` / ``seg_start`` / ``seg_len``: the segments
    (pieces of documents) in the run's order. packed: the rows are max_length slices of the segments laid end
    to end (a last piece of one token is no row), as cpt's in-memory packing; not packed: each segment is a
    row. Every token is learned."""

    def __init__(
        self,
        files: list[TokenFile],
        max_length: int,
        seg_file: np.ndarray,
        seg_start: np.ndarray,
        seg_len: np.ndarray,
        packed: bool = True,
    ) -> None:
        self.files, self.max_length, self.packed = files, max_length, packed
        self.seg_file = seg_file.astype(np.int32)
        self.seg_start = seg_start.astype(np.int64)
        self.seg_len = seg_len.astype(np.int64)
        self.arrays = [f.array() for f in files]
        self.cum = np.concatenate([[0], np.cumsum(self.seg_len)]).astype(np.int64)
        self.total = int(self.cum[-1])
        self.n = rows_in(self.total, max_length) if packed else len(self.seg_len)

    def __len__(self) -> int:
        return self.n

    def _piece(self, k: int, a: int, b: int) -> np.ndarray:
        start = int(self.seg_start[k])
        return self.arrays[int(self.seg_file[k])][start + a : start + b]

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        if not self.packed:
            ids = self._piece(i, 0, int(self.seg_len[i])).tolist()
            return Sample(ids, list(ids))
        a, b = i * self.max_length, min((i + 1) * self.max_length, self.total)
        k = int(np.searchsorted(self.cum, a, side="right")) - 1
        pieces = []
        while a < b:
            lo, hi = int(self.cum[k]), int(self.cum[k + 1])
            pieces.append(self._piece(k, a - lo, min(b, hi) - lo))
            a = min(b, hi)
            k += 1
        ids = np.concatenate(pieces).tolist() if len(pieces) > 1 else pieces[0].tolist()
        return Sample(ids, list(ids))

    def summary(self) -> dict[str, int]:
        """Row, token and learned-token counts without reading the tokens (for the data summary)."""
        if not self.n:
            return {"rows": 0, "tokens": 0, "learned": 0, "longest": 0}
        if self.packed:
            tokens = min(self.total, self.n * self.max_length)
            longest = min(self.total, self.max_length)
        else:
            tokens, longest = int(self.seg_len.sum()), int(self.seg_len.max())
        return {"rows": self.n, "tokens": tokens, "learned": tokens - self.n, "longest": longest}


class CorpusConcat(Sequence):
    """Several sources' rows one after the other (data.schedule keeps each source's rows apart)."""

    def __init__(self, parts: list[PackedCorpus]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k][i - int(self.starts[k])]

    def summary(self) -> dict[str, int]:
        each = [p.summary() for p in self.parts]
        out = {key: sum(c[key] for c in each) for key in ("rows", "tokens", "learned")}
        return {**out, "longest": max((c["longest"] for c in each), default=0)}


def rows_in(tokens: int, max_length: int) -> int:
    """Rows of max_length the tokens give; a last shorter piece counts when it has 2 tokens or more."""
    whole, rest = divmod(tokens, max_length)
    return whole + (1 if rest >= 2 else 0)


def source_files(src: DataSource) -> list[tuple[Path, str]]:
    """The files a local source reads, with the label of their rows' places, in the order the in-memory
    reader (sources.read_rows) reads them: a directory's non-hidden data files sorted by relative path."""
    from llmtune.data.sources import supported_suffix

    path = Path(src.path).expanduser()
    if not path.is_dir():
        return [(path, "")]
    found = [
        q for q in path.rglob("*") if q.is_file() and not any(p.startswith(".") for p in q.relative_to(path).parts)
    ]
    found.sort(key=lambda q: q.relative_to(path).as_posix())
    return [(q, f"{q.relative_to(path).as_posix()} ") for q in found if supported_suffix(q) is not None]


def _lines(raw: Any, path: Path) -> Iterator[str]:
    """The file's lines (split at \\n, without it), decoded as UTF-8 (a BOM at the start is skipped); text
    that is not UTF-8 or a broken gzip file is refused as the in-memory reader refuses it."""
    offset = 0
    try:
        for n, chunk in enumerate(raw, start=1):
            try:
                text = chunk.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"data file {path} is not UTF-8 text: byte 0x{chunk[e.start]:02x} at byte offset "
                    f"{offset + e.start} (line {n}) cannot be decoded",
                    hint="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)",
                ) from None
            offset += len(chunk)
            yield text[:-1] if text.endswith("\n") else text
    except (OSError, EOFError) as e:
        if not path.name.lower().endswith(".gz"):
            raise
        raise DataError(
            f"data file {path} is not a valid gzip file ({e})",
            hint="re-compress it with gzip, or decompress it and drop the .gz suffix",
        ) from None


def _documents(src: DataSource, report: SourceReport) -> Iterator[tuple[str, int, str]]:
    """The source's documents (text, row index, place), one at a time; rows without usable text are dropped
    and counted. Rows are numbered and read as sources.read_rows does (blank lines are no rows)."""
    from llmtune.data.formats import RowError, to_text

    index = 0
    for f, label in source_files(src):
        jsonl = not f.name.lower().endswith(".txt")
        opener = gzip.open if f.name.lower().endswith(".gz") else open
        with opener(f, "rb") as raw:
            for n, line in enumerate(_lines(raw, f), start=1):
                where = f"{label}line {n}"
                if src.max_samples is not None and index >= src.max_samples:
                    return
                line = line.rstrip("\r") if not jsonl else line
                if not line.strip():
                    continue  # blank lines are separators, not rows
                report.rows += 1
                index += 1
                if not jsonl:
                    report.kept += 1
                    yield line, index - 1, where
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
                yield text, index - 1, where


def _tokenize_to(src: DataSource, tokenizer: Any, target: Path, report: SourceReport) -> TokenFile:
    """Write the source's tokens (each document + EOS) and the documents' end offsets to target; returns its
    record. A document under 2 tokens is dropped, as the in-memory encoder drops it."""
    dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max else "uint32"
    eos = tokenizer.eos_token_id
    total = docs = 0
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "tokens.bin", "wb") as out, open(tmp / "ends.bin", "wb") as ends:

        def flush(batch: list[tuple[str, int, str]]) -> None:
            nonlocal total, docs
            ids = tokenizer([b[0] for b in batch], add_special_tokens=True)["input_ids"]
            pieces, sizes = [], []
            for x, (_, index, where) in zip(ids, batch, strict=True):
                if eos is not None and (not x or x[-1] != eos):
                    x = [*x, eos]
                if len(x) < 2:
                    report.drop(index, "text is empty after tokenization", where)
                    report.kept -= 1
                    continue
                pieces.append(np.asarray(x, dtype=dtype))
                sizes.append(len(x))
            if not pieces:
                return
            out.write(np.concatenate(pieces).tobytes())
            ends.write((total + np.cumsum(np.asarray(sizes, dtype=np.int64))).tobytes())
            total += sum(sizes)
            docs += len(sizes)

        batch: list[tuple[str, int, str]] = []
        size = 0
        for doc in _documents(src, report):
            batch.append(doc)
            size += len(doc[0])
            if size >= BATCH_BYTES:
                flush(batch)
                batch, size = [], 0
        if batch:
            flush(batch)
    meta = {"dtype": dtype, "tokens": total, "docs": docs, "rows": report.rows, "kept": report.kept}
    meta["reasons"] = dict(report.reasons)
    meta["first"] = report.first
    meta["first_where"] = report.first_where
    (tmp / "meta.json").write_text(json.dumps(meta))
    if target.exists():  # another process finished the same cache first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return TokenFile(target / "tokens.bin", dtype, total, docs)


def _cached(target: Path, report: SourceReport) -> TokenFile | None:
    try:
        meta = json.loads((target / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    report.rows, report.kept, report.cached = meta["rows"], meta["kept"], True
    report.reasons.update(meta["reasons"])
    report.first = [tuple(x) for x in meta["first"]]  # type: ignore[misc]
    report.first_where = list(meta["first_where"])
    return TokenFile(target / "tokens.bin", meta["dtype"], meta["tokens"], meta["docs"])


def unmappable(src: DataSource) -> str | None:
    """Why the token-file path cannot read this source (None: it can)."""
    if src.path is None or not looks_local(src.path):
        return f"reads local .txt / .jsonl files, not the hub dataset {src.path}"
    p = Path(src.path).expanduser()
    if not p.exists():
        return None  # the reader says that the path does not exist
    files = source_files(src)
    other = [f for f, _ in files if not f.name.lower().endswith(SUFFIXES)]
    if other:
        return f"reads {', '.join(SUFFIXES)} files, not {other[0].name}"
    for f, _ in files:  # a JSON array saved as .jsonl (the in-memory reader takes it): not a row a line
        if not f.name.lower().endswith(".txt"):
            with (gzip.open if f.name.lower().endswith(".gz") else open)(f, "rb") as fh:
                try:
                    head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
                except (OSError, EOFError):
                    head = b""
            if head.startswith(b"["):
                return f"reads a JSON object a line, and {f.name} holds a JSON array"
    return None


def check_source(src: DataSource, where: str) -> None:
    why = unmappable(src)
    if why is None:
        if not Path(src.path).expanduser().exists():
            raise DataError(
                f"data path {src.path} does not exist",
                hint="check the path (relative paths are read from the current directory) or give an absolute path",
            )
        return
    hub = "hub dataset" in why
    raise DataError(
        f"{where}: data.memory_map {why}",
        hint="download the dataset to .jsonl files first, or set data.memory_map: false"
        if hub
        else "convert it to JSONL with a text field, or set data.memory_map: false",
    )


def memory_map_plan(recipe: RecipeBase) -> tuple[bool, str | None]:
    """Whether this run reads its corpus through the token-file path, and a line for the user when
    ``memory_map: auto`` falls back to reading the rows into memory (and why)."""
    d = recipe.data
    if d.memory_map is not True and d.memory_map != "auto":
        return False, None
    if "memory_map" not in STAGE_RECIPES[getattr(recipe, "stage", "")].data_features:  # cpt reads raw text
        return False, None
    if d.memory_map is True:
        return True, None
    needs = [k for k, on in (("data.dedup", d.dedup), ("data.filter", d.filter.active())) if on]
    if needs:
        return False, (
            f"data.memory_map auto: the corpus is read into memory, because {' and '.join(needs)} need its rows "
            "in memory (memory grows with the corpus; remove them for the memory-mapped path)"
        )
    for group, sources in (("train", d.train), ("eval", d.eval)):
        for k, src in enumerate(sources):
            why = unmappable(src)
            if why is not None:
                return False, (
                    f"data.memory_map auto: the corpus is read into memory, because data.{group}[{k}]: the "
                    f"memory-mapped path {why} (memory grows with the corpus)"
                )
    return True, None


def token_file(src: DataSource, tokenizer: Any, fingerprint: str, recipe: RecipeBase) -> tuple[TokenFile, SourceReport]:
    """The source's token file: from the cache, or tokenized into it now."""
    report = SourceReport(name=src.path, format="text")
    settings = "|".join([CORPUS_VERSION, PIPELINE_VERSION, fingerprint_source(src), src.model_dump_json(), fingerprint])
    target = cache_root(recipe) / "corpus" / hashlib.sha256(settings.encode()).hexdigest()[:32]
    hit = _cached(target, report)
    if hit is None:
        hit = _tokenize_to(src, tokenizer, target, report)
    return hit, report


def _chunks(start: np.ndarray, length: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Documents (start, length) cut into max_length chunks, a last chunk of one token dropped, as cpt without
    packing does: (document number, chunk start, chunk length) of each chunk, in order."""
    count = -(-length // max_length)
    doc = np.repeat(np.arange(len(length)), count)
    first = np.concatenate([[0], np.cumsum(count)[:-1]]) if len(count) else np.zeros(0, dtype=np.int64)
    k = np.arange(int(count.sum())) - np.repeat(first, count)
    c_start = start[doc] + k * max_length
    c_len = np.minimum(max_length, length[doc] - k * max_length)
    keep = c_len >= 2
    return doc[keep], c_start[keep], c_len[keep]


def build_corpus(
    recipe: RecipeBase, tokenizer: Any, fingerprint: str, settings: str
) -> tuple[Sequence, PackedCorpus, list[SourceReport], list[tuple[str, PackedCorpus]] | None]:
    """The train and eval rows of a memory-mapped cpt run, the sources' reports, and with data.schedule each
    training source's id and rows: the rows the in-memory pipeline (build_data, then pack_stream or one row
    per chunk) makes from the same recipe, in the same order.
    fingerprint: the tokenizer's (the token files' cache key); settings: the in-memory pipeline's settings,
    so that a source's report carries the fingerprint a resume compares, whichever path read it."""
    d = recipe.data
    packed = d.packing
    rng = random.Random(recipe.seed)  # drawn from as build_data draws: the same documents held out and sampled
    files: list[TokenFile] = []
    train: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    evals: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    reports: list[SourceReport] = []
    loaded = []
    for group, sources in (("train", d.train), ("eval", d.eval)):
        for k, src in enumerate(sources):
            check_source(src, f"data.{group}[{k}]")
            tf, report = token_file(src, tokenizer, fingerprint, recipe)
            parts = [fingerprint_source(src), src.model_dump_json(), "text", settings, "prompts=False"]
            report.fingerprint = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
            reports.append(report)
            if tf.docs == 0:
                raise DataError(
                    f"data source {src.path} yields no usable example ({report.rows} rows read, all dropped)",
                    hint="check that its rows hold text (a {text: ...} field a line, or plain .txt lines)",
                )
            loaded.append((group, src, len(files), tf, report))
            files.append(tf)

    def segments(f: int, tf: TokenFile, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The examples of these documents of file f, as segments: a document (packing) or its chunks."""
        all_ends = tf.ends()
        ends = np.asarray(all_ends[docs], dtype=np.int64)
        starts = np.where(docs > 0, all_ends[np.maximum(docs - 1, 0)], 0).astype(np.int64)
        lengths = ends - starts
        if packed:
            return np.full(len(docs), f, dtype=np.int32), starts, lengths
        _, c_start, c_len = _chunks(starts, lengths, d.max_length)
        return np.full(len(c_len), f, dtype=np.int32), c_start, c_len

    for group, src, f, tf, report in loaded:
        every = np.arange(tf.docs, dtype=np.int64)
        if group == "eval":
            evals.append(segments(f, tf, every))
            report.examples = len(evals[-1][0])
            continue
        docs, held_out = every, 0
        if d.eval_split > 0:  # hold out whole documents, as build_data does
            order = list(range(tf.docs))
            rng.shuffle(order)
            n_eval = max(1, round(d.eval_split * tf.docs))
            if n_eval >= tf.docs:
                raise DataError(f"data.eval_split {d.eval_split} leaves no training example from {src.path}")
            held = np.zeros(tf.docs, dtype=bool)
            held[np.asarray(order[:n_eval], dtype=np.int64)] = True
            evals.append(segments(f, tf, every[held]))
            held_out = len(evals[-1][0])
            docs = every[~held]
        seg = segments(f, tf, docs)
        n = len(seg[0])
        whole, frac = int(src.weight), src.weight - int(src.weight)
        picks = [np.arange(n, dtype=np.int64)] * whole
        if frac > 0:  # as pipeline._apply_weight: at least one example
            picks.append(np.asarray(rng.sample(range(n), max(1, round(frac * n))), dtype=np.int64))
        pick = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
        train.append(tuple(x[pick] for x in seg))  # type: ignore[arg-type]
        report.weight = src.weight
        report.examples = len(pick) + held_out
    if d.on_bad_row == "error":
        bad = [r for r in reports if r.dropped]
        if bad:
            lines = [f"{r.name}: {r.dropped} bad rows, e.g. " + "; ".join(r.first_dropped()) for r in bad]
            raise DataError(
                "data.on_bad_row is error and some rows cannot be used:\n  " + "\n  ".join(lines),
                hint="fix those rows, or set data.on_bad_row: drop to skip them",
            )

    def corpus(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> PackedCorpus:
        cat = [np.concatenate([p[j] for p in parts]) if parts else np.zeros(0, dtype=np.int64) for j in range(3)]
        return PackedCorpus(files, d.max_length, *cat, packed=packed)

    if d.schedule is None:
        return corpus(train), corpus(evals), reports, None
    # data.schedule: each source packed on its own, as the in-memory path packs each source's examples
    sources = [(src.source_id(), corpus([p])) for (_, src, *_), p in zip(loaded, train, strict=False)]
    return CorpusConcat([c for _, c in sources]), corpus(evals), reports, sources
