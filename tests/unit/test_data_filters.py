"""data.dedup, data.filter (token bounds, perplexity selection) and data.replay, on hand-made rows.

Rows are generated here (never seen by the project): instructions of 20+ words, so that one changed word keeps
the word 3-gram Jaccard at or above 0.7 (n words give n - 2 shingles; one changed word in the middle replaces
3 of them: (n - 5) / (n + 1), 0.75 at n = 23), while short instructions that differ in one entity stay apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmtune.data.chat import IGNORE_INDEX, resolve_chat_template
from llmtune.data.filters import (
    EXACT_DUPLICATE,
    Deduper,
    jaccard,
    near_reason,
    prompt_text,
    select_by_perplexity,
    shingles,
)
from llmtune.data.pipeline import Example, mix_replay
from llmtune.errors import RecipeError
from llmtune.recipe import load_recipe, validate_recipe
from tests.conftest import base_recipe, write_recipe

LONG = (
    "Describe step by step how a small mountain village could build a shared greenhouse from recycled windows, "
    "which plants would grow best there in winter, and how the neighbours might divide the work"
)


def test_exact_dedup_normalises_case_and_whitespace_and_keeps_the_first() -> None:
    d = Deduper("exact")
    assert d.check(LONG) is None
    assert d.check("  " + LONG.upper().replace(" ", "   ") + "\n") == EXACT_DUPLICATE
    assert d.check(LONG.replace("winter", "summer")) is None  # exact mode: a changed word is a new row
    assert d.check("short and distinct") is None


def test_near_dedup_drops_one_word_changes_and_keeps_distinct_rows() -> None:
    d = Deduper("near", 0.7)
    changed = LONG.replace("recycled", "salvaged")
    n = len(LONG.split())
    assert jaccard(shingles(LONG), shingles(changed)) == pytest.approx((n - 2 - 3) / (n - 2 + 3))
    assert d.check(LONG) is None
    assert d.check(changed) == near_reason(0.7)
    assert d.check(LONG) == EXACT_DUPLICATE
    # short prompts that differ in their subject are different questions
    assert d.check("What is the capital of France?") is None
    assert d.check("What is the capital of Spain?") is None
    # a different long instruction on another topic
    other = "List five ways a public library can help teenagers learn programming, with a short example of each"
    assert d.check(other) is None
    assert len(d.kept) == 4


def test_near_threshold_is_respected() -> None:
    """Two changed words far apart: 6 of n - 2 shingles replaced; Jaccard (n - 8) / (n + 4), about 0.57 here."""
    two = LONG.replace("small", "tiny").replace("neighbours", "families")
    j = jaccard(shingles(LONG), shingles(two))
    assert 0.5 < j < 0.7
    strict, loose = Deduper("near", 0.7), Deduper("near", 0.5)
    assert strict.check(LONG) is None and strict.check(two) is None
    assert loose.check(LONG) is None and loose.check(two) is not None


def test_near_dedup_is_deterministic_over_many_rows() -> None:
    import random

    rng = random.Random(3)
    words = [f"w{i}" for i in range(400)]
    base = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(200)]
    edited = [b.split() for b in base[:50]]
    for e in edited:
        e[15] = "CHANGED"
    rows = base + [" ".join(e) for e in edited]
    dedupers = [Deduper("near", 0.7), Deduper("near", 0.7)]
    results = [[d.check(r) is None for r in rows] for d in dedupers]
    assert results[0] == results[1]
    assert sum(results[0][:200]) == 200  # random rows share almost no 3-gram
    assert sum(results[0][200:]) == 0  # every one-word edit is caught (candidates by MinHash, confirmed exactly)


def test_prompt_text_is_the_user_turns() -> None:
    alpaca = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "be brief"}
    assert prompt_text(alpaca, "alpaca") == "Translate\n\nbonjour"  # the user turn as alpaca renders it
    msgs = {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    assert prompt_text(msgs, "messages") == "a\nc"
    assert prompt_text({"text": "plain"}, "text") == "plain"


def test_select_by_perplexity_takes_the_extremes() -> None:
    scores = {(0, i): float(v) for i, v in enumerate([5, 1, 9, 3, 7, 2, 8, 4, 6, 10])}
    low, high = select_by_perplexity(scores, 0.2, 0.1)
    assert low == {(0, 1), (0, 5)}  # scores 1 and 2
    assert high == {(0, 9)}  # score 10
    low, high = select_by_perplexity(scores, 0.0, 0.3)
    assert low == set() and high == {(0, 9), (0, 2), (0, 6)}


def _ex(n: int, replay: bool) -> Example:
    ids = list(range(10 + n % 5))
    return Example(ids, list(ids) if replay else [IGNORE_INDEX] * 5 + ids[5:], row=n)


@pytest.mark.parametrize(("n_sft", "ratio"), [(95, 0.05), (40, 0.2), (7, 0.5), (3, 0.1)])
def test_mix_replay_gives_the_fraction(n_sft: int, ratio: float) -> None:
    sft = [_ex(i, False) for i in range(n_sft)]
    pool = [_ex(1000 + i, True) for i in range(12)]
    mixed = mix_replay(sft, pool, ratio, seed=0)
    n_replay = sum(1 for e in mixed if e.row >= 1000)
    assert [e for e in mixed if e.row < 1000] == sft  # every sft example, in order
    assert n_replay == max(1, round(ratio / (1 - ratio) * n_sft))
    assert abs(n_replay / len(mixed) - ratio) <= 1 / len(mixed) or n_replay == 1


# --- recipe checks -----------------------------------------------------------------------------------------


def _refused(tmp_path: Path, recipe: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, recipe))
    return str(info.value)


def test_bad_filter_settings_are_refused(tmp_path: Path) -> None:
    data = base_recipe(tmp_path)["data"]
    msg = _refused(tmp_path, base_recipe(tmp_path, data={**data, "dedup": "fuzzy"}))
    assert "dedup" in msg and "exact" in msg and "near" in msg
    ppl = {"drop_low": 0.6, "drop_high": 0.4}
    msg = _refused(tmp_path, base_recipe(tmp_path, data={**data, "filter": {"perplexity": ppl}}))
    assert "would drop every row" in msg
    msg = _refused(tmp_path, base_recipe(tmp_path, data={**data, "filter": {"min_tokens": 50, "max_tokens": 10}}))
    assert "min_tokens 50 > max_tokens 10" in msg
    msg = _refused(tmp_path, base_recipe(tmp_path, data={**data, "replay": {"path": "x.jsonl", "ratio": 1.0}}))
    assert "ratio" in msg
    msg = _refused(tmp_path, base_recipe(tmp_path, stage="dpo", data={**data, "dedup": "exact"}))
    assert "data.dedup is supported for stages cpt and sft, not dpo" in msg
    msg = _refused(tmp_path, base_recipe(tmp_path, stage="cpt", data={**data, "replay": {"path": "x", "ratio": 0.1}}))
    assert "data.replay mixes plain-text rows into sft" in msg


# --- replay through the sft stage's data (the samples the batch source draws from) ------------------------


def test_sft_replay_fraction_and_labels(tmp_path: Path, tokenizer) -> None:
    from llmtune.engine.batches import Batches
    from llmtune.stages.sft import SftStage

    sft = tmp_path / "sft.jsonl"
    rows = [
        {"instruction": f"Question number {i} about topic {i * 7}?", "input": "", "output": f"Answer {i}."}
        for i in range(38)
    ]
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = tmp_path / "lm.jsonl"
    lm.write_text(
        "".join(json.dumps({"text": f"Plain document {i}: " + "words " * (i % 9 + 3)}) + "\n" for i in range(20))
    )
    recipe = validate_recipe(
        base_recipe(
            tmp_path, data={"train": [{"path": str(sft)}], "max_length": 64, "replay": {"path": str(lm), "ratio": 0.05}}
        )
    )
    template = resolve_chat_template(tokenizer, None, required=True)
    data = SftStage().build_data(recipe, tokenizer, template)
    replay = [s for s in data.train if all(x != IGNORE_INDEX for x in s.labels)]
    assert len(data.train) == 40 and len(replay) == 2  # round(0.05 / 0.95 * 38) = 2: 2 / 40 = 0.05
    for s in data.train:
        if s in replay:
            assert s.labels == s.input_ids and len(s.input_ids) <= 64
        else:  # sft rows learn only the reply: the prompt's tokens are masked
            assert s.labels[0] == IGNORE_INDEX and any(x != IGNORE_INDEX for x in s.labels)
    assert [r.name for r in data.reports][-1] == f"replay: {lm}"
    assert data.reports[-1].examples == 2

    import torch

    from llmtune.engine.distributed import DistInfo

    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = Batches(data.train, recipe, dist, lambda samples: samples)  # micro_batch_size 4: 10 windows
    seen = [s for window in batches.epoch_windows(0) for micro in window for s in micro]
    assert len(seen) == 40 and sum(1 for s in seen if all(x != IGNORE_INDEX for x in s.labels)) == 2


def test_dedup_across_sources_and_not_a_bad_row(tmp_path: Path, tokenizer) -> None:
    """A row of the second source that repeats (or nearly repeats) one of the first is dropped from the second;
    with on_bad_row: error, duplicates are filtered, not bad rows; a malformed row still stops the run."""
    from llmtune.data.pipeline import build_data, conversation_encoder, fingerprint_tokenizer
    from llmtune.errors import DataError
    from llmtune.stages.base import recipe_settings

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first = [{"instruction": LONG, "output": "one"}, {"instruction": "Name a river.", "output": "Nile"}]
    second = [
        {"instruction": LONG.replace("recycled", "salvaged"), "output": "two"},  # near dup of a.jsonl row 1
        {"instruction": "name a   RIVER.", "output": "Amazon"},  # exact dup of a.jsonl row 2
        {"instruction": "Name a mountain.", "output": "Everest"},
    ]
    for path, rows in ((a, first), (b, second)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = resolve_chat_template(tokenizer, None, required=True)

    def build(**data: Any):
        sources = [{"path": str(a)}, {"path": str(b)}]
        recipe = validate_recipe(base_recipe(tmp_path, data={"train": sources, "max_length": 256, **data}))
        settings = recipe_settings(recipe, False, fingerprint_tokenizer(tokenizer, template))
        return build_data(recipe, conversation_encoder(tokenizer, template, 256, False), settings)

    for _ in range(2):  # the second time from the cache
        bundle = build(dedup="near", on_bad_row="error")
        ra, rb = bundle.reports
        assert (ra.kept, rb.kept) == (2, 1) and len(bundle.train) == 3
        assert rb.reasons == {EXACT_DUPLICATE: 1, near_reason(0.7): 1}
        assert rb.first_dropped() == [f"line 1: {near_reason(0.7)}", f"line 2: {EXACT_DUPLICATE}"]
    assert [r.kept for r in build(dedup="exact").reports] == [2, 2]
    assert [r.kept for r in build().reports] == [2, 3]
    b.write_text(b.read_text() + "not json\n")
    with pytest.raises(DataError, match="1 bad rows"):
        build(dedup="near", on_bad_row="error")


def test_perplexity_scores_come_back_with_the_data_and_no_file_is_written(tmp_path: Path, tokenizer) -> None:
    """build_data returns perplexity_scores.jsonl's text for its caller to write (the trainer, on the main
    process) and writes nothing itself. Hand-made scores: a row's NLL sum is its length n over one token, so its
    perplexity is exp(n); of 5 rows, drop_low 0.2 drops the shortest and drop_high 0.2 the longest."""
    import math

    from llmtune.data.pipeline import PERPLEXITY_SCORES, build_data, conversation_encoder, fingerprint_tokenizer
    from llmtune.stages.base import recipe_settings

    path = tmp_path / "rows.jsonl"
    replies = ["a b c d e f", "a", "a b c", "a b c d e f g h i j k l", "a b"]
    path.write_text("".join(json.dumps({"instruction": "Say it.", "output": r}) + "\n" for r in replies))
    template = resolve_chat_template(tokenizer, None, required=True)
    data = {"train": [{"path": str(path)}], "filter": {"perplexity": {"drop_low": 0.2, "drop_high": 0.2}}}
    recipe = validate_recipe(base_recipe(tmp_path, data=data))
    settings = recipe_settings(recipe, False, fingerprint_tokenizer(tokenizer, template))

    lengths: dict[int, int] = {}

    def scorer(examples: list[Example]) -> list[tuple[float, int]]:
        lengths.update((e.row, len(e.input_ids)) for e in examples)
        return [(float(len(e.input_ids)), 1) for e in examples]

    encode = conversation_encoder(tokenizer, template, 256, False)
    bundle = build_data(recipe, encode, settings, use_cache=False, scorer=scorer)
    assert not Path(recipe.output_dir).exists()
    assert list(bundle.outputs) == [PERPLEXITY_SCORES]
    scores = [json.loads(line) for line in bundle.outputs[PERPLEXITY_SCORES].splitlines()]
    assert [s["row"] for s in scores] == [0, 1, 2, 3, 4]
    assert [s["dropped"] for s in scores] == [None, "low", None, "high", None]
    assert [s["kept"] for s in scores] == [True, False, True, False, True]
    assert sorted(lengths, key=lengths.get) == [1, 4, 2, 0, 3]  # the replies' order of length
    for s in scores:
        assert s["source"] == str(path) and math.isclose(s["perplexity"], math.exp(lengths[s["row"]]))
    assert sorted(e.row for e in bundle.train) == [0, 2, 4]
