"""Answer metrics for generations: pure string functions, no model.

Normalisation (exact match, contains): lowercase, whitespace collapsed, surrounding punctuation and
quotes stripped. GSM8K: the gold is the number after the answer's final ``####``; a prediction's
answer is the number after its final ``####``, else its last number; numbers compare by value.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_STRIP = " \t\n.,;:!?\"'`()[]{}"


def normalize(text: str) -> str:
    """
    >>> normalize('  The  Answer is 42. ')
    'the answer is 42'
    """
    return " ".join(text.lower().split()).strip(_STRIP)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def contains(prediction: str, answer: str) -> bool:
    gold = normalize(answer)
    return bool(gold) and gold in normalize(prediction)


def regex_extract(text: str, pattern: str) -> str | None:
    """The first match of ``pattern`` in text: its first capture group if it has groups, else the match."""
    m = re.search(pattern, text)
    if m is None:
        return None
    return m.group(1) if m.re.groups else m.group(0)


def regex_match(prediction: str, answer: str, pattern: str) -> bool:
    """The answer extracted from the prediction by ``pattern`` equals the reference (normalised)."""
    got = regex_extract(prediction, pattern)
    return got is not None and normalize(got) == normalize(answer)


def _number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None


def gsm8k_gold(answer: str) -> str:
    """GSM8K reference answer -> the final number after ``####`` (the whole text if there is none)."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer.strip()


def gsm8k_extract(text: str) -> str | None:
    """The answer a generation gives: after its final ``####`` if present, else its last number."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        nums = _NUMBER.findall(tail)
        return nums[0].replace(",", "").replace("$", "") if nums else None
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "").replace("$", "").rstrip(".") if nums else None


def gsm8k_match(prediction: str, answer: str) -> bool:
    got, gold = gsm8k_extract(prediction), gsm8k_gold(answer)
    if got is None:
        return False
    a, b = _number(got), _number(gold)
    if a is not None and b is not None:
        return a == b
    return normalize(got) == normalize(gold)


def win_tie_loss(scores_a: list[float], scores_b: list[float], tie_margin: float = 0.0) -> tuple[int, int, int]:
    """Counts of a > b + margin (win), |a - b| <= margin (tie), a < b - margin (loss)."""
    if len(scores_a) != len(scores_b):
        raise ValueError("score lists differ in length")
    win = sum(1 for a, b in zip(scores_a, scores_b, strict=True) if a - b > tie_margin)
    loss = sum(1 for a, b in zip(scores_a, scores_b, strict=True) if b - a > tie_margin)
    return win, len(scores_a) - win - loss, loss


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0, 0 for an empty list)."""
    if not xs:
        return 0.0, 0.0
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


def is_repetitive(text: str) -> bool:
    """A reply caught in a loop: of its 3-word sequences fewer than half are distinct (at least 12 words),
    or, for text written without spaces, of its 4-character sequences (at least 48 characters).

    >>> is_repetitive("the cat sat on the mat " * 3), is_repetitive("one two three four five six seven eight nine ten eleven twelve")
    (True, False)
    """
    words = text.split()
    if len(words) >= 12:
        grams = list(zip(words, words[1:], words[2:], strict=False))
    else:
        chars = "".join(words)
        if len(chars) < 48:
            return False
        grams = [chars[i : i + 4] for i in range(len(chars) - 3)]  # type: ignore[misc]
    return len(set(grams)) < 0.5 * len(grams)


def degenerate(text: str, ended: bool) -> str | None:
    """Why a reply is degenerate, or None: "empty" (nothing but whitespace), "repeated" (a loop, see
    is_repetitive) or "truncated" (cut at the token limit, never ended): how a model wins by saying nothing,
    by looping or by never stopping.

    >>> degenerate(" ", True), degenerate("the cat sat " * 6, False), degenerate("Paris", False), degenerate("Paris.", True)
    ('empty', 'repeated', 'truncated', None)
    """
    if not text.strip():
        return "empty"
    if is_repetitive(text):
        return "repeated"
    if not ended:
        return "truncated"
    return None
