"""Reward models: a causal LM's backbone with a scalar head (``AutoModelForSequenceClassification``, one label).

Loading goes through ``llmtune.model.load.load(ModelSpec(..., head="score"))``: the head ``score`` is new (randomly
initialised), the reward is read at the last token that is not padding (right padding, so the config carries
``pad_token_id``), and with lora / qlora the head trains in full and is saved with the adapter
(``modules_to_save=["score"]``, peft task SEQ_CLS).

What a run leaves in output_dir:
- full / freeze: ``model.safetensors`` + ``config.json`` (``LlamaForSequenceClassification``-style, num_labels 1)
  and the tokenizer: ``AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)``.
- lora / qlora: the peft adapter with the head (``PeftModel.from_pretrained(
  AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), out)``), and, unless
  ``rm.export_merged: false``, ``out/merged/``: the adapter merged into the base (de-quantized for qlora),
  loadable without peft.
- rm.loss process (a PRM): the same, with ``AutoModelForTokenClassification`` (num_labels 2: 0 bad, 1 good)
  in place of the sequence classifier (peft task TOKEN_CLS), and ``prm.json`` beside config.json / the
  adapter (and in merged/): the step separator the model was trained with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from llmtune.model.hub import hub_kwargs
from llmtune.model.load import PRM_LABELS, Head, ModelSpec, load
from llmtune.recipe.schema import RecipeBase


def save_merged_reward_model(
    recipe: RecipeBase, adapter_dir: Path, out: Path, tokenizer: Any, head: Head = "score"
) -> list[str]:
    """Merge the adapter (and its head) saved in adapter_dir into a fresh, unquantized base and save it to out.

    The base is loaded in the training precision on the CPU (a 4-bit base is never merged into: that is lossy).
    head: "score" (a reward model) or "token" (a process reward model).
    """
    spec = dataclasses.replace(
        ModelSpec.frozen(recipe, recipe.model.path, "model.path", head=head), adapter=str(adapter_dir)
    )
    merged = load(spec, torch.device("cpu"), tokenizer).model.merge_and_unload()
    merged.config.use_cache = True  # as a model loaded from the hub has it
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sorted(p.name for p in out.iterdir() if p.is_file())


PRM_INFO = "prm.json"


def write_prm_info(out: Path, separator: str) -> None:
    """Record beside a process reward model what scoring needs: the step separator and the head's classes."""
    import json

    info = {
        "kind": "process_reward_model",
        "step_separator": separator,
        "labels": {str(k): v for k, v in PRM_LABELS.items()},
        "score": "softmax(logits)[..., 1] at the last token of each step and its separator",
    }
    (out / PRM_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_prm_info(path: str | Path) -> dict[str, Any] | None:
    """prm.json of a model directory (a PRM), or None when it has none (an outcome reward model)."""
    import json

    f = Path(path).expanduser() / PRM_INFO
    if not f.is_file():
        return None
    return json.loads(f.read_text(encoding="utf-8"))


def load_output_embedding(recipe: RecipeBase, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The base causal LM's output embedding (V, H), read from its safetensors without loading the model:
    ``lm_head.weight``, or the input embedding when the two are tied. A frozen tensor for rm.lm_loss_weight."""
    import json

    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.utils import cached_file

    from llmtune.errors import RecipeError

    m = recipe.model
    kw = hub_kwargs(m)
    hub = {k: v for k, v in kw.items() if k in ("revision", "token")}
    config = AutoConfig.from_pretrained(m.path, **kw)
    index = cached_file(m.path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    if index is not None:
        weight_map: dict[str, str] = json.loads(Path(index).read_text())["weight_map"]
    else:
        single = cached_file(m.path, "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub)
        if single is None:
            raise RecipeError(
                f"rm.lm_loss_weight: {m.path} has no safetensors weights to read the output embedding from",
                hint="convert the model to safetensors, or set rm.lm_loss_weight: 0",
            )
        with safe_open(single, "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    tied = getattr(getattr(config, "text_config", None) or config, "tie_word_embeddings", False)
    suffixes = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight") if tied else ("lm_head.weight",)
    key = next((k for k in weight_map if k.endswith(suffixes)), None)
    if key is None and not tied:  # checkpoints that tie without saying so
        key = next((k for k in weight_map if k.endswith(("embed_tokens.weight", "wte.weight"))), None)
    if key is None:
        raise RecipeError(
            f"rm.lm_loss_weight: no output embedding found in {m.path}",
            hint="use a causal LM checkpoint as model.path, or set rm.lm_loss_weight: 0",
        )
    shard = cached_file(m.path, weight_map[key], **hub)
    with safe_open(shard, "pt") as f:
        weight = f.get_tensor(key)
    return weight.to(device=device, dtype=dtype).requires_grad_(False)
