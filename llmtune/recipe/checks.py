"""Checks of what a recipe names on disk (data files, model directory, template file). No torch."""

from __future__ import annotations

from pathlib import Path

from llmtune.errors import DataError, RecipeError
from llmtune.recipe.schema import RecipeBase, looks_local

BUILTIN_TEMPLATES = ("chatml", "llama3", "alpaca")


def check_paths(recipe: RecipeBase) -> list[str]:
    """Raise a clear error for a missing local file; return notes about names taken as hub ids."""
    notes: list[str] = []
    for group, sources in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        for i, src in enumerate(sources):
            if looks_local(src.path):
                p = Path(src.path).expanduser()
                if not p.exists():
                    raise DataError(
                        f"data.{group}.{i}.path: {src.path} does not exist (looked in {p.resolve().parent})",
                        hint="fix the path (relative paths are taken from the directory you run llmtune in)",
                    )
            else:
                notes.append(f"data.{group}.{i}.path {src.path!r} is not a local file: it is loaded as a hub dataset")
    m = recipe.model
    models = [("model.path", m.path), ("model.tokenizer", m.tokenizer)]
    dpo = getattr(recipe, "dpo", None)
    if dpo is not None:
        models.append(("dpo.reference", dpo.reference))
    for key, value in models:
        if value is None:
            continue
        if looks_local(value) and not Path(value).expanduser().exists():
            raise RecipeError(
                f"{key}: {value} does not exist",
                hint="give a local model directory (with config.json) or a hub id such as Qwen/Qwen2.5-0.5B",
            )
        if not looks_local(value):
            notes.append(f"{key} {value!r} is not a local directory: it is loaded from the hub")
    tpl = m.chat_template
    if tpl is not None and tpl not in BUILTIN_TEMPLATES and not Path(tpl).expanduser().is_file():
        raise RecipeError(
            f"model.chat_template: {tpl!r} is neither a built-in template nor an existing file",
            hint=f"use one of {', '.join(BUILTIN_TEMPLATES)}, a path to a .jinja file, or null for the tokenizer's own",
        )
    return notes
