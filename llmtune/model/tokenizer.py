"""The tokenizer a recipe names, and the checks that models meant to work together were trained with one
tokenizer: vocabularies compared id by id, and against the fingerprint an llmtune run records in run.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmtune.errors import RecipeError, UserError
from llmtune.manifest import RunManifest, TokenizerRecord
from llmtune.model.hub import hub_kwargs
from llmtune.paths import looks_local, same_path
from llmtune.recipe.schema import ModelConfig, RecipeBase


def load_tokenizer(m: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    path = m.tokenizer or m.path
    try:
        tok = AutoTokenizer.from_pretrained(path, **hub_kwargs(m))
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the tokenizer from {path}: {str(e).splitlines()[0]}",
            hint="check model.path / model.tokenizer (a local directory with tokenizer files, or a hub id; "
            "offline machines need a local directory)",
        ) from None
    if tok.pad_token_id is None:
        # Padding positions are masked by attention_mask and labels=-100 by position, never by comparing
        # token ids, so reusing EOS as the pad token does not mask EOS out of the labels.
        candidate = tok.eos_token or tok.unk_token
        if candidate is None:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
            tok.llmtune_added_tokens = 1
        else:
            tok.pad_token = candidate
    tok.padding_side = "right"
    _check_model_tokenizer(m, tok)
    return tok


def _check_model_tokenizer(m: ModelConfig, tok: Any) -> None:
    """The tokenizer loaded for m must be the one m.path was trained with: the same vocabulary as the tokenizer
    saved with the model (when model.tokenizer points elsewhere), and the vocabulary the run.json of an llmtune
    output records."""
    override = m.tokenizer is not None and not same_path(m.tokenizer, m.path)
    if override:
        own = own_tokenizer(m.path, **hub_kwargs(m))
        if own is not None:
            compare_vocabularies(
                tok, f"model.tokenizer {m.tokenizer}", own, f"the tokenizer saved with model.path {m.path}"
            )
    record = saved_tokenizer_record(m.path)
    if record is not None:
        check_tokenizer_record(
            tok,
            record,
            f"model.path {m.path}",
            tok_label=f"model.tokenizer {m.tokenizer}" if override else f"the tokenizer saved in {m.path}",
            hint=TOKENIZER_HINT
            if override
            else "restore the tokenizer files the run saved in that directory, or set model.tokenizer to the "
            "tokenizer the model was trained with",
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_from(*paths: str | None, set_pad: bool = True, **kwargs: Any) -> Any:
    """The tokenizer of the first path that has one (an adapter's carries the chat template it was trained
    with). set_pad: a missing pad token becomes EOS (padding is masked by position, never by id). kwargs go
    to AutoTokenizer.from_pretrained (revision, token, trust_remote_code)."""
    from transformers import AutoTokenizer

    last = ""
    for p in filter(None, paths):
        d = Path(p).expanduser()
        if d.is_dir() and not any((d / f).is_file() for f in TOKENIZER_FILES):
            continue
        try:
            tok = AutoTokenizer.from_pretrained(p, **kwargs)
        except (OSError, ValueError) as e:
            last = str(e).splitlines()[0]
            continue
        if set_pad and tok.pad_token_id is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        return tok
    raise UserError(
        f"no tokenizer could be loaded from {', '.join(p for p in paths if p)} {last}".strip(),
        hint="the model (or adapter) directory needs tokenizer files",
    )


# ------------------------------------------------------------------------------- tokenizer vocabularies

TOKENIZER_HINT = (
    "use the tokenizer saved with the model (leave model.tokenizer unset, or point it at the model's directory), "
    "and train every stage of a pipeline with one tokenizer"
)


def vocab_by_id(tok: Any) -> list[str | None]:
    """The token string of every id, in id order (added tokens included); None for an id no token has.

    One get_vocab() call: fast for 150k-token vocabularies."""
    vocab = tok.get_vocab()
    size = max(len(tok), max(vocab.values(), default=-1) + 1)
    out: list[str | None] = [None] * size
    for token, i in vocab.items():
        out[i] = token
    return out


def _show(token: str | None) -> str:
    return "(no token)" if token is None else repr(token)


def compare_vocabularies(tok_a: Any, label_a: str, tok_b: Any, label_b: str, *, hint: str | None = None) -> None:
    """RecipeError when an id both tokenizers have stands for different tokens. Tokens one of them has after
    the end of the other (a pad token llmtune added) are not compared."""
    a, b = vocab_by_id(tok_a), vocab_by_id(tok_b)
    shared = min(len(a), len(b))
    if a[:shared] == b[:shared]:
        return
    differ = [i for i in range(shared) if a[i] != b[i]]
    examples = ", ".join(f"id {i}: {_show(a[i])} vs {_show(b[i])}" for i in differ[:2])
    sizes = f"; {len(a)} vs {len(b)} tokens" if len(a) != len(b) else ""
    raise RecipeError(
        f"tokenizer mismatch: the tokenizer vocabulary of {label_a} differs from that of {label_b}: "
        f"{len(differ)} of the {shared} token ids they share stand for other tokens ({examples}{sizes}). "
        "A model reads the ids of another tokenizer as other words",
        hint=hint or TOKENIZER_HINT,
    )


def _has_tokenizer_files(d: Path) -> bool:
    return any((d / f).is_file() for f in TOKENIZER_FILES)


def own_tokenizer(path: str | None, **kwargs: Any) -> Any | None:
    """The tokenizer saved with a model (or adapter) path, None when there is none (never raises for that):
    a local directory without tokenizer files, a missing path, a hub id without a loadable tokenizer.
    kwargs go to AutoTokenizer.from_pretrained (revision, token, trust_remote_code)."""
    from transformers import AutoTokenizer

    if not path:
        return None
    d = Path(path).expanduser()
    if d.is_dir():
        if not _has_tokenizer_files(d):
            return None
    elif looks_local(path):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError):
        return None


def _sha256_tokens(tokens: Sequence[str | None]) -> str:
    # JSON with ASCII escapes: unambiguous (token boundaries, None) and encodable whatever the strings hold
    return hashlib.sha256(json.dumps(list(tokens), ensure_ascii=True).encode("ascii")).hexdigest()


def tokenizer_record(tok: Any) -> TokenizerRecord:
    """A fingerprint of a tokenizer's vocabulary for run.json: the number of ids, and the sha256 over the
    id-ordered token strings of all ids. check_tokenizer_record reads it back."""
    tokens = vocab_by_id(tok)
    return TokenizerRecord(size=len(tokens), vocab_sha256=_sha256_tokens(tokens))


def check_tokenizer_record(
    tok: Any, record: TokenizerRecord, label: str, *, tok_label: str = "the tokenizer", hint: str | None = None
) -> None:
    """RecipeError unless the first record.size ids of tok are the vocabulary the record was made from
    (tokens appended after them, e.g. a pad token, are allowed). label: what the record belongs to (the model
    trained with that vocabulary); tok_label: where tok comes from."""
    size, sha = record.size, record.vocab_sha256
    tokens = vocab_by_id(tok)
    if len(tokens) < size:
        problem = f"has {len(tokens)} tokens, fewer than the {size} of the tokenizer {label} was trained with"
    elif _sha256_tokens(tokens[:size]) != sha:
        problem = (
            f"has a different vocabulary from the tokenizer {label} was trained with (its run.json records "
            f"{size} tokens, vocab_sha256 {sha[:12]}...)"
        )
    else:
        return
    raise RecipeError(f"tokenizer mismatch: {tok_label} {problem}", hint=hint or TOKENIZER_HINT)


def saved_tokenizer_record(path: str | None) -> TokenizerRecord | None:
    """The tokenizer record of the run.json in a local llmtune output directory; None when there is no such
    directory, file or record, or it cannot be read."""
    manifest = RunManifest.read(path)
    return None if manifest is None else manifest.tokenizer


def check_tokenizers_agree(
    sources: Sequence[tuple[str | None, str]],
    loaded: tuple[Any, str] | None = None,
    *,
    hint: str | None = None,
    **kwargs: Any,
) -> None:
    """Fail fast when models that are to work together were trained with different tokenizers.

    sources: (path, label) of models / adapters (None paths are skipped). The tokenizer saved with each one
    (when it has one) must agree with the run.json record next to it and with the others' (and with
    `loaded`, a (tokenizer, label) already in use); a source with a record but no tokenizer files is checked
    against the first tokenizer found. kwargs go to own_tokenizer."""
    anchor = loaded
    pending: list[tuple[TokenizerRecord, str]] = []
    for path, label in sources:
        if not path:
            continue
        name = f"{label} {path}"
        tok = own_tokenizer(path, **kwargs)
        record = saved_tokenizer_record(path)
        if tok is None:
            if record is not None:
                pending.append((record, name))
            continue
        if record is not None:
            check_tokenizer_record(
                tok,
                record,
                name,
                tok_label=f"the tokenizer saved in {path}",
                hint="restore the tokenizer files that run saved in that directory",
            )
        if anchor is None:
            anchor = (tok, name)
        else:
            compare_vocabularies(anchor[0], anchor[1], tok, name, hint=hint)
    if anchor is not None:
        for record, name in pending:
            check_tokenizer_record(anchor[0], record, name, tok_label=f"the tokenizer of {anchor[1]}", hint=hint)


def check_reference_tokenizer(recipe: RecipeBase, path: str, tokenizer: Any) -> None:
    """A DPO reference at another path than model.path must have been trained with the policy's tokenizer:
    its log-probs are read at the policy's token ids."""
    if same_path(path, recipe.model.path):
        return  # load_tokenizer checked that one
    m = recipe.model
    policy = f"model.tokenizer {m.tokenizer}" if m.tokenizer else f"model.path {m.path}"
    check_tokenizers_agree(
        [(path, "dpo.reference")],
        loaded=(tokenizer, f"the policy ({policy})"),
        hint="use as dpo.reference a model trained with the policy's tokenizer (null: the starting model), "
        "and train every stage of a pipeline with one tokenizer",
        **hub_kwargs(m),
    )
