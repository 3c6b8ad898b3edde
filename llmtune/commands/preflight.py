"""Checks of what a recipe names on disk and of the machine, made before anything loads (``llmtune validate``
and the start of ``llmtune train``): data files exist and their first rows parse and fit the format they name
(llmtune.commands.data_sample), a local model directory holds a config.json, weights and tokenizer files, the
template file exists, and the precision is one this machine trains in. By file names and first rows only: no
torch, no weights read."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from llmtune.commands.data_sample import check_data_sample
from llmtune.errors import DataError, RecipeError, UserError
from llmtune.manifest import check_finished
from llmtune.paths import check_path_length, looks_local, missing_path_message
from llmtune.recipe.online import RewardConfig
from llmtune.recipe.schema import RecipeBase
from llmtune.recipe.stages import STAGE_RECIPES

BUILTIN_TEMPLATES = ("chatml", "llama3", "alpaca")


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
# the current directory: shared demo data beside the repository, the data/ folder the recipes' comments name,
# and the shipped recipes' demo data. The walk is bounded so that a large data/ tree cannot slow validate down.
DATA_SEARCH_ROOTS = ("../shared/data", "data", "recipes/data")
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
    set, and a file of the same name under DATA_SEARCH_ROOTS when there is one (likely the one meant)."""
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


def _reward(recipe: RecipeBase) -> tuple[str, RewardConfig] | None:
    """(block name, reward block) of an online stage's recipe (its block is named after it: ppo.reward, ...)."""
    stage = getattr(recipe, "stage", "")
    return (stage, getattr(recipe, stage).reward) if STAGE_RECIPES[stage].online else None


def recipe_paths(recipe: RecipeBase) -> list[tuple[str, str]]:
    """(key, value) of every path a recipe names: what the filesystem must be able to hold."""
    found: list[tuple[str, str | None]] = [
        ("output_dir", recipe.output_dir),
        ("model.path", recipe.model.path),
        ("model.tokenizer", recipe.model.tokenizer),
        ("model.chat_template", recipe.model.chat_template),
        ("data.registry", recipe.data.registry),
        ("data.cache_dir", recipe.data.cache_dir),
        ("data.replay.path", recipe.data.replay.path if recipe.data.replay else None),
    ]
    for group, sources in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        for i, src in enumerate(sources):
            found += [(f"data.{group}.{i}.path", src.path), (f"data.{group}.{i}.registry", src.registry)]
    dpo = getattr(recipe, "dpo", None)
    if dpo is not None:
        found.append(("dpo.reference", dpo.reference))
    reward = _reward(recipe)
    if reward is not None:
        block, cfg = reward
        found += [(f"{block}.reward.model", m) for m in cfg.models()]
        found += [(f"{block}.reward.judge.model", j.model) for j in cfg.judges()]
    return [(k, v) for k, v in found if v]


def check_hub(recipe: RecipeBase, *, refuse: bool, notes: list[str] | None = None) -> list[str]:
    """The hub models a recipe names must be in the local cache or the hub reachable (llmtune.model.hub):
    train refuses at once (refuse), validate notes it. notes: check_paths' notes, returned with the note
    that says the same model is loaded from the hub replaced by this one."""
    from llmtune.model.hub import check_hub_models

    models: list[tuple[str, str | None, str | None]] = [
        ("model.path", recipe.model.path, recipe.model.revision),
        ("model.tokenizer", recipe.model.tokenizer, recipe.model.revision),
    ]
    dpo = getattr(recipe, "dpo", None)
    if dpo is not None:
        models.append(("dpo.reference", dpo.reference, None))
    reward = _reward(recipe)
    if reward is not None:
        block, cfg = reward
        models += [(f"{block}.reward.model", m, None) for m in cfg.models()]
        models += [(f"{block}.reward.judge.model", j.model, None) for j in cfg.judges()]
    perplexity = recipe.data.filter.perplexity
    if perplexity is not None and perplexity.model:
        models.append(("data.filter.perplexity.model", perplexity.model, None))
    found = check_hub_models(models, refuse=refuse)
    keys = {note.split(" ", 1)[0] for note in found}
    kept = [n for n in notes or [] if not (n.split(" ", 1)[0] in keys and n.endswith("it is loaded from the hub"))]
    return kept + found


# ------------------------------------------------------------------------------ outputs of shipped recipes
# A recipe of a chain reads what another writes (ppo_lora.yaml the reward model of rm.yaml): validate notes
# that the path is that recipe's output_dir, and train refuses until that run exists.
RECIPES_DIR = "recipes"


