"""Preference pairs for ``llmtune eval --task preference``, read by the rm / dpo stages' reader
(``llmtune.data.preference``, format ``pairs``: ``{prompt, chosen, rejected}``, TRL's ``{chosen, rejected}``
conversations, LLaMA-Factory's ``{conversations, chosen: {from, value}, rejected: {...}}``, alpaca with
chosen / rejected), so eval scores exactly the pairs those stages train on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmtune.data.formats import RowError
from llmtune.data.preference import to_preference


@dataclass
class Pair:
    messages: list[dict]  # the prompt turns, ending with a user turn
    chosen: str
    rejected: str


def is_pair_row(row: Any) -> bool:
    return isinstance(row, dict) and "chosen" in row and "rejected" in row


def to_pair(row: dict, system: str | None = None) -> Pair:
    pref = to_preference(row, "pairs", system)
    if len(pref.conversations) != 2:
        raise RowError("not a pair: expected a chosen and a rejected reply")
    return Pair(pref.conversations[0].messages[:-1], *pref.responses)
