"""Whether a hub model can be had before anything loads it: in the local Hugging Face cache, or the hub
reachable. Without either, transformers would retry the download for about a minute and end with "couldn't
connect to huggingface.co"; this says so in a second, naming the model that ships in the repository.
No torch, no transformers, no huggingface_hub import (those read HF_HUB_OFFLINE when they are imported)."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from llmtune.errors import UserError
from llmtune.paths import looks_local

if TYPE_CHECKING:
    from llmtune.recipe.schema import ModelConfig

CONNECT_TIMEOUT_S = 2.0
_TRUE = {"1", "on", "yes", "true"}
# the tiny chat model in the repository (recipes/quickstart/model): trains offline, on a CPU
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "model"


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded models (its own lookup order of environment variables)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def cached(repo_id: str, revision: str | None = None) -> bool:
    """The model's files are in the local cache for this revision (a branch or tag through refs/, or a
    commit's snapshot), so loading it needs no network."""
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    try:
        ref = repo / "refs" / (revision or "main")
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else (revision or "")
        snapshot = repo / "snapshots" / commit
        return bool(commit) and snapshot.is_dir() and any(snapshot.iterdir())
    except OSError:
        return False


def offline_reason() -> str | None:
    """Why the hub cannot be reached now, or None when it can: offline mode set in the environment, or no
    TCP connection to the hub's host (or the configured proxy) within CONNECT_TIMEOUT_S. One attempt."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    target = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}") if proxy else url
    host = target.hostname or "huggingface.co"
    port = target.port or (443 if target.scheme == "https" else 80)
    via = f" (the proxy for {url.hostname})" if proxy else ""
    result: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                result.append(None)
        except OSError as e:
            result.append(f"no connection to {host}:{port}{via}: {e.strerror or e.__class__.__name__}")

    # in a thread: a name lookup that hangs (a resolver that does not answer) is not bound by the timeout
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(CONNECT_TIMEOUT_S + 0.5)
    if not result:
        return f"no answer from {host}:{port}{via} within {CONNECT_TIMEOUT_S:g} s"
    return result[0]


def _shipped_model() -> str:
    try:
        return os.path.relpath(SHIPPED_MODEL) if SHIPPED_MODEL.is_dir() else "recipes/quickstart/model"
    except ValueError:  # another drive (Windows)
        return str(SHIPPED_MODEL)


def check_hub_models(
    models: list[tuple[str, str | None, str | None]], *, refuse: bool, option: str = "--set"
) -> list[str]:
    """models: (key, path, revision). Each hub id must be in the local cache or the hub reachable: else
    UserError (refuse: train, eval) or a note (validate). A cached model with the hub unreachable is loaded
    offline (HF_HUB_OFFLINE=1 for this process): no retries. Returns the notes."""
    hub = [(k, p, r) for k, p, r in models if p and not looks_local(p)]
    missing = [(k, p) for k, p, r in hub if not cached(p, r)]
    if not hub:
        return []
    reason = offline_reason()
    if reason is None:
        return []
    if not missing:
        _go_offline()
        return []
    key, path = missing[0]
    shipped = _shipped_model()
    fix = f"--set {key}={shipped}" if option == "--set" else f"{key} {shipped}"
    msg = (
        f"{key}: {path} is a hub id that is not in the local Hugging Face cache ({hub_cache_dir()}), and the hub "
        f"cannot be reached ({reason})"
    )
    hint = (
        f"use the small model that ships in the repository, which works offline: {fix} (or a local model "
        f"directory); or connect to the network (and unset HF_HUB_OFFLINE) to download {path}"
    )
    if refuse:
        raise UserError(msg, hint=hint)
    return [
        f"{key} {path!r} is not in the local Hugging Face cache and the hub cannot be reached ({reason}): train "
        f"refuses it; the model that ships in the repository works offline: {fix}"
    ]


def _go_offline() -> None:
    """Load from the cache without asking the hub (set before huggingface_hub reads it, and after)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]


def check_model_options(models: list[tuple[str, str | None]], *, hub_ok: bool = True) -> None:
    """The model options of a command (`--model X`, `chat MODEL`), before anything heavy loads: a path the
    filesystem cannot hold, a local-looking path that does not exist (with the close names that do: a
    mistyped run directory is never looked up on the hub), and a hub id neither cached nor reachable (the
    shipped offline model named as the fix). hub_ok=False: adapters, which are never hub ids here."""
    from llmtune.paths import check_path_length, missing_path_message

    for key, value in models:
        check_path_length(key, value)
        if value and looks_local(value) and not Path(value).expanduser().exists():
            msg, hint = missing_path_message(key, value)
            raise UserError(msg, hint=hint)
    if hub_ok:
        check_hub_models([(k, v, None) for k, v in models if v], refuse=True, option="option")


def from_pretrained_kwargs(revision: str | None, token: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """The hub options of a from_pretrained call: trust_remote_code always, revision and token when set."""
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    if token:
        kw["token"] = token
    return kw


def hub_kwargs(m: ModelConfig) -> dict[str, Any]:
    """revision, token and trust_remote_code for from_pretrained, as the model block sets them."""
    token = m.hub_token.get_secret_value() if m.hub_token is not None else None
    return from_pretrained_kwargs(m.revision, token, m.trust_remote_code)
