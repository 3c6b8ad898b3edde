"""Sources -> examples, caching, mixing, packing and batching (llmtune.data.pipeline)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.data.chat import IGNORE_INDEX, encode_text, resolve_chat_template
from llmtune.data.formats import RowError
from llmtune.data.packing import Sample, as_samples, collate, pack_examples, pack_stream
from llmtune.data.pipeline import (
    DataBundle,
    Example,
    build_data,
    conversation_encoder,
    fingerprint_tokenizer,
    text_encoder,
)
from llmtune.errors import DataError
from llmtune.objectives.lm import count_targets
from llmtune.recipe import validate_recipe
from llmtune.recipe.data import DataSource
from llmtune.stages.base import forward_lm, recipe_settings
from llmtune.stages.cpt import CptStage
from llmtune.stages.lm import LanguageModelStep
from llmtune.stages.sft import SftStage
from tests.conftest import ROOT, base_recipe

QUICKSTART_SFT = ROOT / "recipes" / "quickstart" / "sft.jsonl"


def msgs(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def good(i: int) -> dict:
    return msgs(("user", f"What is {i} plus {i}?"), ("assistant", f"It is {2 * i}."))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def recipe_for(tmp_path: Path, sources: list[dict], **data: Any):
    return validate_recipe(base_recipe(tmp_path, data={"train": sources, **data}))


@pytest.fixture(scope="module")
def template(tokenizer) -> str:
    t = resolve_chat_template(tokenizer, None, required=True)
    assert t is not None
    return t


def sft_build(recipe, tokenizer, template: str, use_cache: bool = True) -> DataBundle:
    """What SftStage.build_data does, without the packing, so that the examples can be inspected."""
    on_prompt = recipe.sft.train_on_prompt
    settings = recipe_settings(recipe, on_prompt, fingerprint_tokenizer(tokenizer, template))
    encoder = conversation_encoder(tokenizer, template, recipe.data.max_length, on_prompt)
    return build_data(recipe, encoder, settings, use_cache=use_cache)


def key(e: Example | Sample) -> tuple[int, ...]:
    return tuple(e.input_ids)


# ------------------------------------------------------------------------------------ malformed rows

LONG_PROMPT = " ".join(["Please tell me a long story about frogs and books."] * 12)
MIXED_ROWS: list[Any] = [
    good(0),  # 0
    '{"messages": [{"role": "user"',  # 1: bad JSON
    good(1),  # 2
    msgs(("user", "Anyone there?")),  # 3: missing assistant
    msgs(("user", "Say something."), ("assistant", "  ")),  # 4: empty reply
    good(2),  # 5
    msgs(("assistant", "I speak first."), ("user", "Why?"), ("assistant", "Because.")),  # 6: wrong order
    msgs(("system", "Be nice."), ("user", "Hello?")),  # 7: missing assistant
    msgs(("user", LONG_PROMPT), ("assistant", "Once upon a time.")),  # 8: too long for max_length 64
    good(3),  # 9
    good(4),  # 10
    good(5),  # 11
]
NO_ASSISTANT = "conversation has no assistant turn"


def test_bad_rows_are_counted_with_reasons_and_indices(tmp_path, tokenizer, template):
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    recipe = recipe_for(tmp_path, [{"path": str(path)}], max_length=64)
    bundle = sft_build(recipe, tokenizer, template)
    (report,) = bundle.reports
    assert (report.rows, report.kept, report.dropped, report.examples) == (12, 6, 6, 6)
    assert len(bundle.train) == 6 and bundle.eval == []
    assert not report.cached
    reasons = dict(report.reasons)
    assert reasons.pop(NO_ASSISTANT) == 2
    assert reasons.pop("turn 2: empty assistant reply") == 1
    assert reasons.pop("turn 1 is the first turn and is from the assistant; it must be from the user") == 1
    (bad_json,) = [r for r in reasons if "not valid JSON" in r]
    assert bad_json.startswith("line 2:") and reasons.pop(bad_json) == 1
    (too_long,) = reasons
    assert "max_length=64" in too_long and reasons[too_long] == 1
    # the first five drops, in row order, with 0-based row indices
    assert [i for i, _ in report.first] == [1, 3, 4, 6, 7]
    assert report.first[1] == (3, NO_ASSISTANT) and report.first[2] == (4, "turn 2: empty assistant reply")
    # every kept example learns something and fits
    for e in bundle.train:
        assert len(e.input_ids) <= 64 and any(x != IGNORE_INDEX for x in e.labels)


def test_on_bad_row_error_lists_the_rows(tmp_path, tokenizer, template):
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    recipe = recipe_for(tmp_path, [{"path": str(path)}], max_length=64, on_bad_row="error")
    with pytest.raises(DataError) as exc:
        sft_build(recipe, tokenizer, template)
    msg = str(exc.value)
    assert "6 bad rows" in msg and str(path) in msg
    assert f"line 4: {NO_ASSISTANT}" in msg and "line 2: not valid JSON" in msg  # one numbering: the file's lines
    assert "row 1: line 2" not in msg
    assert "on_bad_row: drop" in msg  # the fix


def test_source_with_only_bad_rows_is_an_error(tmp_path, tokenizer, template):
    path = write_jsonl(tmp_path / "bad.jsonl", MIXED_ROWS[3:5])
    recipe = recipe_for(tmp_path, [{"path": str(path)}], max_length=64)
    with pytest.raises(DataError, match="yields no usable example") as exc:
        sft_build(recipe, tokenizer, template)
    assert "2 rows read, all dropped" in str(exc.value)
    assert NO_ASSISTANT in str(exc.value)


def test_max_samples_limits_rows_read(tmp_path, tokenizer, template):
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    recipe = recipe_for(tmp_path, [{"path": str(path), "max_samples": 3}], max_length=64)
    bundle = sft_build(recipe, tokenizer, template)
    (report,) = bundle.reports
    assert (report.rows, report.kept) == (3, 2)
    full = sft_build(recipe_for(tmp_path, [{"path": str(path)}], max_length=64), tokenizer, template)
    assert [key(e) for e in bundle.train] == [key(e) for e in full.train[:2]]


# ------------------------------------------------------------------------------------ weights and split


@pytest.fixture
def ten_rows(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "ten.jsonl", [good(i) for i in range(10)])


def test_weight_two_repeats_every_example_twice(tmp_path, tokenizer, template, ten_rows):
    base = sft_build(recipe_for(tmp_path, [{"path": str(ten_rows)}]), tokenizer, template)
    assert len({key(e) for e in base.train}) == 10
    doubled = sft_build(recipe_for(tmp_path, [{"path": str(ten_rows), "weight": 2.0}]), tokenizer, template)
    assert len(doubled.train) == 20
    assert Counter(key(e) for e in doubled.train) == Counter({key(e): 2 for e in base.train})


def test_weight_half_takes_a_seeded_random_half(tmp_path, tokenizer, template, ten_rows):
    base = {key(e) for e in sft_build(recipe_for(tmp_path, [{"path": str(ten_rows)}]), tokenizer, template).train}
    recipe = recipe_for(tmp_path, [{"path": str(ten_rows), "weight": 0.5}])
    half = [key(e) for e in sft_build(recipe, tokenizer, template).train]
    assert len(half) == 5 and len(set(half)) == 5 and set(half) <= base
    again = [key(e) for e in sft_build(recipe, tokenizer, template, use_cache=False).train]
    assert again == half  # same seed, same half
    # random, not the first half: other seeds pick other halves
    halves = set()
    for seed in range(5):
        raw = base_recipe(tmp_path, seed=seed, data={"train": [{"path": str(ten_rows), "weight": 0.5}]})
        halves.add(frozenset(key(e) for e in sft_build(validate_recipe(raw), tokenizer, template).train))
    assert len(halves) > 1


def test_mixing_two_sources(tmp_path, tokenizer, template, ten_rows):
    other = write_jsonl(tmp_path / "other.jsonl", [good(i) for i in range(100, 104)])
    recipe = recipe_for(tmp_path, [{"path": str(ten_rows)}, {"path": str(other), "weight": 1.5}])
    bundle = sft_build(recipe, tokenizer, template)
    assert len(bundle.train) == 10 + 4 + 2
    assert [r.name for r in bundle.reports] == [str(ten_rows), str(other)]


def test_eval_split_is_held_out_and_disjoint(tmp_path, tokenizer, template, ten_rows):
    recipe = recipe_for(tmp_path, [{"path": str(ten_rows)}], eval_split=0.2)
    bundle = sft_build(recipe, tokenizer, template)
    assert len(bundle.eval) == 2 and len(bundle.train) == 8
    train, evals = {key(e) for e in bundle.train}, {key(e) for e in bundle.eval}
    assert not train & evals
    base = sft_build(recipe_for(tmp_path, [{"path": str(ten_rows)}]), tokenizer, template)
    assert train | evals == {key(e) for e in base.train}
    again = sft_build(recipe, tokenizer, template, use_cache=False)
    assert {key(e) for e in again.eval} == evals


def test_eval_split_that_leaves_nothing_is_an_error(tmp_path, tokenizer, template):
    one = write_jsonl(tmp_path / "one.jsonl", [good(1)])
    with pytest.raises(DataError, match="eval_split"):
        sft_build(recipe_for(tmp_path, [{"path": str(one)}], eval_split=0.5), tokenizer, template)


def test_eval_sources_are_not_mixed_into_train(tmp_path, tokenizer, template, ten_rows):
    held = write_jsonl(tmp_path / "held.jsonl", [good(i) for i in range(50, 53)])
    recipe = recipe_for(tmp_path, [{"path": str(ten_rows)}], eval=[{"path": str(held)}])
    bundle = sft_build(recipe, tokenizer, template)
    assert len(bundle.train) == 10 and len(bundle.eval) == 3
    assert not {key(e) for e in bundle.train} & {key(e) for e in bundle.eval}


# ----------------------------------------------------------------------------------------------- cache


def test_cache_hit_returns_identical_examples(tmp_path, tokenizer, template):
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    recipe = recipe_for(tmp_path, [{"path": str(path)}], max_length=64, cache_dir=str(tmp_path / "cache"))
    first = sft_build(recipe, tokenizer, template)
    second = sft_build(recipe, tokenizer, template)
    assert not first.reports[0].cached and second.reports[0].cached
    assert any((tmp_path / "cache").rglob("examples.npz"))
    assert [(e.input_ids, e.labels) for e in second.train] == [(e.input_ids, e.labels) for e in first.train]
    r1, r2 = first.reports[0], second.reports[0]
    assert (r2.rows, r2.kept, r2.examples, r2.reasons, r2.first) == (
        r1.rows,
        r1.kept,
        r1.examples,
        r1.reasons,
        r1.first,
    )


def test_cache_misses_when_max_length_or_file_changes(tmp_path, tokenizer, template):
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    cache = str(tmp_path / "cache")
    sft_build(recipe_for(tmp_path, [{"path": str(path)}], max_length=64, cache_dir=cache), tokenizer, template)

    shorter = sft_build(
        recipe_for(tmp_path, [{"path": str(path)}], max_length=16, cache_dir=cache), tokenizer, template
    )
    assert not shorter.reports[0].cached
    assert all(len(e.input_ids) <= 16 for e in shorter.train)
    assert any(
        len(e.input_ids) > 16
        for e in sft_build(
            recipe_for(tmp_path, [{"path": str(path)}], max_length=64, cache_dir=cache), tokenizer, template
        ).train
    )

    write_jsonl(path, [*MIXED_ROWS, good(42)])
    changed = sft_build(
        recipe_for(tmp_path, [{"path": str(path)}], max_length=64, cache_dir=cache), tokenizer, template
    )
    assert not changed.reports[0].cached
    assert changed.reports[0].rows == 13 and len(changed.train) == 7


def test_cache_misses_when_train_on_prompt_changes(tmp_path, tokenizer, template, ten_rows):
    cache = str(tmp_path / "cache")
    plain = sft_build(recipe_for(tmp_path, [{"path": str(ten_rows)}], cache_dir=cache), tokenizer, template)
    raw = base_recipe(tmp_path, data={"train": [{"path": str(ten_rows)}], "cache_dir": cache})
    raw["sft"] = {"train_on_prompt": True}
    on_prompt = sft_build(validate_recipe(raw), tokenizer, template)
    assert not on_prompt.reports[0].cached
    assert all(e.labels == e.input_ids for e in on_prompt.train)
    assert all(e.labels != e.input_ids for e in plain.train)


# ------------------------------------------------------------------------------------------------- cpt

SHORT_DOCS = ["The sky is blue.", "After Friday comes Saturday.", "Frogs jump."]
LONG_DOC = " ".join(f"The word number {i} backwards is {str(i)[::-1]}." for i in range(12))


def cpt_recipe(tmp_path: Path, packing: bool, max_length: int = 16):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join([LONG_DOC, *SHORT_DOCS]) + "\n")
    raw = base_recipe(
        tmp_path, stage="cpt", data={"train": [{"path": str(path)}], "max_length": max_length, "packing": packing}
    )
    return validate_recipe(raw)


def test_cpt_chunks_a_long_document_without_losing_tokens(tmp_path, tokenizer):
    ids = encode_text(tokenizer, LONG_DOC)
    assert len(ids) > 4 * 16 and len(ids) % 16 not in (0, 1)  # several full chunks and a real remainder
    encode = text_encoder(tokenizer, 16, packing=False)
    chunks = encode({"text": LONG_DOC}, "text", DataSource(path="x.txt"))
    assert [len(c.input_ids) for c in chunks] == [16] * (len(ids) // 16) + [len(ids) % 16]
    assert [t for c in chunks for t in c.input_ids] == ids
    assert all(c.labels == c.input_ids for c in chunks)

    recipe = cpt_recipe(tmp_path, packing=False)
    bundle = build_data(recipe, encode, recipe_settings(recipe, False), "text")
    docs = [encode_text(tokenizer, d) for d in [LONG_DOC, *SHORT_DOCS]]
    assert [t for e in bundle.train for t in e.input_ids] == [t for d in docs for t in d]
    assert len(bundle.train) == len(chunks) + len(SHORT_DOCS)


def test_cpt_text_encoder_rejects_conversations(tokenizer):
    encode = text_encoder(tokenizer, 16, packing=True)
    with pytest.raises(RowError, match="stage cpt reads format text"):
        encode(good(1), "messages", DataSource(path="x.jsonl"))


def test_pack_stream_rows_are_full_except_the_last(tmp_path, tokenizer):
    recipe = cpt_recipe(tmp_path, packing=True)
    bundle = build_data(recipe, text_encoder(tokenizer, 16, packing=True), recipe_settings(recipe, True), "text")
    assert len(bundle.train) == 1 + len(SHORT_DOCS)  # one example per document
    stream = [t for e in bundle.train for t in e.input_ids]
    assert stream.count(tokenizer.eos_token_id) == 1 + len(SHORT_DOCS)  # the documents stay separated by EOS
    assert len(stream) % 16 not in (0, 1)
    rows = pack_stream(bundle.train, 16)
    assert [len(r.input_ids) for r in rows[:-1]] == [16] * (len(rows) - 1)
    assert 2 <= len(rows[-1].input_ids) < 16
    assert [t for r in rows for t in r.input_ids] == stream
    assert all(r.labels == r.input_ids and r.position_ids is None for r in rows)
    # the stage does the same
    data = CptStage().build_data(recipe, tokenizer, None)
    assert [s.input_ids for s in data.train] == [r.input_ids for r in rows]


# ---------------------------------------------------------------------------------------- sft packing


@pytest.fixture(scope="module")
def quickstart_examples(tokenizer, template) -> list[Example]:
    rows = [json.loads(line) for line in QUICKSTART_SFT.read_text().splitlines()[:12]]
    encode = conversation_encoder(tokenizer, template, 128, train_on_prompt=False)
    src = DataSource(path=str(QUICKSTART_SFT))
    return [e for row in rows for e in encode(row, "messages", src)]


def segments(sample: Sample) -> list[tuple[int, int]]:
    """[start, end) of every example in a packed row, from its position ids."""
    assert sample.position_ids is not None
    starts = [j for j, p in enumerate(sample.position_ids) if p == 0]
    return list(zip(starts, [*starts[1:], len(sample.input_ids)], strict=True))


def test_pack_examples(quickstart_examples):
    examples = quickstart_examples
    rows = pack_examples(examples, 128, seed=0)
    assert len(rows) < len(examples) and any(len(segments(r)) >= 3 for r in rows)
    seen: Counter[tuple[int, ...]] = Counter()
    by_ids = {key(e): e for e in examples}
    for r in rows:
        assert len(r.input_ids) == len(r.labels) == len(r.position_ids or []) <= 128
        for a, b in segments(r):
            assert r.position_ids is not None and r.position_ids[a:b] == list(range(b - a))
            k = tuple(r.input_ids[a:b])
            e = by_ids[k]
            assert r.labels[a] == IGNORE_INDEX
            assert r.labels[a + 1 : b] == e.labels[1:]
            seen[k] += 1
    assert seen == Counter(key(e) for e in examples)
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples)
    # deterministic for a seed
    assert [r.input_ids for r in pack_examples(examples, 128, seed=0)] == [r.input_ids for r in rows]


def test_pack_examples_never_learns_across_examples():
    """Even where every token is learned (train_on_prompt), an example's first token is not a target:
    it would be predicted from the previous example's last token."""
    examples = [
        Example(list(range(100 + 10 * i, 100 + 10 * i + n)), list(range(100 + 10 * i, 100 + 10 * i + n)))
        for i, n in enumerate([5, 3, 7, 2, 6, 4])
    ]
    rows = pack_examples(examples, 16, seed=3)
    assert len(rows) == 2
    for r in rows:
        assert len(r.input_ids) <= 16
        for a, b in segments(r):
            assert r.labels[a] == IGNORE_INDEX and r.labels[a + 1 : b] == r.input_ids[a + 1 : b]
    assert sorted(key(Example(r.input_ids[a:b], [])) for r in rows for a, b in segments(r)) == sorted(
        key(e) for e in examples
    )
    units = count_targets(collate(rows, pad_id=0)["labels"]).item()
    assert units == sum(len(e.input_ids) - 1 for e in examples)


