"""Loading what eval runs: a policy (causal LM, optionally with an adapter), reward models (a full
AutoModelForSequenceClassification directory, or a SEQ_CLS peft adapter with its score head), and the
tokenizer that goes with each. Bad paths are UserErrors."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmtune.errors import UserError
from llmtune.model.load import DTYPES, check_tokenizers_agree, load_config, tokenizer_from
from llmtune.model.merge import adapter_config_or_none
from llmtune.recipe.checks import check_finished
from llmtune.recipe.schema import looks_local


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


def resolve(model: str, adapter: str | None, what: str = "--model") -> tuple[str, str | None, dict | None]:
    """(base path, adapter path or None, adapter config). A --model that is an adapter directory stands
    for its recorded base with that adapter."""
    if looks_local(model) and not Path(model).expanduser().exists():
        raise UserError(f"{what} {model} does not exist", hint="pass a model directory or a hub id")
    check_finished(model, what)
    check_finished(adapter, "--adapter")
    if adapter is None:
        cfg = adapter_config_or_none(model)
        if cfg is not None and not (Path(model).expanduser() / "config.json").is_file():
            base = cfg.get("base_model_name_or_path")
            if not base:
                raise UserError(f"{model} is an adapter without a recorded base", hint=f"pass {what} BASE --adapter")
            return str(base), model, cfg
        return model, None, None
    p = Path(adapter).expanduser()
    if not p.is_dir():
        raise UserError(f"adapter {adapter} does not exist", hint="pass the output directory of a lora / qlora run")
    cfg = adapter_config_or_none(adapter)
    if cfg is None:
        raise UserError(f"{adapter} has no adapter_config.json", hint="--adapter takes a peft adapter directory")
    return model, adapter, cfg


def check_reference_tokenizer(model: str, adapter: str | None, reference: str) -> None:
    """A reference model scores the policy's token ids: it must have been trained with the policy's tokenizer."""
    base, adapter, _ = resolve(model, adapter)
    ref_base, ref_adapter, _ = resolve(reference, None, "--reference")
    check_tokenizers_agree(
        [
            (adapter, "the adapter"),
            (base, "--model"),
            (ref_adapter, "the adapter of --reference"),
            (ref_base, "--reference"),
        ],
        hint="pass as --reference the model the policy was trained from (with the same tokenizer)",
    )


def is_reward_model(model: str, adapter: str | None) -> bool:
    base, adapter, cfg = resolve(model, adapter)
    if cfg is not None:
        return cfg.get("task_type") == "SEQ_CLS"
    archs = getattr(load_config(base, "--model"), "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_causal_lm(model: str, adapter: str | None, dtype: torch.dtype, device: torch.device, what: str) -> Loaded:
    from transformers import AutoModelForCausalLM

    base, adapter, _ = resolve(model, adapter, what)
    return _load(AutoModelForCausalLM, base, adapter, dtype, device, what)


def load_reward_model(path: str, dtype: torch.dtype, device: torch.device, adapter: str | None = None) -> Loaded:
    """A reward model: AutoModelForSequenceClassification(num_labels=1), or a SEQ_CLS adapter on its base."""
    from transformers import AutoModelForSequenceClassification

    base, adapter, cfg = resolve(path, adapter, "reward model")
    if cfg is not None and cfg.get("task_type") != "SEQ_CLS":
        raise UserError(
            f"{path} is a {cfg.get('task_type')} adapter, not a reward model",
            hint="a reward model is an rm-stage output (task_type SEQ_CLS) or a sequence-classification model",
        )
    return _load(AutoModelForSequenceClassification, base, adapter, dtype, device, "the reward model", num_labels=1)


def _load(
    auto_class: Any, base: str, adapter: str | None, dtype: torch.dtype, device: torch.device, what: str, **kwargs: Any
) -> Loaded:
    """base (+ adapter) through auto_class, with the tokenizer the adapter (or else the base) carries."""
    load_config(base, what)
    if adapter is not None:
        check_tokenizers_agree(
            [(adapter, "the adapter"), (base, "the base model")],
            hint="pass the base model the adapter was trained on (it saved that model's tokenizer)",
        )
    try:
        m = auto_class.from_pretrained(base, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {what} {base}: {str(e).splitlines()[0]}") from None
    if adapter is not None:
        m = _with_adapter(m, base, adapter)
    m.to(device).eval()
    return Loaded(m, tokenizer_from(adapter, base), adapter or base, adapter is not None)


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
