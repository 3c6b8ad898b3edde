"""``llmtune init STAGE``: a commented starter recipe for a stage, that ``llmtune validate`` accepts as written.

The shared blocks (model, finetuning, data, train, distributed) hold the keys a new recipe usually sets, with
values per stage from its ``Starter`` (llmtune.recipe.stages.STAGE_RECIPES); the stage's own blocks (``dpo:``,
``grpo:`` + ``generation:``, ...) are written from the schema, every key at its default with its description, so they follow the schema as it
grows. Every comment that explains a key is the schema's description of it. Imports no torch.
"""

from __future__ import annotations

import difflib
import json
import re
import textwrap
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llmtune.errors import UserError
from llmtune.recipe.data import DataSource
from llmtune.recipe.schema import RecipeBase
from llmtune.recipe.stages import OMIT, STAGE_RECIPES, Starter

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DOCS = "docs/recipe-reference.md"
QUICKSTART = Path("recipes") / "quickstart"  # the repository's toy data, relative to its root
WIDTH = 110


# every name `llmtune init` takes (each stage, then its variants: dpo, kto) and what it writes
STARTERS: dict[str, Starter] = {
    name: starter
    for stage, info in STAGE_RECIPES.items()
    for name, starter in ((stage, info.starter), *info.variants.items())
}

