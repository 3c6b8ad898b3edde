"""From recipe sources to tokenized examples: read -> canonical form -> tokens + labels -> mix / split.

Every source is tokenized once and cached (keyed by the file contents, the tokenizer, the template and
the settings); rows that cannot be used are dropped, counted and reported with their indices and reasons.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtune.data.chat import encode_conversation, encode_text
from llmtune.data.filters import (
    Deduper,
    is_filter_reason,
    length_check,
    perplexity_reason,
    prompt_text,
    select_by_perplexity,
)
from llmtune.data.formats import UNDESIRABLE, RowError, detect_format, is_undesirable, to_conversation, to_text
from llmtune.data.sources import read_rows
from llmtune.errors import DataError
from llmtune.paths import looks_local
from llmtune.recipe.data import DataSource
from llmtune.recipe.schema import RecipeBase

PIPELINE_VERSION = "5"  # bump when tokenization output changes, to invalidate caches
PERPLEXITY_SCORES = "perplexity_scores.jsonl"  # data.filter.perplexity's score of every training row


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    row: int = 0  # index of the source row it came from (a long cpt document gives several examples)
    # Several sequences in one example (preference rows: one per response, in order): the lengths of the
    # consecutive pieces of input_ids / labels. None: one sequence.
    parts: list[int] | None = None
    values: list[float] | None = None  # numbers that go with the example (a margin, a score, a label)

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) of each sequence the example holds."""
        if not self.parts:
            return [(self.input_ids, self.labels)]
        out, start = [], 0
        for n in self.parts:
            out.append((self.input_ids[start : start + n], self.labels[start : start + n]))
            start += n
        return out

    @property
    def longest(self) -> int:
        """The length of its longest sequence (for preference rows: the prompt and the longer reply)."""
        return max(self.parts) if self.parts else len(self.input_ids)


@dataclass
class PromptExample(Example):
    """A prompt for the online stages (grpo, rejection sampling): input_ids are the rendered prompt; the
    Prompt keeps its messages and reference answer for the rewards. Not cached (built with use_cache=False)."""

    prompt: Any = None


@dataclass
class SourceReport:
    """What became of one source's rows. ``examples``: what the source gives the run, after ``weight`` (a
    train source's examples repeated / sampled by its weight, plus any held out by data.eval_split)."""

    name: str
    rows: int = 0
    kept: int = 0
    examples: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    first: list[tuple[int, str]] = field(default_factory=list)  # (0-based row index, reason) of the first drops
    first_where: list[str] = field(default_factory=list)  # where those rows are, for the user ("line 41")
    cached: bool = False
    fingerprint: str = ""  # the source's file contents and settings: a resume checks the data did not change
    weight: float = 1.0
    format: str = ""  # the format the rows were read as (data.*.format, the stage's default, or detected)
    detected: bool = False  # format was detected from the first rows
    # data.dedup: (row index, where, prompt text) of every usable row, in file order (filters.prompt_text)
    prompts: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.rows - self.kept

    @property
    def filtered(self) -> int:
        """Rows that data.dedup / data.filter removed (usable rows, not bad ones)."""
        return sum(n for why, n in self.reasons.items() if is_filter_reason(why))

    def drop(self, index: int, reason: str, where: str = "") -> None:
        self.reasons[reason] += 1
        if len(self.first) < 5:
            self.first.append((index, reason))
            self.first_where.append(where)

    def first_dropped(self, n: int = 5) -> list[str]:
        """The first n dropped rows as the user finds them: "line 41: not valid JSON (...)" in a JSONL file,
        "row 3: empty assistant reply" in a JSON array (numbered from 1, as in sources.Row.where)."""
        out = []
        for k, (index, reason) in enumerate(self.first[:n]):
            where = self.first_where[k] if k < len(self.first_where) and self.first_where[k] else f"row {index + 1}"
            out.append(reason if reason.startswith(f"{where}:") else f"{where}: {reason}")
        return out


