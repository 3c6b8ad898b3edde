"""Errors that reach the user as a message (exit 2) rather than a traceback."""

from __future__ import annotations

import signal
from pathlib import Path


class LlmtuneError(Exception):
    """An error the CLI reports as ``error: <message>`` with ``exit_code``, without a traceback."""

    exit_code = 1


class UserError(LlmtuneError):
    """A problem with the recipe, the data, the arguments or the environment that the user can fix.

    The CLI prints ``error: <message>`` and exits with ``exit_code`` (2), without a traceback.
    Messages name the problem and the fix.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class RecipeError(UserError):
    """The recipe file or an override is invalid."""


class DataError(UserError):
    """A data file is missing, unreadable, or yields nothing to train on."""


class RolloutInterrupted(Exception):
    """A stop (SIGTERM, Ctrl-C) arrived while an online stage was sampling between two optimizer steps: the
    rollout is dropped and the trainer checkpoints the last finished step (llmtune.engine.trainer)."""


class StepInterrupted(Exception):
    """A stop (SIGTERM, Ctrl-C) arrived on a one-process run between two micro-batches of an optimizer step:
    the step is dropped before its update and the trainer checkpoints the last finished step."""


class TrainingError(LlmtuneError):
    """Training stopped for a reason found at run time (NaN loss, ...). Exit code 1; finished work is kept."""

    exit_code = 1


class Stopped(TrainingError):
    """Stopped on request with a checkpoint written: exit 128 + the signal number (130 Ctrl-C, 143 SIGTERM)."""

    label = "stopped"

    def __init__(self, signum: int, step: int, ckpt: Path) -> None:
        self.exit_code = 128 + signum
        super().__init__(
            f"by {signal.Signals(signum).name} after step {step}; checkpoint {ckpt} written\n"
            "  to continue: run the same command again (it resumes from there)"
        )
