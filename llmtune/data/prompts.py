"""Reading prompts: the ``prompts`` format, and the prompt part of the other formats.

A row becomes a ``Prompt``: the conversation up to the last user turn, and the reference ``answer``
when the row has one. Accepted shapes:

- ``{"prompt": str | messages, "answer"?}`` (the ``prompts`` format), ``{"question", "answer"?}``
  (GSM8K: the gold is the number after the answer's final ``#### ``),
- alpaca ``{"instruction", "input"?, "output"?}`` (``output`` is the answer),
- ``{"messages": [...]}`` / sharegpt ``{"conversations": [...]}``: the turns up to the last user turn;
  the assistant reply after it, if any, is the answer (an ``answer`` key wins).

``system`` on a row is its system prompt. This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmtune.data.formats import RowError, to_conversation

PROMPT_KEYS = ("prompt", "question", "instruction", "messages", "conversations")


@dataclass
class Prompt:
    messages: list[dict]  # ends with a user turn
    answer: str | None = None  # the reference answer as written in the row
    row: int = 0

    @property
    def user_text(self) -> str:
        return self.messages[-1]["content"]


def to_prompt(row: dict, system: str | None = None) -> Prompt:
    """One row -> Prompt; raises RowError for a row with no prompt."""
    if not isinstance(row, dict):
        raise RowError("row is not an object")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise RowError("'answer' is not text")
    answer = None if answer is None else str(answer)
    sys_text = row.get("system") if isinstance(row.get("system"), str) and row.get("system") else system

    if "prompt" in row or "question" in row:
        value = row.get("prompt", row.get("question"))
        if isinstance(value, list):
            return _from_messages({"messages": value}, "messages", answer, sys_text)
        if not isinstance(value, str) or not value.strip():
            raise RowError("empty or non-text prompt")
        messages = [{"role": "user", "content": value}]
    elif "instruction" in row:
        instruction, query = row.get("instruction"), row.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(query, str) or not instruction.strip():
            raise RowError("empty or non-text instruction")
        messages = [{"role": "user", "content": "\n\n".join(p for p in (instruction, query) if p.strip())}]
        if answer is None and isinstance(row.get("output"), str):
            answer = row["output"]
    elif "messages" in row:
        return _from_messages(row, "messages", answer, sys_text)
    elif "conversations" in row:
        return _from_messages(row, "sharegpt", answer, sys_text)
    else:
        raise RowError(f"no prompt: expected one of the keys {', '.join(PROMPT_KEYS)}")
    if sys_text:
        messages.insert(0, {"role": "system", "content": sys_text})
    return Prompt(messages, answer)


def _from_messages(row: dict, fmt: str, answer: str | None, system: str | None) -> Prompt:
    msgs: list[Any] = row["messages"] if fmt == "messages" else row["conversations"]
    if not isinstance(msgs, list):
        raise RowError(f"'{'messages' if fmt == 'messages' else 'conversations'}' is not a list")
    # validate through the sft converter: append a placeholder reply when the conversation ends on the user
    probe = dict(row)
    key = "messages" if fmt == "messages" else "conversations"
    last = msgs[-1] if msgs else None
    ends_user = isinstance(last, dict) and str(last.get("role", last.get("from", ""))).lower() in ("user", "human")
    if ends_user:
        reply = {"role": "assistant", "content": "."} if fmt == "messages" else {"from": "gpt", "value": "."}
        probe[key] = [*msgs, reply]
    conv = to_conversation(probe, fmt, default_system=system)
    turns = conv.messages[:-1] if ends_user else conv.messages
    last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
    if answer is None and last_user + 1 < len(turns) and turns[last_user + 1]["role"] == "assistant":
        answer = turns[last_user + 1]["content"]
    return Prompt(turns[: last_user + 1], answer)


def render_prompt(tokenizer: Any, template: str | None, messages: list[dict]) -> str:
    """The text the model continues: the chat template with the generation prompt, or for a model
    without a template, the turns as plain text."""
    if template is not None:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    parts = []
    for m in messages:
        parts.append(m["content"] if m["role"] != "assistant" else m["content"] + "\n")
    return "\n\n".join(parts) + "\n"


def prompt_encoder(tokenizer: Any, template: str | None, budget: int) -> Any:
    """A data-pipeline encoder for the online stages: one row -> one PromptExample whose input_ids are the
    rendered prompt, left-truncated to ``budget`` tokens (the end of a prompt is what the model continues)."""
    from llmtune.data.pipeline import PromptExample

    def encode(row: dict, fmt: str, src: Any) -> list[Any]:
        prompt = to_prompt(row, src.system)
        text = render_prompt(tokenizer, template, prompt.messages)
        ids = tokenizer(text, add_special_tokens=template is None)["input_ids"][-budget:]
        return [PromptExample(input_ids=ids, labels=[], prompt=prompt)]

    return encode
