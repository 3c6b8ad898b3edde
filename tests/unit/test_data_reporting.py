"""What the data summary and the data messages say (issue 15): KTO rows in sft, the longest preference
sequence, weighted example counts, one numbering of rows, and the preference eval's per-example text."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from llmtune.data.chat import resolve_chat_template
from llmtune.data.formats import UNDESIRABLE, is_undesirable
from llmtune.data.pipeline import DataBundle, Example, build_data, conversation_encoder, fingerprint_tokenizer
from llmtune.data.preference import PreferenceSample, as_preference_samples, build_preference_data
from llmtune.data.sources import read_rows
from llmtune.engine.report import print_data_summary
from llmtune.errors import DataError
from llmtune.recipe import validate_recipe
from llmtune.recipe.data import DataSource
from llmtune.stages.base import recipe_settings
from tests.conftest import SHARED_DATA, TINY_MODEL, assert_refused, base_recipe, run_cli, write_recipe


def msgs(user: str, reply: str, **extra: Any) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], **extra}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def template(tokenizer) -> str:
    t = resolve_chat_template(tokenizer, None, required=True)
    assert t is not None
    return t


def sft_build(tmp_path: Path, tokenizer, template: str, sources: list[dict], **data: Any) -> tuple[Any, DataBundle]:
    recipe = validate_recipe(base_recipe(tmp_path, data={"train": sources, **data}))
    settings = recipe_settings(recipe, False, fingerprint_tokenizer(tokenizer, template))
    encoder = conversation_encoder(tokenizer, template, recipe.data.max_length, False)
    return recipe, build_data(recipe, encoder, settings)


def summary(bundle: Any, recipe: Any) -> str:
    buf = io.StringIO()
    print_data_summary(Console(file=buf, width=250, highlight=False, soft_wrap=True), bundle, recipe)
    return buf.getvalue()


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The data table as {source: {column: cell}}."""
    lines = text.splitlines()
    header = next(line for line in lines if "source" in line and "examples" in line)
    names = [c.strip() for c in re.split(r"[┃│]", header)]
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == len(names) and cells[1].isdigit():
            out[Path(cells[0]).name] = dict(zip(names, cells, strict=True))
    return out


# --------------------------------------------------------------------------------------- 1. KTO rows in sft


def test_is_undesirable_reads_boolean_like_labels_only() -> None:
    assert is_undesirable(msgs("a", "b", label=False)) and is_undesirable(msgs("a", "b", label="False"))
    assert not is_undesirable(msgs("a", "b", label=True)) and not is_undesirable(msgs("a", "b"))
    assert not is_undesirable(msgs("a", "b", label=0)) and not is_undesirable(msgs("a", "b", label="spam"))
    assert not is_undesirable({"instruction": "a", "output": "b", "label": None})
    assert is_undesirable({"instruction": "a", "output": "b", "label": False})  # any conversation format


def test_sft_drops_label_false_rows_counts_and_says_so(tmp_path, tokenizer, template) -> None:
    rows = [msgs(f"Question {i}?", f"Good answer {i}.", label=True) for i in range(6)]
    rows += [msgs(f"Question {i}?", f"Bad answer {i}.", label=False) for i in range(4)]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    recipe, bundle = sft_build(tmp_path, tokenizer, template, [{"path": str(path)}])
    (report,) = bundle.reports
    assert (report.rows, report.kept, report.dropped, report.examples) == (10, 6, 4, 6)
    assert report.reasons == {UNDESIRABLE: 4}
    learned = [tokenizer.decode([t for t in e.labels if t >= 0]) for e in bundle.train]
    assert all("Good answer" in t for t in learned) and not any("Bad answer" in t for t in learned)
    text = summary(bundle, recipe)
    assert f"{UNDESIRABLE} (4x)" in text  # in the dropped reasons
    (note,) = [line for line in text.splitlines() if "have label false" in line]
    assert "4 of 10 rows" in note and "dpo.loss: kto" in note


