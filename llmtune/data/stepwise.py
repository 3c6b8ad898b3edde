"""Step-wise supervision for process reward models (``stage: rm`` with ``rm.loss: process``).

Format ``stepwise`` reads three row shapes (each row on its own, so a file may mix them):

- TRL's stepwise supervision: ``{prompt, completions: [step, ...], labels: [bool, ...]}`` (prompt: text or
  a message list).
- Math-Shepherd: ``{input, label}``: ``input`` is the question and the steps, each step ended by the tag
  ``ки``; ``label`` is the same text with each tag replaced by ``+`` (good) or ``-`` (bad). The question
  is the text before ``Step 1:`` (Math-Shepherd's steps are numbered so).
- PRM800K: ``{question: {problem}, label: {steps: [{completions: [{text, rating}], chosen_completion}]}}``.
  Each step's chosen completion is taken; rating 1 is good, -1 bad, and 0 (neutral: "reasonable but not
  needed") counts as good, as in common practice (OpenAI's PRM800K paper trains "neutral = positive" as
  one of its settings, and Math-Shepherd-style pipelines keep it). A step without a chosen completion ends
  the chain: its first -1 completion, if any, is taken as the final bad step. Steps after the first bad one
  are dropped (the first error is what a PRM must find) and an unrated step ends the chain.

The steps are the assistant reply after the prompt (rendered with the chat template), each step followed by
``rm.step_separator``; the label of a step sits on its step-end token: the token holding the last character
of the step and its separator. All other positions hold IGNORE_INDEX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmtune.data.chat import IGNORE_INDEX, assistant_spans
from llmtune.data.formats import Conversation, RowError, to_conversation
from llmtune.data.pipeline import Encoder, Example
from llmtune.recipe.data import DataSource

SHEPHERD_TAG = "ки"


@dataclass
class StepRow:
    """A step-wise row in canonical form: prompt messages, the steps and one good / bad flag per step."""

    prompt: list[dict]
    steps: list[str]
    labels: list[bool]


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "+", "-"):
        return value.lower() in ("true", "+")
    raise RowError(f"{where} is not true / false (got {value!r})")


def _prompt_messages(prompt: Any, system: Any = None) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("empty prompt")
        msgs: list[dict] = [{"role": "user", "content": prompt}]
        if isinstance(system, str) and system.strip():
            msgs.insert(0, {"role": "system", "content": system})
        return msgs
    if isinstance(prompt, list) and prompt:
        return list(prompt)
    raise RowError(f"'prompt' is not text or a message list (got {type(prompt).__name__})")


def _trl(row: dict) -> StepRow:
    steps, labels = row.get("completions"), row.get("labels")
    if not isinstance(steps, list) or not isinstance(labels, list):
        raise RowError("'completions' and 'labels' must be lists (one label per step)")
    if len(steps) != len(labels):
        raise RowError(f"{len(steps)} steps but {len(labels)} labels: give one label per step")
    flags = [_bool(v, f"labels[{i}]") for i, v in enumerate(labels)]
    return StepRow(_prompt_messages(row.get("prompt"), row.get("system")), steps, flags)


def _shepherd(row: dict) -> StepRow:
    text, label = row.get("input"), row.get("label")
    if not isinstance(text, str) or not isinstance(label, str):
        raise RowError("Math-Shepherd rows have text 'input' and 'label'")
    pieces = text.split(SHEPHERD_TAG)
    if len(pieces) < 2:
        raise RowError(f"'input' has no step tag {SHEPHERD_TAG!r}")
    flags, at = [], 0
    for k, piece in enumerate(pieces[:-1]):
        at += len(piece)
        mark = label[at : at + 1]  # each 2-character tag is one '+' / '-' in label
        if mark not in ("+", "-"):
            raise RowError(f"'label' has {mark!r} where step {k + 1}'s tag is, not + or -")
        flags.append(mark == "+")
        at += 1
    first = pieces[0]
    cut = first.find("Step 1:")
    if cut <= 0:
        raise RowError("could not find where the question ends: Math-Shepherd steps start with 'Step 1:'")
    question, steps = first[:cut], [first[cut:], *pieces[1:-1]]
    return StepRow(_prompt_messages(question.strip()), steps, flags)


def _prm800k(row: dict) -> StepRow:
    question, label = row.get("question"), row.get("label")
    problem = question.get("problem") if isinstance(question, dict) else None
    if not isinstance(problem, str):
        raise RowError("PRM800K rows have question.problem (text)")
    raw = label.get("steps") if isinstance(label, dict) else None
    if not isinstance(raw, list):
        raise RowError("PRM800K rows have label.steps (a list)")
    steps: list[str] = []
    flags: list[bool] = []
    for step in raw:
        comps = step.get("completions") if isinstance(step, dict) else None
        if not isinstance(comps, list) or not comps:
            break
        chosen = step.get("chosen_completion")
        if isinstance(chosen, int) and 0 <= chosen < len(comps):
            comp = comps[chosen]
        else:  # no chosen completion: the chain stops here, at a bad completion if one was rated so
            comp = next((c for c in comps if isinstance(c, dict) and c.get("rating") == -1), None)
            if comp is None:
                break
        rating = comp.get("rating") if isinstance(comp, dict) else None
        if rating not in (-1, 0, 1) or not isinstance(comp.get("text"), str):
            break  # unrated: the chain ends here
        steps.append(comp["text"])
        flags.append(rating != -1)  # neutral (0) counts as good
        if rating == -1:
            break
    return StepRow(_prompt_messages(problem), steps, flags)


def row_shape(row: Any) -> str | None:
    """Which step-wise shape a row has: trl, shepherd, prm800k, or None."""
    if not isinstance(row, dict):
        return None
    if "completions" in row and "labels" in row:
        return "trl"
    if isinstance(row.get("input"), str) and isinstance(row.get("label"), str):
        return "shepherd"
    if isinstance(row.get("question"), dict) and isinstance(row.get("label"), dict):
        return "prm800k"
    return None


def to_steps(row: Any) -> StepRow:
    """A step-wise row of any of the three shapes, validated; RowError with a short reason otherwise."""
    shape = row_shape(row)
    if shape is None:
        keys = ", ".join(sorted(map(str, row))) if isinstance(row, dict) else type(row).__name__
        raise RowError(
            f"not a step-wise row (keys: {keys}): expected {{prompt, completions, labels}}, Math-Shepherd's "
            "{input, label} or PRM800K's {question, label}"
        )
    out = {"trl": _trl, "shepherd": _shepherd, "prm800k": _prm800k}[shape](row)
    out.steps = [s.strip() if isinstance(s, str) else s for s in out.steps]
    for i, s in enumerate(out.steps):
        if not isinstance(s, str) or not s:
            raise RowError(f"step {i + 1} is empty or not text")
    if not out.steps:
        raise RowError("no step")
    return out


def join_steps(steps: list[str], separator: str) -> str:
    """The reply the steps make: each step followed by the separator."""
    return "".join(s + separator for s in steps)


def split_steps(text: str, separator: str) -> list[str]:
    """A completion's steps: split on the separator, stripped, empty pieces dropped (a separator "" keeps the
    whole text as one step)."""
    pieces = text.split(separator) if separator else [text]
    return [p.strip() for p in pieces if p.strip()]


def step_end_tokens(offsets: list[tuple[int, int]], char_ends: list[int]) -> list[int]:
    """For each character end (exclusive), the index of the token holding its last character: the last token
    that starts before it. offsets: each token's (start, end) characters; tokens without text are skipped.

    >>> step_end_tokens([(0, 2), (2, 3), (3, 5), (5, 6)], [3, 6])
    [1, 3]
    """
    out = []
    for end in char_ends:
        idx = max((i for i, (s, e) in enumerate(offsets) if e > s and s < end), default=-1)
        if idx < 0:
            raise RowError("a step has no token after rendering")
        out.append(idx)
    return out


def encode_steps(
    tokenizer: Any, template: str | None, prompt: list[dict], steps: list[str], separator: str, max_length: int | None
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and the steps as the reply, and each step's step-end token index (see the module
    docstring). Too long: the sequence keeps its first max_length tokens, and the steps that end after them are
    left out (RowError when none is left)."""
    reply = join_steps(steps, separator)
    messages = [*prompt, {"role": "assistant", "content": reply}]
    if template is not None:
        conv = to_conversation({"messages": messages}, "messages", None)
        text, spans = assistant_spans(tokenizer, template, conv)
        cursor = spans[-1][0]
        add_special = False
    else:  # a model without a chat template: the turns' texts joined by blank lines
        text = "\n\n".join(m["content"] for m in messages)
        cursor = len(text) - len(reply)
        add_special = True
    ends = []
    for i, step in enumerate(steps):
        pos = text.find(step, cursor)
        if pos < 0:
            raise RowError(f"could not find step {i + 1} in the rendered conversation (the chat template changed it)")
        end = pos + len(step)
        if separator and text.startswith(separator, end):
            end += len(separator)
        ends.append(end)
        cursor = end
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    positions = step_end_tokens([tuple(o) for o in enc["offset_mapping"]], ends)
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
        positions = [p for p in positions if p < max_length]
        if not positions:
            raise RowError(f"no step ends within max_length={max_length}")
    return ids, positions


def stepwise_encoder(tokenizer: Any, template: str, max_length: int, separator: str) -> Encoder:
    """Encoder for build_data: one Example per row, labels 1 (good) / 0 (bad) at the step ends, -100 elsewhere."""

    def encode(row: dict[str, Any], fmt: str, src: DataSource) -> list[Example]:
        if fmt != "stepwise":
            raise RowError(f"format {fmt} is not step-wise data: rm.loss process reads format stepwise")
        sr = to_steps(row)
        prompt = sr.prompt
        if src.system and not any(m.get("role") == "system" for m in prompt):
            prompt = [{"role": "system", "content": src.system}, *prompt]
        ids, positions = encode_steps(tokenizer, template, prompt, sr.steps, separator, max_length)
        labels = [IGNORE_INDEX] * len(ids)
        for p, good in zip(positions, sr.labels, strict=False):
            labels[p] = 1 if good else 0
        return [Example(input_ids=ids, labels=labels)]

    return encode


def conversation_of(row: StepRow, separator: str) -> Conversation:
    """The row as a conversation (its steps joined as the reply), for showing it."""
    reply = join_steps(row.steps, separator)
    return to_conversation({"messages": [*row.prompt, {"role": "assistant", "content": reply}]}, "messages", None)
