"""A hub model that is neither in the local cache nor reachable (issue 27): train and eval refuse at once,
naming the model that ships in the repository and the --set fix, instead of a minute of download retries; a
cached model still loads offline (HF_HUB_OFFLINE is set for the process, so nothing is retried).

Deterministic: offline mode comes from HF_HUB_OFFLINE (the tests' environment) or from a connection refused
by a local port nothing listens on; the CLI runs show the refusal came before torch was imported."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmtune.errors import UserError
from llmtune.model import hub
from llmtune.model.hub import cached, check_hub_models, offline_reason
from tests.conftest import ROOT, base_recipe, run_cli, write_recipe

SFT_DATA = ROOT / "recipes" / "quickstart" / "sft.jsonl"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _cache_model(cache: Path, repo_id: str, ref: str = "main") -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / ref).write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_uncached_hub_model_offline_is_refused_with_the_shipped_model(empty_cache: Path) -> None:
    with pytest.raises(UserError) as info:
        check_hub_models([("model.path", MODEL, None)], refuse=True)
    e = info.value
    assert e.exit_code == 2
    assert e.message == (
        f"model.path: {MODEL} is a hub id that is not in the local Hugging Face cache ({empty_cache}), and the hub "
        "cannot be reached (HF_HUB_OFFLINE=1 is set)"
    )
    assert "recipes/quickstart/model" in (e.hint or "") and "--set model.path=" in (e.hint or "")
    # validate: the same as a note
    notes = check_hub_models([("model.path", MODEL, None)], refuse=False)
    assert len(notes) == 1 and "train refuses it" in notes[0] and "recipes/quickstart/model" in notes[0]
    # local paths are not hub ids: nothing to say
    assert check_hub_models([("model.path", "./somewhere", None)], refuse=True) == []


def test_cached_hub_model_loads_offline(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cache_model(empty_cache, MODEL)
    assert cached(MODEL) and cached(MODEL, "abc123") and not cached(MODEL, "v2") and not cached("other/model")
    assert check_hub_models([("model.path", MODEL, None)], refuse=True) == []


def test_unreachable_hub_is_one_attempt(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No offline mode set, the endpoint refuses the connection: one attempt, then the refusal; a cached model
    switches the process to offline mode, so that huggingface_hub does not retry either."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # nothing listens on port 1
    reason = offline_reason()
    assert reason is not None and reason.startswith("no connection to 127.0.0.1:1")
    with pytest.raises(UserError, match=r"no connection to 127\.0\.0\.1:1"):
        check_hub_models([("model.path", MODEL, None)], refuse=True)
    _cache_model(empty_cache, MODEL)
    monkeypatch.setattr(hub, "_go_offline", lambda: monkeypatch.setenv("HF_HUB_OFFLINE", "1"))
    assert check_hub_models([("model.path", MODEL, None)], refuse=True) == []
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def _no_torch(stderr: str) -> None:
    imported = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    assert "llmtune.cli" in imported
    assert "torch" not in imported and "transformers" not in imported, "refused only after loading torch"


def test_train_and_eval_refuse_an_uncached_hub_model_offline(tmp_path: Path) -> None:
    """The issue's flow: `llmtune init`'s hub model, offline. Refused before torch (no download tried)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "PYTHONPROFILEIMPORTTIME": "1"}
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, model={"path": MODEL}))
    for proc, fix in [
        (run_cli("train", str(recipe), env=env), "--set model.path="),
        (run_cli("eval", "--model", MODEL, "--data", str(SFT_DATA), "--task", "perplexity", env=env), "--model "),
    ]:
        assert proc.returncode == 2, proc.stderr[-2000:]
        text = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
        assert "Traceback" not in text
        assert f"{MODEL} is a hub id that is not in the local Hugging Face cache" in text
        assert "fix: use the small model that ships in the repository" in text
        assert f"{fix}recipes/quickstart/model" in text
        _no_torch(proc.stderr)


def test_go_offline_reaches_a_loaded_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE when imported: an already imported one is switched too."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub._go_offline()
    assert constants.HF_HUB_OFFLINE is True and constants.is_offline_mode()
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.slow  # loads torch and the model: ~18 s on 2 busy cores
def test_a_cached_hub_model_loads_offline(tmp_path: Path) -> None:
    """A hub id whose files are in the local cache works offline: the check lets it through, and transformers
    finds it there (the tiny model laid out as huggingface_hub caches a download). eval: the quickest load."""
    import json
    import shutil

    from tests.conftest import TINY_MODEL, assert_ok

    cache = tmp_path / "hf-cache"
    _cache_model(cache, "llmtune-test/tiny")
    snapshot = cache / "models--llmtune-test--tiny" / "snapshots" / "abc123"
    shutil.rmtree(snapshot)
    shutil.copytree(TINY_MODEL, snapshot)
    report = tmp_path / "report.json"
    args = ["--model", "llmtune-test/tiny", "--data", str(SFT_DATA), "--task", "perplexity", "--max-samples", "2"]
    proc = run_cli("eval", *args, "-o", str(report), env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert_ok(proc)
    assert json.loads(report.read_text())["settings"]["model"] == "llmtune-test/tiny"


def test_a_lookup_that_hangs_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that never answers (getaddrinfo is not bound by the socket timeout): the check gives up
    after its own limit instead of waiting. The connection here blocks until the test ends."""
    import contextlib
    import socket
    import threading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    release = threading.Event()
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (release.wait(), contextlib.nullcontext())[1])
    monkeypatch.setattr(hub, "CONNECT_TIMEOUT_S", 0.05)
    try:
        assert offline_reason() == "no answer from huggingface.co:443 within 0.05 s"
    finally:
        release.set()


def test_validate_notes_an_unreachable_hub_model_once(tmp_path: Path) -> None:
    """validate (offline, not cached): one note for the model, that train refuses it and what works offline."""
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, model={"path": MODEL}))
    proc = run_cli("validate", str(recipe), env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note: model.path")]
    assert len(notes) == 1, notes
    assert "train refuses it" in notes[0] and "--set model.path=recipes/quickstart/model" in notes[0]