def test_sft_refuses_a_source_of_undesirable_rows_only(tmp_path, tokenizer, template) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [msgs(f"Q{i}?", f"A{i}.", label=False) for i in range(3)])
    with pytest.raises(DataError, match="yields no usable example") as exc:
        sft_build(tmp_path, tokenizer, template, [{"path": str(path)}])
    assert "label false" in str(exc.value) and "dpo.loss: kto" in str(exc.value)


def test_sft_on_the_shared_kto_demo_keeps_the_desirable_half(tmp_path, tokenizer, template) -> None:
    kto = SHARED_DATA / "llama-factory" / "kto_en_demo.json"
    if not kto.is_file():
        pytest.skip(f"{kto} is not there")
    _, bundle = sft_build(tmp_path, tokenizer, template, [{"path": str(kto)}], max_length=2048)
    (report,) = bundle.reports
    assert report.reasons[UNDESIRABLE] == 150 and report.kept <= 150


def test_cli_train_refuses_all_undesirable_rows_before_loading_the_model(tmp_path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [msgs(f"Q{i}?", f"A{i}.", label=False) for i in range(3)])
    recipe = base_recipe(tmp_path, data={"train": [{"path": str(path)}], "max_length": 64})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_refused(proc, "label false", "dpo.loss: kto")


# ------------------------------------------------------------------------------ 2. the longest preference row


def test_preference_sample_longest_is_its_longest_sequence() -> None:
    s = PreferenceSample(input_ids=list(range(50)), labels=[-100] * 50, parts=[30, 20])
    assert s.longest == 30
    (e,) = as_preference_samples([Example(list(range(9)), [-100] * 9, parts=[4, 5])])
    assert e.longest == 5
    assert Example(list(range(7)), [0] * 7).longest == 7 and Example([1, 2], [1, 2], parts=[1, 1]).longest == 1


def test_dpo_summary_longest_row_is_one_sequence_within_max_length(tmp_path, tokenizer, template) -> None:
    prompt = "Tell me, in a few words, what colour a ripe lemon usually is when you buy it at a market?"
    rows = [
        {"prompt": f"{prompt} ({i})", "chosen": "A ripe lemon is yellow, bright yellow.", "rejected": "Blue."}
        for i in range(6)
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    max_length = 64
    raw = base_recipe(tmp_path, stage="dpo", data={"train": [{"path": str(path)}], "max_length": max_length})
    recipe = validate_recipe(raw)
    train, evals, reports = build_preference_data(recipe, tokenizer, template, "test-longest", "pairs")
    assert max(len(s.input_ids) for s in train) > max_length  # chosen + rejected together: the old report
    expected = max(max(s.parts) for s in train)
    text = summary(SimpleNamespace(train=train, eval=evals, reports=reports), recipe)
    (longest,) = re.findall(r"longest row: (\d+)", text)
    assert int(longest) == expected <= max_length


def test_summary_longest_row_of_plain_rows_is_their_length(tmp_path, tokenizer, template) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [msgs("Hi?", "Hello there."), msgs("Name?", "I am a model, hi.")])
    recipe, bundle = sft_build(tmp_path, tokenizer, template, [{"path": str(path)}])
    text = summary(bundle, recipe)
    assert f"longest row: {max(len(e.input_ids) for e in bundle.train)};" in text


# ---------------------------------------------------------------------------------------- 3. weighted examples