_LORA = {"method": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
# The shared keys a starter writes, in order, at these values unless the stage's Starter says otherwise.
_SHARED: dict[str, dict[str, Any]] = {
    "model": {"dtype": "auto"},
    "finetuning": _LORA,
    "data": {"max_length": 1024},
    "train": {
        "epochs": 1,
        "micro_batch_size": 4,
        "grad_accum": 1,
        "lr": 2.0e-4,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.03,
        "log_every": 10,
        "save_every": 500,
    },
    "distributed": {"zero_stage": 0, "offload": "none"},
}


def stage_models() -> dict[str, type[RecipeBase]]:
    """Every stage and its recipe class, in the registry's order."""
    return {stage: info.recipe for stage, info in STAGE_RECIPES.items()}


def starter_names() -> list[str]:
    """What ``llmtune init`` takes: every stage, each followed by its variants (dpo, kto: dpo with loss kto)."""
    return list(STARTERS)


def stage_blocks(cls: type[RecipeBase]) -> list[str]:
    """The blocks a stage adds to the shared ones (dpo: [dpo]; grpo: [grpo, generation])."""
    return [k for k in cls.model_fields if k not in RecipeBase.model_fields and k != "stage"]


# ------------------------------------------------------------------------------------------------ YAML text

_PLAIN = re.compile(r"^[A-Za-z_./~][A-Za-z0-9_./:~+-]*$")
_YAML_WORDS = {"null", "true", "false", "yes", "no", "on", "off", "~"}  # what PyYAML reads as null / bool


def yaml_value(v: Any) -> str:
    """A value as YAML flow text that reads back as the same value (PyYAML: floats keep a dot)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        text = repr(v)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exp = text.split("e")
            text = f"{mantissa}.0e{exp}"  # 1e-05 reads as text in PyYAML; 1.0e-05 as a number
        return text
    if isinstance(v, str):
        return v if _PLAIN.match(v) and v.lower() not in _YAML_WORDS else json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(yaml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no YAML form for {type(v).__name__}")


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text, WIDTH, initial_indent=indent + "# ", subsequent_indent=indent + "# ", break_on_hyphens=False
    )


def _key(name: str, value: Any, description: str | None, indent: str) -> list[str]:
    return [*(_comment(description, indent) if description else []), f"{indent}{name}: {yaml_value(value)}"]


def _block(model: type[BaseModel], values: dict[str, Any], indent: str) -> list[str]:
    """The keys of ``values`` (in that order) with the schema's descriptions; nested blocks recursively."""
    lines: list[str] = []
    for name, value in values.items():
        info = model.model_fields[name]  # a starter key the schema lacks fails here (and in the tests)
        if isinstance(value, BaseModel):
            lines += [*(_comment(info.description, indent) if info.description else []), f"{indent}{name}:"]
            sub = type(value)
            lines += _block(sub, {k: getattr(value, k) for k in sub.model_fields}, indent + "  ")
        else:
            lines += _key(name, value, info.description, indent)
    return lines


def _data_path(name: str, root: Path | None) -> tuple[str, bool]:
    """The quickstart file as the recipe names it: relative when it is there from the working directory, else
    the absolute path in the checkout llmtune runs from; (path, found)."""
    rel = QUICKSTART / name
    if rel.is_file():
        return rel.as_posix(), True
    checkout = (root or Path(__file__).resolve().parents[2]) / rel
    if checkout.is_file():
        return str(checkout), True
    return rel.as_posix(), False


def render(name: str, model: str | None = None, root: Path | None = None) -> str:
    """The starter recipe of stage (or variant) ``name`` as commented YAML."""
    known = starter_names()
    if name not in known:
        close = " or ".join(repr(c) for c in difflib.get_close_matches(name, known, n=2))
        raise UserError(
            f"no stage {name!r}" + (f" (did you mean {close}?)" if close else ""),
            hint=f"name one of: {', '.join(known)}",
        )
    st = STARTERS[name]  # every stage of the registry has one
    stage = st.stage or name
    cls = STAGE_RECIPES[stage].recipe
    path = model or DEFAULT_MODEL
    data_path, found = _data_path(st.data, root)
    doc = (cls.__doc__ or "").strip().splitlines()[0]
    settings = ", ".join(f"{b}.{k} {yaml_value(v)}" for b, values in st.stage_values.items() for k, v in values.items())
    variant = f" (`{name}` = stage {stage} with {settings})" if st.stage else ""

    out = [
        *_comment(f"llmtune starter recipe: {stage}{variant}. {doc}", ""),
        "#",
        "#   llmtune validate recipe.yaml    # check it, and see every default filled in (no torch)",
        "#   llmtune train recipe.yaml       # outputs (model, metrics.jsonl, curves.png) go to output_dir",
        "#",
        f"# Every key, its default and meaning: {DOCS}. The values below are a starting point: the data is",
        "# the repository's toy quickstart data, so replace data.train with your own and tune train.lr.",
        f"stage: {stage}",
        *_key("output_dir", f"runs/{name}", RecipeBase.model_fields["output_dir"].description, ""),
        *_key("seed", 42, RecipeBase.model_fields["seed"].description, ""),
        "",
    ]
    base = RecipeBase.model_fields
    for block, defaults in _SHARED.items():
        values = {k: v for k, v in {**defaults, **st.blocks.get(block, {})}.items() if v is not OMIT}
        sub = typing.cast(type[BaseModel], base[block].annotation)
        out.append(f"{block}:")
        if block == "model":
            out += [*_comment(st.model_note, "  "), f"  path: {yaml_value(path)}"]
        if block == "data":
            out += _comment("Sources, mixed by weight. " + (DataSource.model_fields["path"].description or ""), "  ")
            out.append("  train:")
            note = f"your file here: {st.data_note}" + ("" if found else f" (placeholder: {data_path} is not here)")
            out += _comment(note, "    ")
            out += [f"    - path: {yaml_value(data_path)}", f"      format: {st.format}"]
        out += _block(sub, values, "  ")
        out.append("")
    precision = f"{base['precision'].description} bf16: recent GPUs and CPUs; fp32: anywhere; fp16: older GPUs."
    out += _key("precision", "bf16", precision, "")
    for block in stage_blocks(cls):
        sub = typing.cast(type[BaseModel], cls.model_fields[block].annotation)
        default = sub()
        for k, v in st.stage_values.get(block, {}).items():
            setattr(default, k, v)
        doc = sub.__dict__.get("__doc__") or f"{block} options."
        out += ["", *_comment(f"--- {block}: {doc.strip().splitlines()[0]} Every key at its default; see {DOCS}.", "")]
        out.append(f"{block}:")
        out += _block(sub, {k: getattr(default, k) for k in sub.model_fields}, "  ")
    return "\n".join(out) + "\n"
