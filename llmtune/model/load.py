"""Loading the model and tokenizer a recipe names, and making the parts that train trainable.

full: every weight; freeze: the last N decoder layers and named modules; lora (dora / rslora), adalora, ia3,
prefix, prompt, ptuning: peft adapters; qlora: lora on a 4-bit NF4 base (bitsandbytes), prepared for k-bit
training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console

from llmtune.errors import RecipeError, UserError
from llmtune.manifest import RunManifest, TokenizerRecord
from llmtune.paths import looks_local, same_path
from llmtune.recipe.schema import PROMPT_METHODS, FinetuningConfig, ModelConfig, RecipeBase

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: Any  # a torch module (a peft model with an adapter)
    tokenizer: Any
    trainable_params: int = 0
    total_params: int = 0
    name: str = ""  # the adapter's path, else the model's
    has_adapter: bool = False
    engine: Any = None  # a frozen model's ZeRO-3 inference engine, set by the caller's Partition.wrap (keep alive)


@dataclass(frozen=True)
class Partition:
    """How a frozen model is spread over a ZeRO-3 run's processes, handed in by the training strategy:
    ``config`` (the DeepSpeed config that partitions the weights while they load) and ``wrap`` (partitioned
    module -> the inference engine whose hooks gather each layer's weights for its forward pass; it must stay
    alive while the model is used)."""

    config: dict[str, Any]
    wrap: Callable[[torch.nn.Module], Any]

    def apply(self, loaded: LoadedModel) -> LoadedModel:
        """``loaded`` (loaded with zero3=config) wrapped: its engine kept beside the model."""
        loaded.engine = self.wrap(loaded.model)
        return loaded


def _hub_kwargs(m: ModelConfig) -> dict[str, Any]:
    """revision, token and trust_remote_code for from_pretrained, as the model block sets them."""
    return ModelSpec(path=m.path, **_model_options(m)).hub_kwargs()


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


def tokenizer_from(*paths: str | None, set_pad: bool = True, **kwargs: Any) -> Any:
    """The tokenizer of the first path that has one (an adapter's carries the chat template it was trained
    with). set_pad: a missing pad token becomes EOS (padding is masked by position, never by id). kwargs go
    to AutoTokenizer.from_pretrained (revision, token, trust_remote_code)."""
    from transformers import AutoTokenizer

    last = ""
    for p in filter(None, paths):
        d = Path(p).expanduser()
        if d.is_dir() and not any((d / f).is_file() for f in TOKENIZER_FILES):
            continue
        try:
            tok = AutoTokenizer.from_pretrained(p, **kwargs)
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


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype a model samples in, next to a run of `precision`: fp32 for fp32 and on the CPU, else the
    run's own (bf16 / fp16 on a GPU)."""
    if precision == "fp32" or device.type != "cuda":
        return torch.float32
    return DTYPES[precision]


# ------------------------------------------------------------------------------------------ the model spec

Head = Literal["lm", "score", "value", "token"]
_AUTO_CLASS = {
    "lm": "AutoModelForCausalLM",
    "score": "AutoModelForSequenceClassification",
    "value": "AutoModelForSequenceClassification",
    "token": "AutoModelForTokenClassification",
}
# a process reward model's two classes (llmtune.objectives.prm): 1 is a good step
PRM_LABELS = {0: "bad", 1: "good"}


