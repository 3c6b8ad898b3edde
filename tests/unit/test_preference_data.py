"""Preference rows in the shapes users bring -> canonical rows -> tokens -> pair batches; the cache keeps them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.data.chat import IGNORE_INDEX
from llmtune.data.formats import RowError
from llmtune.data.pipeline import build_data
from llmtune.data.preference import (
    as_preference_samples,
    collate_preference,
    detect_preference_format,
    encode_reply,
    preference_encoder,
    to_preference,
)
from llmtune.recipe.data import DataSource
from llmtune.recipe.stages import DpoRecipe
from tests.conftest import TINY_MODEL

PROMPT_MSGS = [{"role": "user", "content": "Name a colour."}]


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": PROMPT_MSGS, "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": "No."},
        {  # TRL: two full conversations, the prompt is what they share
            "chosen": [*PROMPT_MSGS, {"role": "assistant", "content": "Blue."}],
            "rejected": [*PROMPT_MSGS, {"role": "assistant", "content": "No."}],
        },
        {  # LLaMA-Factory
            "conversations": [{"from": "human", "value": "Name a colour."}],
            "chosen": {"from": "gpt", "value": "Blue."},
            "rejected": {"from": "gpt", "value": "No."},
        },
        {"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "No."},
    ],
    ids=["strings", "messages", "trl-implicit", "llama-factory", "alpaca"],
)
def test_pair_shapes_give_the_same_canonical_row(row: dict) -> None:
    pref = to_preference(row, "pairs")
    assert pref.responses == ["Blue.", "No."]
    for conv in pref.conversations:
        assert conv.messages[:-1] == PROMPT_MSGS
        assert conv.messages[-1]["role"] == "assistant"
    assert pref.value == 0.0


def test_pair_margin_system_and_multi_turn_prompt() -> None:
    row = {
        "system": "Be brief.",
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Colour?"},
        ],
        "chosen": "Blue.",
        "rejected": "Red, maybe.",
        "margin": 2,
    }
    pref = to_preference(row, "pairs", default_system="Default.")
    assert pref.value == 2.0
    assert [m["role"] for m in pref.conversations[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert pref.conversations[0].messages[0]["content"] == "Default."  # a message-list prompt: source system


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "Q", "chosen": "Same", "rejected": " Same "}, "chosen and rejected are identical"),
        ({"prompt": "Q", "chosen": "", "rejected": "x"}, "empty chosen response"),
        ({"prompt": "Q", "chosen": "x", "rejected": None}, "empty rejected response"),
        ({"prompt": "Q", "chosen": "x"}, "missing key 'rejected'"),
        ({"chosen": "x", "rejected": "y"}, "no prompt"),
        ({"prompt": "Q", "chosen": "x", "rejected": "y", "margin": "big"}, "'margin' is not a number"),
        ({"prompt": "Q", "chosen": "x", "rejected": "y", "margin": float("nan")}, "'margin' is not a finite number"),
        ({"prompt": "Q", "chosen": "x", "rejected": "y", "margin": 1e30}, "'margin' is beyond"),
        (
            {
                "chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}],
            },
            "differ before their last reply",
        ),
        ({"prompt": "Q", "chosen": {"role": "user", "content": "x"}, "rejected": "y"}, "not from the assistant"),
    ],
)
def test_bad_pairs_are_rejected_with_a_reason(row: dict, reason: str) -> None:
    with pytest.raises(RowError, match=reason):
        to_preference(row, "pairs")


@pytest.mark.parametrize("score", [float("nan"), float("inf"), -1e9])
def test_a_score_that_is_not_a_usable_number_is_a_row_error(score: float) -> None:
    with pytest.raises(RowError, match="'score' is"):
        to_preference({"prompt": "Q", "response": "A", "score": score}, "pointwise")


def test_ranked_pointwise_unpaired_shapes() -> None:
    ranked = to_preference(
        {"prompt": "Q", "responses": ["best", {"role": "assistant", "content": "mid"}, "worst"]}, "ranked"
    )
    assert ranked.responses == ["best", "mid", "worst"]
    assert to_preference({"prompt": "Q", "chosen": "a", "rejected": "b"}, "ranked").responses == ["a", "b"]
    with pytest.raises(RowError, match="fewer than 2"):
        to_preference({"prompt": "Q", "responses": ["only"]}, "ranked")
    with pytest.raises(RowError, match="identical"):
        to_preference({"prompt": "Q", "responses": ["a", "a"]}, "ranked")

    point = to_preference({"prompt": "Q", "response": "A", "score": 3.5}, "pointwise")
    assert point.responses == ["A"] and point.value == 3.5
    with pytest.raises(RowError, match="'score' is not a number"):
        to_preference({"prompt": "Q", "response": "A", "score": True}, "pointwise")

    kto = to_preference({"prompt": "Q", "completion": "A", "label": False}, "unpaired")
    assert kto.responses == ["A"] and kto.value == 0.0
    msgs = to_preference(
        {"messages": [*PROMPT_MSGS, {"role": "assistant", "content": "Blue"}], "label": True}, "unpaired"
    )
    assert msgs.responses == ["Blue"] and msgs.value == 1.0
    with pytest.raises(RowError, match="no assistant turn"):
        to_preference({"messages": PROMPT_MSGS, "label": True}, "unpaired")
    with pytest.raises(RowError, match="'label' is not true / false"):
        to_preference({"prompt": "Q", "completion": "A", "label": "maybe"}, "unpaired")


def test_detect_preference_format() -> None:
    assert detect_preference_format([{"prompt": "q", "chosen": "a", "rejected": "b"}]) == "pairs"
    assert detect_preference_format([{"prompt": "q", "responses": []}]) == "ranked"
    assert detect_preference_format([{"prompt": "q", "response": "a", "score": 1}]) == "pointwise"
    assert detect_preference_format([{"messages": [], "label": True}]) == "unpaired"
    assert detect_preference_format([{"instruction": "q", "output": "a"}]) is None


def test_labels_cover_only_the_last_reply(tokenizer) -> None:
    row = {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Colour?"},
        ],
        "chosen": "Blue.",
        "rejected": "Red.",
    }
    conv = to_preference(row, "pairs").conversations[0]
    ids, labels = encode_reply(tokenizer, tokenizer.chat_template, conv, 512)
    learned = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "Blue.<|im_end|>"  # the reply and its end of turn; not the earlier assistant turn
    assert len(ids) == len(labels)


def test_truncation_keeps_the_reply(tokenizer) -> None:
    conv = to_preference({"prompt": "word " * 200, "chosen": "Blue sky.", "rejected": "x"}, "pairs").conversations[0]
    ids, labels = encode_reply(tokenizer, tokenizer.chat_template, conv, 32)
    assert len(ids) == 32
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "Blue sky.<|im_end|>"
    long_reply = to_preference({"prompt": "Q", "chosen": "sky " * 200, "rejected": "x"}, "pairs").conversations[0]
    ids, labels = encode_reply(tokenizer, tokenizer.chat_template, long_reply, 32)
    assert len(ids) == 32 and sum(t != IGNORE_INDEX for t in labels) > 10


def test_collate_stacks_chosen_then_rejected(tokenizer) -> None:
    enc = preference_encoder(tokenizer, tokenizer.chat_template, 128)
    src = DataSource(path="x.jsonl")
    rows = [
        {"prompt": "Q1", "chosen": "good one", "rejected": "bad", "margin": 1.5},
        {"prompt": "Q2", "chosen": "good", "rejected": "bad two three"},
    ]
    samples = as_preference_samples([e for r in rows for e in enc(r, "pairs", src)])
    assert [len(s.parts) for s in samples] == [2, 2]
    batch = collate_preference(samples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] % 8 == 0
    assert batch["group"].tolist() == [0, 1, 0, 1] and batch["rank"].tolist() == [0, 0, 1, 1]
    assert batch["value"].tolist() == [1.5, 0.0]
    assert "ref_logps" not in batch
    for i, (b, r) in enumerate(zip(batch["group"].tolist(), batch["rank"].tolist(), strict=True)):
        ids, _ = samples[b].sequences()[r]
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["attention_mask"][i].sum().item() == len(ids)
    samples[0].ref_logps, samples[1].ref_logps = [-1.0, -2.0], [-3.0, -4.0]
    assert collate_preference(samples, 0)["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]


def test_ranked_collate_with_different_lengths(tokenizer) -> None:
    enc = preference_encoder(tokenizer, tokenizer.chat_template, 128)
    src = DataSource(path="x.jsonl")
    rows = [{"prompt": "Q", "responses": ["a", "b", "c"]}, {"prompt": "R", "responses": ["d", "e"]}]
    samples = as_preference_samples([e for r in rows for e in enc(r, "ranked", src)])
    batch = collate_preference(samples, 0)
    assert batch["group"].tolist() == [0, 1, 0, 1, 0] and batch["rank"].tolist() == [0, 0, 1, 1, 2]


def _recipe(tmp_path: Path, sources: list[dict], loss: str = "sigmoid") -> DpoRecipe:
    return DpoRecipe(
        stage="dpo",
        output_dir=str(tmp_path / "out"),
        model={"path": str(TINY_MODEL)},
        data={"train": sources, "max_length": 2048, "cache_dir": str(tmp_path / "cache")},
        dpo={"loss": loss},
    )


def test_drops_are_counted_and_the_cache_keeps_parts_and_values(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad", "margin": 0.5},
        {"prompt": "Q2", "chosen": "same", "rejected": "same"},
        {"prompt": "Q3", "chosen": "", "rejected": "bad"},
        {"prompt": "Q4", "chosen": "fine", "rejected": "worse"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = _recipe(tmp_path, [{"path": str(path)}])
    enc = preference_encoder(tokenizer, tokenizer.chat_template, 2048)
    first = build_data(recipe, enc, "s", "pairs")
    report = first.reports[0]
    assert (report.rows, report.kept, report.dropped) == (4, 2, 2)
    assert report.reasons["chosen and rejected are identical"] == 1
    assert report.reasons["empty chosen response"] == 1
    again = build_data(recipe, enc, "s", "pairs")
    assert again.reports[0].cached
    for a, b in zip(first.train, again.train, strict=True):
        assert (a.input_ids, a.labels, a.parts, a.values, a.row) == (b.input_ids, b.labels, b.parts, b.values, b.row)
    assert [e.values for e in again.train] == [[0.5], [0.0]]


def test_kto_reads_pairs_as_two_unpaired_examples_and_the_cache_tells_the_modes_apart(
    tmp_path: Path, tokenizer
) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Q1", "chosen": "good", "rejected": "bad"}, {"prompt": "Q2", "chosen": "ok", "rejected": "no"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = _recipe(tmp_path, [{"path": str(path)}])
    pairs = build_data(recipe, preference_encoder(tokenizer, tokenizer.chat_template, 2048), "s", "pairs")
    assert [len(e.parts) for e in pairs.train] == [2, 2]
    # the same file and settings read for KTO: not the pairs cache entry, but one example per reply
    enc = preference_encoder(tokenizer, tokenizer.chat_template, 2048, unpair=True)
    kto = build_data(recipe, enc, "s", "unpaired")
    assert not kto.reports[0].cached
    assert [(len(e.parts), e.values, e.row) for e in kto.train] == [
        (1, [1.0], 0),
        (1, [0.0], 0),
        (1, [1.0], 1),
        (1, [0.0], 1),
    ]
    first = pairs.train[0]
    n = first.parts[0]
    assert kto.train[0].input_ids == first.input_ids[:n] and kto.train[1].input_ids == first.input_ids[n:]


@pytest.mark.parametrize(
    ("name", "fmt", "loss"),
    [
        ("dpo_en_demo.json", "pairs", "sigmoid"),
        ("dpo_zh_demo.json", "pairs", "sigmoid"),
        ("kto_en_demo.json", "unpaired", "kto"),
    ],
)
def test_shared_preference_files_load(
    tmp_path: Path, shared_data: Path, tokenizer, name: str, fmt: str, loss: str
) -> None:
    path = shared_data / "llama-factory" / name
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert detect_preference_format(rows) == fmt
    recipe = _recipe(tmp_path, [{"path": str(path)}], loss)
    bundle = build_data(recipe, preference_encoder(tokenizer, tokenizer.chat_template, 2048), "s", fmt)
    report = bundle.reports[0]
    assert report.rows == 300 and report.kept == 300, report.reasons
    samples = as_preference_samples(bundle.train)
    assert all(len(s.parts) == (2 if fmt == "pairs" else 1) for s in samples)
    if fmt == "unpaired":
        labels = {s.value for s in samples}
        assert labels == {0.0, 1.0}
    for s in samples[:20]:
        for ids, labels in s.sequences():
            assert any(t != IGNORE_INDEX for t in labels[1:]) and len(ids) <= 2048


# --- Anthropic HH-RLHF's raw shape and implicit prompts ----------------------------------------------------------

HH_FILE = Path(__file__).resolve().parents[1] / "assets" / "hh_rlhf_sample.jsonl"


def test_hh_rlhf_dialogues_are_parsed_into_turns_with_the_shared_turns_as_prompt() -> None:
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Colour?\n\nAssistant: Blue.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Colour?\n\nAssistant:  No. ",
    }
    pref = to_preference(row, "pairs")
    assert pref.responses == ["Blue.", "No."]
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Colour?"},
    ]
    for conv in pref.conversations:
        assert conv.messages[:-1] == prompt
    # the same with a system prompt from the source, and without the leading blank lines
    pref = to_preference({k: v.lstrip() for k, v in row.items()}, "pairs", default_system="Be brief.")
    assert pref.conversations[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert pref.conversations[1].messages[1:-1] == prompt


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            {"chosen": "\n\nHuman: Spain?\n\nAssistant: Madrid.", "rejected": "\n\nHuman: Italy?\n\nAssistant: Rome."},
            "differ before their last reply \\(at turn 1",
        ),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant:"},
            "rejected: turn 2",
        ),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: Same", "rejected": "\n\nHuman: Hi\n\nAssistant: Same "}, "identical"),
        (
            {"chosen": "note\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Hi\n\nAssistant: B"},
            "chosen: text before",
        ),
        ({"chosen": "Good answer.", "rejected": "Bad answer."}, "no prompt: .*share no start"),
        ({"chosen": "Yes", "rejected": "Yes, sure"}, "no prompt"),
    ],
)
def test_pairs_without_a_usable_shared_prompt_are_refused_with_a_reason(row: dict, reason: str) -> None:
    with pytest.raises(RowError, match=reason):
        to_preference(row, "pairs")


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ("Q: what is 2+2? A: 4", "Q: what is 2+2? A: 5", ("Q: what is 2+2? A:", "4", "5")),
        ("The answer is four.", "The answer is five.", ("The answer is", "four.", "five.")),  # no split word
        ("Say hi.\nHi!", "Say hi.\nGo away.", ("Say hi.", "Hi!", "Go away.")),
    ],
)
def test_plain_pairs_split_their_shared_start_into_the_prompt(chosen: str, rejected: str, expected: tuple) -> None:
    pref = to_preference({"chosen": chosen, "rejected": rejected}, "pairs")
    prompt, *replies = expected
    assert pref.responses == replies
    assert [c.messages[:-1] for c in pref.conversations] == [[{"role": "user", "content": prompt}]] * 2


def test_hh_rlhf_file_builds_with_dropped_rows_counted_per_reason(tmp_path: Path, tokenizer) -> None:
    recipe = DpoRecipe.model_validate(
        {
            "stage": "dpo",
            "output_dir": str(tmp_path / "out"),
            "model": {"path": str(TINY_MODEL)},
            "data": {"train": [{"path": str(HH_FILE)}], "max_length": 256},
        }
    )
    template = tokenizer.chat_template
    bundle = build_data(recipe, preference_encoder(tokenizer, template, 256), "hh", "pairs", use_cache=False)
    (report,) = bundle.reports
    assert (report.rows, report.kept) == (39, 35)
    reasons = "\n".join(report.reasons)
    for phrase in (
        "differ before their last reply",
        "rejected: turn 2: empty assistant reply",
        "no prompt",
        "identical",
    ):
        assert phrase in reasons, reasons
    assert report.first_dropped()[0].startswith("line 6: chosen and rejected differ")
    # every kept row: two sequences sharing the rendered prompt, labels only on each last reply
    for e in bundle.train:
        (c_ids, c_lab), (r_ids, r_lab) = e.sequences()
        first = c_lab.index(next(x for x in c_lab if x != IGNORE_INDEX))
        assert c_ids[:first] == r_ids[:first]
        assert all(x == IGNORE_INDEX for x in r_lab[:first])
    multi = [e for e in bundle.train if tokenizer.decode(e.sequences()[0][0]).count("<|im_start|>user") == 3]
    assert len(multi) == 1
    (c_ids, c_lab), _ = multi[0].sequences()
    learned = tokenizer.decode([t for t in c_lab if t != IGNORE_INDEX])
    assert learned.startswith("Four plus four is eight.") and "six" not in learned
