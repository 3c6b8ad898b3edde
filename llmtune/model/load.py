"""Loading the model and tokenizer a recipe names, and making the parts that train trainable.

full: every weight; freeze: the last N decoder layers and named modules; lora: peft adapters;
qlora: peft adapters on a 4-bit NF4 base (bitsandbytes), prepared for k-bit training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmtune.errors import RecipeError, UserError
from llmtune.manifest import RunManifest, TokenizerRecord
from llmtune.recipe.schema import FinetuningConfig, ModelConfig, RecipeBase, looks_local

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    trainable_params: int
    total_params: int


def _hub_kwargs(m: ModelConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if m.revision:
        kw["revision"] = m.revision
    token = m.hub_token.get_secret_value() if m.hub_token is not None else None
    if token:
        kw["token"] = token
    return kw


def load_tokenizer(m: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    path = m.tokenizer or m.path
    try:
        tok = AutoTokenizer.from_pretrained(path, **_hub_kwargs(m))
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the tokenizer from {path}: {str(e).splitlines()[0]}",
            hint="check model.path / model.tokenizer (a local directory with tokenizer files, or a hub id; "
            "offline machines need a local directory)",
        ) from None
    if tok.pad_token_id is None:
        # Padding positions are masked by attention_mask and labels=-100 by position, never by comparing
        # token ids, so reusing EOS as the pad token does not mask EOS out of the labels.
        candidate = tok.eos_token or tok.unk_token
        if candidate is None:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
            tok.llmtune_added_tokens = 1
        else:
            tok.pad_token = candidate
    tok.padding_side = "right"
    _check_model_tokenizer(m, tok)
    return tok


def _check_model_tokenizer(m: ModelConfig, tok: Any) -> None:
    """The tokenizer loaded for m must be the one m.path was trained with: the same vocabulary as the tokenizer
    saved with the model (when model.tokenizer points elsewhere), and the vocabulary the run.json of an llmtune
    output records."""
    override = m.tokenizer is not None and not same_path(m.tokenizer, m.path)
    if override:
        own = own_tokenizer(m.path, **_hub_kwargs(m))
        if own is not None:
            compare_vocabularies(
                tok, f"model.tokenizer {m.tokenizer}", own, f"the tokenizer saved with model.path {m.path}"
            )
    record = saved_tokenizer_record(m.path)
    if record is not None:
        check_tokenizer_record(
            tok,
            record,
            f"model.path {m.path}",
            tok_label=f"model.tokenizer {m.tokenizer}" if override else f"the tokenizer saved in {m.path}",
            hint=TOKENIZER_HINT
            if override
            else "restore the tokenizer files the run saved in that directory, or set model.tokenizer to the "
            "tokenizer the model was trained with",
        )


def load_config(path: str, what: str, **kwargs: Any) -> Any:
    """A model's config, or a UserError naming where it was looked for and the fix."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load a model config from {what} {path}: {str(e).splitlines()[0]}",
            hint="pass a local model directory (config.json + safetensors weights) or a hub id",
        ) from None