@dataclass
class DataBundle:
    train: list[Example]
    eval: list[Example]
    reports: list[SourceReport]
    notes: list[str] = field(default_factory=list)  # printed under the data summary (e.g. the perplexity filter)
    # each training source's id (data.schedule) and its examples' range [start, end) in train
    train_ranges: list[tuple[str, int, int]] = field(default_factory=list)
    # files for output_dir, by name (data.filter.perplexity's scores): the caller writes them, on one process
    outputs: dict[str, str] = field(default_factory=dict)

    def train_sources(self) -> list[tuple[str, list[Example]]]:
        """Each training source's id and examples (after eval_split and weight)."""
        return [(name, self.train[a:b]) for name, a, b in self.train_ranges]


Encoder = Callable[[dict[str, Any], str, DataSource], list[Example]]
# examples -> (summed NLL over the learned tokens, number of learned tokens) of each
Scorer = Callable[[list[Example]], list[tuple[float, int]]]


def fingerprint_tokenizer(tokenizer: Any, template: str | None) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    h.update((template or "").encode())
    return h.hexdigest()


def fingerprint_source(src: DataSource) -> str:
    h = hashlib.sha256()
    if not looks_local(src.path):
        h.update(f"hub:{src.path}:{src.subset}:{src.split}".encode())
        return h.hexdigest()
    p = Path(src.path).expanduser()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_root(recipe: RecipeBase) -> Path:
    base = recipe.data.cache_dir or os.environ.get("LLMTUNE_CACHE") or "~/.cache/llmtune"
    return Path(base).expanduser() / "data"


def _save_cache(path: Path, examples: list[Example], report: SourceReport) -> None:
    path.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    ids = np.array([t for e in examples for t in e.input_ids], dtype=np.int64)
    labels = np.array([t for e in examples for t in e.labels], dtype=np.int64)
    tmp = path / "examples.tmp.npz"
    rows = np.array([e.row for e in examples], dtype=np.int64)
    extra: dict[str, np.ndarray] = {}
    for name, dtype in (("parts", np.int64), ("values", np.float64)):  # optional per-example lists
        lists = [getattr(e, name) for e in examples]
        if any(v is not None for v in lists):
            extra[f"{name}_counts"] = np.array([-1 if v is None else len(v) for v in lists], dtype=np.int64)
            extra[name] = np.array([x for v in lists if v is not None for x in v], dtype=dtype)
    np.savez(tmp, lengths=lengths, ids=ids, labels=labels, rows=rows, **extra)
    meta = {
        "rows": report.rows,
        "kept": report.kept,
        "reasons": dict(report.reasons),
        "first": report.first,
        "first_where": report.first_where,
        "format": report.format,
        "detected": report.detected,
        "prompts": report.prompts,
    }
    (path / "report.json").write_text(json.dumps(meta))
    os.replace(tmp, path / "examples.npz")  # the npz is written last: a cache entry is complete or absent