@dataclass(frozen=True)
class ModelSpec:
    """What to load, without the recipe: where from, with which head, and whether it trains.

    head: "lm", a causal LM; "score", a sequence classifier with one label (a reward model: the score at the
    last real token); "value", the same class read at every token (a PPO critic); "token", a token classifier
    with two labels (a process reward model: bad / good at each step's end). finetuning: the method a
    trained model gets; None for a frozen model (a reference, a reward model, eval's models), which loads for
    inference only: eval mode, no gradients, optionally with a peft adapter on top."""

    path: str
    head: Head = "lm"
    finetuning: FinetuningConfig | None = None
    adapter: str | None = None  # frozen models: a peft adapter on `path`
    dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32  # qlora: what the 4-bit layers compute in
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    revision: str | None = None
    token: str | None = None
    trust_remote_code: bool = False
    what: str = "model.path"  # how messages name it

    @property
    def trainable(self) -> bool:
        return self.finetuning is not None

    @property
    def score_head(self) -> bool:
        return self.head in ("score", "value", "token")

    def hub_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision:
            kw["revision"] = self.revision
        if self.token:
            kw["token"] = self.token
        return kw

    @classmethod
    def trained(cls, recipe: RecipeBase, head: Head = "lm") -> ModelSpec:
        """The model a recipe trains: model.path with the recipe's fine-tuning method."""
        m = recipe.model
        compute = torch.float32 if recipe.precision == "fp32" else DTYPES[recipe.precision]
        return cls(
            path=m.path,
            head=head,
            finetuning=recipe.finetuning,
            dtype=weight_dtype(recipe),
            compute_dtype=compute,
            gradient_checkpointing=recipe.train.gradient_checkpointing,
            **_model_options(m),
        )

    @classmethod
    def frozen(cls, recipe: RecipeBase, path: str, what: str, head: Head = "lm") -> ModelSpec:
        """A frozen model next to the one a recipe trains (a reference), in the recipe's weight dtype, with
        its hub options and attention implementation."""
        return cls(path=path, head=head, dtype=weight_dtype(recipe), what=what, **_model_options(recipe.model))


def _model_options(m: ModelConfig) -> dict[str, Any]:
    return {
        "attn_implementation": m.attn_implementation,
        "revision": m.revision,
        "token": m.hub_token.get_secret_value() if m.hub_token is not None else None,
        "trust_remote_code": m.trust_remote_code,
    }


# ----------------------------------------------------------------------------------------------- the loader


def load(
    spec: ModelSpec, device: torch.device, tokenizer: Any | None = None, *, zero3: dict[str, Any] | None = None
) -> LoadedModel:
    """The one loader, for training and eval. A trained model gets its fine-tuning method (call it with
    HfDeepSpeedConfig alive for ZeRO-3: the trainer wraps it in its engine). A frozen model is set up for
    inference; ``zero3`` (a DeepSpeed ZeRO-3 config, Partition.config) partitions it over the processes instead
    of a full copy on each, and the caller then wraps it (Partition.apply). tokenizer: None loads the one the
    adapter (or else the model) carries."""
    if spec.trust_remote_code:
        warnings.warn(f"trust_remote_code is true: Python code shipped with {spec.path} will run", stacklevel=2)
    if spec.trainable:
        assert tokenizer is not None, "a trained model loads with the recipe's tokenizer"
        return _load_trained(spec, device, tokenizer)
    return _load_frozen(spec, device, tokenizer, zero3)


