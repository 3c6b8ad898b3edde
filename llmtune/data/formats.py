"""Turning rows of the supported formats into one canonical form: plain text, or a ``Conversation``.

Formats: ``text`` (``{"text": ...}``), ``alpaca`` (``instruction`` / ``input`` / ``output`` / ``system`` /
``history``, as in LLaMA-Factory's files), ``sharegpt`` (``conversations: [{from, value}]`` with optional
``system`` and ``tools``; function_call / observation turns for tool use) and ``messages`` (OpenAI-style
``messages: [{role, content}]``). A row that cannot be converted raises ``RowError`` with a short reason
(the caller drops or reports it); a source whose format cannot be recognised raises ``DataError``.

A row with a boolean ``label`` (KTO data, e.g. LLaMA-Factory's ``kto_en_demo.json``: ``messages`` + ``label``)
marks its reply desirable (true) or undesirable (false); ``is_undesirable`` tells the stages that learn
replies (sft) which rows to drop, with the reason ``UNDESIRABLE``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from llmtune.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "text")
ROLES = ("system", "user", "assistant", "tool")

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "system": "system",
}
_MESSAGES_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
}
_DETECT_ROWS = 20
UNDESIRABLE = "label false (an undesirable reply: KTO data)"


class RowError(Exception):
    """A row that cannot be used; the message is a short human reason ("empty assistant reply")."""


@dataclass
class Conversation:
    """A conversation in canonical form.

    ``messages``: ``{"role": "system" | "user" | "assistant" | "tool", "content": str}`` dicts, a system
    message only first; a function call's content is its JSON text (what templates without tool support
    render). ``tools``: the parsed tool / function definitions of the row, or None. ``calls``: for each
    assistant message that calls functions (by index in ``messages``), the text before the calls and the
    calls in transformers' form (``[{"type": "function", "function": {"name", "arguments"}}]``), which
    templates that render ``tool_calls`` get instead of the JSON text.
    """

    messages: list[dict]
    tools: list | None = None
    calls: dict[int, tuple[str, list[dict]]] = field(default_factory=dict)


@dataclass
class _Turn:
    role: str
    content: str
    call: bool = field(default=False)  # an assistant function call (tool results may follow)
    # the call in transformers' tool_calls form, with the text before it, when it parses as {name, arguments}
    structured: tuple[str, list[dict]] | None = field(default=None)


# ------------------------------------------------------------------------------------------- detection


def _row_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("messages"), list):
        return "messages"
    if isinstance(row.get("conversations"), list):
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


def detect_format(rows: list[dict]) -> str:
    """The format of a source, from the keys of its first rows (the most common match wins).

    ``messages`` (a list) -> messages; ``conversations`` (a list) -> sharegpt; ``instruction`` + ``output``
    -> alpaca; ``text`` -> text. Raises ``DataError`` listing the keys found when nothing fits.
    """
    sample = [r for r in rows if isinstance(r, dict)][:_DETECT_ROWS]
    if not sample:
        raise DataError(
            "cannot detect the data format: the source has no readable rows",
            hint="check the file, or set format: on the source",
        )
    votes = Counter(f for f in map(_row_format, sample) if f is not None)
    if votes:
        best = max(votes.values())
        return next(f for f in ("messages", "sharegpt", "alpaca", "text") if votes.get(f) == best)
    keys = sorted({str(k) for r in sample for k in r})
    raise DataError(
        f"cannot detect the data format: the first rows have keys {', '.join(keys) or '(none)'}; supported "
        "formats are alpaca (instruction, output), sharegpt (conversations), messages (messages) and text (text)",
        hint="set format: on the source, or map your columns to those names with columns: "
        "(e.g. columns: {instruction: question, output: answer})",
    )


# ------------------------------------------------------------------------------------------ conversion


def is_undesirable(row: Any) -> bool:
    """True for a row whose ``label`` is false (a boolean, or the text "false"): KTO's undesirable reply.

    Only a boolean-like label counts: a number or other text in a ``label`` column is some other annotation.
    """
    if not isinstance(row, dict):
        return False
    label = row.get("label")
    return label is False or (isinstance(label, str) and label.strip().lower() == "false")


def to_text(row: dict) -> str:
    """The ``text`` of a text-format row (a non-empty string)."""
    _require_object(row)
    if "text" not in row:
        raise RowError("missing key 'text'")
    text = row["text"]
    if not isinstance(text, str):
        raise RowError(f"'text' is not text (got {_kind(text)})")
    if not text.strip():
        raise RowError("empty text")
    return text


def to_conversation(row: dict, fmt: str, default_system: str | None = None) -> Conversation:
    """Convert an alpaca / sharegpt / messages row to a validated ``Conversation``.

    ``default_system`` becomes the first message when the row has no system prompt (and it is not None).
    Raises ``RowError`` for a malformed row.
    """
    _require_object(row)
    if fmt == "alpaca":
        turns, tools = _alpaca(row), None
    elif fmt == "sharegpt":
        turns, tools = _sharegpt(row)
    elif fmt == "messages":
        turns, tools = _messages(row)
    elif fmt == "text":
        raise ValueError("format text has no conversation: use to_text")
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _validate(turns)
    if default_system is not None and turns[0].role != "system":
        turns.insert(0, _Turn("system", default_system))
    messages = [{"role": t.role, "content": t.content} for t in turns]
    calls = {i: t.structured for i, t in enumerate(turns) if t.structured is not None}
    return Conversation(messages=messages, tools=tools, calls=calls)


def _tool_calls(value: Any) -> list[dict] | None:
    """A function call as written in the data ({"name", "arguments"}, a list of them, or OpenAI's
    {"type": "function", "function": {...}} items) in transformers' tool_calls form; None for anything else."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = item["function"]
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]):
            return None
        args = item.get("arguments", {})
        if isinstance(args, str):  # OpenAI writes the arguments as JSON text
            try:
                args = json.loads(args) if args.strip() else {}
            except (json.JSONDecodeError, RecursionError):
                return None
        calls.append({"type": "function", "function": {"name": item["name"], "arguments": args}})
    return calls or None


