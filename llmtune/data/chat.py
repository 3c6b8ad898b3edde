"""Rendering canonical examples to token ids and labels.

Conversations go through the chat template; the labels cover the assistant turns (all of them, in one
pass) including the end-of-turn text the template puts after each, and nothing else. The spans are found
by rendering the conversation up to each assistant turn (with the generation prompt) and up to its end:
the characters in between are the reply. Tokens are then labelled through the tokenizer's offsets, so any
fast tokenizer and any template that renders a conversation as a prefix of its continuation works.
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from llmtune.data.formats import Conversation, RowError
from llmtune.errors import RecipeError

IGNORE_INDEX = -100
BUILTIN_TEMPLATES = ("chatml", "llama3", "alpaca")


def resolve_chat_template(tokenizer: Any, override: str | None, *, required: bool) -> str | None:
    """The Jinja template to render with: the override (a built-in name or a file), or the tokenizer's."""
    if override is not None:
        if override in BUILTIN_TEMPLATES:
            _warn_missing_markers(tokenizer, override)
            return resources.files("llmtune.templates").joinpath(f"{override}.jinja").read_text("utf-8")
        p = Path(override).expanduser()
        if not p.is_file():
            raise RecipeError(
                f"model.chat_template {override!r} is neither a built-in template nor a file",
                hint=f"use one of {', '.join(BUILTIN_TEMPLATES)} or the path of a .jinja file",
            )
        return p.read_text("utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default") or next(iter(template.values()), None)
    if template is None and required:
        raise RecipeError(
            "the tokenizer has no chat template, and this stage renders conversations",
            hint="set model.chat_template to a built-in (chatml, llama3, alpaca) or a .jinja file; "
            "for a base model, chatml is a good choice",
        )
    return template


_MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"), "llama3": ("<|start_header_id|>", "<|eot_id|>")}


def _warn_missing_markers(tokenizer: Any, name: str) -> None:
    """A built-in template whose turn markers are not tokens of this tokenizer still trains, but the model
    learns the end-of-turn marker as text pieces, and generation does not stop at it."""
    if not hasattr(tokenizer, "get_vocab"):
        return
    vocab = tokenizer.get_vocab()
    missing = [m for m in _MARKERS.get(name, ()) if m not in vocab]
    if missing:
        warnings.warn(
            f"model.chat_template {name}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            "a token of this tokenizer, so the model learns the turn markers as text and generation will not stop "
            "at the end of a reply; prefer the tokenizer's own template (chat_template: null) if it has one, or a "
            "template built from its special tokens",
            stacklevel=2,
        )


def _render(tokenizer: Any, template: str, messages: list[dict], tools: Any, gen_prompt: bool) -> str:
    try:
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tools=tools,
            tokenize=False,
            add_generation_prompt=gen_prompt,
        )
    except Exception as e:  # jinja raises TemplateError / TypeError etc. for conversations it rejects
        raise RowError(f"the chat template rejected this conversation: {str(e).splitlines()[0]}") from None
    return out


def _with_tools_in_system(messages: list[dict], tools: list) -> list[dict]:
    """For templates that ignore `tools`, describe the tools in the system message instead."""
    text = "You can call these tools:\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = msgs[0]["content"] + "\n\n" + text
    else:
        msgs.insert(0, {"role": "system", "content": text})
    return msgs


def template_messages(conv: Conversation, template: str) -> tuple[list[dict], list | None]:
    """The messages and tools to render ``conv`` with: function calls as ``tool_calls`` for a template that
    renders them (else as their JSON text), and the tools passed to a template that renders ``tools`` (else
    described in the system message)."""
    messages = [dict(m) for m in conv.messages]
    if conv.calls and "tool_calls" in template:
        for i, (before, calls) in conv.calls.items():
            messages[i] = {"role": "assistant", "content": before, "tool_calls": calls}
    tools = conv.tools or None
    if tools and "tools" not in template:
        messages, tools = _with_tools_in_system(messages, tools), None
    return messages, tools


def assistant_spans(tokenizer: Any, template: str, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Render the whole conversation; return the text and the (start, end) character span of every reply."""
    messages, tools = template_messages(conv, template)
    full = _render(tokenizer, template, messages, tools, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], tools, True)
        upto = _render(tokenizer, template, messages[: i + 1], tools, False)
        if upto.startswith(before) and full.startswith(upto):
            start, end = len(before), len(upto)
        else:  # template not prefix-stable (e.g. it rewrites earlier turns): find the reply text itself
            reply = upto[len(before) :] if upto.startswith(before) else msg["content"]
            start = full.find(reply, cursor)
            if start < 0 or not reply:
                raise RowError(f"could not locate assistant turn {i + 1} in the rendered conversation")
            end = start + len(reply)
        # Learn the reply and the end-of-turn text, but not trailing whitespace between turns.
        while end > start and full[end - 1] in " \n" and end - 1 > start + len(msg["content"].rstrip()):
            end -= 1
        if not full[start:end].strip():
            raise RowError(f"the chat template renders assistant turn {i + 1} as no text: check model.chat_template")
        spans.append((start, end))
        cursor = end
    if not spans:
        raise RowError("conversation has no assistant turn")
    return full, spans


def encode_conversation(
    tokenizer: Any,
    template: str,
    conv: Conversation,
    max_length: int,
    train_on_prompt: bool = False,
    bounds: tuple[int | None, int | None] = (None, None),
) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX outside assistant replies), truncated to max_length. bounds: (min, max)
    tokens of the whole rendered conversation, before truncation (data.filter); a row outside is a RowError."""
    text, spans = assistant_spans(tokenizer, template, conv)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        k = 0
        for j, (s, e) in enumerate(offsets):
            while k < len(spans) and spans[k][1] <= s:
                k += 1
            if k == len(spans):
                break
            if e > spans[k][0] and s < spans[k][1]:
                labels[j] = ids[j]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        raise RowError("the chat template leaves no assistant token to learn: check model.chat_template")
    if bounds != (None, None):
        from llmtune.data.filters import length_check

        length_check(len(ids), *bounds)
    if len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        # The reason is the same text for every such row, so that the summary can count them together.
        raise RowError(f"no trainable token left after truncation to max_length={max_length}")
    return ids, labels


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """A document's token ids: the tokenizer's own special tokens (BOS), then EOS at the end."""
    ids: list[int] = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if len(ids) < 2:
        raise RowError("text is empty after tokenization")
    return ids