def _from_pretrained(spec: ModelSpec, tokenizer: Any, **extra: Any) -> tuple[Any, dict[str, Any]]:
    """The model with spec's head (and its loading info), with clear errors for what the user can fix."""
    import transformers

    kwargs: dict[str, Any] = {"dtype": spec.dtype, **spec.hub_kwargs(), **extra}
    if spec.attn_implementation != "auto":
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.head == "token":
        label2id = {v: k for k, v in PRM_LABELS.items()}
        kwargs.update(num_labels=2, id2label=PRM_LABELS, label2id=label2id, pad_token_id=tokenizer.pad_token_id)
    elif spec.score_head:
        kwargs.update(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    auto_class = getattr(transformers, _AUTO_CLASS[spec.head])
    # a local model by its absolute path: adapters record it as their base, and relative to the directory
    # training ran in it would not be found from anywhere else
    where = str(Path(spec.path).expanduser().resolve()) if looks_local(spec.path) else spec.path
    try:
        # a reward model's new (or adapter-borne) score head is the point, not a problem to report
        with quiet_load_report(spec.score_head):
            return auto_class.from_pretrained(where, output_loading_info=True, **kwargs)
    except ImportError as e:
        if "flash" in str(e).lower():
            raise RecipeError(
                f"model.attn_implementation {spec.attn_implementation} is not available here: {e}",
                hint="use attn_implementation: sdpa (or install flash-attn on a CUDA machine)",
            ) from None
        raise
    except ValueError as e:
        if "attn_implementation" in str(e) or "attention" in str(e).lower():
            raise RecipeError(
                f"model.attn_implementation: {str(e).splitlines()[0]}", hint="use attn_implementation: sdpa"
            ) from None
        raise UserError(f"could not load {spec.what} {spec.path}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise UserError(
            f"could not load {spec.what} {spec.path}: {str(e).splitlines()[0]}",
            hint="pass a local model directory (config.json + safetensors weights) or a hub id",
        ) from None


def _fit_tokenizer(model: Any, spec: ModelSpec, tokenizer: Any) -> None:
    """Embeddings for the pad token llmtune added (a tokenizer with more tokens than that is another
    model's), and the pad id where sequence classifiers and generation read it."""
    n_embed = model.get_input_embeddings().num_embeddings
    added = getattr(tokenizer, "llmtune_added_tokens", 0)
    if len(tokenizer) > n_embed + added:
        raise RecipeError(
            f"the tokenizer has {len(tokenizer)} tokens but the model {spec.path} has embeddings for {n_embed}: "
            "the model was trained with another tokenizer",
            hint="use the tokenizer saved with the model (leave model.tokenizer unset, or point it at that model's "
            "directory)",
        )
    if len(tokenizer) > n_embed:  # only the pad token llmtune added
        model.resize_token_embeddings(len(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if spec.score_head:  # pooling takes the last token that is not padding: it needs the pad id
        model.config.pad_token_id = pad if pad is not None else 0
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad
    model.config.use_cache = False  # generation turns it on for itself (generation.sample.generation_mode)


def _load_trained(spec: ModelSpec, device: torch.device, tokenizer: Any) -> LoadedModel:
    ft = spec.finetuning
    assert ft is not None
    extra: dict[str, Any] = {}
    if ft.method == "qlora":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=ft.quant_type,
            bnb_4bit_use_double_quant=ft.double_quant,
            bnb_4bit_compute_dtype=spec.compute_dtype,
        )
        extra["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    config = load_config(spec.path, spec.what, **spec.hub_kwargs())
    if spec.head == "lm":
        refuse_reward_model(config, f"{spec.what} {spec.path}")
    model, _ = _from_pretrained(spec, tokenizer, **extra)
    _fit_tokenizer(model, spec, tokenizer)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(
        model,
        ft,
        spec.gradient_checkpointing,
        head_modules=["score"] if spec.score_head else [],
        tokenizer=tokenizer,
        task_type="TOKEN_CLS" if spec.head == "token" else None,
    )
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    if trainable == 0:
        raise RecipeError(
            "no parameter is trainable with this finetuning setup",
            hint="for method freeze, raise finetuning.trainable_layers or name finetuning.trainable_modules",
        )
    return LoadedModel(model, tokenizer, trainable, total, name=spec.path)


REWARD_MODEL_HINT = (
    "pass the output of an rm run (`llmtune train` with stage: rm): its output directory (with lora / qlora the "
    "adapter, which carries the score head) or its merged/ export"
)


def _load_frozen(
    spec: ModelSpec, device: torch.device, tokenizer: Any | None, zero3: dict[str, Any] | None
) -> LoadedModel:
    config = load_config(spec.path, spec.what, **spec.hub_kwargs())
    if spec.head == "lm":
        refuse_reward_model(config, f"{spec.what} {spec.path}")
    if spec.adapter is not None:
        check_tokenizers_agree(
            [(spec.adapter, "the adapter"), (spec.path, "the base model")],
            hint="pass the base model the adapter was trained on (it saved that model's tokenizer)",
        )
    tok = tokenizer if tokenizer is not None else tokenizer_from(spec.adapter, spec.path, **spec.hub_kwargs())
    hf_ds = None
    if zero3 is not None:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(zero3)  # alive while the weights load: each process keeps only its share
    model, info = _from_pretrained(spec, tok)
    head = "lm_head" if spec.head == "lm" else "score"
    head_missing = any(k.split(".")[0] == head for k in info.get("missing_keys", ()))
    if spec.score_head and head_missing and (spec.adapter is None or not _adapter_has(spec.adapter, "score")):
        raise UserError(
            f"{spec.what} {spec.adapter or spec.path} has no trained score head (its weights hold no score.*): "
            "it is not a reward model, and its scores would come from a random head",
            hint=REWARD_MODEL_HINT,
        )
    if spec.head == "lm" and head_missing and not getattr(model.config, "tie_word_embeddings", False):
        raise UserError(
            f"{spec.what} {spec.path} has no language-model head in its weights (lm_head is missing); "
            "it would generate from a random one",
            hint="pass a causal LM (a cpt / sft / dpo output, or a base model)",
        )
    _fit_tokenizer(model, spec, tok)
    if spec.adapter is not None:
        model = _with_adapter(model, spec.path, spec.adapter)
    model.requires_grad_(False)
    if zero3 is None:  # ZeRO-3: partitioned; the caller wraps it in an inference engine (Partition.wrap)
        model.to(device)
    del hf_ds
    model.eval()
    total = sum(_numel(p) for p in model.parameters())
    return LoadedModel(model, tok, 0, total, name=spec.adapter or spec.path, has_adapter=spec.adapter is not None)


def _adapter_has(adapter: str, module: str) -> bool:
    """Whether an adapter's saved weights hold `module` in full (modules_to_save); True when unsure."""
    f = Path(adapter).expanduser() / "adapter_model.safetensors"
    if not f.is_file():
        return True
    from safetensors import safe_open

    try:
        with safe_open(str(f), "pt") as st:
            return any(module in k.split(".") for k in st.keys())  # noqa: SIM118 (safe_open has no __iter__)
    except Exception:  # an unreadable file is reported by peft when it loads
        return True


def _with_adapter(model: Any, base: str, adapter: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise UserError(
            f"the adapter {adapter} does not fit {base}: {str(e).strip().splitlines()[0]}",
            hint="pass the base model the adapter was trained on",
        ) from None


@contextlib.contextmanager
def quiet_load_report(quiet: bool = True) -> Iterator[None]:
    """Hide transformers' load report (and the tensor-parallel note it then logs instead) while a reward
    model loads: that lm_head is unused and the head `score` is new (or comes with the adapter) is the
    point, not a problem."""
    names = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
    loggers = [logging.getLogger(n) for n in names]
    levels = [log.level for log in loggers]
    if quiet:
        for log in loggers:
            log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
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


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave an empty local tensor


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


def describe(loaded: LoadedModel, recipe: RecipeBase, console: Console) -> None:
    pct = 100.0 * loaded.trainable_params / max(loaded.total_params, 1)
    ft = recipe.finetuning
    options = [name for name, on in (("dora", ft.use_dora), ("rslora", ft.use_rslora)) if on]
    method = ft.method + (f" ({' + '.join(options)})" if options and ft.method in ("lora", "qlora") else "")
    console.print(
        f"model: {recipe.model.path} | method {method} | "
        f"trainable {loaded.trainable_params:,} / {loaded.total_params:,} params ({pct:.2f}%)"
    )


def is_local_dir(path: str) -> bool:
    return Path(os.path.expanduser(path)).is_dir()