def _alpaca(row: dict) -> list[_Turn]:
    instruction = _text_field(row, "instruction", required=True)
    query = _text_field(row, "input")
    output = _text_field(row, "output", required=True)
    system = _text_field(row, "system")
    turns: list[_Turn] = []
    if system.strip():
        turns.append(_Turn("system", system))
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise RowError(f"'history' is not a list of [user, assistant] pairs (got {_kind(history)})")
        for i, pair in enumerate(history, start=1):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise RowError(f"'history' item {i} is not a [user, assistant] pair")
            for role, value in zip(("user", "assistant"), pair, strict=True):
                if not isinstance(value, str):
                    raise RowError(f"'history' item {i} {role} is not text (got {_kind(value)})")
                turns.append(_Turn(role, value))
    prompt = "\n\n".join(part for part in (instruction, query) if part.strip())
    turns.append(_Turn("user", prompt))
    turns.append(_Turn("assistant", output))
    return turns


def _sharegpt(row: dict) -> tuple[list[_Turn], list | None]:
    if "conversations" not in row:
        raise RowError("missing key 'conversations'")
    convs = row["conversations"]
    if not isinstance(convs, list):
        raise RowError(f"'conversations' is not a list (got {_kind(convs)})")
    turns: list[_Turn] = []
    for n, turn in enumerate(convs, start=1):
        if not isinstance(turn, dict):
            raise RowError(f"turn {n} is not an object (got {_kind(turn)})")
        role_key, content_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        if role_key not in turn:
            raise RowError(f"turn {n} has no '{role_key}' key")
        if content_key not in turn:
            raise RowError(f"turn {n} has no '{content_key}' key")
        raw_role, value = turn[role_key], turn[content_key]
        role = _SHAREGPT_ROLES.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RowError(f"turn {n} has unknown role {raw_role!r}")
        call = raw_role.lower() == "function_call"
        structured = _tool_calls(value) if call else None
        if (call or role == "tool") and isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        if not isinstance(value, str):
            raise RowError(f"turn {n} content is not text (got {_kind(value)})")
        turns.append(_Turn(role, value, call=call, structured=None if structured is None else ("", structured)))
    system = _text_field(row, "system")
    if system.strip() and not (turns and turns[0].role == "system"):
        turns.insert(0, _Turn("system", system))
    return turns, _parse_tools(row.get("tools"))


