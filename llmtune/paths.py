"""Paths the user names (models, data, output directories): local path or hub id, the same place, close
names when one does not exist, and lengths the filesystem refuses. No torch, no llmtune layer above.

``looks_local`` decides whether a name is read from the disk or from the Hugging Face hub. A hub id is
``name`` or ``owner/name`` of letters, digits, ``-``, ``_`` and ``.`` (at most 96 characters); anything else
(``./x``, ``/abs``, ``~/x``, ``a/b/c``, ``model.gguf``, ``data.jsonl``) is local, and so is ``owner/name``
whose ``owner`` is a folder in the current directory (``runs/sft-merge`` beside ``runs/``): a mistyped run
directory must not be looked up on the hub."""

from __future__ import annotations

import difflib
import errno
import os
import re
from pathlib import Path

from llmtune.errors import UserError

# suffixes of files llmtune reads (data, weights, templates): never a hub id
FILE_SUFFIXES = {
    ".json",
    ".jsonl",
    ".parquet",
    ".csv",
    ".txt",
    ".tsv",
    ".arrow",
    ".gz",
    ".gguf",
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".jinja",
    ".yaml",
    ".yml",
}
# the hub's repository names (huggingface_hub.utils.validate_repo_id): name or owner/name, at most 96 chars
HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")
HUB_ID_MAX = 96
NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, APFS, NTFS)
PATH_MAX = 4096  # bytes in a whole path (Linux)


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # a name too long for the filesystem, a permission error on a parent
        return False


def local_reason(path: str) -> str | None:
    """Why ``path`` is taken as local rather than as a hub id (for messages); None for a hub id."""
    if not path:
        return None
    p = Path(path).expanduser()
    if path.startswith((".", "/", "~", "\\")):
        return f"it starts with {path[0]}"
    if _exists(p):
        return "it exists here"
    if p.suffix.lower() in FILE_SUFFIXES:
        return f"it ends in {p.suffix}"
    if path.count("/") > 1:
        return "it has more than one /"
    if len(path) > HUB_ID_MAX or not HUB_ID.match(path) or "--" in path or ".." in path:
        return "it is not a hub id (owner/name of letters, digits, - _ .)"
    first = path.split("/", 1)[0]
    if "/" in path and _is_dir(Path(first)):
        return f"{first}/ is a folder here"
    return None


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:
        return False


def looks_local(path: str) -> bool:
    """True when a data / model path names the local filesystem rather than a hub id (see the module doc)."""
    return local_reason(path) is not None


def same_path(a: str, b: str) -> bool:
    """Two model / tokenizer paths name the same place (local directories compared resolved)."""
    if a == b:
        return True
    if looks_local(a) and looks_local(b):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


_SIBLINGS_MAX = 2000  # entries read from one directory when looking for close names


def close_siblings(path: str, n: int = 3) -> list[str]:
    """Existing paths whose name is close to the first part of ``path`` that does not exist, written as the
    user wrote the rest (``runs/quickstart-merge`` -> ``runs/quickstart-merged``); sorted by closeness."""
    p = Path(path).expanduser()
    parts = p.parts
    for i in range(len(parts)):
        head = Path(*parts[: i + 1])
        if _exists(head):
            continue
        parent = Path(*parts[:i]) if i else Path(".")
        try:
            names = []
            for k, entry in enumerate(os.scandir(parent)):
                if k >= _SIBLINGS_MAX:
                    break
                if not entry.name.startswith("."):
                    names.append(entry.name)
        except OSError:
            return []
        close = difflib.get_close_matches(parts[i], names, n=n, cutoff=0.6)
        written = path.rstrip("/").split("/")
        prefix = "/".join(written[: len(written) - (len(parts) - i)])
        return [f"{prefix}/{c}" if prefix else c for c in close]
    return []


def missing_path_message(key: str, value: str) -> tuple[str, str]:
    """(message, hint) for a local-looking path that does not exist: where it was looked for, why it is not
    taken as a hub id, and close existing names (likely the one meant)."""
    reason = local_reason(value) or ""
    where = Path(value).expanduser()
    looked = where.resolve().parent if not where.is_absolute() else where.parent
    msg = f"{key}: {value} does not exist (looked in {looked}"
    if reason.endswith("is a folder here"):
        msg += f"; {reason}, so this is a local path, not a hub id"
    msg += ")"
    close = close_siblings(value)
    if close:
        # an option (--model) or a command's argument (llmtune chat) takes the path after it; a recipe key --set
        fix = f"{key} {close[0]}" if key.startswith("--") or " " in key else f"--set {key}={close[0]}"
        hint = f"did you mean {' or '.join(close)}? ({fix})"
    else:
        hint = (
            f"fix the path (relative paths are taken from the directory you run llmtune in: {Path.cwd()}), "
            "or give a hub id such as Qwen/Qwen2.5-0.5B"
        )
    return msg, hint


def _limits(path: Path) -> tuple[int, int]:
    """(longest name, longest path) in bytes on the filesystem of path's nearest existing ancestor."""
    for parent in [path, *path.parents]:
        try:
            if parent.exists():
                return os.pathconf(parent, "PC_NAME_MAX"), os.pathconf(parent, "PC_PATH_MAX")
        except OSError:
            continue  # this one is too long itself: its parent tells
        except (ValueError, AttributeError):  # no pathconf (Windows)
            break
    return NAME_MAX, PATH_MAX


def check_path_length(key: str, value: str | None) -> None:
    """UserError when the filesystem cannot hold the path: a component (a file or folder name) longer than
    its name limit (255 bytes on common filesystems), or the whole absolute path longer than its path limit.
    Names are counted in bytes as the filesystem stores them (UTF-8 here)."""
    if not value:
        return
    p = Path(value).expanduser()
    name_max, path_max = _limits(p.absolute())
    for part in p.parts:
        size = len(os.fsencode(part))
        if size > name_max and part != p.anchor:
            shown = part if len(part) <= 40 else f"{part[:24]}...{part[-12:]}"
            length = f"{size} characters" if size == len(part) else f"{len(part)} characters ({size} bytes in UTF-8)"
            example = (
                " (e.g. a short run name: the recipe saved in the run holds the details)" if key == "output_dir" else ""
            )
            raise UserError(
                f"{key}: the path component {shown!r} is {length} long; the filesystem allows at most "
                f"{name_max} bytes for one file or folder name ({os.strerror(errno.ENAMETOOLONG)})",
                hint=f"shorten that part of {key}{example}",
            )
    total = len(os.fsencode(str(p.absolute())))
    if total > path_max:
        raise UserError(
            f"{key}: the path is {total} bytes long as an absolute path; the filesystem allows at most {path_max}",
            hint=f"shorten {key} (fewer or shorter folder names), or run from a directory with a shorter path",
        )


def check_path_lengths(*paths: tuple[str, object]) -> None:
    """Paths given as a command's options that the filesystem cannot hold: one clear error before anything runs
    (``("--out", out)`` pairs; None values are skipped)."""
    for key, value in paths:
        check_path_length(key, None if value is None else str(value))