def _load_cache(path: Path, name: str) -> tuple[list[Example], SourceReport] | None:
    f = path / "examples.npz"
    if not f.is_file() or not (path / "report.json").is_file():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            lengths, ids, labels, rows = z["lengths"], z["ids"], z["labels"], z["rows"]
            extra = {
                key: _split_optional(z[f"{key}_counts"], z[key])
                for key in ("parts", "values")
                if f"{key}_counts" in z.files
            }
        meta = json.loads((path / "report.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    examples = [
        Example(ids[a:b].tolist(), labels[a:b].tolist(), int(r))
        for (a, b), r in zip(itertools.pairwise(bounds), rows, strict=True)
    ]
    for field_name, lists in extra.items():
        for e, v in zip(examples, lists, strict=True):
            setattr(e, field_name, v)
    report = SourceReport(name=name, rows=meta["rows"], kept=meta["kept"], cached=True)
    report.reasons.update(meta["reasons"])
    report.first = [tuple(x) for x in meta["first"]]  # type: ignore[misc]
    report.first_where = list(meta.get("first_where", []))
    report.format, report.detected = str(meta.get("format", "")), bool(meta.get("detected", False))
    report.prompts = [(int(i), str(w), str(t)) for i, w, t in meta.get("prompts", [])]
    return examples, report


def _split_optional(counts: np.ndarray, flat: np.ndarray) -> list[list | None]:
    out: list[list | None] = []
    start = 0
    for n in counts.tolist():
        if n < 0:
            out.append(None)
            continue
        out.append(flat[start : start + n].tolist())
        start += n
    return out


def load_source(
    src: DataSource,
    encode: Encoder,
    default_format: str | None,
    cache_dir: Path | None,
    settings: str,
    prompts: bool = False,
) -> tuple[list[Example], SourceReport]:
    """Tokenize one source (or take it from the cache); malformed rows are dropped and counted. prompts: keep
    each usable row's prompt text in report.prompts, for data.dedup (dedup_sources)."""
    key = None
    fingerprint = ""
    if cache_dir is not None:
        parts = [fingerprint_source(src), src.model_dump_json(), str(default_format), settings, f"prompts={prompts}"]
        fingerprint = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
        key = hashlib.sha256(f"{PIPELINE_VERSION}|{fingerprint}".encode()).hexdigest()[:32]
        hit = _load_cache(cache_dir / key, src.path)
        if hit is not None:
            hit[1].fingerprint = fingerprint
            return hit
    rows = read_rows(src)
    if src.max_samples is not None:
        rows = rows[: src.max_samples]
    report = SourceReport(name=src.path, rows=len(rows), fingerprint=fingerprint)
    fmt = src.format or default_format
    if fmt is None:
        sample = [r.data for r in rows[:50] if r.data is not None]
        if not sample:
            raise DataError(f"{src.path}: no readable row in the first 50 rows", hint="check the file's format")
        fmt = detect_format(sample)
        report.detected = True
    report.format = fmt
    examples: list[Example] = []
    for row in rows:
        if row.data is None:
            report.drop(row.index, row.error or "unreadable row", row.where)
            continue
        try:
            out = encode(row.data, fmt, src)
            if prompts:  # only usable rows take part in dedup: the first usable copy is kept
                report.prompts.append((row.index, row.where, prompt_text(row.data, fmt, src.system)))
        except RowError as e:
            report.drop(row.index, str(e), row.where)
            continue
        report.kept += 1
        for e in out:
            e.row = row.index
        examples.extend(out)
    report.examples = len(examples)
    if cache_dir is not None and key is not None:
        _save_cache(cache_dir / key, examples, report)
    return examples, report


def _apply_weight(examples: list[Example], weight: float, rng: random.Random) -> list[Example]:
    whole, frac = int(weight), weight - int(weight)
    out = examples * whole
    if frac > 0:  # at least one example, so that a small weight never silently removes a source
        out += rng.sample(examples, max(1, round(frac * len(examples))))
    return out


def build_data(
    recipe: RecipeBase,
    encode: Encoder,
    settings: str,
    default_format: str | None = None,
    use_cache: bool = True,
    scorer: Scorer | None = None,
) -> DataBundle:
    """All train and eval sources of a recipe, tokenized, filtered, mixed and split. scorer: scores examples
    for data.filter.perplexity (the training sources' rows, before eval_split and weight)."""
    d = recipe.data
    cache = cache_root(recipe) if use_cache else None
    rng = random.Random(recipe.seed)
    train: list[Example] = []
    evals: list[Example] = []
    reports: list[SourceReport] = []
    loaded: list[tuple[str, DataSource, list[Example], SourceReport]] = []
    notes: list[str] = []
    outputs: dict[str, str] = {}
    ranges: list[tuple[str, int, int]] = []
    for group, sources in (("train", d.train), ("eval", d.eval)):
        for src in sources:
            examples, report = load_source(src, encode, default_format, cache, settings, d.dedup is not None)
            report.examples = len(examples)
            reports.append(report)
            if not examples:
                raise DataError(
                    f"data source {src.path} yields no usable example ({report.rows} rows read, all dropped)",
                    hint=_reasons_hint(report),
                )
            loaded.append((group, src, examples, report))
    if d.dedup is not None:  # the training sources together, in order; the eval sources together
        for group in ("train", "eval"):
            mine = [k for k, x in enumerate(loaded) if x[0] == group]
            kept = dedup_sources([(loaded[k][2], loaded[k][3]) for k in mine], d.dedup, d.dedup_threshold)
            for k, examples in zip(mine, kept, strict=True):
                loaded[k] = (loaded[k][0], loaded[k][1], examples, loaded[k][3])
    if d.filter.perplexity is not None:
        if scorer is None:
            raise DataError(f"data.filter.perplexity is not supported for stage {recipe.stage}")
        kept, note, scores = perplexity_filter(
            recipe, [(ex, rep) for group, _, ex, rep in loaded if group == "train"], scorer, cache is not None
        )
        notes.append(note)
        outputs[PERPLEXITY_SCORES] = scores
        trained = iter(kept)
        loaded = [(g, s, next(trained) if g == "train" else ex, r) for g, s, ex, r in loaded]
    for group, src, examples, report in loaded:
        if group == "eval":
            evals.extend(examples)
            continue
        held_out = 0
        if d.eval_split > 0:  # hold out whole source rows (all chunks of a document go to one side)
            rows = sorted({e.row for e in examples})
            rng.shuffle(rows)
            n_eval = max(1, round(d.eval_split * len(rows)))
            if n_eval >= len(rows):
                raise DataError(f"data.eval_split {d.eval_split} leaves no training example from {src.path}")
            held = set(rows[:n_eval])
            evals.extend(e for e in examples if e.row in held)
            held_out = sum(1 for e in examples if e.row in held)
            examples = [e for e in examples if e.row not in held]
        weighted = _apply_weight(examples, src.weight, rng)
        report.weight = src.weight
        report.examples = len(weighted) + held_out  # what the source contributes, after its weight
        ranges.append((src.source_id(), len(train), len(train) + len(weighted)))
        train.extend(weighted)
    if d.on_bad_row == "error":
        bad = [r for r in reports if r.dropped > r.filtered]
        if bad:
            lines = [f"{r.name}: {r.dropped - r.filtered} bad rows, e.g. " + "; ".join(r.first_dropped()) for r in bad]
            raise DataError(
                "data.on_bad_row is error and some rows cannot be used:\n  " + "\n  ".join(lines),
                hint="fix those rows, or set data.on_bad_row: drop to skip them",
            )
    return DataBundle(train=train, eval=evals, reports=reports, notes=notes, train_ranges=ranges, outputs=outputs)


def _reasons_hint(report: SourceReport) -> str:
    top = "; ".join(f"{why} ({n}x)" for why, n in report.reasons.most_common(3))
    if report.reasons.get(UNDESIRABLE):
        return (
            f"reasons: {top}. Rows with label false are KTO data (undesirable replies) and sft learns only "
            "desirable replies: train this file with stage dpo and dpo.loss: kto, or give sft rows with label true"
        )
    return f"reasons: {top}. Check the format (set data.*.format / columns) and data.max_length"


def dedup_sources(
    sources: list[tuple[list[Example], SourceReport]], mode: str, threshold: float
) -> list[list[Example]]:
    """data.dedup over several sources read in order (their report.prompts): a row whose prompt text repeats a
    kept row of the same or an earlier source is dropped and counted in its source's report; returns the
    examples each source keeps."""
    deduper = Deduper(mode, threshold)
    out: list[list[Example]] = []
    for examples, report in sources:
        gone: set[int] = set()
        for row, where, text in report.prompts:
            reason = deduper.check(text)
            if reason is not None:
                report.drop(row, reason, where)
                report.kept -= 1
                gone.add(row)
        out.append([e for e in examples if e.row not in gone] if gone else examples)
        report.examples = len(out[-1])
    return out


def perplexity_filter(
    recipe: RecipeBase, sources: list[tuple[list[Example], SourceReport]], scorer: Scorer, use_cache: bool
) -> tuple[list[list[Example]], str, str]:
    """data.filter.perplexity: score every training row (a row's perplexity: exp of the mean NLL over the
    learned tokens of all its examples), drop the drop_low fraction with the lowest and the drop_high fraction
    with the highest perplexity over all training sources together, and count them in the sources' reports.
    The scores are cached (model + data). Returns the kept examples of each source, a line for the user and
    the text of output_dir/perplexity_scores.jsonl (one JSON line per scored row), for the caller to write."""
    cfg = recipe.data.filter.perplexity
    assert cfg is not None
    model = cfg.model or recipe.model.path
    parts = [model_fingerprint(model, recipe.model.revision if cfg.model is None else None)]
    parts += [rep.fingerprint for _, rep in sources]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
    cache_file = cache_root(recipe) / "perplexity" / f"{key}.json"
    cacheable = use_cache and all(rep.fingerprint for _, rep in sources)
    scores: dict[tuple[int, int], float] | None = None
    cached = False
    if cacheable and cache_file.is_file():
        try:
            scores = {(int(i), int(r)): float(p) for i, r, p in json.loads(cache_file.read_text())}
            cached = True
        except (OSError, ValueError, TypeError):
            scores = None
    if scores is None:
        flat = [e for examples, _ in sources for e in examples]
        totals = scorer(flat)
        sums: dict[tuple[int, int], list[float]] = {}
        k = 0
        for i, (examples, _) in enumerate(sources):
            for e in examples:
                acc = sums.setdefault((i, e.row), [0.0, 0])
                acc[0] += totals[k][0]
                acc[1] += totals[k][1]
                k += 1
        scores = {key_: math.exp(nll / max(n, 1)) for key_, (nll, n) in sums.items()}
        if cacheable:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps([[i, r, p] for (i, r), p in sorted(scores.items())]))
            os.replace(tmp, cache_file)
    low, high = select_by_perplexity(scores, cfg.drop_low, cfg.drop_high)
    for _, report in sources:  # a resume checks these: other drop fractions or another model is other data
        if report.fingerprint:
            report.fingerprint = hashlib.sha256(f"{report.fingerprint}|{parts[0]}|{cfg}".encode()).hexdigest()[:32]
    out: list[list[Example]] = []
    for i, (examples, report) in enumerate(sources):
        for (j, row), side in sorted([(k_, "low") for k_ in low] + [(k_, "high") for k_ in high]):
            if j == i:
                report.drop(row, perplexity_reason(side, cfg.drop_low if side == "low" else cfg.drop_high))
                report.kept -= 1
        gone = {row for j, row in low | high if j == i}
        out.append([e for e in examples if e.row not in gone])
        report.examples = len(out[-1])
    path = Path(recipe.output_dir) / PERPLEXITY_SCORES
    lines = []
    for (i, row), p in sorted(scores.items()):
        dropped = "low" if (i, row) in low else "high" if (i, row) in high else None
        rec = {"source": sources[i][1].name, "row": row, "perplexity": p, "kept": dropped is None}
        lines.append(json.dumps({**rec, "dropped": dropped}) + "\n")
    kept = sorted(p for k_, p in scores.items() if k_ not in low and k_ not in high)
    note = (
        f"perplexity filter: {len(scores)} training rows scored with {model} "
        f"({'scores from the cache' if cached else 'scored now'}); dropped {len(low)} easiest and {len(high)} "
        f"hardest, kept perplexities {kept[0]:.4g} to {kept[-1]:.4g}; scores in {path}"
    )
    return out, note, "".join(lines)


