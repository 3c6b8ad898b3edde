"""Preference data: the row shapes users bring -> a prompt and responses -> token sequences -> pair batches.

Formats (``format:`` of a data source; rm and dpo pick the one their loss reads when it is omitted):

- ``pairs``: ``{prompt, chosen, rejected}`` with a text prompt or a message list, and text, ``{role, content}``
  / ``{from, value}`` or one-message-list responses; TRL's ``{chosen, rejected}`` full conversations (the
  prompt is the shared part); LLaMA-Factory's ``{conversations, chosen: {from, value}, rejected: {...}}``;
  alpaca ``{instruction, input, chosen, rejected}``; Anthropic HH-RLHF's raw ``{chosen, rejected}`` strings of
  ``"\n\nHuman: ...\n\nAssistant: ..."`` turns (parsed into turns; the prompt is the turns they share);
  any other ``{chosen, rejected}`` strings without a prompt column: their shared start (cut at a word
  boundary) is the prompt. An optional numeric ``margin`` column (rm).
- ``ranked``: ``{prompt, responses: [...]}``, best first.
- ``pointwise``: ``{prompt, response, score}`` (or ``{messages, score}``, the last message the response).
- ``unpaired`` (KTO): ``{prompt, completion, label: bool}`` or ``{messages, label}``. KTO also reads
  ``pairs`` rows: the chosen reply becomes a desirable example, the rejected one an undesirable example.

``system`` / ``tools`` columns work as in the conversation formats. Rows with an empty or a repeated
response are dropped with a reason (counted in the data summary). Every response is rendered after the
prompt with the chat template; labels cover the last assistant reply only (with its end-of-turn text).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any

from llmtune.data.chat import IGNORE_INDEX, assistant_spans
from llmtune.data.formats import Conversation, RowError, to_conversation
from llmtune.data.pipeline import Encoder, Example
from llmtune.recipe.data import PREFERENCE_FORMATS, DataSource

_PROMPT_KEYS = ("prompt", "conversations", "instruction", "messages", "question")


@dataclass
class PreferenceRow:
    """A preference row in canonical form: conversations that share a prompt and differ in the last reply.

    ``conversations``: one per response, in preference order (pairs: chosen, rejected; ranked: best first;
    pointwise / unpaired: one). ``value``: the margin (pairs, 0 when absent), score (pointwise) or label
    (unpaired: 1.0 desirable, 0.0 not).
    """

    conversations: list[Conversation]
    value: float | None = None

    @property
    def responses(self) -> list[str]:
        return [c.messages[-1]["content"] for c in self.conversations]


# --- rows -> canonical ------------------------------------------------------------------------------------------


def to_preference(row: Any, fmt: str, default_system: str | None = None) -> PreferenceRow:
    """Convert a row of a preference format; raises RowError with a short reason for an unusable row."""
    if not isinstance(row, dict):
        raise RowError(f"row is not an object (got {type(row).__name__})")
    if fmt == "pairs":
        return _pairs(row, default_system)
    if fmt == "ranked":
        return _ranked(row, default_system)
    if fmt == "pointwise":
        return _single(row, ("response", "completion"), "score", default_system)
    if fmt == "unpaired":
        return _single(row, ("completion", "response"), "label", default_system)
    raise RowError(f"format {fmt} is not preference data: use one of {', '.join(PREFERENCE_FORMATS)}")


def detect_preference_format(rows: list[dict]) -> str | None:
    """The preference format of the first rows' keys (stepwise: a PRM's step-wise rows), or None when they are
    not preference data."""
    for row in rows[:20]:
        if not isinstance(row, dict):
            continue
        if "chosen" in row and "rejected" in row:
            return "pairs"
        if ("completions" in row and "labels" in row) or (
            isinstance(row.get("label"), (str, dict)) and ("input" in row or isinstance(row.get("question"), dict))
        ):
            return "stepwise"  # process reward model rows (llmtune.data.stepwise)
        if "responses" in row:
            return "ranked"
        if "score" in row:
            return "pointwise"
        if "label" in row and ("completion" in row or "messages" in row or "conversations" in row):
            return "unpaired"
    return None


def _text(value: Any, what: str) -> str:
    """A response given as text, {role, content} / {from, value}, or a one-message list."""
    if isinstance(value, list):
        if len(value) != 1:
            raise RowError(f"{what} is a list of {len(value)} messages; expected one assistant reply")
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from", "assistant"))
        if str(role).lower() not in ("assistant", "gpt", "model", "function_call"):
            raise RowError(f"{what} is a message from {role!r}, not from the assistant")
        value = value.get("content", value.get("value"))
    if value is None:
        raise RowError(f"empty {what} response")
    if not isinstance(value, str):
        raise RowError(f"{what} is not text (got {type(value).__name__})")
    if not value.strip():
        raise RowError(f"empty {what} response")
    return value


def _with_response(row: dict, response: str, default_system: str | None) -> Conversation:
    """The row's prompt (prompt / conversations / instruction) followed by one assistant reply, validated."""
    if isinstance(row.get("conversations"), list):
        conv_row = {**row, "conversations": [*row["conversations"], {"from": "gpt", "value": response}]}
        return to_conversation(conv_row, "sharegpt", default_system)
    if "instruction" in row:
        return to_conversation({**row, "output": response}, "alpaca", default_system)
    prompt = row.get("prompt", row.get("question"))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("empty prompt")
        messages: list[Any] = [{"role": "user", "content": prompt}]
        system = row.get("system")
        if isinstance(system, str) and system.strip():
            messages.insert(0, {"role": "system", "content": system})
    elif isinstance(prompt, list):
        messages = list(prompt)
    elif prompt is None:
        raise RowError(f"no prompt: expected one of the keys {', '.join(_PROMPT_KEYS[:3])}")
    else:
        raise RowError(f"'prompt' is not text or a message list (got {type(prompt).__name__})")
    messages.append({"role": "assistant", "content": response})
    return to_conversation({"messages": messages, "tools": row.get("tools")}, "messages", default_system)


