"""Key names other fine-tuning tools use (HF TrainingArguments, TRL, LLaMA-Factory, axolotl, peft), and
what llmtune calls each. An unknown recipe key is looked up here before the did-you-mean matcher, which
guesses by spelling and so sends ``save_steps`` to ``max_steps``.

A value is one or more llmtune key paths (a list element is written ``[i]``); the first one that exists
in the recipe's stage is named. Keys llmtune has under the same name at another level (``lr`` at the top
level) are found from the schema itself (``own_key_paths``)."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel

SYNONYMS_DOC = "docs/key-names.md"

# foreign key -> (llmtune paths, a remark shown after the name, or "")
SYNONYMS: dict[str, tuple[tuple[str, ...], str]] = {
    # HF TrainingArguments / TRL
    "learning_rate": (("train.lr",), ""),
    "num_train_epochs": (("train.epochs",), ""),
    "num_epochs": (("train.epochs",), ""),  # axolotl
    "per_device_train_batch_size": (("train.micro_batch_size",), "sequences per forward pass per process"),
    "train_batch_size": (("train.micro_batch_size",), "sequences per forward pass per process"),
    "per_device_eval_batch_size": (("train.eval_batch_size",), ""),
    "gradient_accumulation_steps": (("train.grad_accum",), ""),
    "lr_scheduler_type": (("train.lr_scheduler",), ""),
    "save_steps": (("train.save_every",), "a resumable checkpoint every N steps"),
    "save_total_limit": (("train.keep_checkpoints",), ""),
    "logging_steps": (("train.log_every",), ""),
    "eval_steps": (("train.eval_every",), ""),
    "eval_strategy": (("train.eval_every",), "every N steps"),
    "evaluation_strategy": (("train.eval_every",), "every N steps"),
    "save_strategy": (("train.save_every",), "every N steps"),
    "optim": (("train.optimizer",), ""),
    "adam_epsilon": (("train.adam_eps",), ""),
    "metric_for_best_model": (("train.best_metric",), ""),
    "bf16": (("precision",), "precision: bf16"),
    "fp16": (("precision",), "precision: fp16"),
    "mixed_precision": (("precision",), "bf16 | fp16 | fp32"),
    "deepspeed": (
        ("distributed.zero_stage",),
        "llmtune writes the DeepSpeed config from distributed.zero_stage and distributed.offload",
    ),
    "resume_from_checkpoint": ((), "the option `llmtune train RECIPE --resume-from DIR` (a rerun resumes by itself)"),
    # sequence length: TRL, LLaMA-Factory, axolotl, tokenizers
    "max_seq_length": (("data.max_length",), ""),
    "max_seq_len": (("data.max_length",), ""),
    "cutoff_len": (("data.max_length",), ""),
    "sequence_len": (("data.max_length",), ""),
    "model_max_length": (("data.max_length",), ""),
    "sample_packing": (("data.packing",), ""),
    # model
    "model_name_or_path": (("model.path",), ""),
    "base_model": (("model.path",), ""),
    "model_name": (("model.path",), ""),
    "tokenizer_name": (("model.tokenizer",), ""),
    "tokenizer_name_or_path": (("model.tokenizer",), ""),
    "torch_dtype": (("model.dtype",), ""),
    "template": (("model.chat_template",), ""),
    "flash_attention": (("model.attn_implementation",), "attn_implementation: flash_attention_2"),
    "use_auth_token": (("model.hub_token",), ""),
    "token": (("model.hub_token",), ""),
    # fine-tuning method: peft, LLaMA-Factory, axolotl
    "finetuning_type": (("finetuning.method",), ""),
    "adapter": (("finetuning.method",), "lora | qlora | ..."),
    "load_in_4bit": (("finetuning.method",), "method: qlora"),
    "quantization_bit": (("finetuning.method",), "method: qlora (4-bit)"),
    "use_peft": (("finetuning.method",), "method: lora"),
    "lora_rank": (("finetuning.lora_r",), ""),
    "r": (("finetuning.lora_r",), ""),
    "lora_target": (("finetuning.target_modules",), ""),
    "lora_target_modules": (("finetuning.target_modules",), ""),
    "lora_target_linear": (("finetuning.target_modules",), "target_modules: all-linear"),
    "lora_modules_to_save": (("finetuning.modules_to_save",), ""),
    "additional_target": (("finetuning.modules_to_save",), ""),
    "bnb_4bit_quant_type": (("finetuning.quant_type",), ""),
    "bnb_4bit_use_double_quant": (("finetuning.double_quant",), ""),
    # data
    "dataset": (("data.train",), "a list of {path: FILE}"),
    "datasets": (("data.train",), "a list of {path: FILE}"),
    "dataset_name": (("data.train",), "a list of {path: FILE}"),
    "train_file": (("data.train",), "a list of {path: FILE}"),
    "eval_dataset": (("data.eval",), "a list of {path: FILE}"),
    "dataset_dir": (("data.registry",), "the dataset_info.json file itself"),
    "val_size": (("data.eval_split",), ""),
    "val_set_size": (("data.eval_split",), ""),
    "max_samples": (("data.train[i].max_samples",), "per data source"),
    # preference and online stages: TRL, LLaMA-Factory
    "pref_beta": (("dpo.beta",), ""),
    "pref_loss": (("dpo.loss",), ""),
    "ref_model": (("dpo.reference",), ""),
    "loss_type": (("dpo.loss", "grpo.loss_type"), ""),
    "init_kl_coef": (("ppo.kl_coef",), ""),
    "max_completion_length": (("generation.max_new_tokens",), ""),
}


def _unwrap(tp: Any) -> Any:
    """The pydantic block model inside Optional / list / Annotated, else tp."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    for arg in typing.get_args(tp) if origin is not None else ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return tp


