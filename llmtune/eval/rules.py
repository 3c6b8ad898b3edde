"""Rule rewards: ``(completion, answer) -> float``. Built-ins: exact_match, contains, gsm8k (1.0 / 0.0
against the row's answer), regex:PATTERN (1.0 when the completion matches); or ``module:function``, any
importable function with that signature."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from llmtune.errors import UserError
from llmtune.eval import metrics

Rule = Callable[[str, "str | None"], float]
BUILTIN_RULES = ("exact_match", "contains", "gsm8k", "regex:PATTERN")
_NEEDS_ANSWER = {"exact_match": metrics.exact_match, "contains": metrics.contains, "gsm8k": metrics.gsm8k_match}


def get_rule(spec: str) -> tuple[Rule, bool]:
    """The rule named ``spec`` and whether it needs each row's ``answer``."""
    if spec in _NEEDS_ANSWER:
        fn = _NEEDS_ANSWER[spec]
        return (lambda completion, answer: float(fn(completion, answer or ""))), True
    if spec.startswith("regex:"):
        import re

        pattern = spec[len("regex:") :]
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise UserError(f"rule {spec!r}: not a valid regular expression ({e})") from None
        return (lambda completion, answer: float(compiled.search(completion) is not None)), False
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UserError(f"unknown rule {spec!r}", hint=f"use one of {', '.join(BUILTIN_RULES)}, or module:function")
    import warnings

    warnings.warn(f"rule {spec}: running Python code from module {module} (trust_reward_code is on)", stacklevel=2)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"rule {spec!r} cannot be imported: {e}", hint="check the module is on PYTHONPATH") from None
    return (lambda completion, answer: float(fn(completion, answer))), False