def _messages(row: dict) -> tuple[list[_Turn], list | None]:
    if "messages" not in row:
        raise RowError("missing key 'messages'")
    msgs = row["messages"]
    if not isinstance(msgs, list):
        raise RowError(f"'messages' is not a list (got {_kind(msgs)})")
    turns: list[_Turn] = []
    for n, msg in enumerate(msgs, start=1):
        if not isinstance(msg, dict):
            raise RowError(f"turn {n} is not an object (got {_kind(msg)})")
        if "role" not in msg:
            raise RowError(f"turn {n} has no 'role' key")
        raw_role = msg["role"]
        role = _MESSAGES_ROLES.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RowError(f"turn {n} has unknown role {raw_role!r}")
        content = msg.get("content")
        calls = msg.get("tool_calls") if role == "assistant" else None
        if isinstance(content, list):
            content = _join_parts(content, n)
        elif role == "tool" and isinstance(content, dict):
            content = json.dumps(content, ensure_ascii=False)
        structured = None
        if calls:
            calls_text = json.dumps(calls, ensure_ascii=False)
            parsed = _tool_calls(calls)
            if content is None or (isinstance(content, str) and not content.strip()):
                structured = None if parsed is None else ("", parsed)
                content = calls_text
            elif isinstance(content, str):
                structured = None if parsed is None else (content, parsed)
                content = f"{content}\n{calls_text}"
        if not isinstance(content, str):
            raise RowError(f"turn {n} content is not text (got {_kind(content)})")
        turns.append(_Turn(role, content, call=bool(calls), structured=structured))
    return turns, _parse_tools(row.get("tools"))


def _join_parts(parts: list, n: int) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and part.get("type", "text") != "text":
            raise RowError(f"turn {n} has a {part.get('type')!r} content part; only text is supported")
        else:
            raise RowError(f"turn {n} content is not text (a content part is {_kind(part)})")
    return "".join(texts)


def _parse_tools(tools: Any) -> list | None:
    if tools is None:
        return None
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RowError(f"'tools' is not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise RowError("'tools' is JSON nested too deeply") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise RowError(f"'tools' is not a list of tool definitions (got {_kind(tools)})")
    for i, tool in enumerate(tools, start=1):
        if not isinstance(tool, dict):
            raise RowError(f"'tools' item {i} is not an object (got {_kind(tool)})")
    return tools or None


# ------------------------------------------------------------------------------------------ validation


def _validate(turns: list[_Turn]) -> None:
    if not turns:
        raise RowError("conversation is empty")
    first_chat: int | None = None
    for i, t in enumerate(turns):
        n = i + 1
        prev = turns[i - 1] if i > 0 else None
        if t.role == "system":
            if i > 0:
                raise RowError(f"turn {n} is a system message; a system prompt is only allowed as the first turn")
            continue
        if first_chat is None:
            first_chat = i
            if t.role != "user":
                raise RowError(f"turn {n} is the first turn and is from the {t.role}; it must be from the user")
        if t.role == "user":
            if not t.content.strip():
                raise RowError(f"turn {n}: empty user message")
            if prev is not None and prev.role == "user":
                raise RowError(f"turns {n - 1} and {n} are both from the user")
        elif t.role == "assistant":
            if not t.content.strip():
                raise RowError(f"turn {n}: empty assistant reply")
            if prev is not None and prev.role == "assistant" and not t.call:
                raise RowError(f"turns {n - 1} and {n} are both from the assistant")
        elif t.role == "tool" and (prev is None or prev.role not in ("assistant", "tool")):
            raise RowError(f"turn {n} is a tool result but does not follow an assistant function call")
    if not any(t.role == "assistant" for t in turns):
        raise RowError("conversation has no assistant turn")


# --------------------------------------------------------------------------------------------- helpers


def _require_object(row: Any) -> None:
    if not isinstance(row, dict):
        raise RowError(f"row is not an object (got {_kind(row)})")


def _text_field(row: dict, key: str, *, required: bool = False) -> str:
    """``row[key]`` as a string; an optional key that is absent or null is ""."""
    if key not in row or (row[key] is None and not required):
        if required:
            raise RowError(f"missing key '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"'{key}' is not text (got {_kind(value)})")
    return value


def _kind(obj: Any) -> str:
    if obj is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(obj), type(obj).__name__
    )
