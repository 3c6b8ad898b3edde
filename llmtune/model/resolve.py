"""The models that run for inference (eval, chat, synth, the reward sources), resolved and checked before
llmtune.model.load.load loads them: a policy (a causal LM, optionally with an adapter; an adapter directory
stands for its recorded base with it), reward models (a full AutoModelForSequenceClassification directory,
or a SEQ_CLS peft adapter with its score head), and the tokenizer that goes with each. Bad paths are
UserErrors."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from llmtune.errors import UserError
from llmtune.manifest import check_finished
from llmtune.model.load import (
    DTYPES,
    REWARD_MODEL_HINT,
    LoadedModel,
    ModelSpec,
    is_reward_architecture,
    load,
    load_config,
)
from llmtune.model.peft import adapter_config_or_none
from llmtune.model.tokenizer import check_tokenizers_agree
from llmtune.paths import looks_local, missing_path_message


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
        msg, hint = missing_path_message(what, model)
        raise UserError(msg, hint=hint)
    check_finished(model, what)
    check_finished(adapter, "--adapter")
    if adapter is None:
        cfg = adapter_config_or_none(model)
        if cfg is not None and not (Path(model).expanduser() / "config.json").is_file():
            base = cfg.get("base_model_name_or_path")
            if not base:
                raise UserError(f"{model} is an adapter without a recorded base", hint=f"pass {what} BASE --adapter")
            base = str(base)
            if looks_local(base) and not Path(base).expanduser().exists():
                absolute = Path(base).expanduser().is_absolute()
                raise UserError(
                    f"{what} {model} is an adapter whose recorded base {base} does not exist "
                    + (
                        "(moved, or on another machine)"
                        if absolute
                        else f"from the current directory ({Path.cwd()}): a relative base path is recorded relative "
                        "to the directory training ran in"
                    ),
                    hint=f"pass the base explicitly: {what} BASE --adapter {model}"
                    + ("" if absolute else " (or run from the directory training ran in)"),
                )
            return base, model, cfg
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


def _architectures(base: str, what: str) -> list[str]:
    return list(getattr(load_config(base, what), "architectures", None) or [])


def is_reward_model(model: str, adapter: str | None) -> bool:
    """A SEQ_CLS adapter, or (without an adapter) a model whose config names a *ForSequenceClassification
    architecture: something with a trained score head."""
    base, adapter, cfg = resolve(model, adapter)
    if cfg is not None:
        return cfg.get("task_type") == "SEQ_CLS"
    return is_reward_architecture(_architectures(base, "--model"))


def require_causal_lm(model: str, adapter: str | None, what: str, hint: str | None = None) -> None:
    """Refuse a reward model (a SEQ_CLS adapter or a *ForSequenceClassification model) where a causal LM is
    needed: loaded as one, its language-model head would be random."""
    base, adapter, cfg = resolve(model, adapter, what)
    shown = model if adapter is None or adapter == model else f"{model} --adapter {adapter}"
    hint = hint or "pass a causal LM (a cpt / sft / dpo output, or a base model); reward models are judges"
    if cfg is not None and cfg.get("task_type") == "SEQ_CLS":
        raise UserError(
            f"{what} {shown} is a reward-model adapter (task_type SEQ_CLS): it has a score head, not a "
            "language-model head, so it cannot generate or give token log-probabilities",
            hint=hint,
        )
    archs = _architectures(base, what)
    if is_reward_architecture(archs):
        raise UserError(
            f"{what} {base} is a reward model ({', '.join(archs)}): it has a score head, not a language-model "
            "head, so it cannot generate or give token log-probabilities",
            hint=hint,
        )


def head_of(path: str, what: str) -> tuple[str | None, list[str]]:
    """(the adapter's peft task_type, []) for an adapter directory, else (None, the base config's
    architectures): what a role check (reward model, process reward model) reads."""
    base, _, cfg = resolve(path, None, what)
    if cfg is not None:
        return cfg.get("task_type") or "", []
    return None, _architectures(base, what)


def require_reward_model(path: str, what: str = "--reward-model") -> None:
    """Refuse what has no trained score head: a causal LM would get a randomly initialised one."""
    task, archs = head_of(path, what)
    if task is not None:
        if task != "SEQ_CLS":
            raise UserError(
                f"{what} {path} is a {task or 'non-reward'} adapter, not a reward model "
                "(a reward-model adapter has task_type SEQ_CLS and carries the score head)",
                hint=REWARD_MODEL_HINT,
            )
        return
    if archs and not is_reward_architecture(archs):
        raise UserError(
            f"{what} {path} is not a reward model: its config's architectures are {', '.join(archs)} "
            "(no score head), and it is not a SEQ_CLS adapter; its scores would come from a random head",
            hint=REWARD_MODEL_HINT,
        )


def load_causal_lm(model: str, adapter: str | None, dtype: torch.dtype, device: torch.device, what: str) -> LoadedModel:
    require_causal_lm(model, adapter, what)
    base, adapter, _ = resolve(model, adapter, what)
    return load(ModelSpec(path=base, adapter=adapter, dtype=dtype, what=what), device)


def load_reward_model(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    adapter: str | None = None,
    what: str = "--reward-model",
    zero3: dict | None = None,
) -> LoadedModel:
    """A reward model: AutoModelForSequenceClassification(num_labels=1), or a SEQ_CLS adapter on its base.
    zero3: a DeepSpeed ZeRO-3 config to partition it with (inside a training run; the caller then wraps the
    partitioned model, model.load.Partition.apply)."""
    if adapter is None:
        require_reward_model(path, what)
    base, adapter, cfg = resolve(path, adapter, what)
    if cfg is not None and cfg.get("task_type") != "SEQ_CLS":
        raise UserError(f"{adapter} is a {cfg.get('task_type')} adapter, not a reward model", hint=REWARD_MODEL_HINT)
    return load(ModelSpec(path=base, head="score", adapter=adapter, dtype=dtype, what=what), device, zero3=zero3)


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