def model_fingerprint(path: str, revision: str | None = None) -> str:
    """A scoring model's identity for the score cache: a local directory's file names, sizes and times, or a
    hub id and revision."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return f"hub:{path}:{revision}"
    stats = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
    return hashlib.sha256(f"{p.resolve()}|{stats}".encode()).hexdigest()


def mix_replay(train: list[Example], replay: list[Example], ratio: float, seed: int) -> list[Example]:
    """data.replay: add round(ratio / (1 - ratio) * len(train)) replay examples (at least 1), so that ratio of
    the result are replay examples; drawn without repeats while the pool lasts, and spread evenly through the
    training examples (the epoch shuffle mixes them again)."""
    n = max(1, round(ratio / (1 - ratio) * len(train)))
    rng = random.Random(seed)
    picked: list[Example] = []
    while len(picked) < n:
        picked += rng.sample(replay, min(len(replay), n - len(picked)))
    out: list[Example] = []
    total = len(train) + n
    j = 0
    for k in range(total):  # replay example j goes at position floor((j + 0.5) * total / n)
        if j < n and k == int((j + 0.5) * total / n):
            out.append(picked[j])
            j += 1
        else:
            out.append(train[k - j])
    return out


def add_replay(recipe: RecipeBase, bundle: DataBundle, tokenizer: Any, settings: str) -> None:
    """data.replay: read the plain-text file as cpt does without packing (every token learned, documents cut
    into max_length pieces) and mix its examples into bundle.train at data.replay.ratio (mix_replay)."""
    r = recipe.data.replay
    assert r is not None
    src = DataSource(path=r.path, format="text", columns=r.columns, max_samples=r.max_samples)
    encode = text_encoder(tokenizer, recipe.data.max_length, packing=False)
    cache = cache_root(recipe) if bundle.reports and all(x.fingerprint for x in bundle.reports) else None
    examples, report = load_source(src, encode, "text", cache, f"replay|{settings}")
    report.name = f"replay: {r.path}"
    if report.fingerprint:  # the ratio decides how many replay rows the run trains on
        report.fingerprint = hashlib.sha256(f"{report.fingerprint}|{r.ratio}".encode()).hexdigest()[:32]
    if not examples:
        raise DataError(
            f"data.replay.path {r.path} yields no usable text ({report.rows} rows read, all dropped)",
            hint=_reasons_hint(report).replace("Check the format", "Replay reads {text: ...} rows or .txt lines"),
        )
    before = len(bundle.train)
    bundle.train = mix_replay(bundle.train, examples, r.ratio, recipe.seed)
    report.examples = len(bundle.train) - before
    bundle.reports.append(report)


# --- encoders for the two text stages ------------------------------------------------------------------


def with_quality_label(conv: Any, row: dict[str, Any], src: DataSource) -> None:
    """Quality-conditioned training: the row's label (src.quality_column) put before its first user turn."""
    col = src.quality_column
    label = row.get(col) if isinstance(row, dict) else None
    if label is None or (isinstance(label, str) and not label.strip()):
        raise RowError(f"no quality label: column {col!r} is missing or empty (quality_column)")
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    first = next((m for m in conv.messages if m["role"] == "user"), None)
    if first is None:
        raise RowError("no user turn to put the quality label before")
    first["content"] = src.quality_prefix.format(label=label) + first["content"]


