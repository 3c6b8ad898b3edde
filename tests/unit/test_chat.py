"""Chat-template rendering and label masks (llmtune.data.chat)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmtune.data.chat import (
    IGNORE_INDEX,
    assistant_spans,
    encode_conversation,
    encode_text,
    resolve_chat_template,
)
from llmtune.data.formats import Conversation, RowError, to_conversation
from llmtune.errors import RecipeError

SYSTEM = "Be brief."
USER1, REPLY1 = "Hi there", "Hello friend."
USER2, REPLY2 = "What is two plus two?", "It is four."
TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
OBSERVATION = '{"temp_celsius": 21, "sky": "cloudy"}'
FINAL = "It is 21 degrees and cloudy."


def two_turns(system: bool = True) -> Conversation:
    msgs = [
        {"role": "user", "content": USER1},
        {"role": "assistant", "content": REPLY1},
        {"role": "user", "content": USER2},
        {"role": "assistant", "content": REPLY2},
    ]
    if system:
        msgs.insert(0, {"role": "system", "content": SYSTEM})
    return Conversation(msgs)


def tool_conv(system: str | None = None) -> Conversation:
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": CALL},
        {"role": "tool", "content": OBSERVATION},
        {"role": "assistant", "content": FINAL},
    ]
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    return Conversation(msgs, tools=TOOLS)


def learned(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of labelled positions."""
    out, start = [], None
    for j, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = j
        elif lab == IGNORE_INDEX and start is not None:
            out.append((start, j))
            start = None
    return out


@pytest.fixture(scope="module")
def template(tokenizer) -> str:
    t = resolve_chat_template(tokenizer, None, required=True)
    assert t is not None
    return t


# ----------------------------------------------------------------------------------------- label masks


def test_labels_are_exactly_both_replies_and_their_end_token(tokenizer, template):
    ids, labels = encode_conversation(tokenizer, template, two_turns(), max_length=512)
    assert len(ids) == len(labels)
    assert learned(tokenizer, ids, labels) == f"{REPLY1}<|im_end|>{REPLY2}<|im_end|>"
    # two contiguous runs, one per reply, each ending on <|im_end|>, followed by an unlabelled "\n"
    spans = runs(labels)
    assert len(spans) == 2
    for a, b in spans:
        assert ids[b - 1] == tokenizer.eos_token_id
        assert tokenizer.decode([ids[b]]) == "\n" and labels[b] == IGNORE_INDEX
        # the generation prompt just before the reply is not learned
        assert tokenizer.decode(ids[a - 3 : a]) == "<|im_start|>assistant\n"
    # labels equal the ids where they are set
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    # nothing of the system / user turns is learned
    text = learned(tokenizer, ids, labels)
    for prompt in (SYSTEM, USER1, USER2, "user", "system"):
        assert prompt not in text


def test_eos_is_learned_although_it_is_the_pad_token(tokenizer, template):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2  # the tiny tokenizer pads with <|im_end|>
    ids, labels = encode_conversation(tokenizer, template, two_turns(), max_length=512)
    eos_positions = [j for j, i in enumerate(ids) if i == tokenizer.eos_token_id]
    assert len(eos_positions) == 5  # system, user, reply, user, reply
    learned_eos = [j for j in eos_positions if labels[j] == tokenizer.eos_token_id]
    assert len(learned_eos) == 2
    assert learned_eos == [b - 1 for _, b in runs(labels)]


def test_train_on_prompt_labels_everything(tokenizer, template):
    ids, labels = encode_conversation(tokenizer, template, two_turns(), 512, train_on_prompt=True)
    assert labels == ids
    ids2, _ = encode_conversation(tokenizer, template, two_turns(), 512, train_on_prompt=False)
    assert ids2 == ids


def test_default_system_and_sharegpt_row(tokenizer, template):
    row = {"conversations": [{"from": "human", "value": USER1}, {"from": "gpt", "value": REPLY1}]}
    conv = to_conversation(row, "sharegpt", default_system="You help.")
    ids, labels = encode_conversation(tokenizer, template, conv, 512)
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nYou help.<|im_end|>")
    assert learned(tokenizer, ids, labels) == f"{REPLY1}<|im_end|>"


# ------------------------------------------------------------------------------------------ truncation


def test_truncation_before_the_first_reply_is_a_row_error(tokenizer, template):
    conv = two_turns(system=False)
    full_ids, full_labels = encode_conversation(tokenizer, template, conv, 512)
    first = runs(full_labels)[0][0]
    with pytest.raises(RowError, match=f"max_length={first}"):
        encode_conversation(tokenizer, template, conv, max_length=first)
    # one more token: the first reply token survives and is learned
    ids, labels = encode_conversation(tokenizer, template, conv, max_length=first + 1)
    assert len(ids) == first + 1 and labels[-1] == ids[-1] == full_ids[first]