def written_by(path: str, recipes_dir: str = RECIPES_DIR) -> str | None:
    """The recipe file in recipes_dir (relative to the current directory) whose output_dir is ``path`` (or
    holds it), as recipes/NAME.yaml; None when there is none. Reads each file's output_dir key only."""
    import yaml

    d = Path(recipes_dir)
    if not looks_local(path) or not d.is_dir():
        return None
    target = Path(path).expanduser().absolute()
    for f in sorted(d.glob("*.yaml"))[:200]:
        try:
            out = yaml.safe_load(f.read_text(encoding="utf-8")).get("output_dir")
        except (OSError, ValueError, yaml.YAMLError, AttributeError):
            continue
        if not isinstance(out, str) or not out:
            continue
        out_path = Path(os.path.normpath(Path(out).expanduser().absolute()))
        norm = Path(os.path.normpath(target))
        if norm == out_path or out_path in norm.parents:
            return f.as_posix()
    return None


def missing_local_path(key: str, value: str, planned: list[str] | None, hint: str | None = None) -> None:
    """A local-looking path that does not exist: refused (with close names), unless it is what another
    recipe in recipes/ writes and planned is a list: then a note is added to it (validate)."""
    recipe_file = written_by(value)
    if recipe_file is not None:
        run_it = f"{value} is written by {recipe_file}: run it first (llmtune train {recipe_file})"
        if planned is not None:
            planned.append(f"{key} {run_it}; train refuses until it exists")
            return
        raise RecipeError(f"{key}: {value} does not exist", hint=run_it)
    msg, close = missing_path_message(key, value)
    raise RecipeError(msg, hint=close if hint is None or close.startswith("did you mean") else hint)


def check_paths(recipe: RecipeBase, *, planned_ok: bool = False) -> list[str]:
    """Raise a clear error for what train would refuse before or while loading (a missing local file, an
    incomplete model directory, a precision this machine cannot train in, data rows that do not fit their
    format); return notes (names taken as hub ids, rows train will drop). planned_ok (validate): a model
    path that another recipe in recipes/ writes is a note until it exists, not an error."""
    notes: list[str] = []
    planned: list[str] | None = notes if planned_ok else None
    for key, value in recipe_paths(recipe):
        check_path_length(key, value)
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
            missing_local_path(key, value, planned)
            continue
        if not looks_local(value):
            notes.append(f"{key} {value!r} is not a local directory: it is loaded from the hub")
        check_finished(value, key)
        if not looks_local(value):
            continue
        if key == "model.tokenizer":
            check_tokenizer_files(key, value)
            continue
        check_model_dir(key, value)
        if key == "model.path" and m.tokenizer is None and not has_gguf(Path(value).expanduser()):
            check_tokenizer_files(key, value)
    _check_output_dir(
        recipe, [v for _, v in models if v] + [src.path for src in [*recipe.data.train, *recipe.data.eval]]
    )
    _check_reward_block(recipe, planned)
    _check_trackers(recipe)
    check_precision_here(recipe)
    check_kernels_here(recipe)
    for group, sources in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        for i, src in enumerate(sources):
            if looks_local(src.path):
                notes.extend(check_data_sample(recipe, src, f"data.{group}.{i}"))
    tpl = m.chat_template
    if tpl is not None and tpl not in BUILTIN_TEMPLATES and not Path(tpl).expanduser().is_file():
        raise RecipeError(
            f"model.chat_template: {tpl!r} is neither a built-in template nor an existing file",
            hint=f"use one of {', '.join(BUILTIN_TEMPLATES)}, a path to a .jinja file, or null for the tokenizer's own",
        )
    return notes


def _check_trackers(recipe: RecipeBase) -> None:
    """Each train.report_to tracker's package is installed (looked up, not imported: validate stays fast)."""
    from llmtune.engine.trackers import PIP_NAMES, missing_tracker

    name = missing_tracker(recipe.train.report_to)
    if name is not None:
        raise RecipeError(
            f"train.report_to: {name} is not installed in this Python environment ({sys.executable})",
            hint=f"pip install {PIP_NAMES[name]} (or llmtune[trackers] for all three), or remove {name} from "
            "train.report_to",
        )


def _check_reward_block(recipe: RecipeBase, planned: list[str] | None = None) -> None:
    """The online stages' reward: rule names and patterns, and that reward-model paths exist (what can be
    told without importing torch; train checks the rest, and module:function rules, before loading)."""
    reward = _reward(recipe)
    if reward is None:
        return
    block, cfg = reward
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
            missing_local_path(
                f"{block}.reward.model",
                path,
                planned,
                hint="give the output directory of an rm run (llmtune train with stage: rm)",
            )
            continue
        check_finished(path, f"{block}.reward.model")
    from llmtune.rewards.judge import check_judge

    for judge in cfg.judges():  # the rubric reads, a local judge exists
        check_judge(judge, f"{block}.reward.judge")


