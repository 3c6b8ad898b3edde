"""Reading a recipe: YAML -> ``--set`` overrides -> the typed Recipe, with errors that name the fix."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError

from llmtune.errors import RecipeError
from llmtune.recipe.schema import RecipeBase
from llmtune.recipe.stages import STAGE_RECIPES, STAGES, AnyRecipe, Recipe
from llmtune.recipe.synonyms import SYNONYMS_DOC, synonym_message

_ADAPTER: TypeAdapter[AnyRecipe] = TypeAdapter(Recipe)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping without a word; a recipe refuses them."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(
            f"recipe file {p} does not exist" if not p.exists() else f"recipe path {p} is not a file",
            hint="pass the path of a YAML recipe, e.g. `llmtune train recipes/quickstart.yaml`",
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"recipe {p} is not UTF-8 text ({e.reason} at byte {e.start})",
            hint="save the file as UTF-8 (most editors: 'Save with encoding' -> UTF-8)",
        ) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except _DuplicateKey as e:
        raise RecipeError(
            f"recipe {p} has the key {e.key!r} twice in one block (line {e.line}); YAML would keep only the last",
            hint="remove one of them",
        ) from None
    except RecursionError:
        raise RecipeError(
            f"recipe {p} is nested too deeply to read", hint="a recipe is a few levels of `key: value` blocks"
        ) from None
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(
            f"recipe {p} is not valid YAML{where}: {problem}",
            hint="check indentation and that every `key: value` pair has a space after the colon",
        ) from None
    if raw is None:
        raise RecipeError(f"recipe {p} is empty", hint="start from one of the files in recipes/")
    if not isinstance(raw, dict):
        raise RecipeError(
            f"recipe {p} must be a mapping of keys (stage:, model:, data:, ...), not a {type(raw).__name__}"
        )
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML). The schema types the value later."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {item!r} is not of the form key.path=value", hint="e.g. --set train.lr=1e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except (yaml.YAMLError, RecursionError):
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node: Any = raw
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, k, keys[: i + 1])]
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item}: {'.'.join(keys[:i])} is a value, not a block of keys")
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, keys)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"--set {item}: {'.'.join(keys[:-1])} is a value, not a block of keys")
    return raw


def _list_index(node: list[Any], k: str, path: list[str]) -> int:
    try:
        idx = int(k)
    except ValueError:
        raise RecipeError(
            f"--set {'.'.join(path)}: {'.'.join(path[:-1])} is a list; index it with a number (e.g. .0.)"
        ) from None
    if not -len(node) <= idx < len(node):
        raise RecipeError(f"--set {'.'.join(path)}: index {idx} is out of range (the list has {len(node)} items)")
    return idx


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> AnyRecipe:
    stage = raw.get("stage")
    if stage is None:
        close = difflib.get_close_matches("stage", [str(k) for k in raw], n=1, cutoff=0.6)
        typo = f" (found {close[0]!r}. Did you mean 'stage'?)" if close else ""
        raise RecipeError(
            f"{source}: missing key `stage`{typo}", hint=f"add `stage: sft` (one of: {', '.join(STAGES)})"
        )
    if stage not in STAGES:
        close = difflib.get_close_matches(str(stage), list(STAGES), n=1)
        raise RecipeError(
            f"{source}: stage: unknown stage {stage!r}" + (f". Did you mean {close[0]!r}?" if close else ""),
            hint=f"use one of: {', '.join(STAGES)}",
        )
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as e:
        msg = format_validation_error(e, source, STAGE_RECIPES[stage].recipe)
        renamed = any(n in msg for n in (": unknown key; llmtune ", ": unknown key here; it belongs at "))
        raise RecipeError(
            msg, hint=f"rename or move the keys as shown ({SYNONYMS_DOC} lists other tools' names)" if renamed else None
        ) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> AnyRecipe:
    raw = apply_overrides(read_yaml(path), list(overrides or []))
    return validate_recipe(raw, str(path))


# --- error messages ---------------------------------------------------------------------------------


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel], what: str = "recipe") -> str:
    """what: the kind of file (a recipe, an eval file)."""
    errors = err.errors(include_url=False)
    lines = [f"{source} is not a valid {what} ({len(errors)} problem{'s' if len(errors) != 1 else ''}):"]
    for e in errors:
        loc = list(e["loc"])
        if loc and loc[0] in STAGES:  # the discriminated union puts the stage tag first
            loc = loc[1:]
        path = ".".join(str(p) for p in loc) or "(top level)"
        lines.append(f"  {path}: {_describe(e, loc, root)}")
    return "\n".join(lines)


def _describe(e: dict[str, Any], loc: list[Any], root: type[BaseModel]) -> str:
    kind = e["type"]
    given = e.get("input")
    if kind == "extra_forbidden":
        other_name = synonym_message(root, loc)  # another tool's name for a key, or a key at the wrong level
        if other_name is not None:
            return other_name
        parent = _model_at(root, loc[:-1])
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        msg = f"unknown key {loc[-1]!r}."
        if close:
            return f"{msg} Did you mean {close[0]!r}?"
        return f"{msg} Valid keys here: {', '.join(known)}" if known else msg
    if kind == "missing":
        field = _field_at(root, loc)
        desc = f" ({field.description})" if field is not None and field.description else ""
        return f"required key is missing{desc}. Fix: add it."
    if kind == "literal_error":
        expected = e.get("ctx", {}).get("expected", "")
        close = difflib.get_close_matches(str(given), [x.strip(" '") for x in expected.split(",")], n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        return f"{given!r} is not allowed; use one of {expected}.{hint}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected a whole number, got {given!r}. Fix: e.g. 4"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {given!r}. Fix: e.g. 0.0002 or 2.0e-4"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {given!r}"
    if kind in ("string_type",):
        return f"expected text, got {type(given).__name__} {given!r}"
    if kind in ("list_type",):
        return f"expected a list (`- item` lines or [a, b]), got {type(given).__name__}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a block of keys, got {type(given).__name__} {given!r}"
    if kind.startswith(("greater_than", "less_than")):
        return f"{given!r} is out of range: {e['msg'].lower()}"
    if kind == "value_error":
        return e["msg"].removeprefix("Value error, ")
    return f"{e['msg']} (got {given!r})"


def _unwrap(tp: Any) -> Any:
    """Strip Optional / list / Annotated so that the block model inside is reached."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (list, tuple) or origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        for arg in typing.get_args(tp):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return tp


def _model_at(root: type[BaseModel], loc: list[Any]) -> type[BaseModel] | None:
    node: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return None
        node = _unwrap(node.model_fields[part].annotation)
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _field_at(root: type[BaseModel], loc: list[Any]) -> Any:
    parent = _model_at(root, loc[:-1])
    return parent.model_fields.get(str(loc[-1])) if parent else None


# --- saving -----------------------------------------------------------------------------------------


def resolved_dict(recipe: RecipeBase) -> dict[str, Any]:
    """The recipe with every default filled in and secrets removed (what is saved as recipe.yaml)."""
    data = recipe.model_dump(mode="python", exclude={"model": {"hub_token"}})
    return _strip_secrets(data)


def _strip_secrets(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_secrets(v) for k, v in node.items() if not isinstance(v, SecretStr)}
    if isinstance(node, list):
        return [_strip_secrets(v) for v in node]
    return node


def dump_recipe(recipe: RecipeBase) -> str:
    return yaml.safe_dump(resolved_dict(recipe), sort_keys=False, allow_unicode=True)