def test_examples_column_counts_the_source_after_its_weight(tmp_path, tokenizer, template) -> None:
    ten = write_jsonl(tmp_path / "ten.jsonl", [msgs(f"What is {i}?", f"It is {i}.") for i in range(10)])
    four = write_jsonl(tmp_path / "four.jsonl", [msgs(f"Who is {i}?", f"Number {i}.") for i in range(4)])
    sources = [{"path": str(ten), "weight": 2.0}, {"path": str(four), "weight": 0.5}]
    recipe, bundle = sft_build(tmp_path, tokenizer, template, sources)
    r_ten, r_four = bundle.reports
    assert (r_ten.kept, r_ten.examples, r_ten.weight) == (10, 20, 2.0)
    assert (r_four.kept, r_four.examples, r_four.weight) == (4, 2, 0.5)
    assert len(bundle.train) == r_ten.examples + r_four.examples
    cells = table_rows(summary(bundle, recipe))
    assert cells["ten.jsonl"]["examples"] == "20" and cells["ten.jsonl"]["weight"] == "2"
    assert cells["four.jsonl"]["examples"] == "2" and cells["four.jsonl"]["weight"] == "0.5"


def test_examples_column_with_eval_split_and_no_weight_column_at_weight_one(tmp_path, tokenizer, template) -> None:
    ten = write_jsonl(tmp_path / "ten.jsonl", [msgs(f"What is {i}?", f"It is {i}.") for i in range(10)])
    recipe, bundle = sft_build(tmp_path, tokenizer, template, [{"path": str(ten), "weight": 3.0}], eval_split=0.2)
    (report,) = bundle.reports
    assert len(bundle.eval) == 2 and len(bundle.train) == 24
    assert report.examples == 24 + 2  # the held-out rows go to eval once, unweighted
    recipe, bundle = sft_build(tmp_path, tokenizer, template, [{"path": str(ten)}])
    cells = table_rows(summary(bundle, recipe))
    assert "weight" not in cells["ten.jsonl"] and cells["ten.jsonl"]["examples"] == "10"


# ------------------------------------------------------------------------------------------ 4. one numbering


def test_rows_say_where_they_are_numbered_from_one(tmp_path) -> None:
    jsonl = write_jsonl(tmp_path / "a.jsonl", [msgs("a", "b"), "", "{broken", msgs("c", "d")])
    rows = read_rows(DataSource(path=str(jsonl)))
    assert [r.where for r in rows] == ["line 1", "line 3", "line 4"]
    assert rows[1].error is not None and rows[1].error.startswith("line 3: not valid JSON")
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([msgs("a", "b"), "oops", msgs("c", "d")]), encoding="utf-8")
    rows = read_rows(DataSource(path=str(arr)))
    assert [r.where for r in rows] == ["row 1", "row 2", "row 3"]
    assert rows[1].error == "row 2: a JSON string, not an object"
    csv = tmp_path / "a.csv"
    csv.write_text("instruction,output\na,b\nc,d,e\n", encoding="utf-8")
    rows = read_rows(DataSource(path=str(csv)))
    assert [r.where for r in rows] == ["line 2", "line 3"] and rows[1].error == "line 3: 3 fields, but the header has 2"
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\ntwo\n", encoding="utf-8")
    assert [r.where for r in read_rows(DataSource(path=str(txt)))] == ["line 1", "line 3"]
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "x.jsonl", [msgs("a", "b")])
    (d / "y.json").write_text(json.dumps([msgs("a", "b"), msgs("c", "d")]), encoding="utf-8")
    assert [r.where for r in read_rows(DataSource(path=str(d)))] == ["x.jsonl line 1", "y.json row 1", "y.json row 2"]


