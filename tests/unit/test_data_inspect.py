"""`llmtune data inspect`: the format, drops per reason, the length histogram and one rendered example whose
[[...]] markers are exactly the tokens training learns, on files the project does not ship (HH-RLHF-style rows,
LLaMA-Factory's demo files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmtune.commands.inspect import histogram, inspect_command, inspect_source
from llmtune.data.chat import resolve_chat_template
from llmtune.recipe import validate_recipe
from llmtune.recipe.data import DataSource
from llmtune.recipe.stages import RM_FORMAT_OF_LOSS
from tests.conftest import ROOT, TINY_MODEL, assert_ok, assert_refused, run_cli

HH = ROOT / "tests" / "assets" / "hh_rlhf_sample.jsonl"
END = "<|im_end|>"  # the tiny model's end of turn, learned with each reply


def inspect(capsys: pytest.CaptureFixture, file: Path | None, **options) -> str:
    args = {
        "recipe_path": None, "overrides": [], "model": None, "stage": None, "fmt": None, "max_length": None,
        "chat_template": None, "row": None, "max_rows": None, "markers": None,
    }  # fmt: skip
    inspect_command(file, **{**args, **options})
    return capsys.readouterr().out


def marked(out: str) -> list[str]:
    return re.findall(r"\[\[(.*?)\]\]", out, flags=re.S)


def test_hh_rlhf_rows_show_format_drops_and_the_reply_masks(capsys) -> None:
    out = inspect(capsys, HH, row=2)
    assert "stage dpo (guessed from the rows" in out and "the repository's tiny model" in out
    assert "format: pairs" in out and "Anthropic HH-RLHF dialogues" in out
    assert "rows: 39 read, 35 kept, 4 would be dropped" in out
    for reason, where in (
        ("chosen and rejected differ before their last reply", "line 6"),
        ("rejected: turn 2: empty assistant reply", "line 15"),
        ("no prompt: the row has no prompt column", "line 24"),
        ("chosen and rejected are identical", "line 33"),
    ):
        assert re.search(rf"^\s+1  {re.escape(reason)}.*\(e\.g\. {where}\)$", out, flags=re.M), out
    assert "max 129, median 67, over max_length 2048: 0 of 35 (0.0%)" in out
    row = json.loads(HH.read_text().splitlines()[1])
    reply = {k: row[k].rsplit("Assistant: ", 1)[1] for k in ("chosen", "rejected")}
    assert marked(out) == [reply["chosen"] + END, reply["rejected"] + END]  # only the last replies are learned
    prompt = row["chosen"].split("\n\nHuman: ")[1].split("\n\nAssistant")[0]
    assert out.count(prompt) == 2 and all(prompt not in m for m in marked(out))
    # a dropped row says why; a multi-turn row learns only the last reply, the earlier one is prompt
    out = inspect(capsys, HH, row=6)
    assert "row 6 (line 6) would be dropped: chosen and rejected differ before their last reply" in out
    lines = HH.read_text().splitlines()
    n = next(i for i, line in enumerate(lines, 1) if "four plus four" in line)
    out = inspect(capsys, HH, row=n, stage="rm")
    assert "Three plus three is six." in out
    assert marked(out) == ["Four plus four is eight." + END, "Count on your fingers." + END]


def test_llama_factory_demo_files(capsys, shared_data: Path) -> None:
    lf = shared_data / "llama-factory"
    # alpaca (sft): the output is learned, the instruction is not; rows cut to nothing are counted
    row = json.loads((lf / "alpaca_en_demo.json").read_text())[0]
    out = inspect(capsys, lf / "alpaca_en_demo.json", max_length=1024)
    assert "stage sft" in out and "format: alpaca (detected from the first rows)" in out
    assert "rows: 999 read" in out and "token lengths before truncation (each example):" in out
    assert marked(out) == [row["output"] + END]
    assert row["instruction"] in out.split("[[")[0]
    out = inspect(capsys, lf / "alpaca_en_demo.json", max_length=64, max_rows=200)
    assert re.search(r"^\s+\d+  no trainable token left after truncation to max_length=64", out, flags=re.M)
    assert re.search(r"over max_length 64: \d+ of 200", out)

    # dpo pairs in LLaMA-Factory's shape: each reply learned after the shared prompt
    row = json.loads((lf / "dpo_en_demo.json").read_text())[1]
    out = inspect(capsys, lf / "dpo_en_demo.json", row=2, max_length=4096, max_rows=10)
    assert "rows shaped as conversations + chosen + rejected" in out
    assert marked(out) == [row["chosen"]["value"] + END, row["rejected"]["value"] + END]

    # KTO rows: desirable / undesirable completions (dpo kto), or dropped with their reason by sft
    out = inspect(capsys, lf / "kto_en_demo.json", max_rows=40, max_length=8192)
    assert "stage dpo (loss kto)" in out and "format: unpaired" in out and "completion (label desirable)" in out
    out = inspect(capsys, lf / "kto_en_demo.json", max_rows=40, max_length=8192, stage="sft")
    assert re.search(r"^\s+\d+  label false \(an undesirable reply: KTO data\)", out, flags=re.M)

    # prompts (grpo): the question is rendered for generation, nothing is trained
    gsm = shared_data / "gsm8k" / "train_first1000.jsonl"
    out = inspect(capsys, gsm, max_rows=10, max_length=512)
    assert "stage grpo" in out and "format: prompts" in out and "over max_length 448:" in out  # 512 - 64 new tokens
    assert "prompt, row 1 (line 1):" in out and "nothing in it is trained" in out and marked(out) == []
    assert json.loads(gsm.read_text().splitlines()[0])["question"] in out

    # raw text (cpt): every token is learned, long documents become max_length chunks
    out = inspect(capsys, lf / "c4_demo.jsonl", max_rows=20, max_length=128)
    assert "stage cpt" in out and "format: text" in out and "token lengths before truncation (each document)" in out
    assert "chunks of max_length 128; the first:" in out
    text = json.loads((lf / "c4_demo.jsonl").read_text().splitlines()[0])["text"]
    (learned,) = marked(out)
    assert text.startswith(learned) and len(learned) > 100


def test_glaive_tool_calls_are_learned_and_observations_are_not(capsys, shared_data: Path) -> None:
    path = shared_data / "llama-factory" / "glaive_toolcall_en_demo.json"
    row = json.loads(path.read_text())[0]
    for template in ("chatml", None):  # the built-in chatml and the tiny model's own template render tools
        out = inspect(capsys, path, max_rows=5, chat_template=template, row=1)
        assert "format: sharegpt (detected from the first rows)" in out
        tools = json.loads(row["tools"])
        assert "<tools>\n" + json.dumps(tools[0]) + "\n</tools>" in out.split("[[")[0]  # the system turn
        expected = []
        for turn in row["conversations"]:
            if turn["from"] == "gpt":
                expected.append(turn["value"] + END)
            elif turn["from"] == "function_call":
                call = json.loads(turn["value"])
                body = json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)
                expected.append(f"<tool_call>\n{body}\n</tool_call>{END}")
            elif turn["from"] == "observation":
                assert f"<|im_start|>tool\n{turn['value']}{END}" in out
        assert marked(out) == expected


def test_with_a_recipe_and_the_same_examples_as_training(tmp_path: Path, capsys, tokenizer) -> None:
    recipe = ROOT / "recipes" / "quickstart.yaml"
    out = inspect(capsys, None, recipe_path=recipe, overrides=["data.max_length=32"], row=1)
    assert "recipe " in out and "stage sft" in out and "max_length 32" in out and "format: messages (given)" in out
    row = json.loads((ROOT / "recipes" / "quickstart" / "sft.jsonl").read_text().splitlines()[0])
    assert marked(out) == [row["messages"][-1]["content"] + END]
    # the examples inspect shows are the ones the stage trains on (same encoder, same detection)
    from llmtune.stages.rm import FORMAT_OF_LOSS
    from llmtune.stages.sft import SftStage

    assert RM_FORMAT_OF_LOSS == FORMAT_OF_LOSS
    src = DataSource(path=str(ROOT / "recipes" / "quickstart" / "sft.jsonl"), max_samples=50)
    r = validate_recipe(
        {
            "stage": "sft",
            "output_dir": str(tmp_path),
            "model": {"path": str(TINY_MODEL)},
            "data": {"train": [src.model_dump()], "max_length": 24},
        }
    )
    template = resolve_chat_template(tokenizer, None, required=True)
    ins = inspect_source(r, src, tokenizer, template)
    trained = SftStage().build_data(r, tokenizer, template).train
    assert [(e.input_ids, e.labels) for e in ins.examples] == [(s.input_ids, s.labels) for s in trained]


def test_inspect_counts_what_the_filters_drop(tmp_path: Path, tokenizer) -> None:
    """inspect with a recipe drops what training drops for data.dedup and data.filter's token bounds."""
    long = "Explain how tides rise and fall along a rocky northern coast and why fishermen there plan around them every single week of the year"
    rows = [
        {"instruction": long, "input": "", "output": "The moon."},
        {"instruction": long.upper(), "input": "", "output": "Again."},  # exact after normalisation
        {"instruction": long.replace("rocky", "sandy"), "input": "", "output": "Near."},  # one word changed
        {"instruction": "Name a colour.", "input": "", "output": "Blue " * 200},  # over max_tokens
        {"instruction": "Name a fruit.", "input": "", "output": "Pear."},
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    src = DataSource(path=str(path))
    data = {"train": [src.model_dump()], "dedup": "near", "filter": {"max_tokens": 150}, "max_length": 512}
    r = validate_recipe({"stage": "sft", "output_dir": str(tmp_path), "model": {"path": str(TINY_MODEL)}, "data": data})
    template = resolve_chat_template(tokenizer, None, required=True)
    ins = inspect_source(r, src, tokenizer, template)
    assert ins.report.kept == 2 and len(ins.full) == 5
    assert sorted(ins.report.reasons.values()) == [1, 1, 1]
    from llmtune.stages.sft import SftStage

    trained = SftStage().build_data(r, tokenizer, template).train
    assert [(e.input_ids, e.labels) for e in ins.examples] == [(s.input_ids, s.labels) for s in trained]


def test_histogram_buckets() -> None:
    lines = histogram([5, 12, 12, 30, 70, 400], max_length=32)
    assert lines[0].split()[0] == "0-9" and lines[0].split()[-1] == "1"
    assert lines[-2].split()[0] == "60+" and lines[-2].split()[-1] == "2"  # beyond 2 x max_length: one bucket
    assert any(line.endswith("<- max_length") and line.split()[0] == "30-39" for line in lines)
    assert lines[-1] == "  max 400, median 21, over max_length 32: 2 of 6 (33.3%)"


def test_cli_inspect_and_its_refusals() -> None:
    proc = run_cli("data", "inspect", str(HH), "--row", "1")
    assert_ok(proc)
    assert "rows: 39 read, 35 kept, 4 would be dropped" in proc.stdout
    assert len(marked(proc.stdout)) == 2  # not a terminal: markers
    assert_refused(run_cli("data", "inspect", str(HH), "--row", "99"), "--row 99", "has rows 1 to 39")
    assert_refused(run_cli("data", "inspect", "missing.jsonl"), "missing.jsonl does not exist")
    assert_refused(
        run_cli("data", "inspect", str(HH), "--recipe", "recipes/rm.yaml", "--model", "x"), "--model and --recipe"
    )
