"""Loading a model: ModelSpec says what (where from, with which head, trained with which method or frozen),
and load is the one loader, for training and for inference. The tokenizer and its checks are in
llmtune.model.tokenizer, the fine-tuning methods in llmtune.model.peft.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console

from llmtune.errors import RecipeError, UserError
from llmtune.model.hub import from_pretrained_kwargs, hub_kwargs
from llmtune.model.kernels import apply_kernels
from llmtune.model.peft import apply_method
from llmtune.model.tokenizer import check_tokenizers_agree, tokenizer_from
from llmtune.paths import looks_local
from llmtune.recipe.schema import FinetuningConfig, ModelConfig, RecipeBase

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
        config = AutoConfig.from_pretrained(m.path, **hub_kwargs(m))
    except (OSError, ValueError):
        return None  # load_model reports an unreadable config with the fix
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
    kernels: str = "none"  # train.kernels: fused layer kernels for a trained model (model/kernels.py)
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
        return from_pretrained_kwargs(self.revision, self.token, self.trust_remote_code)

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
            kernels=recipe.train.kernels,
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
    apply_kernels(model, spec.kernels)  # before peft wraps the layers
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


def describe(loaded: LoadedModel, recipe: RecipeBase, console: Console) -> None:
    pct = 100.0 * loaded.trainable_params / max(loaded.total_params, 1)
    ft = recipe.finetuning
    options = [name for name, on in (("dora", ft.use_dora), ("rslora", ft.use_rslora)) if on]
    method = ft.method + (f" ({' + '.join(options)})" if options and ft.method in ("lora", "qlora") else "")
    console.print(
        f"model: {recipe.model.path} | method {method} | "
        f"trainable {loaded.trainable_params:,} / {loaded.total_params:,} params ({pct:.2f}%)"
    )