def position_limit(m: ModelConfig) -> int | None:
    """The longest sequence the model's position embeddings cover (None when it does not say)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(m.path, **_hub_kwargs(m))
    except (OSError, ValueError):
        return None  # load_model reports an unreadable config with the fix
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_from(*paths: str | None, set_pad: bool = True) -> Any:
    """The tokenizer of the first path that has one (an adapter's carries the chat template it was trained
    with). set_pad: a missing pad token becomes EOS (padding is masked by position, never by id)."""
    from transformers import AutoTokenizer

    last = ""
    for p in filter(None, paths):
        d = Path(p).expanduser()
        if d.is_dir() and not any((d / f).is_file() for f in TOKENIZER_FILES):
            continue
        try:
            tok = AutoTokenizer.from_pretrained(p)
        except (OSError, ValueError) as e:
            last = str(e).splitlines()[0]
            continue
        if set_pad and tok.pad_token_id is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        return tok
    raise UserError(
        f"no tokenizer could be loaded from {', '.join(p for p in paths if p)} {last}".strip(),
        hint="the model (or adapter) directory needs tokenizer files",
    )


# ------------------------------------------------------------------------------- tokenizer vocabularies

TOKENIZER_HINT = (
    "use the tokenizer saved with the model (leave model.tokenizer unset, or point it at the model's directory), "
    "and train every stage of a pipeline with one tokenizer"
)


def same_path(a: str, b: str) -> bool:
    """Two model / tokenizer paths name the same place (local directories compared resolved)."""
    if a == b:
        return True
    if looks_local(a) and looks_local(b):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


def vocab_by_id(tok: Any) -> list[str | None]:
    """The token string of every id, in id order (added tokens included); None for an id no token has.

    One get_vocab() call: fast for 150k-token vocabularies."""
    vocab = tok.get_vocab()
    size = max(len(tok), max(vocab.values(), default=-1) + 1)
    out: list[str | None] = [None] * size
    for token, i in vocab.items():
        out[i] = token
    return out


def _show(token: str | None) -> str:
    return "(no token)" if token is None else repr(token)


def compare_vocabularies(tok_a: Any, label_a: str, tok_b: Any, label_b: str, *, hint: str | None = None) -> None:
    """RecipeError when an id both tokenizers have stands for different tokens. Tokens one of them has after
    the end of the other (a pad token llmtune added) are not compared."""
    a, b = vocab_by_id(tok_a), vocab_by_id(tok_b)
    shared = min(len(a), len(b))
    if a[:shared] == b[:shared]:
        return
    differ = [i for i in range(shared) if a[i] != b[i]]
    examples = ", ".join(f"id {i}: {_show(a[i])} vs {_show(b[i])}" for i in differ[:2])
    sizes = f"; {len(a)} vs {len(b)} tokens" if len(a) != len(b) else ""
    raise RecipeError(
        f"tokenizer mismatch: the tokenizer vocabulary of {label_a} differs from that of {label_b}: "
        f"{len(differ)} of the {shared} token ids they share stand for other tokens ({examples}{sizes}). "
        "A model reads the ids of another tokenizer as other words",
        hint=hint or TOKENIZER_HINT,
    )


def _has_tokenizer_files(d: Path) -> bool:
    return any((d / f).is_file() for f in TOKENIZER_FILES)


def own_tokenizer(path: str | None, **kwargs: Any) -> Any | None:
    """The tokenizer saved with a model (or adapter) path, None when there is none (never raises for that):
    a local directory without tokenizer files, a missing path, a hub id without a loadable tokenizer.
    kwargs go to AutoTokenizer.from_pretrained (revision, token, trust_remote_code)."""
    from transformers import AutoTokenizer

    if not path:
        return None
    d = Path(path).expanduser()
    if d.is_dir():
        if not _has_tokenizer_files(d):
            return None
    elif looks_local(path):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError):
        return None


def _sha256_tokens(tokens: Sequence[str | None]) -> str:
    # JSON with ASCII escapes: unambiguous (token boundaries, None) and encodable whatever the strings hold
    return hashlib.sha256(json.dumps(list(tokens), ensure_ascii=True).encode("ascii")).hexdigest()


def tokenizer_record(tok: Any) -> TokenizerRecord:
    """A fingerprint of a tokenizer's vocabulary for run.json: the number of ids, and the sha256 over the
    id-ordered token strings of all ids. check_tokenizer_record reads it back."""
    tokens = vocab_by_id(tok)
    return TokenizerRecord(size=len(tokens), vocab_sha256=_sha256_tokens(tokens))


def check_tokenizer_record(
    tok: Any, record: TokenizerRecord, label: str, *, tok_label: str = "the tokenizer", hint: str | None = None
) -> None:
    """RecipeError unless the first record.size ids of tok are the vocabulary the record was made from
    (tokens appended after them, e.g. a pad token, are allowed). label: what the record belongs to (the model
    trained with that vocabulary); tok_label: where tok comes from."""
    size, sha = record.size, record.vocab_sha256
    tokens = vocab_by_id(tok)
    if len(tokens) < size:
        problem = f"has {len(tokens)} tokens, fewer than the {size} of the tokenizer {label} was trained with"
    elif _sha256_tokens(tokens[:size]) != sha:
        problem = (
            f"has a different vocabulary from the tokenizer {label} was trained with (its run.json records "
            f"{size} tokens, vocab_sha256 {sha[:12]}...)"
        )
    else:
        return
    raise RecipeError(f"tokenizer mismatch: {tok_label} {problem}", hint=hint or TOKENIZER_HINT)


def saved_tokenizer_record(path: str | None) -> TokenizerRecord | None:
    """The tokenizer record of the run.json in a local llmtune output directory; None when there is no such
    directory, file or record, or it cannot be read."""
    manifest = RunManifest.read(path)
    return None if manifest is None else manifest.tokenizer


def check_tokenizers_agree(
    sources: Sequence[tuple[str | None, str]],
    loaded: tuple[Any, str] | None = None,
    *,
    hint: str | None = None,
    **kwargs: Any,
) -> None:
    """Fail fast when models that are to work together were trained with different tokenizers.

    sources: (path, label) of models / adapters (None paths are skipped). The tokenizer saved with each one
    (when it has one) must agree with the run.json record next to it and with the others' (and with
    `loaded`, a (tokenizer, label) already in use); a source with a record but no tokenizer files is checked
    against the first tokenizer found. kwargs go to own_tokenizer."""
    anchor = loaded
    pending: list[tuple[TokenizerRecord, str]] = []
    for path, label in sources:
        if not path:
            continue
        name = f"{label} {path}"
        tok = own_tokenizer(path, **kwargs)
        record = saved_tokenizer_record(path)
        if tok is None:
            if record is not None:
                pending.append((record, name))
            continue
        if record is not None:
            check_tokenizer_record(
                tok,
                record,
                name,
                tok_label=f"the tokenizer saved in {path}",
                hint="restore the tokenizer files that run saved in that directory",
            )
        if anchor is None:
            anchor = (tok, name)
        else:
            compare_vocabularies(anchor[0], anchor[1], tok, name, hint=hint)
    if anchor is not None:
        for record, name in pending:
            check_tokenizer_record(anchor[0], record, name, tok_label=f"the tokenizer of {anchor[1]}", hint=hint)


def weight_dtype(recipe: RecipeBase) -> torch.dtype:
    if recipe.model.dtype != "auto":
        return DTYPES[recipe.model.dtype]
    return DTYPES[recipe.precision]


def load_model(recipe: RecipeBase, device: torch.device, tokenizer: Any, head: str = "lm") -> LoadedModel:
    """Load the model and apply the fine-tuning method. Call with HfDeepSpeedConfig alive for ZeRO-3.

    head: "lm", the causal LM; "score", a reward model (AutoModelForSequenceClassification with one label: the
    backbone of the checkpoint with a new scalar head on the last non-pad token, trained in full)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m, ft = recipe.model, recipe.finetuning
    if m.trust_remote_code:
        warnings.warn(f"model.trust_remote_code is true: Python code shipped with {m.path} will run", stacklevel=2)
    dtype = weight_dtype(recipe)
    kwargs: dict[str, Any] = {"dtype": dtype, **_hub_kwargs(m)}
    if m.attn_implementation != "auto":
        kwargs["attn_implementation"] = m.attn_implementation
    if ft.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.float32 if recipe.precision == "fp32" else DTYPES[recipe.precision]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=ft.quant_type,
            bnb_4bit_use_double_quant=ft.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    config = load_config(m.path, "model.path", **_hub_kwargs(m))
    if head == "lm":
        refuse_reward_model(config, f"model.path {m.path}")
    auto_class: Any = AutoModelForCausalLM
    if head == "score":
        auto_class = AutoModelForSequenceClassification
        kwargs.update(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    try:
        with quiet_load_report(head == "score"):
            # a local model by its absolute path: adapters record it as their base, and relative to the
            # directory training ran in it would not be found from anywhere else
            where = str(Path(m.path).expanduser().resolve()) if looks_local(m.path) else m.path
            model = auto_class.from_pretrained(where, **kwargs)
    except ImportError as e:
        if "flash" in str(e).lower():
            raise RecipeError(
                f"model.attn_implementation {m.attn_implementation} is not available here: {e}",
                hint="use attn_implementation: sdpa (or install flash-attn on a CUDA machine)",
            ) from None
        raise
    except ValueError as e:
        if "attn_implementation" in str(e) or "attention" in str(e).lower():
            raise RecipeError(
                f"model.attn_implementation: {str(e).splitlines()[0]}", hint="use attn_implementation: sdpa"
            ) from None
        raise

    n_embed = model.get_input_embeddings().num_embeddings
    added = getattr(tokenizer, "llmtune_added_tokens", 0)
    if len(tokenizer) > n_embed + added:
        raise RecipeError(
            f"the tokenizer has {len(tokenizer)} tokens but the model {m.path} has embeddings for {n_embed}: "
            "the model was trained with another tokenizer",
            hint="use the tokenizer saved with the model (leave model.tokenizer unset, or point it at that model's "
            "directory)",
        )
    if len(tokenizer) > n_embed:  # only the pad token llmtune added
        model.resize_token_embeddings(len(tokenizer))
    if head == "score":  # pooling takes the last token that is not padding: it needs the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False

    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    model = apply_method(
        model, ft, recipe.train.gradient_checkpointing, head_modules=["score"] if head == "score" else []
    )
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    if trainable == 0:
        raise RecipeError(
            "no parameter is trainable with this finetuning setup",
            hint="for method freeze, raise finetuning.trainable_layers or name finetuning.trainable_modules",
        )
    return LoadedModel(model=model, tokenizer=tokenizer, trainable_params=trainable, total_params=total)


@contextlib.contextmanager
def quiet_load_report(quiet: bool = True) -> Iterator[None]:
    """Hide transformers' load report while a reward model loads: that lm_head is unused and the head
    `score` is new is the point, not a problem."""
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def check_reference_tokenizer(recipe: RecipeBase, path: str, tokenizer: Any) -> None:
    """A DPO reference at another path than model.path must have been trained with the policy's tokenizer:
    its log-probs are read at the policy's token ids."""
    if same_path(path, recipe.model.path):
        return  # load_tokenizer checked that one
    m = recipe.model
    policy = f"model.tokenizer {m.tokenizer}" if m.tokenizer else f"model.path {m.path}"
    check_tokenizers_agree(
        [(path, "dpo.reference")],
        loaded=(tokenizer, f"the policy ({policy})"),
        hint="use as dpo.reference a model trained with the policy's tokenizer (null: the starting model), "
        "and train every stage of a pipeline with one tokenizer",
        **_hub_kwargs(m),
    )


def is_reward_architecture(archs: list[str]) -> bool:
    """A config's `architectures` name a reward model (a sequence classifier with a score head)."""
    return any(a.endswith("ForSequenceClassification") for a in archs)


def refuse_reward_model(config: Any, what: str) -> None:
    """A reward model (a *ForSequenceClassification checkpoint) where a causal LM is needed: its language-model
    head would be created at random, silently."""
    archs = getattr(config, "architectures", None) or []
    if is_reward_architecture(archs):
        raise RecipeError(
            f"{what} is a reward model ({archs[0]}): it has no language-model head, and a random one would be "
            "used in its place",
            hint="use a causal LM here (e.g. the sft model the reward model was trained from); reward models are "
            "for stage rm and eval --reward-model",
        )


def load_reference_model(recipe: RecipeBase, path: str, device: torch.device, tokenizer: Any) -> torch.nn.Module:
    """A frozen causal LM in eval mode (a DPO reference): plain weights in the recipe's dtype, not quantized,
    not partitioned. Call when no HfDeepSpeedConfig is alive."""
    from transformers import AutoModelForCausalLM

    refuse_reward_model(load_config(path, "dpo.reference", **_hub_kwargs(recipe.model)), f"dpo.reference {path}")
    kwargs: dict[str, Any] = {"dtype": weight_dtype(recipe), **_hub_kwargs(recipe.model)}
    if recipe.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the reference model from {path}: {str(e).splitlines()[0]}",
            hint="dpo.reference must be a local model directory or a hub id (null: the starting model)",
        ) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.to(device).eval()


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave an empty local tensor