def conversation_encoder(
    tokenizer: Any,
    template: str,
    max_length: int,
    train_on_prompt: bool,
    bounds: tuple[int | None, int | None] = (None, None),
) -> Encoder:
    def encode(row: dict[str, Any], fmt: str, src: DataSource) -> list[Example]:
        if fmt == "text":
            raise RowError("format text has no conversation: use stage cpt for raw text")
        if is_undesirable(row):  # KTO data: sft must not learn the replies marked bad
            raise RowError(UNDESIRABLE)
        conv = to_conversation(row, fmt, default_system=src.system)
        if src.quality_column is not None:
            with_quality_label(conv, row, src)
        ids, labels = encode_conversation(tokenizer, template, conv, max_length, train_on_prompt, bounds)
        return [Example(ids, labels)]

    return encode


def text_encoder(
    tokenizer: Any, max_length: int, packing: bool, bounds: tuple[int | None, int | None] = (None, None)
) -> Encoder:
    """cpt: a document becomes one example (packing) or max_length chunks of it (no text is thrown away).
    bounds: (min, max) tokens of a document (data.filter); a document outside is a RowError."""

    def encode(row: dict[str, Any], fmt: str, src: DataSource) -> list[Example]:
        if fmt != "text":
            raise RowError(f"format {fmt} is not raw text: stage cpt reads format text")
        ids = encode_text(tokenizer, to_text(row))
        length_check(len(ids), *bounds)
        if packing:
            return [Example(ids, list(ids))]
        chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
        return [Example(c, list(c)) for c in chunks if len(c) >= 2]

    return encode