# ----------------------------------------------------------------------------------------- model directories
# What train's loaders need in a local model directory, checked by file name only (no weights are read): a
# config.json, weights, and tokenizer files. A .gguf file (or a folder holding one) is left alone.

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
NOT_WEIGHTS = ("training_args.bin",)  # written by the HF Trainer beside (or instead of) the weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
TOKENIZER_CONFIG = "tokenizer_config.json"
_LISTED = 8


def has_gguf(p: Path) -> bool:
    """A .gguf file, or a directory holding one (llama.cpp weights: not checked like a transformers model)."""
    if p.is_file():
        return p.name.lower().endswith(".gguf")
    try:
        return p.is_dir() and any(c.name.lower().endswith(".gguf") and c.is_file() for c in p.iterdir())
    except OSError:
        return False


def _listing(d: Path) -> str:
    """Up to _LISTED names in d (directories with a trailing /), for messages."""
    try:
        names = sorted(c.name + ("/" if c.is_dir() else "") for c in d.iterdir() if not c.name.startswith("."))
    except OSError:
        return "nothing readable"
    if not names:
        return "nothing: the directory is empty"
    more = f", ... ({len(names)} entries)" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _model_dirs_below(d: Path) -> list[str]:
    """Subdirectories (one or two levels down, bounded) that hold a config.json: likely the model meant."""
    found: list[str] = []
    try:
        level = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))[:50]
        for c in level:
            if (c / "config.json").is_file():
                found.append(str(c))
        if not found:
            for c in level:
                found.extend(str(g) for g in sorted(c.iterdir())[:50] if g.is_dir() and (g / "config.json").is_file())
    except OSError:
        return found
    return found[:3]


def _adapter_kind(d: Path) -> str | None:
    try:
        cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("peft_type") if isinstance(cfg, dict) else None


def _adapter_base(d: Path) -> str | None:
    try:
        cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    return base if isinstance(base, str) and base.strip() else None


def check_model_dir(key: str, value: str) -> None:
    """A local model.path / dpo.reference must be a directory transformers can load a causal LM from:
    config.json and weights (a LoRA adapter is refused with how to merge it). A .gguf is not checked."""
    d = Path(value).expanduser()
    if has_gguf(d):
        return
    if d.is_file():
        hint = "give the directory the model was saved to (config.json, weights and tokenizer files)"
        if (d.parent / "config.json").is_file():
            hint = f"give the directory that holds it: set {key}: {d.parent}"
        raise RecipeError(f"{key}: {value} is a file, not a model directory", hint=hint)
    if not d.is_dir():
        return
    if (d / "adapter_config.json").is_file() and not (d / "config.json").is_file():
        merged = f"{value.rstrip('/')}-merged"
        base = _adapter_base(d)
        base_hint = f"its base model ({base})" if base else "the base model it was trained on"
        kind = _adapter_kind(d)
        if kind in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):  # virtual tokens: nothing to merge
            raise RecipeError(
                f"{key}: {value} is a {kind} adapter (adapter_config.json), not a whole model, and it cannot be "
                "merged into one",
                hint=f"point {key} at {base_hint}, and load the adapter with PeftModel.from_pretrained(base, adapter)",
            )
        raise RecipeError(
            f"{key}: {value} is a LoRA adapter (adapter_config.json), not a whole model",
            hint=f"merge it into its base first: llmtune merge-lora --adapter {value} --out {merged}, then set "
            f"{key}: {merged}; or point {key} at {base_hint} to start from that",
        )
    if not (d / "config.json").is_file():
        below = _model_dirs_below(d)
        hint = (
            f"point {key} at the directory the model was saved to (config.json, *.safetensors weights and "
            "tokenizer files; for full / freeze fine-tuning, a run's output_dir), or at a hub id such as "
            "Qwen/Qwen2.5-0.5B"
        )
        if below:
            hint += f"\n       a model directory below it, likely the one meant: {', '.join(below)}"
        raise RecipeError(
            f"{key}: {value} has no config.json, so no model can be loaded from it (found: {_listing(d)})",
            hint=hint,
        )
    try:
        files = [c for c in d.iterdir() if c.is_file()]
    except OSError:
        return
    weights = [c for c in files if c.name.lower().endswith(WEIGHT_SUFFIXES) and c.name not in NOT_WEIGHTS]
    if not weights:
        raise RecipeError(
            f"{key}: {value} has a config.json but no weights (no *.safetensors, *.bin or "
            f"*.safetensors.index.json; found: {_listing(d)})",
            hint=f"copy the model's weight files (e.g. model.safetensors) into {value}, or point {key} at the "
            "complete model directory",
        )
    for index in (c for c in weights if c.name.lower().endswith(".index.json")):
        _check_index(key, value, index)


