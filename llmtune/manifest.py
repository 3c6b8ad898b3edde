"""run.json: the typed record of a run in its output directory (what ran, on what, how it ended, and the
vocabulary it trained with). Training writes it; resume planning, the unfinished-run checks, the tokenizer
checks of later stages and rejection sampling's rounds read it back with `RunManifest.read`.

Reading is tolerant, field by field: a run.json from another version, or one edited by hand, keeps the
fields that have the right type and leaves the others unset (None), so one bad field does not hide the rest.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from llmtune.errors import UserError

FILE = "run.json"
STATUSES = ("running", "stopped", "failed", "finished")


@dataclass(frozen=True)
class TokenizerRecord:
    """A fingerprint of a tokenizer's vocabulary: the number of ids and the sha256 over the id-ordered token
    strings (llmtune.model.tokenizer.tokenizer_record makes it, check_tokenizer_record compares against it)."""

    size: int
    vocab_sha256: str

    @classmethod
    def parse(cls, value: Any) -> TokenizerRecord | None:
        if not isinstance(value, dict):
            return None
        size, sha = value.get("size"), value.get("vocab_sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or not isinstance(sha, str):
            return None
        return cls(size, sha)


@dataclass
class RunManifest:
    """run.json. status: running | stopped | failed | finished (another value read back is kept as it is:
    it is not finished)."""

    llmtune: str | None = None
    stage: str | None = None
    status: str | None = "running"
    started: str | None = None
    finished: str | None = None
    torch: str | None = None
    deepspeed: str | None = None
    world_size: int | None = None
    device: str | None = None
    total_steps: int | None = None  # the optimizer steps planned
    steps: int | None = None  # the optimizer steps done, at the finish
    epochs: float | None = None  # the passes over the training data done, at the finish (2.0: two whole epochs)
    rounds: int | None = None  # rejection sampling: its rounds
    tokenizer: TokenizerRecord | None = None  # later stages check the tokenizer they load against it
    trainer_state: dict[str, Any] | None = None  # the counters at the finish (engine.checkpoint.TrainerState)
    peak_memory: dict[str, float] | None = None  # engine.memory.peak_memory at the end (finished or not), in GB

    @property
    def is_finished(self) -> bool:
        return self.status == "finished"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def write(self, out: Path) -> None:
        """Write out/run.json atomically (a reader never sees half a file)."""
        tmp = out / (FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")
        os.replace(tmp, out / FILE)

    @classmethod
    def read(cls, path: str | Path | None) -> RunManifest | None:
        """The run.json of a local llmtune output directory; None when there is none, or it is not a JSON
        object. Fields of the wrong type are left unset."""
        from llmtune.paths import looks_local

        if not path or not looks_local(str(path)):
            return None
        try:
            raw = json.loads((Path(path).expanduser() / FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict):
            return None
        values: dict[str, Any] = {f.name: None for f in fields(cls)}
        for name in values:
            value = raw.get(name)
            if name == "tokenizer":
                values[name] = TokenizerRecord.parse(value)
            elif name == "trainer_state":
                values[name] = value if isinstance(value, dict) else None
            elif name == "epochs":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                values[name] = float(value) if ok else None
            elif name in ("world_size", "total_steps", "steps", "rounds"):
                values[name] = value if isinstance(value, int) and not isinstance(value, bool) else None
            else:
                values[name] = value if isinstance(value, str) else None
        return cls(**values)


def status_of(path: str | Path | None) -> str | None:
    """The status run.json records in a directory; None when it is no llmtune output or records none."""
    m = RunManifest.read(path)
    return None if m is None else m.status


def unfinished_run(path: str | None) -> str | None:
    """The run.json status of an llmtune output directory whose run has not finished (running, failed,
    stopped); None for a finished run and for anything that is not an llmtune output."""
    status = status_of(path)
    return None if status in (None, "finished") else str(status)


def check_finished(path: str | None, what: str) -> None:
    """A model input that is an llmtune run must have finished: until then its top-level weights are
    missing, or stale ones of an earlier run."""
    status = unfinished_run(path)
    if status is not None:
        raise UserError(
            f"{what} {path} is an llmtune run that has not finished (run.json status: {status}): "
            "the model there is missing or out of date",
            hint="finish that run first (the same `llmtune train` command resumes it), or point to a finished run",
        )
