"""Rule rewards: ``(completion, answer) -> float``, pure Python, no model.

Built-ins:

- ``exact_match``: 1.0 when the completion equals the row's answer (lowercased, whitespace collapsed,
  surrounding punctuation stripped), else 0.0
- ``contains``: 1.0 when the (normalised) answer occurs in the completion
- ``gsm8k``: 1.0 when the completion's final answer (the number after its last ``####``, else its last
  number) equals the number after the answer's ``####``, compared by value
- ``regex:PATTERN``: 1.0 when PATTERN (Python ``re``) matches anywhere in the completion; needs no answer
- ``length_penalty:N``: ``-max(0, len(completion) - N) / N`` with N characters: 0 up to N characters, then
  -1 per N characters over (-0.5 at 1.5 N); needs no answer. Mix it with another source to discourage rambling.
- ``module:function``: any importable ``function(completion, answer) -> float``. It runs that module's code,
  so it is refused unless asked for (``--trust-reward-code``).

The answer a rule sees is the row's ``answer`` with a GSM8K-style ``#### <number>`` reduced to the number
(see :func:`reference_answer`); rules that need an answer (exact_match, contains, gsm8k) refuse rows without one.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

from llmtune.errors import UserError
from llmtune.rewards import metrics

Rule = Callable[[str, "str | None"], float]
BUILTIN_RULES = ("exact_match", "contains", "gsm8k", "regex:PATTERN", "length_penalty:N")
_NEEDS_ANSWER = {"exact_match": metrics.exact_match, "contains": metrics.contains, "gsm8k": metrics.gsm8k_match}
_PARAMETRISED = ("regex:", "length_penalty:")
TRUST_HINT = "pass --trust-reward-code (trust_reward_code: true in an eval file) to allow module:function rules"


def reference_answer(answer: str) -> str:
    """What rules compare against: a GSM8K answer (``... #### 42``) reduced to its final number, else as is."""
    return metrics.gsm8k_gold(answer) if "####" in answer else answer


def is_code_rule(spec: str) -> bool:
    """Whether ``spec`` names user code (``module:function``) rather than a built-in rule."""
    return ":" in spec and not spec.startswith(_PARAMETRISED)


def needs_answer(spec: str) -> bool:
    """Whether the built-in rule ``spec`` scores against the row's answer (module:function rules may use it)."""
    return spec in _NEEDS_ANSWER


def rule_range(spec: str) -> tuple[float, float] | None:
    """The (lowest, highest) score the built-in rule ``spec`` gives, or None when it is not known (user code)."""
    if spec in _NEEDS_ANSWER or spec.startswith("regex:"):
        return 0.0, 1.0
    if spec.startswith("length_penalty:"):
        return -math.inf, 0.0
    return None


def _unknown(spec: str) -> UserError:
    return UserError(
        f"unknown rule {spec!r}", hint=f"use one of {', '.join(BUILTIN_RULES)}, or module:function (your own code)"
    )


def _length_limit(spec: str) -> int:
    raw = spec[len("length_penalty:") :]
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n <= 0:
        raise UserError(
            f"rule {spec!r}: the length must be a positive whole number of characters, not {raw!r}",
            hint="e.g. length_penalty:500",
        )
    return n


def _compile(spec: str) -> re.Pattern[str]:
    try:
        return re.compile(spec[len("regex:") :])
    except re.error as e:
        raise UserError(f"rule {spec!r}: not a valid regular expression ({e})", hint="fix the pattern") from None


def check_rule(spec: str, *, trust_code: bool) -> None:
    """Raise a UserError for a rule that cannot run, without running or importing anything: an unknown name,
    a bad regex or length, or module:function without ``trust_code``."""
    if spec in _NEEDS_ANSWER:
        return
    if spec.startswith("regex:"):
        _compile(spec)
        return
    if spec.startswith("length_penalty:"):
        _length_limit(spec)
        return
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise _unknown(spec)
    if not trust_code:
        raise UserError(
            f"rule {spec!r} imports and runs Python code from module {module!r}; that happens only when asked for",
            hint=TRUST_HINT,
        )


def get_rule(spec: str, *, trust_code: bool) -> tuple[Rule, bool]:
    """The rule named ``spec`` and whether it needs each row's ``answer``. A module:function rule is imported
    only with ``trust_code`` (and then with a warning)."""
    check_rule(spec, trust_code=trust_code)
    if spec in _NEEDS_ANSWER:
        fn = _NEEDS_ANSWER[spec]
        return (lambda completion, answer: float(fn(completion, answer or ""))), True
    if spec.startswith("regex:"):
        compiled = _compile(spec)
        return (lambda completion, answer: float(compiled.search(completion) is not None)), False
    if spec.startswith("length_penalty:"):
        limit = _length_limit(spec)
        return (lambda completion, answer: -max(0, len(completion) - limit) / limit), False
    module, _, name = spec.partition(":")
    import warnings

    warnings.warn(f"rule {spec}: running Python code from module {module} (trust_reward_code is on)", stacklevel=2)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"rule {spec!r} cannot be imported: {e}", hint="check the module is on PYTHONPATH") from None
    if not callable(fn):
        raise UserError(f"rule {spec!r}: {module}.{name} is not a function", hint="name a function(completion, answer)")
    return (lambda completion, answer: float(fn(completion, answer))), False
