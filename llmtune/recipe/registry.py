"""A dataset registry: names mapped to files, column renames and role tags, in the spirit of LLaMA-Factory's
``dataset_info.json``, so that a recipe source can be ``{name: alpaca_en_demo}`` and the data stays as it is.

An entry (every key but one of ``file_name`` / ``hf_hub_url`` optional)::

    "glaive_toolcall_en_demo": {
      "file_name": "glaive_toolcall_en_demo.json",    # relative to the registry file's directory
      "hf_hub_url": "org/name", "subset": null, "split": "train",   # or a hub dataset
      "formatting": "sharegpt",                       # alpaca (default) | sharegpt: how to read `columns`
      "columns": {"messages": "conversations", "tools": "tools"},
      "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
               "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
      "num_samples": 1000,                            # -> max_samples
      "ranking": true                                 # preference pairs (chosen / rejected), read as such
    }

``columns`` use LLaMA-Factory's names (alpaca: prompt, query, response, history, system; sharegpt: messages,
system, tools; both: chosen, rejected, kto_tag) and become llmtune's ``columns:`` (instruction, input, output,
conversations, label, ...). The format is not fixed by the entry: it is detected from the renamed rows (or
is the stage's default for rm / dpo), so one entry serves sft, rm, dpo and kto alike. This module imports
only the standard library.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
_ENTRY_KEYS = {
    "file_name", "hf_hub_url", "subset", "split", "formatting", "columns", "tags", "num_samples", "ranking",
    "folder", "ms_hub_url", "script_url", "om_hub_url", "cloud_file_name",
}  # fmt: skip
# LLaMA-Factory's column names -> llmtune's canonical row keys
_ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
    "system": "system",
    "chosen": "chosen",
    "rejected": "rejected",
    "kto_tag": "label",
    "tools": "tools",
}
_SHAREGPT_COLUMNS = {
    "messages": "conversations",
    "system": "system",
    "tools": "tools",
    "chosen": "chosen",
    "rejected": "rejected",
    "kto_tag": "label",
}


class RegistryError(ValueError):
    """A registry that cannot be read, or a name it does not hold (the message names the fix)."""


def read_registry(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise RegistryError(f"the dataset registry {path} does not exist (a dataset_info.json file)")
    try:
        obj = json.loads(p.read_text("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"the dataset registry {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RegistryError(f"the dataset registry {path} holds a JSON {type(obj).__name__}, not an object of names")
    return obj


def resolve(registry: str, name: str) -> dict[str, Any]:
    """The DataSource fields (path, subset, split, columns, tags, max_samples) of ``name`` in ``registry``."""
    entries = read_registry(registry)
    if name not in entries:
        close = difflib.get_close_matches(name, [str(k) for k in entries], n=1)
        known = ", ".join(sorted(map(str, entries))[:12]) + (", ..." if len(entries) > 12 else "")
        raise RegistryError(
            f"no dataset {name!r} in the registry {registry}"
            + (f". Did you mean {close[0]!r}?" if close else f" (it has: {known or 'nothing'})")
        )
    entry = entries[name]
    where = f"the registry {registry}, entry {name!r}"
    if not isinstance(entry, dict):
        raise RegistryError(f'{where} is not an object (e.g. {{"file_name": "data.json"}})')
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise RegistryError(
            f"{where} has unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_ENTRY_KEYS))})"
        )
    out: dict[str, Any] = {}
    if entry.get("file_name"):
        f = Path(str(entry["file_name"])).expanduser()
        out["path"] = str(f if f.is_absolute() else Path(registry).expanduser().parent / f)
    elif entry.get("hf_hub_url"):
        out["path"] = str(entry["hf_hub_url"])
        for key in ("subset", "split"):
            if entry.get(key) is not None:
                out[key] = str(entry[key])
    else:
        others = [k for k in ("ms_hub_url", "script_url", "om_hub_url", "cloud_file_name") if entry.get(k)]
        raise RegistryError(
            f"{where} has no file_name or hf_hub_url"
            + (f" (only {', '.join(others)}, which llmtune does not read)" if others else "")
        )
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise RegistryError(f"{where}: formatting {formatting!r} is not alpaca or sharegpt")
    names = _SHAREGPT_COLUMNS if formatting == "sharegpt" else _ALPACA_COLUMNS
    columns = entry.get("columns") or {}
    if not isinstance(columns, dict):
        raise RegistryError(f"{where}: columns is not an object of column names")
    mapped: dict[str, str] = {}
    for lf_name, column in columns.items():
        if column is None:
            continue
        if formatting == "alpaca" and lf_name == "prompt" and "response" not in columns and "chosen" not in columns:
            mapped["text"] = str(column)  # a pretraining entry: its prompt column is the text
            continue
        if lf_name not in names:
            raise RegistryError(f"{where}: unknown {formatting} column {lf_name!r} (known: {', '.join(names)})")
        if names[lf_name] != column:
            mapped[names[lf_name]] = str(column)
    if mapped:
        out["columns"] = mapped
    tags = entry.get("tags") or {}
    if formatting == "sharegpt" and tags:
        out["tags"] = {str(k): str(v) for k, v in tags.items()}
    elif tags:
        raise RegistryError(f"{where}: tags (role names) apply to formatting sharegpt only")
    if entry.get("num_samples") is not None:
        out["max_samples"] = entry["num_samples"]
    return out


def apply_tags(row: dict, tags: dict[str, str]) -> dict:
    """A sharegpt-like row with its turns' keys and role names mapped to ``{from, value}`` with the standard
    roles (human, gpt, observation, function_call, system); chosen / rejected single turns too."""
    role_key, content_key = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    roles = {
        tags.get("user_tag", "human"): "human",
        tags.get("assistant_tag", "gpt"): "gpt",
        tags.get("observation_tag", "observation"): "observation",
        tags.get("function_tag", "function_call"): "function_call",
        tags.get("system_tag", "system"): "system",
    }

    def turn(t: Any) -> Any:
        if not isinstance(t, dict) or role_key not in t:
            return t
        role = t[role_key]
        out = {k: v for k, v in t.items() if k not in (role_key, content_key)}
        out["from"] = roles.get(role, role) if isinstance(role, str) else role
        if content_key in t:
            out["value"] = t[content_key]
        return out

    new = dict(row)
    if isinstance(row.get("conversations"), list):
        new["conversations"] = [turn(t) for t in row["conversations"]]
    for key in ("chosen", "rejected"):
        if isinstance(row.get(key), dict):
            new[key] = turn(row[key])
        elif isinstance(row.get(key), list):
            new[key] = [turn(t) for t in row[key]]
    return new
