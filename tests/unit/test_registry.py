"""The dataset registry (issue 12): a dataset_info.json in LLaMA-Factory's shape maps names to files, column
renames and role tags; a recipe source is then {name: ...}, and the rows read as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.data.chat import IGNORE_INDEX, resolve_chat_template
from llmtune.data.pipeline import build_data, conversation_encoder
from llmtune.data.preference import preference_encoder
from llmtune.data.sources import read_rows
from llmtune.errors import RecipeError
from llmtune.recipe import dump_recipe, validate_recipe
from llmtune.recipe.registry import apply_tags, resolve
from tests.conftest import TINY_MODEL, assert_ok, run_cli, write_recipe

# LLaMA-Factory's own entries for its demo files (data/dataset_info.json)
LF_ENTRIES = {
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "glaive_toolcall_en_demo": {
        "file_name": "glaive_toolcall_en_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"},
    },
    "dpo_en_demo": {
        "file_name": "dpo_en_demo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
    "kto_en_demo": {
        "file_name": "kto_en_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
}


def recipe(tmp_path: Path, registry: Path, sources: list[dict], stage: str = "sft", **extra) -> object:
    raw = {
        "stage": stage,
        "output_dir": str(tmp_path / "out"),
        "model": {"path": str(TINY_MODEL)},
        "data": {"registry": str(registry), "train": sources, "max_length": 4096},
        **extra,
    }
    return validate_recipe(raw)


@pytest.fixture
def own_data(tmp_path: Path) -> Path:
    """A registry beside data with its own column names and role names (relative file_name)."""
    (tmp_path / "data").mkdir()
    rows = [
        {
            "dialog": [
                {"speaker": "CUSTOMER", "text": f"Question {i}?"},
                {"speaker": "AGENT", "text": f"Answer {i}."},
                {"speaker": "CUSTOMER", "text": "Thanks!"},
                {"speaker": "AGENT", "text": "You are welcome."},
            ],
            "persona": "You are a shop assistant.",
        }
        for i in range(6)
    ]
    (tmp_path / "data" / "support.json").write_text(json.dumps(rows))
    qa = [{"q": f"What is {i} + {i}?", "a": str(2 * i), "ctx": "arithmetic"} for i in range(5)]
    (tmp_path / "data" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    registry = {
        "support": {
            "file_name": "data/support.json",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog", "system": "persona"},
            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "CUSTOMER", "assistant_tag": "AGENT"},
        },
        "qa": {
            "file_name": "data/qa.jsonl",
            "columns": {"prompt": "q", "query": "ctx", "response": "a"},
            "num_samples": 3,
        },
    }
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(registry))
    return path


def test_named_sources_read_renamed_columns_and_role_tags(tmp_path: Path, own_data: Path, tokenizer) -> None:
    r = recipe(tmp_path, own_data, [{"name": "support"}, {"name": "qa"}])
    support, qa = r.data.train
    assert support.path == str(tmp_path / "data" / "support.json")  # relative to the registry file
    assert support.columns == {"conversations": "dialog", "system": "persona"}
    assert qa.columns == {"instruction": "q", "input": "ctx", "output": "a"} and qa.max_samples == 3
    row = read_rows(support)[0].data
    assert row["conversations"][1] == {"from": "gpt", "value": "Answer 0."} and row["system"].startswith("You")
    template = resolve_chat_template(tokenizer, None, required=True)
    bundle = build_data(r, conversation_encoder(tokenizer, template, 4096, False), "reg", use_cache=False)
    assert [(x.rows, x.kept) for x in bundle.reports] == [(6, 6), (3, 3)]
    e = bundle.train[0]
    text = tokenizer.decode(e.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a shop assistant.<|im_end|>\n<|im_start|>user\nQuestion 0?")
    learned = tokenizer.decode([t for t in e.labels if t != IGNORE_INDEX])
    assert learned == "Answer 0.<|im_end|>You are welcome.<|im_end|>"
    qa_text = tokenizer.decode(bundle.train[6].input_ids)
    assert "What is 0 + 0?\n\narithmetic" in qa_text
    # a source's own keys win over the entry's, and the resolved recipe validates again unchanged
    r2 = recipe(tmp_path, own_data, [{"name": "qa", "max_samples": 5, "system": "Be exact."}])
    assert r2.data.train[0].max_samples == 5
    import yaml

    dumped = yaml.safe_load(dump_recipe(r2))
    own_data.unlink()  # a resolved recipe (e.g. output_dir/recipe.yaml) no longer needs the registry
    assert validate_recipe(dumped).data.model_dump() == r2.data.model_dump()


@pytest.mark.parametrize(
    ("source", "entries", "phrase"),
    [
        ({"name": "suport"}, None, "no dataset 'suport' in the registry .* Did you mean 'support'"),
        ({"name": "x"}, {"x": {"ms_hub_url": "a/b"}}, "no file_name or hf_hub_url \\(only ms_hub_url"),
        ({"name": "x"}, {"x": {"file_name": "a.json", "columns": {"answer": "a"}}}, "unknown alpaca column 'answer'"),
        ({"name": "x"}, {"x": {"file_name": "a.json", "formating": "sharegpt"}}, "unknown key\\(s\\) formating"),
        ({"name": "x"}, {"x": {"file_name": "a.json", "formatting": "openai"}}, "formatting 'openai' is not"),
        ({"name": "x", "tags": {"role": "r"}}, {"x": {"file_name": "a.json"}}, "unknown tag 'role'"),
        ({}, None, "has no path: set path: .* or name:"),
    ],
)
def test_registry_mistakes_are_named(tmp_path: Path, own_data: Path, source: dict, entries, phrase: str) -> None:
    if entries is not None:
        own_data.write_text(json.dumps(entries))
    with pytest.raises(RecipeError, match=phrase):
        recipe(tmp_path, own_data, [source])


def test_a_name_needs_a_registry(tmp_path: Path) -> None:
    raw = {"stage": "sft", "output_dir": "o", "model": {"path": "m"}, "data": {"train": [{"name": "a"}]}}
    with pytest.raises(RecipeError, match=r"data.train.0.name 'a' needs a registry: set data.registry"):
        validate_recipe(raw)
    raw["data"]["train"][0]["registry"] = str(tmp_path / "missing.json")
    with pytest.raises(RecipeError, match=r"missing\.json does not exist"):
        validate_recipe(raw)


def test_apply_tags_maps_turns_and_single_replies() -> None:
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "u", "assistant_tag": "a", "function_tag": "f"}
    row = {
        "conversations": [
            {"role": "u", "content": "hi"},
            {"role": "f", "content": "{}"},
            {"role": "other", "content": "x"},
        ],
        "chosen": {"role": "a", "content": "yes"},
        "rejected": [{"role": "a", "content": "no"}],
    }
    out = apply_tags(row, tags)
    assert out["conversations"] == [
        {"from": "human", "value": "hi"},
        {"from": "function_call", "value": "{}"},
        {"from": "other", "value": "x"},  # not a tag: left for the format to accept or refuse
    ]
    assert out["chosen"] == {"from": "gpt", "value": "yes"} and out["rejected"] == [{"from": "gpt", "value": "no"}]


def test_llama_factory_entries_for_its_demo_files(tmp_path: Path, shared_data: Path, tokenizer) -> None:
    lf = shared_data / "llama-factory"
    registry = tmp_path / "dataset_info.json"
    registry.write_text(json.dumps({k: {**v, "file_name": str(lf / v["file_name"])} for k, v in LF_ENTRIES.items()}))
    assert resolve(str(registry), "c4_demo")["columns"] == {"text": "text"}
    template = resolve_chat_template(tokenizer, None, required=True)
    # sft: alpaca, tool calls, and KTO rows (label false left out); the same rows as the files by path
    names = ["alpaca_en_demo", "glaive_toolcall_en_demo", "kto_en_demo"]
    by_name = recipe(tmp_path, registry, [{"name": n, "max_samples": 30} for n in names])
    by_path = recipe(
        tmp_path, registry, [{"path": str(lf / LF_ENTRIES[n]["file_name"]), "max_samples": 30} for n in names]
    )
    encode = conversation_encoder(tokenizer, template, 4096, False)
    a = build_data(by_name, encode, "n", use_cache=False)
    b = build_data(by_path, encode, "p", use_cache=False)
    assert [(r.rows, r.kept) for r in a.reports] == [(r.rows, r.kept) for r in b.reports]
    assert [e.input_ids for e in a.train] == [e.input_ids for e in b.train]
    assert a.reports[2].kept < 30  # the undesirable KTO rows
    # dpo: pairs, and kto reads the same KTO entry as unpaired rows
    for loss, name, fmt in (("sigmoid", "dpo_en_demo", "pairs"), ("kto", "kto_en_demo", "unpaired")):
        r = recipe(tmp_path, registry, [{"name": name, "max_samples": 20}], stage="dpo", dpo={"loss": loss})
        bundle = build_data(r, preference_encoder(tokenizer, template, 4096), "d", fmt, use_cache=False)
        assert bundle.reports[0].kept == 20, bundle.reports[0].reasons


def test_sft_trains_from_a_named_source(tmp_path: Path, own_data: Path) -> None:
    raw = {
        "stage": "sft",
        "output_dir": str(tmp_path / "out"),
        "model": {"path": str(TINY_MODEL)},
        "finetuning": {"method": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"registry": str(own_data), "train": [{"name": "support"}, {"name": "qa"}], "max_length": 64},
        "train": {"max_steps": 2, "micro_batch_size": 4, "log_every": 1},
        "precision": "fp32",
    }
    proc = run_cli("train", str(write_recipe(tmp_path, raw)))
    assert_ok(proc)
    assert "support.json" in proc.stdout and "qa.jsonl" in proc.stdout
    proc = run_cli("data", "inspect", "support", "--registry", str(own_data))
    assert_ok(proc)
    assert "(dataset support of the registry)" in proc.stdout and "rows: 6 read, 6 kept" in proc.stdout
