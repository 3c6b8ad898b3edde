"""``llmtune init STAGE``: a stage's starter recipe (llmtune.recipe.starter) printed, or written to a file."""

from __future__ import annotations

import sys
from pathlib import Path

from llmtune.errors import UserError
from llmtune.paths import check_path_lengths
from llmtune.recipe.starter import render


def init_command(stage: str, model: str | None, out: Path | None, force: bool) -> None:
    check_path_lengths(("--out", out))
    text = render(stage, model)
    if out is None:
        sys.stdout.write(text)
        return
    if out.is_dir():
        raise UserError(f"--out {out} is a directory", hint=f"name a file, e.g. {out / (stage + '.yaml')}")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists", hint="pass --force to replace it, or choose another file")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}; check it with: llmtune validate {out}")
