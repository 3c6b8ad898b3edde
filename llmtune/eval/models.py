"""Loading what eval runs: a policy (causal LM, optionally with an adapter), reward models (a full
AutoModelForSequenceClassification directory, or a SEQ_CLS peft adapter with its score head), and the
tokenizer that goes with each. Bad paths are UserErrors."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmtune.errors import UserError
from llmtune.model.load import DTYPES, load_config


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    name: str
    has_adapter: bool


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but no CUDA GPU is visible", hint="use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _adapter_config(path: str) -> dict[str, Any] | None:
    f = Path(path).expanduser() / "adapter_config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{f} is not valid JSON") from None


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists() or path.count("/") != 1


def resolve(model: str, adapter: str | None, what: str = "--model") -> tuple[str, str | None, dict | None]:
    """(base path, adapter path or None, adapter config). A --model that is an adapter directory stands
    for its recorded base with that adapter."""
    if _looks_local(model) and not Path(model).expanduser().exists():
        raise UserError(f"{what} {model} does not exist", hint="pass a model directory or a hub id")
    if adapter is None:
        cfg = _adapter_config(model)
        if cfg is not None and not (Path(model).expanduser() / "config.json").is_file():
            base = cfg.get("base_model_name_or_path")
            if not base:
                raise UserError(f"{model} is an adapter without a recorded base", hint=f"pass {what} BASE --adapter")
            return str(base), model, cfg
        return model, None, None
    p = Path(adapter).expanduser()
    if not p.is_dir():
        raise UserError(f"adapter {adapter} does not exist", hint="pass the output directory of a lora / qlora run")
    cfg = _adapter_config(adapter)
    if cfg is None:
        raise UserError(f"{adapter} has no adapter_config.json", hint="--adapter takes a peft adapter directory")
    return model, adapter, cfg


def is_reward_model(model: str, adapter: str | None) -> bool:
    base, adapter, cfg = resolve(model, adapter)
    if cfg is not None:
        return cfg.get("task_type") == "SEQ_CLS"
    archs = getattr(load_config(base, "--model"), "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_tokenizer(*paths: str | None) -> Any:
    """The first loadable tokenizer among paths (an adapter's carries the training chat template);
    a missing pad token becomes EOS (padding is masked by position, never by id)."""
    from transformers import AutoTokenizer

    last = ""
    for p in paths:
        if p is None:
            continue
        d = Path(p).expanduser()
        if d.is_dir() and not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            continue
        try:
            tok = AutoTokenizer.from_pretrained(p)
        except (OSError, ValueError) as e:
            last = str(e).splitlines()[0]
            continue
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        return tok
    raise UserError(f"no tokenizer could be loaded from {', '.join(p for p in paths if p)} {last}".strip())


def load_causal_lm(model: str, adapter: str | None, dtype: torch.dtype, device: torch.device, what: str) -> Loaded:
    from transformers import AutoModelForCausalLM

    base, adapter, _ = resolve(model, adapter, what)
    load_config(base, what)
    try:
        m = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {what} {base}: {str(e).splitlines()[0]}") from None
    if adapter is not None:
        m = _with_adapter(m, base, adapter)
    tok = load_tokenizer(adapter, base)
    m.to(device).eval()
    return Loaded(m, tok, adapter or base, adapter is not None)


def load_reward_model(path: str, dtype: torch.dtype, device: torch.device, adapter: str | None = None) -> Loaded:
    """A reward model: AutoModelForSequenceClassification(num_labels=1), or a SEQ_CLS adapter on its base."""
    from transformers import AutoModelForSequenceClassification

    base, adapter, cfg = resolve(path, adapter, "reward model")
    if cfg is not None and cfg.get("task_type") != "SEQ_CLS":
        raise UserError(
            f"{path} is a {cfg.get('task_type')} adapter, not a reward model",
            hint="a reward model is an rm-stage output (task_type SEQ_CLS) or a sequence-classification model",
        )
    load_config(base, "reward model")
    try:
        m = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the reward model {base}: {str(e).splitlines()[0]}") from None
    if adapter is not None:
        m = _with_adapter(m, base, adapter)
    tok = load_tokenizer(adapter, base)
    m.to(device).eval()
    return Loaded(m, tok, adapter or base, adapter is not None)


def _with_adapter(model: Any, base: str, adapter: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise UserError(
            f"the adapter {adapter} does not fit {base}: {str(e).strip().splitlines()[0]}",
            hint="pass the base model the adapter was trained on",
        ) from None


@contextmanager
def last_token_scores(model: Any):
    """Capture the score head's output at every position: yields a list that receives (B, T) tensors.

    The reward of a sequence is the score at its last real token (the attention mask says which), the
    same for right- and left-padded batches and whatever the pad token is."""
    head = None
    for name, mod in model.named_modules():
        if name.split(".")[-1] == "score":
            head = mod
            break
    if head is None:
        raise UserError("the reward model has no `score` head", hint="use a *ForSequenceClassification model")
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, out: captured.append(out[..., 0].float()))
    try:
        yield captured
    finally:
        handle.remove()


def free(*objs: Any) -> None:
    del objs
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