def test_sft_stage_packs_when_asked(tmp_path, tokenizer, template):
    recipe = validate_recipe(base_recipe(tmp_path, data={"packing": True, "max_length": 128}))
    data = SftStage().build_data(recipe, tokenizer, template)
    assert data.train and all(s.position_ids is not None and len(s.input_ids) <= 128 for s in data.train)
    assert data.reports[0].kept == 600
    assert sum(len(segments(s)) for s in data.train) == 600


# ---------------------------------------------------------------------- packed == unpacked (the model)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_lm(request, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=request.param, dtype=torch.float32)
    return model.eval()


def token_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(x_{t+1} | x_{<=t}) for every position: (B, T-1)."""
    with torch.no_grad():
        logits = forward_lm(model, batch).float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]


def test_packed_rows_match_examples_run_one_by_one(tiny_lm, tokenizer, quickstart_examples):
    examples = quickstart_examples
    rows = pack_examples(examples, 128, seed=0)
    batch = collate(rows, tokenizer.pad_token_id)
    assert "position_ids" in batch and "attention_mask" not in batch
    packed_lp = token_logprobs(tiny_lm, batch)

    step = LanguageModelStep()
    total, n_total = torch.tensor(0.0), torch.tensor(0)
    by_ids = {key(e): e for e in examples}
    compared = 0
    for r, row in enumerate(rows):
        for a, b in segments(row):
            e = by_ids[tuple(row.input_ids[a:b])]
            single = collate(as_samples([e]), tokenizer.pad_token_id)
            lp = token_logprobs(tiny_lm, single)[0, : b - a - 1]
            torch.testing.assert_close(packed_lp[r, a : b - 1], lp, atol=1e-4, rtol=0)
            compared += 1
    for e in examples:
        with torch.no_grad():
            out = step.step(tiny_lm, collate(as_samples([e]), tokenizer.pad_token_id))
        total, n_total = total + out.loss_sum, n_total + out.units
    assert compared == len(examples)

    with torch.no_grad():
        packed = step.step(tiny_lm, batch)
    assert packed.units.item() == n_total.item() == count_targets(batch["labels"]).item()
    assert packed.units.item() == sum(sum(x != IGNORE_INDEX for x in e.labels[1:]) for e in examples)
    assert abs(packed.loss_sum.item() - total.item()) < 1e-4

    # a padded (unpacked) batch of the same examples gives the same sum too
    with torch.no_grad():
        padded = step.step(tiny_lm, collate(as_samples(examples), tokenizer.pad_token_id))
    assert padded.units.item() == n_total.item()
    assert abs(padded.loss_sum.item() - total.item()) < 1e-4

    # control: without restarting positions the examples would see each other, and the loss changes
    leaky = dict(batch)
    leaky["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        mixed = step.step(tiny_lm, leaky)
    assert abs(mixed.loss_sum.item() - total.item()) > 1e-2


# ----------------------------------------------------------------------------------------------- collate


def test_collate_unpacked_pads_right_with_attention_mask(tokenizer):
    eos = tokenizer.eos_token_id
    a = Sample([5, 6, 7, 8, eos], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, eos])
    b = Sample(list(range(10, 21)), list(range(10, 21)))
    batch = collate([a, b], pad_id=eos)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, eos] + [eos] * 11
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, eos] + [IGNORE_INDEX] * 11
    assert batch["labels"][1].tolist() == list(range(10, 21)) + [IGNORE_INDEX] * 5
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 11, [1] * 11 + [0] * 5]
    assert count_targets(batch["labels"]).item() == 3 + 10
    # a row that is already a multiple of 8 is not padded further
    assert collate([Sample(list(range(16)), list(range(16)))], pad_id=0)["input_ids"].shape == (1, 16)
    assert collate([a], pad_id=0, pad_to_multiple=1)["input_ids"].shape == (1, 5)


def test_collate_packed_carries_position_ids(tokenizer):
    eos = tokenizer.eos_token_id
    row = Sample([5, 6, eos, 7, 8, 9, eos], [IGNORE_INDEX, 6, eos, IGNORE_INDEX, 8, 9, eos], [0, 1, 2, 0, 1, 2, 3])
    plain = Sample([1, 2, 3], [1, 2, 3])
    batch = collate([row, plain], pad_id=eos)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["labels"][0].tolist() == [*row.labels, IGNORE_INDEX]
    assert batch["labels"][1].tolist() == [1, 2, 3] + [IGNORE_INDEX] * 5
    assert batch["input_ids"][1].tolist() == [1, 2, 3] + [eos] * 5


# ------------------------------------------------------------------------------------------ shared data


def test_glaive_toolcall_through_the_sft_encoder(tmp_path, tokenizer, template, shared_data: Path):
    path = shared_data / "llama-factory" / "glaive_toolcall_en_demo.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    recipe = recipe_for(tmp_path, [{"path": str(path), "max_samples": 40}], max_length=2048)
    bundle = sft_build(recipe, tokenizer, template, use_cache=False)
    (report,) = bundle.reports
    assert report.rows == 40 and report.kept >= 35 and len(bundle.train) == report.kept
    for e in bundle.train:
        assert any(x != IGNORE_INDEX for x in e.labels[1:])
        assert len(e.input_ids) <= 2048
    assert sum("<tools>" in tokenizer.decode(e.input_ids) for e in bundle.train) >= 10  # rows with tools

    # one row with a tool call: the call is learned, the observation (tool result) is not
    row = json.loads(path.read_text())[0]
    observation = next(t["value"] for t in row["conversations"] if t["from"] == "observation")
    call = next(t["value"] for t in row["conversations"] if t["from"] == "function_call")
    encode = conversation_encoder(tokenizer, template, 2048, train_on_prompt=False)
    (e,) = encode(row, "sharegpt", DataSource(path=str(path)))
    learned = tokenizer.decode([i for i, lab in zip(e.input_ids, e.labels, strict=True) if lab != IGNORE_INDEX])
    assert observation in tokenizer.decode(e.input_ids)
    assert observation not in learned and '"recipes": [' not in learned
    assert call in learned
    assert learned.count("<|im_end|>") == sum(t["from"] in ("gpt", "function_call") for t in row["conversations"])
