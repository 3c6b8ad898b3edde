"""Property-based tests: whatever a user writes in a recipe or a data file ends in a clear message (a
RecipeError / DataError, exit 2) or a counted dropped row (RowError), never another exception."""

from __future__ import annotations

import json
import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtune.data.formats import RowError, to_conversation
from llmtune.data.sources import read_rows
from llmtune.errors import UserError
from llmtune.recipe.data import DataSource
from llmtune.recipe.load import apply_overrides, load_recipe, validate_recipe
from tests.conftest import ROOT, TINY_MODEL

KEYS = [
    "stage", "output_dir", "seed", "model", "finetuning", "data", "train", "distributed", "precision", "sft",
    "path", "dtype", "method", "lora_r", "lr", "lrr", "epochs", "max_steps", "micro_batch_size", "zero_stage",
    "packing", "max_length", "format", "weight", "max_samples", "eval_split", "eval", "offload", "warmup_ratio",
    "modle", "trian", "finetunning", "lora_alpah", "target_modules", "chat_template", "on_bad_row",
]  # fmt: skip
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["sft", "cpt", "rm", "lora", "qlora", "bf16", "fp16", "all-linear", "x"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=12,
)


def _good() -> dict:
    return {
        "stage": "sft",
        "output_dir": "runs/x",
        "model": {"path": str(TINY_MODEL)},
        "data": {"train": [{"path": str(ROOT / "recipes" / "quickstart" / "sft.jsonl")}]},
    }


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=8))
def test_random_recipes_validate_or_explain(raw: dict) -> None:
    try:
        validate_recipe(raw, "fuzz.yaml")
    except UserError as e:
        assert e.exit_code == 2 and str(e).strip()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3), values), max_size=4))
def test_mutated_good_recipes_validate_or_explain(edits: list) -> None:
    raw = _good()
    try:
        for path, value in edits:
            raw = apply_overrides(raw, [f"{'.'.join(path)}={json.dumps(value)}"])
        recipe = validate_recipe(raw, "fuzz.yaml")
    except UserError as e:
        assert e.exit_code == 2 and str(e).strip()
    else:
        assert recipe.stage in ("sft", "cpt")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_recipe_bytes_never_crash(tmp_path: Path, blob: bytes) -> None:
    p = tmp_path / "r.yaml"
    p.write_bytes(blob)
    try:
        load_recipe(p)
    except UserError as e:
        assert e.exit_code == 2


messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "gpt", "human", "bot", ""]),
         "content": st.one_of(st.text(max_size=20), st.none(), st.integers(), st.lists(st.text(max_size=5)))}
    ),
    max_size=6,
)  # fmt: skip
rows = st.one_of(
    st.builds(lambda m: {"messages": m}, messages),
    st.builds(
        lambda m: {"conversations": [{"from": x["role"], "value": x["content"]} for x in m]},
        messages,
    ),
    st.dictionaries(st.sampled_from(["instruction", "input", "output", "system", "history"]), values, max_size=5),
    st.dictionaries(st.text(string.ascii_lowercase, max_size=8), values, max_size=4),
    values,
)


@settings(max_examples=500, deadline=None)
@given(rows, st.sampled_from(["alpaca", "sharegpt", "messages"]))
def test_random_rows_convert_or_are_dropped_with_a_reason(row: object, fmt: str) -> None:
    try:
        conv = to_conversation(row, fmt)  # type: ignore[arg-type]
    except RowError as e:
        assert str(e).strip()
    else:
        assert any(m["role"] == "assistant" and m["content"].strip() for m in conv.messages)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(lambda v: json.dumps(v).encode(), values),
        st.builds(lambda vs: "\n".join(json.dumps(v) for v in vs).encode()[:-3], st.lists(values, max_size=4)),
    ),
    st.sampled_from([".json", ".jsonl", ".csv", ".txt"]),
)
def test_random_data_files_read_or_explain(tmp_path: Path, blob: bytes, suffix: str) -> None:
    p = tmp_path / f"d{suffix}"
    p.write_bytes(blob)
    try:
        out = read_rows(DataSource(path=str(p)))
    except UserError as e:
        assert e.exit_code == 2 and str(p.name) in str(e)
    else:
        assert all((r.data is None) != (r.error is None) for r in out)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows, st.sampled_from(["sharegpt", "messages"]), st.integers(8, 96))
def test_random_rows_through_the_chat_template_encode_or_drop(tokenizer, row: object, fmt: str, max_length: int):
    from llmtune.data.chat import IGNORE_INDEX, encode_conversation

    try:
        conv = to_conversation(row, fmt)  # type: ignore[arg-type]
        ids, labels = encode_conversation(tokenizer, tokenizer.chat_template, conv, max_length)
    except RowError as e:
        assert str(e).strip()
    else:
        assert 0 < len(ids) == len(labels) <= max_length
        assert any(x != IGNORE_INDEX for x in labels[1:])
