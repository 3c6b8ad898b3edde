"""Checks of what a recipe names on disk (data files, model directory, template file). No torch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmtune.errors import DataError, RecipeError, UserError
from llmtune.recipe.schema import RecipeBase, looks_local

BUILTIN_TEMPLATES = ("chatml", "llama3", "alpaca")


def run_manifest(path: str | Path | None) -> dict[str, Any]:
    """The run.json of a local llmtune output directory; {} when there is none or it cannot be read."""
    if not path or not looks_local(str(path)):
        return {}
    try:
        manifest = json.loads((Path(path).expanduser() / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def unfinished_run(path: str | None) -> str | None:
    """The run.json status of an llmtune output directory whose run has not finished (running, failed,
    stopped); None for a finished run and for anything that is not an llmtune output."""
    status = run_manifest(path).get("status")
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


def _check_output_dir(recipe: RecipeBase, inputs: list[str]) -> None:
    """output_dir must be (or become) a directory of its own: not a file, not under a file, and neither one of
    the run's inputs nor inside one (--overwrite would write into a model's directory)."""
    out = Path(recipe.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir: {recipe.output_dir} is a file", hint="give a directory path for the outputs")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise RecipeError(
                f"output_dir: {recipe.output_dir} is under {parent}, which is a file",
                hint="give a directory path for the outputs",
            )
        if parent.exists():
            break
    resolved = out.resolve()
    for value in inputs:
        if not looks_local(value):
            continue
        p = Path(value).expanduser().resolve()
        if p == resolved or p in resolved.parents:
            raise RecipeError(
                f"output_dir: {recipe.output_dir} is {value} or inside it, an input of this run",
                hint="write the outputs to a new directory (e.g. runs/<name>)",
            )


# Where a data file of the same name is looked for when a recipe's data path does not exist, relative to
# the current directory: the shared demo data beside the repository, and the data/ folder the recipes' comments
# name. The walk is bounded so that a large data/ tree cannot slow validate down.
DATA_SEARCH_ROOTS = ("../shared/data", "data")
_SEARCH_MAX_ENTRIES = 20_000
_SEARCH_MAX_FOUND = 3


def same_name_files(name: str, roots: tuple[str, ...] = DATA_SEARCH_ROOTS) -> list[str]:
    """Files (or directories) called ``name`` under ``roots`` (relative to the current directory), as paths
    relative to it, in a sorted and bounded walk that skips hidden directories and does not follow links."""
    found: list[str] = []
    seen = 0
    for root in roots:
        if not Path(root).is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if name in filenames or name in dirnames:
                found.append(os.path.join(dirpath, name))
                if len(found) >= _SEARCH_MAX_FOUND:
                    return found
            seen += len(dirnames) + len(filenames)
            if seen > _SEARCH_MAX_ENTRIES:
                return found
    return found


def _missing_data_hint(path: Path, group: str, i: int) -> str:
    """What to do about a data path that does not exist: where relative paths are taken from, which key to
    set, and a file of the same name under ../shared/data/ or data/ when there is one (likely the one meant)."""
    hint = (
        "fix the path: relative paths are taken from the directory you run llmtune in; "
        f"point data.{group}[{i}].path at your file (in the recipe, or with --set data.{group}.{i}.path=FILE)"
    )
    found = same_name_files(path.name) if path.name else []
    # the line below is aligned under the hint's first line, which follows "  fix: "
    if len(found) == 1:
        hint += f"\n       likely the one meant (the same file name): {found[0]}"
    elif found:
        hint += f"\n       files of the same name, likely one of them: {', '.join(found)}"
    return hint


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
                        hint=_missing_data_hint(p, group, i),
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
        check_finished(value, key)
        d = Path(value).expanduser()
        if key != "model.tokenizer" and (d / "adapter_config.json").is_file() and not (d / "config.json").is_file():
            raise RecipeError(
                f"{key}: {value} is a LoRA adapter (adapter_config.json), not a whole model",
                hint=f"merge it into its base first: llmtune merge-lora --adapter {value} --out "
                f"{value.rstrip('/')}-merged, then set {key}: {value.rstrip('/')}-merged",
            )
    _check_output_dir(
        recipe, [v for _, v in models if v] + [src.path for src in [*recipe.data.train, *recipe.data.eval]]
    )
    _check_reward_block(recipe)
    tpl = m.chat_template
    if tpl is not None and tpl not in BUILTIN_TEMPLATES and not Path(tpl).expanduser().is_file():
        raise RecipeError(
            f"model.chat_template: {tpl!r} is neither a built-in template nor an existing file",
            hint=f"use one of {', '.join(BUILTIN_TEMPLATES)}, a path to a .jinja file, or null for the tokenizer's own",
        )
    return notes


def _check_reward_block(recipe: RecipeBase) -> None:
    """The online stages' reward: rule names and patterns, and that reward-model paths exist (what can be
    told without importing torch; train checks the rest, and module:function rules, before loading)."""
    for block in ("ppo", "grpo", "rejection_sampling"):
        cfg = getattr(getattr(recipe, block, None), "reward", None)
        if cfg is None:
            continue
        from llmtune.errors import UserError
        from llmtune.rewards.rules import check_rule, is_code_rule

        for spec in cfg.rules():
            if is_code_rule(spec):
                continue
            try:
                check_rule(spec, trust_code=False)
            except UserError as e:
                raise RecipeError(f"{block}.reward.rule: {e.message}", hint=e.hint) from None
        for path in cfg.models():
            if looks_local(path) and not Path(path).expanduser().exists():
                raise RecipeError(
                    f"{block}.reward.model: {path} does not exist",
                    hint="give the output directory of an rm run (llmtune train with stage: rm)",
                )
            check_finished(path, f"{block}.reward.model")