def _last_reply(row: dict, key: str, default_system: str | None) -> Conversation:
    """A full conversation (messages / conversations) whose last message is the response."""
    conv = to_conversation(row, "messages" if key == "messages" else "sharegpt", default_system)
    if conv.messages[-1]["role"] != "assistant":
        raise RowError(f"the last message of '{key}' is from the {conv.messages[-1]['role']}, not the assistant")
    return conv


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def is_hh_dialogue(text: Any) -> bool:
    """True for Anthropic HH-RLHF's raw dialogue text: "\\n\\nHuman: ...\\n\\nAssistant: ..." turns."""
    return isinstance(text, str) and text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


def hh_messages(text: str, what: str = "dialogue") -> list[dict]:
    """The turns of an HH-RLHF dialogue as ``{role, content}`` messages (Human: user, Assistant: assistant),
    their text stripped. An empty turn stays (validation names it); text before the first turn is refused."""
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip():
        raise RowError(f"{what}: text before the first 'Human:' turn of an HH-RLHF dialogue")
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two texts without a prompt column: the prompt is their
    shared start, cut back to a word boundary so that no word is split, with a non-empty reply on each
    side. Raises RowError when they share no such start."""
    k = next(
        (i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), min(len(chosen), len(rejected))
    )

    def mid_word(i: int) -> bool:
        return chosen[i - 1].isalnum() and (chosen[i : i + 1].isalnum() or rejected[i : i + 1].isalnum())

    while k > 0 and (mid_word(k) or not chosen[k:].strip() or not rejected[k:].strip()):
        k -= 1
    prompt = chosen[:k].strip()
    if not prompt:
        raise RowError(
            "no prompt: the row has no prompt column (prompt, conversations, instruction, messages) and chosen "
            "and rejected share no start to take as the prompt"
        )
    return prompt, chosen[k:].strip(), rejected[k:].strip()


def _implicit_prompt(row: dict, chosen: list, rejected: list, default_system: str | None) -> list[Conversation]:
    """Two full conversations (TRL's implicit prompt, or parsed HH-RLHF dialogues) whose shared turns are
    the prompt: they must differ only in their last reply."""
    convs = []
    for what, messages in (("chosen", chosen), ("rejected", rejected)):
        try:
            convs.append(_last_reply({"messages": messages, "tools": row.get("tools")}, "messages", default_system))
        except RowError as e:
            raise RowError(f"{what}: {e}") from None
    a, b = convs[0].messages, convs[1].messages
    if a[:-1] != b[:-1]:
        turn = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)) - 1)
        raise RowError(
            f"chosen and rejected differ before their last reply (at turn {turn + 1}; chosen has {len(a)} turns, "
            f"rejected {len(b)}): the prompt is the turns they share, and only the last reply may differ"
        )
    return convs


def pairs_shape(row: Any) -> str:
    """Which of the pairs shapes a row has, in words (for ``llmtune data inspect``)."""
    if not isinstance(row, dict) or "chosen" not in row:
        return "something else (no chosen key)"
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if any(k in row for k in _PROMPT_KEYS):
        key = next(k for k in _PROMPT_KEYS if k in row)
        return f"{key} + chosen + rejected"
    if isinstance(chosen, str) and (is_hh_dialogue(chosen) or is_hh_dialogue(rejected)):
        return "Anthropic HH-RLHF dialogues (the turns chosen and rejected share are the prompt)"
    if isinstance(chosen, list):
        return "full conversations (TRL's implicit prompt: the turns chosen and rejected share)"
    return "chosen + rejected texts without a prompt (their shared start is the prompt)"


def _pairs(row: dict, default_system: str | None) -> PreferenceRow:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(f"missing key '{key}'")
    chosen, rejected = row["chosen"], row["rejected"]
    has_prompt = any(k in row for k in _PROMPT_KEYS)
    if not has_prompt and isinstance(chosen, str) and isinstance(rejected, str):
        if is_hh_dialogue(chosen) or is_hh_dialogue(rejected):  # Anthropic HH-RLHF's raw shape
            chosen, rejected = hh_messages(chosen, "chosen"), hh_messages(rejected, "rejected")
        elif chosen.strip() != rejected.strip() and chosen.strip() and rejected.strip():
            prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
            row = {**row, "prompt": prompt}
    convs: list[Conversation] = []
    if not has_prompt and isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1:
        # TRL's implicit prompt: two full conversations that differ only in the last reply
        convs = _implicit_prompt(row, chosen, rejected, default_system)
        texts = [c.messages[-1]["content"] for c in convs]
    else:
        texts = [_text(chosen, "chosen"), _text(rejected, "rejected")]
    if texts[0].strip() == texts[1].strip():
        raise RowError("chosen and rejected are identical")
    if not convs:
        convs = [_with_response(row, t, default_system) for t in texts]
    margin = row.get("margin")
    if margin is not None:
        _check_number(margin, "margin")
    return PreferenceRow(convs, float(margin or 0.0))


LARGEST_VALUE = 1e6  # a margin or score beyond this overflows the losses: rescale the column


def _check_number(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RowError(f"'{key}' is not a number (got {value!r})")
    if not math.isfinite(value):
        raise RowError(f"'{key}' is not a finite number (got {value!r})")
    if abs(value) > LARGEST_VALUE:
        raise RowError(f"'{key}' is beyond +-{LARGEST_VALUE:g} (got {value!r}): rescale the column")


def _ranked(row: dict, default_system: str | None) -> PreferenceRow:
    if "chosen" in row and "rejected" in row:  # a pair is a ranking of two
        return _pairs(row, default_system)
    responses = row.get("responses")
    if not isinstance(responses, list):
        raise RowError("missing key 'responses' (a list, best first)")
    texts = [_text(r, f"responses[{i}]") for i, r in enumerate(responses)]
    if len(texts) < 2:
        raise RowError("fewer than 2 responses to rank")
    if len({t.strip() for t in texts}) < len(texts):
        raise RowError("two ranked responses are identical")
    return PreferenceRow([_with_response(row, t, default_system) for t in texts])


def _single(row: dict, keys: tuple[str, ...], value_key: str, default_system: str | None) -> PreferenceRow:
    if value_key not in row:
        raise RowError(f"missing key '{value_key}'")
    value = row[value_key]
    if value_key == "label":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not (isinstance(value, bool) or value in (0, 1)):
            raise RowError(f"'label' is not true / false (got {value!r})")
        number = 1.0 if value else 0.0
    else:
        _check_number(value, value_key)
        number = float(value)
    key = next((k for k in keys if k in row), None)
    if key is not None:
        conv = _with_response(row, _text(row[key], key), default_system)
    elif isinstance(row.get("messages"), list):
        conv = _last_reply(row, "messages", default_system)
    elif isinstance(row.get("conversations"), list):
        conv = _last_reply(row, "conversations", default_system)
    else:
        raise RowError(f"missing key '{keys[0]}' (or 'messages' ending with the reply)")
    return PreferenceRow([conv], number)


# --- canonical -> tokens ----------------------------------------------------------------------------------------


def encode_reply(tokenizer: Any, template: str, conv: Conversation, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels on its last assistant reply only.

    Too long: the prompt is cut from the left so that the whole reply stays; a reply longer than
    max_length keeps its start after the last max_length // 2 prompt tokens.
    """
    text, spans = assistant_spans(tokenizer, template, conv)
    start, end = spans[-1]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [
        tok if e > start and s < end else IGNORE_INDEX for tok, (s, e) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    learned = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
    if not learned:
        raise RowError("the reply has no token after rendering")
    if len(ids) > max_length:
        first = learned[0]
        if len(ids) - first <= max_length - 1:  # keep the whole reply (and what follows), cut the prompt's start
            cut = len(ids) - max_length
        else:  # keep some prompt, then as much of the reply as fits
            cut = max(0, first - max_length // 2)
        ids, labels = ids[cut : cut + max_length], labels[cut : cut + max_length]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        raise RowError(f"no trainable token left after truncation to max_length={max_length}")
    return ids, labels


def preference_encoder(tokenizer: Any, template: str, max_length: int, unpair: bool = False) -> Encoder:
    """Encoder for build_data: one Example per row holding one sequence per response (Example.parts).

    unpair (KTO): a pairs row becomes two unpaired examples, its chosen reply desirable (label 1) and its
    rejected reply undesirable (label 0)."""

    def encode(row: dict[str, Any], fmt: str, src: DataSource) -> list[Example]:
        is_pair = fmt == "pairs" or (fmt == "unpaired" and "label" not in row and {"chosen", "rejected"} <= set(row))
        if unpair and is_pair:
            pair = to_preference(row, "pairs", default_system=src.system)
            examples = []
            for conv, label in zip(pair.conversations, (1.0, 0.0), strict=True):
                ids, labels = encode_reply(tokenizer, template, conv, max_length)
                examples.append(Example(input_ids=ids, labels=labels, parts=[len(ids)], values=[label]))
            return examples
        pref = to_preference(row, fmt, default_system=src.system)
        seqs = [encode_reply(tokenizer, template, c, max_length) for c in pref.conversations]
        return [
            Example(
                input_ids=[t for ids, _ in seqs for t in ids],
                labels=[t for _, lab in seqs for t in lab],
                parts=[len(ids) for ids, _ in seqs],
                values=None if pref.value is None else [pref.value],
            )
        ]

    return encode


# --- samples and batches ----------------------------------------------------------------------------------------


@dataclass
class PreferenceSample:
    """One preference row ready to batch: its responses' token sequences one after the other (``parts``
    gives their lengths, in preference order), the row's value (margin / score / label) and, once computed,
    the reference log-prob of each response."""

    input_ids: list[int]
    labels: list[int]
    parts: list[int]
    value: float = 0.0
    ref_logps: list[float] | None = None

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) of each response."""
        out, start = [], 0
        for n in self.parts:
            out.append((self.input_ids[start : start + n], self.labels[start : start + n]))
            start += n
        return out

    @property
    def longest(self) -> int:
        """The longest sequence the model sees: the prompt and the longer reply (input_ids hold them all)."""
        return max(self.parts) if self.parts else len(self.input_ids)


def as_preference_samples(examples: list[Example]) -> list[PreferenceSample]:
    return [
        PreferenceSample(
            input_ids=e.input_ids,
            labels=e.labels,
            parts=list(e.parts or [len(e.input_ids)]),
            value=e.values[0] if e.values else 0.0,
        )
        for e in examples
    ]


def collate_preference(samples: list[PreferenceSample], pad_id: int, pad_to_multiple: int = 8) -> dict[str, Any]:
    """Stack every response of every row into one right-padded batch, response-major: for pairs, the B chosen
    rows come first and the B rejected rows after them (2B rows, one forward pass).

    Keys: input_ids, attention_mask, labels (N, T); group (N,) the row each sequence belongs to; rank (N,) its
    position in the row's order; value (B,) the rows' margins / scores / labels; ref_logps (N,) when every
    sample carries them.
    """
    import torch

    seqs = [s.sequences() for s in samples]
    k_max = max(len(s.parts) for s in samples)
    order = [(b, r) for r in range(k_max) for b, s in enumerate(samples) if r < len(s.parts)]
    longest = max(len(seqs[b][r][0]) for b, r in order)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    n = len(order)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (b, r) in enumerate(order):
        seq, lab = seqs[b][r]
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(seq)] = torch.tensor(lab)
        mask[i, : len(seq)] = 1
    batch: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "group": torch.tensor([b for b, _ in order], dtype=torch.long),
        "rank": torch.tensor([r for _, r in order], dtype=torch.long),
        "value": torch.tensor([s.value for s in samples], dtype=torch.float32),
    }
    if all(s.ref_logps is not None for s in samples):
        batch["ref_logps"] = torch.tensor([samples[b].ref_logps[r] for b, r in order], dtype=torch.float32)  # type: ignore[index]
    return batch


def build_preference_data(recipe: Any, tokenizer: Any, template: str, settings: str, default_format: str) -> Any:
    """Train / eval PreferenceSamples of a recipe (tokenized once and cached, like the other stages' data)."""
    from llmtune.data.pipeline import build_data

    bundle = build_data(
        recipe,
        preference_encoder(tokenizer, template, recipe.data.max_length, unpair=default_format == "unpaired"),
        settings,
        default_format,
    )
    return as_preference_samples(bundle.train), as_preference_samples(bundle.eval), bundle.reports