def _is_list(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _is_list(typing.get_args(tp)[0])
    return origin is list or any(typing.get_origin(a) is list for a in typing.get_args(tp))


def key_paths(root: type[BaseModel]) -> dict[str, list[str]]:
    """Every key of the schema under root, by name: {name: [its paths]} (list elements as ``[i]``)."""
    found: dict[str, list[str]] = {}

    def walk(model: type[BaseModel], prefix: str, depth: int) -> None:
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            found.setdefault(name, []).append(path)
            inner = _unwrap(field.annotation)
            if depth < 4 and isinstance(inner, type) and issubclass(inner, BaseModel):
                walk(inner, f"{path}[i]." if _is_list(field.annotation) else f"{path}.", depth + 1)

    walk(root, "", 0)
    return found


def _exists(root: type[BaseModel], path: str) -> bool:
    return path in {p for paths in key_paths(root).values() for p in paths}


def _same_place(path: str, loc: list[Any]) -> bool:
    """The llmtune path names the block the unknown key sits in (list indexes as [i])."""
    here = ".".join("[i]" if isinstance(p, int) else str(p) for p in loc[:-1]).replace(".[i]", "[i]")
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    return here == parent


def synonym_message(root: type[BaseModel], loc: list[Any]) -> str | None:
    """For an unknown key at loc: what llmtune calls it (a synonym from another tool, or an llmtune key at
    another level), as the text after ``<path>: ``; None when the key is not known under another name."""
    key = str(loc[-1])
    if key in SYNONYMS:
        paths, remark = SYNONYMS[key]
        if not paths:
            return f"unknown key; llmtune takes it as {remark}"
        target = next((p for p in paths if _exists(root, p)), None)
        if target is None:
            return None
        more = f" ({remark})" if remark else ""
        return f"unknown key; llmtune calls it {target}{more}"
    own = key_paths(root).get(key, [])
    if len(own) == 1 and not _same_place(own[0], loc):
        return f"unknown key here; it belongs at {own[0]}"
    return None


def render_doc() -> str:
    """docs/key-names.md: the table above, for people moving a config from another tool."""
    lines = [
        "# Key names from other tools",
        "",
        "Generated from `llmtune/recipe/synonyms.py` by `scripts/gen_key_names.py`; do not edit by hand.",
        "A recipe key named as in HF TrainingArguments, TRL, LLaMA-Factory, axolotl or peft is refused with the",
        "llmtune name, e.g. `train.learning_rate: unknown key; llmtune calls it train.lr`. An llmtune key at the",
        "wrong level is refused with its place (`lr: unknown key here; it belongs at train.lr`). Where two paths",
        "are listed, the one of the recipe's stage is named.",
        "",
        "| other tools' key | llmtune key | note |",
        "|---|---|---|",
    ]
    for key, (paths, remark) in SYNONYMS.items():
        target = " / ".join(f"`{p}`" for p in paths) or "(not a recipe key)"
        lines.append(f"| `{key}` | {target} | {remark} |")
    return "\n".join(lines) + "\n"