def test_truncation_inside_a_reply_keeps_the_partial_reply(tokenizer, template):
    conv = two_turns(system=False)
    full_ids, full_labels = encode_conversation(tokenizer, template, conv, 512)
    a, b = runs(full_labels)[0]
    cut = a + (b - a) // 2
    ids, labels = encode_conversation(tokenizer, template, conv, max_length=cut)
    assert ids == full_ids[:cut] and labels == full_labels[:cut]
    partial = learned(tokenizer, ids, labels)
    assert partial and REPLY1.startswith(partial) and partial != REPLY1


# --------------------------------------------------------------------------------------------- tools


def test_tools_rendered_by_a_template_that_supports_them(tokenizer, template):
    assert "tools" in template
    ids, labels = encode_conversation(tokenizer, template, tool_conv(), 1024)
    text = tokenizer.decode(ids)
    assert "<tools>" in text and json.dumps(TOOLS[0]) in text
    assert "You can call these tools" not in text  # not the fallback description
    assert learned(tokenizer, ids, labels) == f"{CALL}<|im_end|>{FINAL}<|im_end|>"


# chatml as it was before it rendered tools: a template that knows neither tools nor tool_calls
PLAIN_CHATML = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_tools_described_in_system_for_a_template_without_tools(tokenizer):
    chatml = PLAIN_CHATML
    description = "You can call these tools:\n" + json.dumps(TOOLS[0])
    ids, labels = encode_conversation(tokenizer, chatml, tool_conv(), 1024)
    text = tokenizer.decode(ids)
    assert text.startswith(f"<|im_start|>system\n{description}<|im_end|>\n<|im_start|>user\n")
    assert learned(tokenizer, ids, labels) == f"{CALL}<|im_end|>{FINAL}<|im_end|>"
    # an existing system prompt is kept, with the tools appended to it
    ids, labels = encode_conversation(tokenizer, chatml, tool_conv(system="Be helpful."), 1024)
    assert tokenizer.decode(ids).startswith(f"<|im_start|>system\nBe helpful.\n\n{description}<|im_end|>")
    assert tokenizer.decode(ids).count("<|im_start|>system") == 1


def test_tool_results_are_not_learned(tokenizer, template):
    for tmpl in (template, resolve_chat_template(tokenizer, "chatml", required=True), PLAIN_CHATML):
        ids, labels = encode_conversation(tokenizer, tmpl, tool_conv(), 1024)
        assert OBSERVATION in tokenizer.decode(ids)
        assert OBSERVATION not in learned(tokenizer, ids, labels)
        assert "temp_celsius" not in learned(tokenizer, ids, labels)


# ------------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("name", "end"),
    [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("alpaca", "<|im_end|>")],
)
def test_builtin_templates_label_the_replies(tokenizer, name, end):
    tmpl = resolve_chat_template(tokenizer, name, required=True)
    ids, labels = encode_conversation(tokenizer, tmpl, two_turns(), 512)
    assert learned(tokenizer, ids, labels) == f"{REPLY1}{end}{REPLY2}{end}"
    full = tokenizer.decode(ids)
    assert SYSTEM in full and USER2 in full


def test_a_builtin_template_whose_markers_are_not_tokens_warns(tokenizer):
    import warnings

    with pytest.warns(UserWarning, match=r"<\|start_header_id\|>, <\|eot_id\|> are not a token") as caught:
        llama3 = resolve_chat_template(tokenizer, "llama3", required=True)
    assert len(caught) == 1 and "<|eot_id|>" in (llama3 or "")  # a warning, and the template is still given
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chatml = resolve_chat_template(tokenizer, "chatml", required=True)  # the tiny tokenizer has its tokens
    assert "<|im_end|>" in (chatml or "")


def test_template_file_path(tokenizer, tmp_path: Path):
    path = tmp_path / "plain.jinja"
    path.write_text(
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' -%}{{ 'A: ' + m['content'] + eos_token + '\\n' }}"
        "{%- else -%}{{ m['role'][0] | upper + ': ' + m['content'] + '\\n' }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'A: ' }}{%- endif -%}"
    )
    tmpl = resolve_chat_template(tokenizer, str(path), required=True)
    assert tmpl == path.read_text()
    ids, labels = encode_conversation(tokenizer, tmpl, two_turns(), 512)
    assert tokenizer.decode(ids) == (
        f"S: {SYSTEM}\nU: {USER1}\nA: {REPLY1}<|im_end|>\nU: {USER2}\nA: {REPLY2}<|im_end|>\n"
    )
    assert learned(tokenizer, ids, labels) == f"{REPLY1}<|im_end|>{REPLY2}<|im_end|>"


def test_unknown_template_name_is_a_recipe_error(tokenizer):
    with pytest.raises(RecipeError, match="no-such-template"):
        resolve_chat_template(tokenizer, "no-such-template", required=True)


def test_missing_template_is_a_recipe_error_only_when_required():
    bare = SimpleNamespace(chat_template=None)
    with pytest.raises(RecipeError) as exc:
        resolve_chat_template(bare, None, required=True)
    assert "model.chat_template" in str(exc.value)
    assert resolve_chat_template(bare, None, required=False) is None
    # a built-in override works even for a tokenizer without a template
    assert "<|im_start|>" in (resolve_chat_template(bare, "chatml", required=True) or "")