def apply_method(
    model: torch.nn.Module, ft: FinetuningConfig, grad_ckpt: bool, head_modules: list[str] | None = None
) -> torch.nn.Module:
    """head_modules: new modules (a reward head) that train in full with every method and are saved with
    the adapter."""
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
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

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
    config = LoraConfig(
        r=ft.lora_r,
        lora_alpha=ft.lora_alpha,
        lora_dropout=ft.lora_dropout,
        target_modules=ft.target_modules,
        modules_to_save=[*ft.modules_to_save, *head_modules] or None,
        use_rslora=ft.use_rslora,
        task_type="SEQ_CLS" if head_modules else "CAUSAL_LM",
        bias="none",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise RecipeError(
            f"finetuning.target_modules {ft.target_modules!r}: {str(e).splitlines()[0]}",
            hint="name modules that exist in the model (e.g. q_proj, v_proj), or use all-linear",
        ) from None
    if grad_ckpt:
        model.enable_input_require_grads()
    return model


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


def describe(loaded: LoadedModel, recipe: RecipeBase, console: Console) -> None:
    pct = 100.0 * loaded.trainable_params / max(loaded.total_params, 1)
    console.print(
        f"model: {recipe.model.path} | method {recipe.finetuning.method} | "
        f"trainable {loaded.trainable_params:,} / {loaded.total_params:,} params ({pct:.2f}%)"
    )


def is_local_dir(path: str) -> bool:
    return Path(os.path.expanduser(path)).is_dir()