def test_dropped_rows_are_named_once_the_same_way_everywhere(tmp_path, tokenizer, template) -> None:
    no_reply = {"messages": [{"role": "user", "content": "Anyone?"}]}
    jsonl = write_jsonl(tmp_path / "mixed.jsonl", [msgs("a?", "b."), "{broken", msgs("c?", "d."), no_reply])
    arr = tmp_path / "mixed.json"
    arr.write_text(json.dumps([msgs("a?", "b."), no_reply, msgs("c?", "d.")]), encoding="utf-8")
    recipe, bundle = sft_build(tmp_path, tokenizer, template, [{"path": str(jsonl)}, {"path": str(arr)}])
    r_jsonl, r_arr = bundle.reports
    assert r_jsonl.first_dropped()[0].startswith("line 2: not valid JSON")
    assert r_jsonl.first_dropped()[1] == "line 4: conversation has no assistant turn"
    assert r_arr.first_dropped() == ["row 2: conversation has no assistant turn"]
    assert [i for i, _ in r_jsonl.first] == [1, 3]  # the program's 0-based indices are unchanged
    text = summary(bundle, recipe)
    assert "First: line 2: not valid JSON" in text and "line 4: conversation has no assistant turn" in text
    assert "First: row 2: conversation has no assistant turn" in text
    assert not re.search(r"row \d+: line \d+", text)
    with pytest.raises(DataError) as exc:
        sft_build(tmp_path, tokenizer, template, [{"path": str(jsonl)}], on_bad_row="error")
    msg = str(exc.value)
    assert "line 2: not valid JSON" in msg and "line 4: conversation has no assistant turn" in msg
    assert not re.search(r"row \d+: line \d+", msg)


def test_cached_reports_keep_where_the_rows_are(tmp_path, tokenizer, template) -> None:
    jsonl = write_jsonl(tmp_path / "m.jsonl", [msgs("a?", "b."), {"messages": [{"role": "user", "content": "x"}]}])
    sources = [{"path": str(jsonl)}]
    _, first = sft_build(tmp_path, tokenizer, template, sources, cache_dir=str(tmp_path / "c"))
    _, second = sft_build(tmp_path, tokenizer, template, sources, cache_dir=str(tmp_path / "c"))
    assert second.reports[0].cached
    assert (
        second.reports[0].first_dropped()
        == first.reports[0].first_dropped()
        == ["line 2: conversation has no assistant turn"]
    )


def test_eval_messages_use_the_same_numbering(tmp_path) -> None:
    from llmtune.data.lm import convert
    from llmtune.eval.pairs import to_pair

    path = write_jsonl(tmp_path / "p.jsonl", ["{broken", {"prompt": "a", "chosen": "b", "rejected": "b"}])
    rows = read_rows(DataSource(path=str(path)))
    with pytest.raises(DataError) as exc:
        convert(rows, to_pair, str(path), "pairs")
    msg = str(exc.value)
    assert "line 1: not valid JSON" in msg and "line 2: chosen and rejected are identical" in msg
    assert not re.search(r"row \d+: line \d+", msg)


# --------------------------------------------------------------------------------- 5. preference eval texts


def test_preference_eval_rows_carry_the_prompt_and_replies(tmp_path) -> None:
    from llmtune.eval.config import EvalConfig
    from llmtune.eval.likelihood import TEXT_LIMIT
    from llmtune.eval.tasks import run_task

    long_reply = "Yes. " * 300
    rows = [
        {"prompt": "What colour is a lemon?", "chosen": "Yellow.", "rejected": "Blue."},
        {
            "prompt": [
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Is the sky blue?"},
            ],
            "chosen": long_reply,
            "rejected": "No.",
        },
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = EvalConfig(
        task="preference",
        model=str(TINY_MODEL),
        reference=str(TINY_MODEL),
        data=str(path),
        device="cpu",
        dtype="fp32",
        max_length=512,
    )
    result = run_task(cfg, Console(quiet=True))
    first, second = sorted(result.rows, key=lambda r: r["index"])
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("What colour is a lemon?", "Yellow.", "Blue.")
    assert {"chosen_score", "rejected_score", "correct"} <= set(first)
    assert second["prompt"].endswith("Is the sky blue?") and "earlier turns" in second["prompt"]
    assert len(second["chosen"]) == TEXT_LIMIT and second["chosen"].startswith("Yes. Yes.")
    assert second["chosen"].endswith("...") and second["rejected"] == "No."
    json.dumps(result.rows)  # the rows go to a JSONL file
