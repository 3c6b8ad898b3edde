"""Row formats to canonical text / conversations (llmtune.data.formats)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.data.formats import Conversation, RowError, detect_format, to_conversation, to_text
from llmtune.data.sources import read_rows
from llmtune.errors import DataError
from llmtune.recipe.data import DataSource

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def roles(conv: Conversation) -> list[str]:
    return [m["role"] for m in conv.messages]


def shared_rows(rel: str) -> list[dict]:
    p = SHARED / rel
    if not p.is_file():
        pytest.skip(f"shared data file {p} is absent")
    rows = read_rows(DataSource(path=str(p)))
    assert all(r.error is None for r in rows)
    return [r.data for r in rows if r.data is not None]


def sg(*turns: tuple[str, object], **extra: object) -> dict:
    """A sharegpt row from (from, value) pairs."""
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def msgs(*turns: tuple[str, object], **extra: object) -> dict:
    """A messages row from (role, content) pairs."""
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


TOOL = {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}}


# ------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"text": "hello"}, "text"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt"),
        ({"messages": [{"role": "user", "content": "hi"}], "label": True}, "messages"),
        ({"text": "t", "instruction": "a", "output": "b"}, "alpaca"),
    ],
)
def test_detect_format(row: dict, fmt: str) -> None:
    assert detect_format([row]) == fmt


def test_detect_format_majority_of_first_rows_wins() -> None:
    rows = [{"instruction": "a"}, {"instruction": "b", "output": "c"}, {"instruction": "d", "output": "e"}]
    assert detect_format(rows) == "alpaca"


def test_detect_format_lists_keys_and_formats_when_nothing_fits() -> None:
    with pytest.raises(DataError) as info:
        detect_format([{"question": "q", "answer": "a"}])
    msg = str(info.value)
    assert "keys answer, question" in msg
    assert all(f in msg for f in ("alpaca", "sharegpt", "messages", "text"))
    assert info.value.hint is not None and "format:" in info.value.hint and "columns:" in info.value.hint


def test_detect_format_with_no_rows() -> None:
    with pytest.raises(DataError, match="no readable rows"):
        detect_format([])


def test_detect_format_conversations_must_be_a_list() -> None:
    with pytest.raises(DataError, match="keys conversations"):
        detect_format([{"conversations": "human: hi"}])


# ------------------------------------------------------------------------------------------ text


def test_to_text() -> None:
    assert to_text({"text": "  some text\n"}) == "  some text\n"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"content": "x"}, "missing key 'text'"),
        ({"text": 3}, "'text' is not text (got number)"),
        ({"text": None}, "'text' is not text (got null)"),
        ({"text": " \n"}, "empty text"),
        ("just a string", "row is not an object (got string)"),
    ],
)
def test_to_text_errors(row: object, reason: str) -> None:
    with pytest.raises(RowError) as info:
        to_text(row)  # type: ignore[arg-type]
    assert str(info.value) == reason


# ------------------------------------------------------------------------------------------ alpaca


def test_alpaca_instruction_and_input_are_joined() -> None:
    conv = to_conversation({"instruction": "Translate", "input": "bonjour", "output": "hello"}, "alpaca")
    assert conv.messages == [
        {"role": "user", "content": "Translate\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert conv.tools is None


def test_alpaca_empty_or_missing_or_null_input() -> None:
    for row in (
        {"instruction": "Hi", "input": "", "output": "Hello"},
        {"instruction": "Hi", "input": "  ", "output": "Hello"},
        {"instruction": "Hi", "output": "Hello"},
        {"instruction": "Hi", "input": None, "output": "Hello"},
    ):
        assert to_conversation(row, "alpaca").messages[0] == {"role": "user", "content": "Hi"}


def test_alpaca_input_only() -> None:
    conv = to_conversation({"instruction": "", "input": "the question", "output": "a"}, "alpaca")
    assert conv.messages[0]["content"] == "the question"


def test_alpaca_system_and_history() -> None:
    row = {
        "instruction": "And 3+3?",
        "input": "",
        "output": "6",
        "system": "You are a calculator.",
        "history": [["1+1?", "2"], ["2+2?", "4"]],
    }
    conv = to_conversation(row, "alpaca")
    assert roles(conv) == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in conv.messages] == ["You are a calculator.", "1+1?", "2", "2+2?", "4", "And 3+3?", "6"]


def test_alpaca_empty_system_field_counts_as_none() -> None:
    conv = to_conversation({"instruction": "a", "output": "b", "system": ""}, "alpaca", default_system="D")
    assert conv.messages[0] == {"role": "system", "content": "D"}
    assert roles(conv) == ["system", "user", "assistant"]


def test_default_system_inserted_only_when_row_has_none() -> None:
    plain = to_conversation({"instruction": "a", "output": "b"}, "alpaca", default_system="Be brief.")
    assert plain.messages[0] == {"role": "system", "content": "Be brief."}
    own = to_conversation({"instruction": "a", "output": "b", "system": "Own."}, "alpaca", default_system="Be brief.")
    assert own.messages[0] == {"role": "system", "content": "Own."} and len(own.messages) == 3
    none = to_conversation({"instruction": "a", "output": "b"}, "alpaca", default_system=None)
    assert roles(none) == ["user", "assistant"]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"input": "x", "output": "y"}, "missing key 'instruction'"),
        ({"instruction": "x", "input": "y"}, "missing key 'output'"),
        ({"instruction": "x", "output": None}, "'output' is not text (got null)"),
        ({"instruction": "x", "output": 4}, "'output' is not text (got number)"),
        ({"instruction": "x", "output": ["good", "bad"]}, "'output' is not text (got list)"),
        ({"instruction": 12, "output": "y"}, "'instruction' is not text (got number)"),
        ({"instruction": None, "output": "y"}, "'instruction' is not text (got null)"),
        ({"instruction": "x", "input": {"a": 1}, "output": "y"}, "'input' is not text (got object)"),
        ({"instruction": "x", "output": "y", "system": 1.5}, "'system' is not text (got number)"),
        ({"instruction": "x", "output": " \n"}, "turn 2: empty assistant reply"),
        ({"instruction": "", "input": "  ", "output": "y"}, "turn 1: empty user message"),
        (
            {"instruction": "x", "output": "y", "history": "a"},
            "'history' is not a list of [user, assistant] pairs (got string)",
        ),
        (
            {"instruction": "x", "output": "y", "history": [["a", "b", "c"]]},
            "'history' item 1 is not a [user, assistant] pair",
        ),
        (
            {"instruction": "x", "output": "y", "history": [["a", "b"], ["c", 5]]},
            "'history' item 2 assistant is not text (got number)",
        ),
        ({"instruction": "x", "output": "y", "history": [["a", ""]]}, "turn 2: empty assistant reply"),
        (["x", "y"], "row is not an object (got list)"),
    ],
)
def test_alpaca_errors(row: object, reason: str) -> None:
    with pytest.raises(RowError) as info:
        to_conversation(row, "alpaca")  # type: ignore[arg-type]
    assert str(info.value) == reason


# ------------------------------------------------------------------------------------------ sharegpt


def test_sharegpt_roles_and_tools() -> None:
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    row = sg(
        ("human", "Weather in Paris?"),
        ("function_call", call),
        ("observation", '{"temp": 21}'),
        ("gpt", "It is 21 degrees."),
        tools=json.dumps([TOOL]),
        system="Use tools.",
    )
    conv = to_conversation(row, "sharegpt")
    assert roles(conv) == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[2]["content"] == call
    assert conv.messages[3]["content"] == '{"temp": 21}'
    assert conv.tools == [TOOL]


def test_sharegpt_role_aliases_and_role_content_keys() -> None:
    row = {
        "conversations": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u1"},
            {"role": "model", "content": "a1"},
            {"role": "Human", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    conv = to_conversation(row, "sharegpt", default_system="ignored")
    assert roles(conv) == ["system", "user", "assistant", "user", "assistant"]
    assert conv.messages[0]["content"] == "S"


def test_sharegpt_in_conversation_system_wins_over_top_level() -> None:
    row = sg(("system", "inner"), ("human", "q"), ("gpt", "a"), system="outer")
    assert to_conversation(row, "sharegpt").messages[0] == {"role": "system", "content": "inner"}


def test_sharegpt_parallel_calls_and_structured_call_values() -> None:
    row = sg(
        ("human", "q"),
        ("function_call", {"name": "a", "arguments": {}}),
        ("function_call", {"name": "b", "arguments": {}}),
        ("observation", {"ok": 1}),
        ("observation", "done"),
        ("gpt", "answer"),
    )
    conv = to_conversation(row, "sharegpt")
    assert roles(conv) == ["user", "assistant", "assistant", "tool", "tool", "assistant"]
    assert json.loads(conv.messages[1]["content"]) == {"name": "a", "arguments": {}}
    assert conv.messages[3]["content"] == '{"ok": 1}'


def test_sharegpt_assistant_text_then_function_call() -> None:
    row = sg(
        ("human", "q"), ("gpt", "Let me check."), ("function_call", '{"name": "f"}'), ("observation", "r"), ("gpt", "a")
    )
    assert roles(to_conversation(row, "sharegpt")) == ["user", "assistant", "assistant", "tool", "assistant"]


@pytest.mark.parametrize("tools", ["", "[]", None, []])
def test_sharegpt_empty_tools_are_none(tools: object) -> None:
    assert to_conversation(sg(("human", "q"), ("gpt", "a"), tools=tools), "sharegpt").tools is None


def test_sharegpt_single_tool_object_is_wrapped() -> None:
    assert to_conversation(sg(("human", "q"), ("gpt", "a"), tools=json.dumps(TOOL)), "sharegpt").tools == [TOOL]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": []}, "missing key 'conversations'"),
        ({"conversations": "hi"}, "'conversations' is not a list (got string)"),
        ({"conversations": []}, "conversation is empty"),
        ({"conversations": ["hi"]}, "turn 1 is not an object (got string)"),
        ({"conversations": [{"value": "hi"}]}, "turn 1 has no 'from' key"),
        ({"conversations": [{"from": "human"}]}, "turn 1 has no 'value' key"),
        ({"conversations": [{"role": "user"}]}, "turn 1 has no 'content' key"),
        (sg(("human", "q"), ("gpt", "a"), ("gpt4", "b")), "turn 3 has unknown role 'gpt4'"),
        (sg(("human", "q"), (None, "a")), "turn 2 has unknown role None"),
        (sg(("human", "q"), ("gpt", 42)), "turn 2 content is not text (got number)"),
        (sg(("human", "q"), ("gpt", None)), "turn 2 content is not text (got null)"),
        (sg(("human", {"text": "q"}), ("gpt", "a")), "turn 1 content is not text (got object)"),
        (sg(("human", "q"), ("gpt", "   ")), "turn 2: empty assistant reply"),
        (sg(("human", ""), ("gpt", "a")), "turn 1: empty user message"),
        (sg(("human", "q")), "conversation has no assistant turn"),
        (sg(("system", "s")), "conversation has no assistant turn"),
        (
            sg(("gpt", "hello"), ("human", "q"), ("gpt", "a")),
            "turn 1 is the first turn and is from the assistant; it must be from the user",
        ),
        (
            sg(("human", "q"), ("system", "s"), ("gpt", "a")),
            "turn 2 is a system message; a system prompt is only allowed as the first turn",
        ),
        (sg(("human", "q1"), ("human", "q2"), ("gpt", "a")), "turns 1 and 2 are both from the user"),
        (sg(("human", "q"), ("gpt", "a1"), ("gpt", "a2")), "turns 2 and 3 are both from the assistant"),
        (
            sg(("human", "q"), ("observation", "r"), ("gpt", "a")),
            "turn 2 is a tool result but does not follow an assistant function call",
        ),
        (
            sg(("observation", "r"), ("gpt", "a")),
            "turn 1 is the first turn and is from the tool; it must be from the user",
        ),
        (
            sg(("human", "q"), ("gpt", "a"), tools="[{bad json"),
            "'tools' is not valid JSON (Expecting property name enclosed in double quotes at column 3)",
        ),
        (sg(("human", "q"), ("gpt", "a"), tools="42"), "'tools' is not a list of tool definitions (got number)"),
        (sg(("human", "q"), ("gpt", "a"), tools='["get_weather"]'), "'tools' item 1 is not an object (got string)"),
        (sg(("human", "q"), ("gpt", "a"), system=["s"]), "'system' is not text (got list)"),
    ],
)
def test_sharegpt_errors(row: dict, reason: str) -> None:
    with pytest.raises(RowError) as info:
        to_conversation(row, "sharegpt")
    assert str(info.value) == reason


# ------------------------------------------------------------------------------------------ messages


def test_messages_basic_with_aliases() -> None:
    conv = to_conversation(msgs(("system", "S"), ("human", "q"), ("gpt", "a")), "messages")
    assert conv.messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_messages_content_parts_are_joined() -> None:
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": ["plain ", {"text": "parts"}]},
        ]
    }
    conv = to_conversation(row, "messages")
    assert [m["content"] for m in conv.messages] == ["Hello there", "plain parts"]


def test_messages_tool_calls_with_null_content() -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": "-3C"},
            {"role": "assistant", "content": "It is -3C."},
        ],
        "tools": [{"type": "function", "function": TOOL}],
    }
    conv = to_conversation(row, "messages")
    assert roles(conv) == ["user", "assistant", "tool", "assistant"]
    assert json.loads(conv.messages[1]["content"]) == calls
    assert conv.tools == [{"type": "function", "function": TOOL}]
    assert all(set(m) == {"role", "content"} for m in conv.messages)


def test_messages_tool_calls_with_text_content_keep_both() -> None:
    calls = [{"function": {"name": "f", "arguments": "{}"}}]
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "Checking.", "tool_calls": calls},
            {"role": "tool", "content": {"result": 1}},
            {"role": "assistant", "content": "a"},
        ]
    }
    conv = to_conversation(row, "messages")
    assert conv.messages[1]["content"] == "Checking.\n" + json.dumps(calls)
    assert conv.messages[2]["content"] == '{"result": 1}'


def test_messages_default_system() -> None:
    conv = to_conversation(msgs(("user", "q"), ("assistant", "a")), "messages", default_system="")
    assert conv.messages[0] == {"role": "system", "content": ""}
    assert roles(conv) == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"conversations": []}, "missing key 'messages'"),
        ({"messages": {"role": "user"}}, "'messages' is not a list (got object)"),
        ({"messages": [None]}, "turn 1 is not an object (got null)"),
        ({"messages": [{"content": "q"}]}, "turn 1 has no 'role' key"),
        (msgs(("user", "q"), ("bot", "a")), "turn 2 has unknown role 'bot'"),
        (msgs(("user", "q"), ("assistant", None)), "turn 2 content is not text (got null)"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
            "turn 2 content is not text (got null)",
        ),
        (
            msgs(("user", [{"type": "image_url", "image_url": {"url": "x"}}]), ("assistant", "a")),
            "turn 1 has a 'image_url' content part; only text is supported",
        ),
        (msgs(("user", [3]), ("assistant", "a")), "turn 1 content is not text (a content part is number)"),
        (msgs(("user", "q"), ("assistant", "")), "turn 2: empty assistant reply"),
        (
            msgs(("user", "q"), ("tool", "r"), ("assistant", "a")),
            "turn 2 is a tool result but does not follow an assistant function call",
        ),
        (
            msgs(("assistant", "a"), ("user", "q")),
            "turn 1 is the first turn and is from the assistant; it must be from the user",
        ),
        (
            msgs(("system", "s"), ("user", "q"), ("user", "q2"), ("assistant", "a")),
            "turns 2 and 3 are both from the user",
        ),
        (
            msgs(("user", "q"), ("assistant", "a"), ("system", "s")),
            "turn 3 is a system message; a system prompt is only allowed as the first turn",
        ),
        (
            msgs(("user", "q"), ("assistant", "a"), tools="{not json"),
            "'tools' is not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        ),
        (msgs(("system", "s"), ("user", "q")), "conversation has no assistant turn"),
    ],
)
def test_messages_errors(row: dict, reason: str) -> None:
    with pytest.raises(RowError) as info:
        to_conversation(row, "messages")
    assert str(info.value) == reason


def test_to_conversation_rejects_text_and_unknown_formats() -> None:
    with pytest.raises(ValueError, match="use to_text"):
        to_conversation({"text": "x"}, "text")
    with pytest.raises(ValueError, match="unknown format 'chatml'"):
        to_conversation({"text": "x"}, "chatml")


# ------------------------------------------------------------------------------------------ real files


def test_real_alpaca_en() -> None:
    rows = shared_rows("llama-factory/alpaca_en_demo.json")
    assert detect_format(rows) == "alpaca"
    convs = [to_conversation(r, "alpaca") for r in rows]
    assert len(convs) == 999
    assert all(roles(c) == ["user", "assistant"] for c in convs)
    with_input = [r for r in rows if r["input"].strip()]
    assert with_input, "the demo file has rows with an input"
    r = with_input[0]
    assert to_conversation(r, "alpaca").messages[0]["content"] == r["instruction"] + "\n\n" + r["input"]


def test_real_alpaca_zh_keeps_non_ascii_text() -> None:
    rows = shared_rows("llama-factory/alpaca_zh_demo.json")
    convs = [to_conversation(r, "alpaca", default_system="你是一个助手。") for r in rows]
    assert len(convs) == 1000
    assert all(roles(c) == ["system", "user", "assistant"] for c in convs)
    assert convs[0].messages[2]["content"] == rows[0]["output"]
    assert any(ord(ch) > 0x4E00 for ch in convs[0].messages[1]["content"])


def test_real_glaive_toolcall() -> None:
    rows = shared_rows("llama-factory/glaive_toolcall_en_demo.json")
    assert detect_format(rows) == "sharegpt"
    convs = [to_conversation(r, "sharegpt") for r in rows]
    assert len(convs) == 300
    # row 0: human, gpt, human, function_call, observation, gpt, human, gpt
    assert roles(convs[0]) == ["user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert json.loads(convs[0].messages[3]["content"])["name"] == "search_recipes"
    assert convs[0].tools is not None and convs[0].tools[0]["name"] == "search_recipes"
    with_tool_turns = [c for c in convs if "tool" in roles(c)]
    assert len(with_tool_turns) == 153
    assert sum(roles(c).count("tool") for c in convs) == 211
    assert sum(1 for c in convs if c.tools) == 191
    assert all(isinstance(t, dict) and "name" in t for c in convs for t in c.tools or [])


def test_real_kto_messages() -> None:
    rows = shared_rows("llama-factory/kto_en_demo.json")
    assert detect_format(rows) == "messages"
    convs = [to_conversation(r, "messages") for r in rows]
    assert len(convs) == 300
    assert all(roles(c)[0] == "user" and roles(c)[-1] == "assistant" for c in convs)
    assert sum(1 for c in convs if len(c.messages) == 2) == 223
    assert max(len(c.messages) for c in convs) == 12


def test_real_dpo_prompts_without_reply_are_row_errors() -> None:
    rows = shared_rows("llama-factory/dpo_en_demo.json")
    assert detect_format(rows) == "sharegpt"
    reasons = []
    for r in rows:
        try:
            to_conversation(r, "sharegpt")
        except RowError as e:
            reasons.append(str(e))
    assert len(reasons) == 194  # single-turn prompts: the reply is in chosen / rejected
    assert set(reasons) == {"conversation has no assistant turn"}


def test_real_c4_and_wiki_text() -> None:
    c4 = shared_rows("llama-factory/c4_demo.jsonl")
    assert detect_format(c4) == "text"
    texts = [to_text(r) for r in c4]
    assert len(texts) == 300 and max(map(len, texts)) == 37499
    wiki = shared_rows("llama-factory/wiki_demo.txt")
    assert detect_format(wiki) == "text"
    wiki_texts = [to_text(r) for r in wiki]
    assert len(wiki_texts) == 30 and wiki_texts[0].startswith("Anarchism is a political philosophy")


def test_real_gsm8k_needs_columns() -> None:
    p = SHARED / "gsm8k" / "train_first1000.jsonl"
    if not p.is_file():
        pytest.skip(f"shared data file {p} is absent")
    with pytest.raises(DataError, match="keys answer, question"):
        detect_format([r.data for r in read_rows(DataSource(path=str(p))) if r.data])
    mapped = read_rows(DataSource(path=str(p), columns={"instruction": "question", "output": "answer"}))
    rows = [r.data for r in mapped if r.data]
    assert detect_format(rows) == "alpaca"
    assert all(to_conversation(r, "alpaca").messages[1]["content"].rsplit("#### ", 1)[1].strip() for r in rows)
