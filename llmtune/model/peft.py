"""The fine-tuning methods: making the parts of a model that train trainable, and reading adapter configs.

full: every weight; freeze: the last N decoder layers and named modules; lora (dora / rslora), adalora, ia3,
prefix, prompt, ptuning: peft adapters; qlora: lora on a 4-bit NF4 base (bitsandbytes), prepared for k-bit
training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmtune.errors import RecipeError, UserError
from llmtune.recipe.schema import PROMPT_METHODS, FinetuningConfig


def apply_method(
    model: torch.nn.Module,
    ft: FinetuningConfig,
    grad_ckpt: bool,
    head_modules: list[str] | None = None,
    tokenizer: Any | None = None,
    task_type: str | None = None,
) -> torch.nn.Module:
    """head_modules: new modules (a reward head) that train in full with every method and are saved with
    the adapter. task_type: the peft task (default SEQ_CLS with a head, else CAUSAL_LM; TOKEN_CLS for a PRM)."""
    head_modules = head_modules or []
    if ft.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if ft.method == "freeze":
        model = _freeze(model, ft)
        for name, p in model.named_parameters():
            if any(name.split(".")[0] == h for h in head_modules):
                p.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if ft.method == "qlora":
        _keep_4bit_layout(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=grad_ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    names = [n for n, _ in model.named_modules() if n]
    for wanted in ft.modules_to_save:
        if not any(n == wanted or n.endswith("." + wanted) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
            raise RecipeError(
                f"finetuning.modules_to_save: no module of the model is called {wanted!r}",
                hint=f"name modules that exist (this model has {', '.join(leaves)}), or remove it",
            )
    to_save = [*ft.modules_to_save, *head_modules] or None
    task_type = task_type or ("SEQ_CLS" if head_modules else "CAUSAL_LM")
    config = peft_config(ft, task_type, to_save, model_type=getattr(model.config, "model_type", None))
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        key = "finetuning.ia3" if ft.method == "ia3" else f"finetuning.target_modules {ft.target_modules!r}"
        raise RecipeError(
            f"{key}: {str(e).splitlines()[0]}",
            hint="name modules that exist in the model (e.g. q_proj, v_proj), or use all-linear",
        ) from None
    if ft.method == "prompt" and ft.prompt.init_text:
        _init_prompt_from_text(model, ft, tokenizer)
    if grad_ckpt and ft.method not in PROMPT_METHODS:
        model.enable_input_require_grads()
    return model


def peft_config(
    ft: FinetuningConfig, task_type: str, modules_to_save: list[str] | None = None, model_type: str | None = None
) -> Any:
    """The peft config of a fine-tuning method (lora / qlora with their dora / rslora options, adalora, ia3,
    prefix, prompt, ptuning). AdaLoRA's total_step is a placeholder here: the trainer sets it to the run's
    real optimizer-step count before the first step (llmtune.engine.adalora)."""
    import peft

    lora = {"lora_alpha": ft.lora_alpha, "lora_dropout": ft.lora_dropout, "target_modules": ft.target_modules}
    common = {"task_type": task_type, "modules_to_save": modules_to_save}
    if ft.method in ("lora", "qlora"):
        return peft.LoraConfig(
            r=ft.lora_r, use_rslora=ft.use_rslora, use_dora=ft.use_dora, bias="none", **lora, **common
        )
    if ft.method == "adalora":
        a = ft.adalora
        return peft.AdaLoraConfig(
            init_r=a.init_r,
            target_r=a.target_r,
            tinit=a.tinit,
            tfinal=a.tfinal,
            deltaT=a.delta_t,
            beta1=a.beta1,
            beta2=a.beta2,
            total_step=a.tinit + a.tfinal + 1,
            **lora,
            **common,
        )
    if ft.method == "ia3":
        targets, feedforward = ft.ia3.target_modules, ft.ia3.feedforward_modules
        if targets is not None and feedforward is None:  # those of the targets peft counts as feed-forward
            default = peft.utils.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type or "", [])
            feedforward = [m for m in targets if m in default]
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, **common)
    p = ft.prompt
    if ft.method == "prefix":
        return peft.PrefixTuningConfig(
            num_virtual_tokens=p.num_virtual_tokens,
            prefix_projection=p.prefix_projection,
            encoder_hidden_size=p.encoder_hidden_size,
            **common,
        )
    if ft.method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, **common)
    assert ft.method == "ptuning", ft.method
    return peft.PromptEncoderConfig(
        num_virtual_tokens=p.num_virtual_tokens,
        encoder_hidden_size=p.encoder_hidden_size,
        encoder_reparameterization_type=p.encoder_type.upper(),
        **common,
    )


def _init_prompt_from_text(model: Any, ft: FinetuningConfig, tokenizer: Any) -> None:
    """Prompt tuning from text (peft's PromptTuningInit.TEXT, with the recipe's tokenizer): the virtual tokens
    start as the embeddings of finetuning.prompt.init_text's tokens, repeated or cut to num_virtual_tokens."""
    n = ft.prompt.num_virtual_tokens
    ids = tokenizer(ft.prompt.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RecipeError("finetuning.prompt.init_text has no tokens", hint="give some text, or remove init_text")
    ids = (ids * (n // len(ids) + 1))[:n]
    embed = model.get_input_embeddings()
    with torch.no_grad():
        init = embed(torch.tensor(ids, device=embed.weight.device)).detach().clone()
        model.prompt_encoder["default"].embedding.weight.copy_(init.to(torch.float32))


def _keep_4bit_layout(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place the first time a layer runs in
    eval mode without gradients (an inference-only layout, which also needs out_features % 32 == 0).
    Evaluation inside a training run must leave the weights as training uses them, so turn that off."""
    import bitsandbytes as bnb

    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's list of transformer blocks: the longest ModuleList (model.layers, h, blocks, ...)."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise RecipeError(
            "finetuning.method freeze: the model has no list of decoder layers",
            hint="use finetuning.trainable_modules to name what trains, or another method",
        )
    return best


def _freeze(model: torch.nn.Module, ft: FinetuningConfig) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    if ft.trainable_layers:
        _, layers = decoder_layers(model)
        n = min(ft.trainable_layers, len(layers))
        for layer in list(layers)[len(layers) - n :]:
            for p in layer.parameters():
                p.requires_grad_(True)
    unmatched = []
    for pattern in ft.trainable_modules:
        hits = [p for name, p in model.named_parameters() if pattern in name]
        if not hits:
            unmatched.append(pattern)
        for p in hits:
            p.requires_grad_(True)
    if unmatched:
        names = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()})[:12]
        raise RecipeError(
            f"finetuning.trainable_modules: no parameter name contains {', '.join(map(repr, unmatched))}",
            hint=f"use substrings of parameter names, e.g. {', '.join(names[:6])}",
        )
    return model


def adapter_config_or_none(path: str | Path) -> dict[str, Any] | None:
    """adapter_config.json of a directory, None when there is none; invalid JSON is an error."""
    f = Path(path).expanduser() / "adapter_config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON: {e}") from None