def test_named_templates_use_the_default():
    named = SimpleNamespace(chat_template={"tool_use": "TOOL", "default": "DEFAULT"})
    assert resolve_chat_template(named, None, required=True) == "DEFAULT"


def test_template_that_rejects_a_conversation_raises_row_error(tokenizer):
    tmpl = (
        "{%- if messages[0]['role'] != 'user' -%}{{ raise_exception('conversations must start with the user') }}"
        "{%- endif -%}"
        "{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] + eos_token }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}"
    )
    with pytest.raises(RowError, match="rejected this conversation: conversations must start with the user"):
        encode_conversation(tokenizer, tmpl, two_turns(system=True), 512)
    ids, labels = encode_conversation(tokenizer, tmpl, two_turns(system=False), 512)
    assert learned(tokenizer, ids, labels) == f"{REPLY1}<|im_end|>{REPLY2}<|im_end|>"


@pytest.mark.parametrize(
    "tmpl",
    [
        "",  # renders nothing
        "{%- for m in messages -%}{%- if m['role'] != 'assistant' -%}{{ m['content'] }}{%- endif -%}{%- endfor -%}",
    ],
)
def test_a_template_that_drops_the_replies_is_named_as_the_cause(tokenizer, tmpl):
    with pytest.raises(
        RowError, match=r"chat template renders assistant turn 2 as no text: check model\.chat_template"
    ):
        encode_conversation(tokenizer, tmpl, two_turns(system=False), 512)


def test_no_assistant_turn_is_a_row_error(tokenizer, template):
    with pytest.raises(RowError, match="no assistant turn"):
        assistant_spans(tokenizer, template, Conversation([{"role": "user", "content": "hello"}]))


# ----------------------------------------------------------------------------------------- plain text


def test_encode_text_appends_eos_once(tokenizer):
    eos = tokenizer.eos_token_id
    ids = encode_text(tokenizer, "The sky is blue.")
    assert ids[-1] == eos and ids.count(eos) == 1
    assert ids[:-1] == tokenizer("The sky is blue.", add_special_tokens=True)["input_ids"]
    # a text already ending in EOS does not get a second one
    ids2 = encode_text(tokenizer, "The sky is blue.<|im_end|>")
    assert ids2 == ids
    with pytest.raises(RowError, match="empty"):
        encode_text(tokenizer, "")


GLAIVE_ROW = {  # the shape of LLaMA-Factory's glaive_toolcall_en_demo.json
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": CALL},
        {"from": "observation", "value": OBSERVATION},
        {"from": "gpt", "value": FINAL},
    ],
    "tools": json.dumps(TOOLS),
}
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("name", ["tokenizer", "chatml"])
def test_function_calls_render_as_tool_calls_in_templates_that_support_them(tokenizer, template, name):
    """The tiny model's own template and the built-in chatml render the tools in the system turn and a
    function call as <tool_call> (learned); the observation is a tool turn, not learned."""
    tmpl = template if name == "tokenizer" else resolve_chat_template(tokenizer, "chatml", required=True)
    conv = to_conversation(GLAIVE_ROW, "sharegpt", default_system="Be brief.")
    assert conv.calls == {
        2: ("", [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
    }
    ids, labels = encode_conversation(tokenizer, tmpl, conv, 1024)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and json.dumps(TOOLS[0]) in text
    assert text.count("<|im_start|>system") == 1
    assert f"<|im_start|>assistant\n{TOOL_CALL}<|im_end|>" in text
    assert f"<|im_start|>tool\n{OBSERVATION}<|im_end|>" in text
    assert learned(tokenizer, ids, labels) == f"{TOOL_CALL}<|im_end|>{FINAL}<|im_end|>"
    # a template without tool_calls gets the call as its JSON text (learned all the same)
    ids, labels = encode_conversation(tokenizer, PLAIN_CHATML, conv, 1024)
    assert learned(tokenizer, ids, labels) == f"{CALL}<|im_end|>{FINAL}<|im_end|>"


def test_openai_tool_calls_keep_the_text_before_them(tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
                ],
            },
            {"role": "tool", "content": OBSERVATION},
            {"role": "assistant", "content": FINAL},
        ],
        "tools": TOOLS,
    }
    conv = to_conversation(row, "messages")
    chatml = resolve_chat_template(tokenizer, "chatml", required=True)
    ids, labels = encode_conversation(tokenizer, chatml, conv, 1024)
    assert learned(tokenizer, ids, labels) == f"Let me check.\n{TOOL_CALL}<|im_end|>{FINAL}<|im_end|>"
    # a call whose arguments are not JSON stays text
    row["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    conv = to_conversation(row, "messages")
    assert conv.calls == {}
    assert "get_weather" in learned(tokenizer, *encode_conversation(tokenizer, chatml, conv, 1024))