def _check_index(key: str, value: str, index: Path) -> None:
    """The shards a *.index.json names must be there (a partial download or copy)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return  # transformers' own message is clear enough for an unreadable index
    if not isinstance(weight_map, dict):
        return
    shards = sorted({v for v in weight_map.values() if isinstance(v, str)})
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f", ... ({len(missing)} in all)" if len(missing) > 3 else "")
        raise RecipeError(
            f"{key}: {value}: {index.name} names {len(shards)} weight files, and {len(missing)} of them are missing "
            f"({shown})",
            hint=f"copy (or finish downloading) the missing shards into {value}, or point {key} at the complete "
            "model directory",
        )


def check_tokenizer_files(key: str, value: str) -> None:
    """The directory the tokenizer is loaded from (model.tokenizer, else model.path) must hold tokenizer files."""
    d = Path(value).expanduser()
    if not d.is_dir() or has_gguf(d):
        return
    if any((d / f).is_file() for f in (*TOKENIZER_FILES, TOKENIZER_CONFIG)):
        return
    if key == "model.tokenizer":
        hint = (
            "point model.tokenizer at a directory saved with tokenizer.save_pretrained (or a hub id), or remove it "
            "to use the tokenizer saved with model.path"
        )
    else:
        hint = (
            f"copy the tokenizer files saved with the model into {value}, or set model.tokenizer to a directory or "
            "hub id that has them (the tokenizer the model was trained with)"
        )
    raise RecipeError(
        f"{key}: {value} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json or "
        f"tokenizer_config.json; found: {_listing(d)})",
        hint=hint,
    )


# -------------------------------------------------------------------------------------------------- precision
# Whether this machine has a GPU, told without importing torch: the NVIDIA (or ROCm) tools and device files.
GPU_TOOLS = ("nvidia-smi", "rocm-smi")
GPU_MARKERS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def clearly_no_gpu() -> bool:
    """True only when this machine clearly has no GPU torch could train on (False when unsure)."""
    if sys.platform == "darwin":
        return True  # torch has no CUDA on macOS, and llmtune trains on the CPU there
    if not sys.platform.startswith("linux"):
        return False
    if any(shutil.which(tool) for tool in GPU_TOOLS):
        return False
    return not any(os.path.exists(p) for p in GPU_MARKERS)


def check_precision_here(recipe: RecipeBase) -> None:
    """precision fp16 on a machine without a GPU: train refuses it (llmtune.engine.config.check_precision)
    after loading; bf16 and fp32 train on the CPU."""
    if recipe.precision == "fp16" and clearly_no_gpu():
        raise RecipeError(
            "precision fp16 is not supported on CPU (DeepSpeed has no fp16 training there), and this machine "
            "has no GPU (no nvidia-smi on PATH, no /proc/driver/nvidia)",
            hint="use precision: bf16 or precision: fp32 on CPU (fp16 is for older NVIDIA GPUs)",
        )


def check_kernels_here(recipe: RecipeBase) -> None:
    """train.kernels: liger on a machine that clearly has no GPU, or without liger-kernel installed: refused
    before anything loads (the loader refuses it again where this check cannot tell)."""
    from llmtune.model.kernels import kernels_problem

    problem = kernels_problem(recipe.train.kernels, cuda=not clearly_no_gpu())
    if problem:
        raise RecipeError(problem)


def validate_command(recipe_path: Path, overrides: list[str]) -> None:
    """``llmtune validate``: the recipe and what it names checked, its notes and the resolved recipe printed."""
    from rich.console import Console
    from rich.markup import escape

    from llmtune.recipe import dump_recipe, load_recipe

    r = load_recipe(recipe_path, overrides)
    notes = check_hub(r, refuse=False, notes=check_paths(r, planned_ok=True))
    out = Console(highlight=False, soft_wrap=True)  # never wrap: the resolved YAML must stay valid
    for note in notes:
        out.print(f"note: {note}", markup=False)
    out.print(f"[green]ok[/]: {escape(str(recipe_path))} is a valid {r.stage} recipe. Resolved:", markup=True)
    out.print(dump_recipe(r), markup=False, end="")
