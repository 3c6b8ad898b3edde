"""The recipe schema: one pydantic model per stage, discriminated on ``stage:``.

Every block forbids unknown keys, every field has a default and a description, and cross-field
checks say how to fix what they reject. This module imports only pydantic (``llmtune validate``
and ``llmtune --help`` must not import torch).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from llmtune.paths import looks_local

DATA_FORMATS = (
    "alpaca",
    "sharegpt",
    "messages",
    "text",
    "pairs",
    "ranked",
    "pointwise",
    "unpaired",
    "prompts",
    "stepwise",
)
PREFERENCE_FORMATS = ("pairs", "ranked", "pointwise", "unpaired")


class Block(BaseModel):
    """Base of every recipe block: unknown keys are errors, assignments are validated.

    Numbers given for text keys are taken as text (``--set model.revision=20240101``,
    ``output_dir: 2024``): YAML types them as numbers, the schema says they are names.
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        protected_namespaces=(),
        coerce_numbers_to_str=True,
        allow_inf_nan=False,  # lr: .inf passes `gt=0`; no recipe number is meant to be infinite or NaN
    )


class ModelConfig(Block):
    path: str = Field(description="Hub id (e.g. Qwen/Qwen2.5-0.5B) or local directory of the model to start from.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="Dtype the weights are loaded in. auto: follow `precision` (fp32 when precision is fp32).",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        default="sdpa", description="Attention kernel. auto lets transformers choose."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run Python code shipped with the model. Only for models you trust."
    )
    chat_template: str | None = Field(
        default=None,
        description="null: the tokenizer's own template; else a built-in name (chatml, llama3, alpaca) or a "
        ".jinja file.",
    )
    tokenizer: str | None = Field(default=None, description="Tokenizer path if it differs from the model path.")
    hub_token: SecretStr | None = Field(
        default=None, description="Hub access token (never written to outputs; HF_TOKEN also works)."
    )


class AdaLoraOptions(Block):
    """AdaLoRA (method: adalora): LoRA whose rank budget shrinks over training to the most important
    singular directions (peft's AdaLoraConfig; its total_step is the run's real optimizer-step count)."""

    init_r: int = Field(default=12, ge=1, description="Rank every adapted matrix starts with.")
    target_r: int = Field(default=8, ge=1, description="Average rank the budget shrinks to.")
    tinit: int = Field(default=0, ge=0, description="Optimizer steps at full rank before the budget starts to shrink.")
    tfinal: int = Field(
        default=0,
        ge=0,
        description="Last optimizer steps at the final rank pattern (tinit + tfinal < the run's steps).",
    )
    delta_t: int = Field(default=1, ge=1, description="Steps between two rank re-allocations (peft's deltaT).")
    beta1: float = Field(default=0.85, gt=0, lt=1, description="EMA factor of the sensitivity.")
    beta2: float = Field(default=0.85, gt=0, lt=1, description="EMA factor of the uncertainty.")

    @model_validator(mode="after")
    def _budget(self) -> AdaLoraOptions:
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r {self.target_r} is above init_r {self.init_r}: the budget only "
                "shrinks; lower target_r or raise init_r"
            )
        return self


class Ia3Options(Block):
    """(IA)^3 (method: ia3): learned vectors that rescale keys, values and feed-forward activations."""

    target_modules: list[str] | None = Field(
        default=None,
        description="Modules that get a scaling vector; null: peft's default for the model type "
        "(llama: k_proj, v_proj, down_proj).",
    )
    feedforward_modules: list[str] | None = Field(
        default=None,
        description="Those of target_modules whose input (not output) is scaled; null: peft's default "
        "(llama: down_proj), or those of target_modules that peft's default names. A subset of target_modules.",
    )

    @model_validator(mode="after")
    def _subset(self) -> Ia3Options:
        t, f = self.target_modules, self.feedforward_modules
        if f is not None and t is None:
            raise ValueError(
                "feedforward_modules is set without target_modules: name target_modules too "
                "(feedforward_modules must be a subset of them)"
            )
        if t is not None and f is not None and not set(f) <= set(t):
            raise ValueError(
                f"feedforward_modules {sorted(set(f) - set(t))} are not in target_modules: "
                "add them to target_modules or remove them"
            )
        if t is not None and not t:
            raise ValueError("target_modules is empty: name at least one module, or use null")
        return self


class PromptOptions(Block):
    """Virtual tokens (methods prefix, prompt, ptuning): trained vectors in front of every sequence."""

    num_virtual_tokens: int = Field(default=16, ge=1, description="prefix / prompt / ptuning: virtual tokens.")
    encoder_hidden_size: int = Field(
        default=128,
        ge=1,
        description="ptuning: hidden size of the prompt encoder; prefix: of the projection (prefix_projection).",
    )
    encoder_type: Literal["mlp", "lstm"] = Field(default="mlp", description="ptuning: the prompt encoder.")
    prefix_projection: bool = Field(
        default=False, description="prefix: reparameterise the prefix through a 2-layer MLP."
    )
    init_text: str | None = Field(
        default=None,
        description="prompt: initialise the virtual tokens from this text's token embeddings (null: random).",
    )


LORA_METHODS = ("lora", "qlora")  # after the dora / rslora aliases are resolved
PROMPT_METHODS = ("prefix", "prompt", "ptuning")  # virtual tokens: nothing to merge into the weights
PEFT_METHODS = (*LORA_METHODS, "adalora", "ia3", *PROMPT_METHODS)  # the trained model is a peft adapter
MERGEABLE_METHODS = (*LORA_METHODS, "adalora", "ia3")
# which keys of FinetuningConfig each peft method reads beyond modules_to_save (the others must keep their
# defaults, so that a key set for another method is not silently ignored)
_METHOD_KEYS = {
    "lora": {"lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora"},
    "adalora": {"lora_alpha", "lora_dropout", "target_modules", "adalora"},
    "ia3": {"ia3"},
    "prefix": {"prompt"},
    "prompt": {"prompt"},
    "ptuning": {"prompt"},
}
_METHOD_KEYS["qlora"] = _METHOD_KEYS["lora"] | {"quant_type", "double_quant"}
_PROMPT_KEYS = {
    "num_virtual_tokens": PROMPT_METHODS,
    "encoder_hidden_size": ("ptuning", "prefix"),
    "encoder_type": ("ptuning",),
    "prefix_projection": ("prefix",),
    "init_text": ("prompt",),
}


class FinetuningConfig(Block):
    method: Literal[
        "full", "freeze", "lora", "qlora", "dora", "rslora", "adalora", "ia3", "prefix", "prompt", "ptuning"
    ] = Field(
        default="lora",
        description="full: all weights; freeze: only the last layers / named modules; "
        "lora: low-rank adapters; qlora: lora on a 4-bit NF4 base; dora / rslora: lora with use_dora / "
        "use_rslora (read back as method lora); adalora: lora with a rank budget over training; ia3: "
        "learned rescaling vectors; prefix: prefix tuning (trained keys / values per layer); prompt: prompt "
        "tuning (trained input embeddings); ptuning: P-tuning (virtual tokens from a prompt encoder). "
        "All but full / freeze train a peft adapter.",
    )
    lora_r: int = Field(default=16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(default=32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        default="all-linear",
        description="Modules that get adapters: all-linear, or a list of module names (q_proj, v_proj, ...).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(
        default=False, description="lora / qlora: DoRA, weight-decomposed LoRA (a learned magnitude per output)."
    )
    adalora: AdaLoraOptions = Field(default_factory=AdaLoraOptions, description="method adalora: its schedule.")
    ia3: Ia3Options = Field(default_factory=Ia3Options, description="method ia3: which modules are rescaled.")
    prompt: PromptOptions = Field(
        default_factory=PromptOptions, description="methods prefix / prompt / ptuning: the virtual tokens."
    )
    trainable_layers: int = Field(
        default=2, ge=0, description="freeze: number of last decoder layers that are trained."
    )
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="freeze: extra parameter-name substrings that are trained (e.g. embed_tokens, lm_head).",
    )
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="qlora: 4-bit data type.")
    double_quant: bool = Field(default=True, description="qlora: quantize the quantization constants too.")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v != "all-linear":
            return [v]
        if isinstance(v, list) and not v:
            raise ValueError("is empty: name at least one module (e.g. [q_proj, v_proj]) or use all-linear")
        return v

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: object) -> object:
        """method dora / rslora: lora with use_dora / use_rslora (one code path, one saved form)."""
        if isinstance(data, dict) and data.get("method") in ("dora", "rslora"):
            key = f"use_{data['method']}"
            if data.get(key) is False:
                raise ValueError(f"method {data['method']} with {key}: false: remove {key}, or use method: lora")
            data = {**data, "method": "lora", key: True}
        return data

    @model_validator(mode="after")
    def _keys_of_other_methods(self) -> FinetuningConfig:
        """A key that only another method reads must keep its default: set, it would be silently ignored.
        (full / freeze ignore the lora keys, as they always did; the keys of the other peft methods are new.)"""
        if self.method in _METHOD_KEYS:
            used = _METHOD_KEYS[self.method] | {"method", "modules_to_save"}
            checked = set().union(*_METHOD_KEYS.values()) - used
        else:
            checked = {"use_dora", "adalora", "ia3", "prompt"}
        for name in sorted(checked):
            if getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True):
                users = [m for m, keys in _METHOD_KEYS.items() if name in keys]
                raise ValueError(
                    f"{name} is not used by method {self.method} (it is for {' / '.join(users)}): "
                    "remove it, or choose that method"
                )
        if self.method in PROMPT_METHODS:
            fresh = PromptOptions()
            for key, methods in _PROMPT_KEYS.items():
                if self.method not in methods and getattr(self.prompt, key) != getattr(fresh, key):
                    raise ValueError(
                        f"prompt.{key} is not used by method {self.method} (it is for "
                        f"{' / '.join(methods)}): remove it, or choose that method"
                    )
        return self


class DataSource(Block):
    path: str = Field(
        default="",
        description="A file (json, jsonl, parquet, csv, txt), a directory of them, or a hub id (or give name:).",
    )
    name: str | None = Field(
        default=None,
        description="A dataset of the registry (data.registry, a dataset_info.json): its file, columns and tags "
        "fill the keys this source does not set.",
    )
    registry: str | None = Field(default=None, description="The registry file for name: (default: data.registry).")
    id: str | None = Field(
        default=None,
        description="The source's name in data.schedule (default: its registry name:, else its file or directory "
        "name without suffixes, e.g. general for data/general.jsonl).",
    )
    format: (
        Literal[
            "alpaca", "sharegpt", "messages", "text", "pairs", "ranked", "pointwise", "unpaired", "prompts", "stepwise"
        ]
        | None
    ) = Field(
        default=None,
        description="Row format; omitted = detected from the first rows (rm / dpo: the format their loss reads). "
        "pairs: prompt + chosen + rejected (also TRL's and LLaMA-Factory's shapes); ranked: prompt + responses "
        "best first; pointwise: prompt + response + score; unpaired: prompt + completion + label (KTO); "
        "prompts (grpo, rejection_sampling): prompt / question / instruction / messages, optional answer; "
        "stepwise (rm.loss process): {prompt, completions, labels}, Math-Shepherd's {input, label} or PRM800K's "
        "{question, label}.",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        description="Mixing multiplier: 2.0 repeats the source twice, 0.5 takes a random half.",
    )
    max_samples: int | None = Field(default=None, ge=1, description="Use at most this many rows of this source.")
    split: str = Field(default="train", description="Split to load for hub datasets.")
    subset: str | None = Field(default=None, description="Hub dataset configuration name.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns to the names the format expects, e.g. {instruction: question, output: answer}.",
    )
    system: str | None = Field(default=None, description="System prompt for rows that have none.")
    quality_column: str | None = Field(
        default=None,
        description="sft: a column holding each row's quality label (e.g. a score or high / low); its value "
        "prefixes the first user turn through quality_prefix, so that at inference the best label can be asked for.",
    )
    quality_prefix: str = Field(
        default="[quality: {label}] ",
        description="quality_column: the text put before the first user turn; {label} is the row's value.",
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="sharegpt turns with other keys / role names, as LLaMA-Factory's tags: role_tag, content_tag, "
        "user_tag, assistant_tag, observation_tag, function_tag, system_tag (e.g. {role_tag: role, "
        "content_tag: content, user_tag: user, assistant_tag: assistant}).",
    )

    @field_validator("quality_prefix")
    @classmethod
    def _quality_prefix(cls, v: str) -> str:
        try:
            v.format(label="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError("may hold only {label} in braces, e.g. '[quality: {label}] '") from None
        if "{label}" not in v:
            raise ValueError("must hold {label} (where the row's quality label goes), e.g. '[quality: {label}] '")
        return v

    @field_validator("tags")
    @classmethod
    def _tag_keys(cls, v: dict[str, str]) -> dict[str, str]:
        from llmtune.data.registry import TAG_KEYS

        unknown = [k for k in v if k not in TAG_KEYS]
        if unknown:
            raise ValueError(f"unknown tag {unknown[0]!r}: use {', '.join(TAG_KEYS)}")
        return v

    def source_id(self) -> str:
        """What data.schedule calls this source: id, else the registry name, else the file name's stem."""
        if self.id:
            return self.id
        if self.name:
            return self.name
        base = Path(self.path.rstrip("/")).name if looks_local(self.path) else self.path
        return base.split(".")[0] if looks_local(self.path) and not base.startswith(".") else base

    @model_validator(mode="after")
    def _path_or_name(self) -> DataSource:
        if not self.path and not self.name:
            raise ValueError(
                "has no path: set path: (a file, a directory or a hub id) or name: (a dataset of data.registry)"
            )
        return self


class PerplexityFilter(Block):
    model: str | None = Field(
        default=None,
        description="The model that scores the rows (hub id or directory); null: model.path, the model being "
        "trained, as it is before training.",
    )
    drop_low: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Fraction of the training rows with the lowest perplexity (easiest) dropped.",
    )
    drop_high: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Fraction of the training rows with the highest perplexity (hardest) dropped.",
    )
    batch_size: int = Field(default=8, ge=1, description="Rows per forward pass while scoring.")

    @model_validator(mode="after")
    def _fractions(self) -> PerplexityFilter:
        if self.drop_low + self.drop_high >= 1:
            raise ValueError(
                f"drop_low {self.drop_low} + drop_high {self.drop_high} >= 1 would drop every row: keep their sum "
                "below 1 (e.g. drop_low: 0.1, drop_high: 0.1)"
            )
        if self.drop_low == 0 and self.drop_high == 0:
            raise ValueError("drops nothing: set drop_low and / or drop_high (fractions, e.g. 0.1), or remove it")
        return self


class DataFilter(Block):
    min_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Drop rows whose tokenized length (before truncation to max_length) is below this.",
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Drop rows whose tokenized length (before truncation to max_length) is above this "
        "(data.max_length cuts long rows instead).",
    )
    perplexity: PerplexityFilter | None = Field(
        default=None,
        description="Score each training row's perplexity on its learned tokens with a model and drop the "
        "easiest / hardest fractions ({model, drop_low, drop_high, batch_size}); scores are cached and written "
        "to output_dir/perplexity_scores.jsonl.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> DataFilter:
        if self.min_tokens is not None and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} > max_tokens {self.max_tokens}: no row could pass")
        return self

    def active(self) -> bool:
        return self.min_tokens is not None or self.max_tokens is not None or self.perplexity is not None


class ReplayConfig(Block):
    path: str = Field(description="Plain-text rows ({text: ...} json / jsonl / parquet, or a .txt file) to replay.")
    ratio: float = Field(
        gt=0, lt=1, description="Fraction of the training examples that are replay rows (0.05: 5 in every 100)."
    )
    columns: dict[str, str] = Field(default_factory=dict, description="Rename a column to text, e.g. {text: body}.")
    max_samples: int | None = Field(default=None, ge=1, description="Use at most this many rows of the file.")


class SchedulePhase(Block):
    until: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Where the phase ends, as a fraction of the run's steps (0.3: after the first 30%); omitted on "
        "the last phase (it runs to the end).",
    )
    until_step: int | None = Field(
        default=None,
        ge=1,
        description="Where the phase ends, as a step number (the phase holds the steps up to and including it); "
        "instead of until. Omitted on the last phase.",
    )
    weights: dict[str, float] = Field(
        description="Each training source's share of the rows in this phase, by source id (data.train[].id, else "
        "the registry name, else the file name without suffixes), e.g. {general: 0.8, domain: 0.2}; relative "
        "(divided by their sum), every source listed (0 leaves it out of the phase).",
    )
    ramp: bool = Field(
        default=False,
        description="The shares move linearly, step by step, from the previous phase's to these (reached at the "
        "phase's last step): a rising domain share.",
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in v.items() if not (w >= 0 and math.isfinite(w))]
        if bad:
            raise ValueError(f"the weight of {bad[0]} is {v[bad[0]]}: weights are numbers >= 0")
        if not v or sum(v.values()) <= 0:
            raise ValueError("sum to 0: give at least one source a weight > 0 (e.g. {general: 1.0})")
        return v

    @model_validator(mode="after")
    def _one_end(self) -> SchedulePhase:
        if self.until is not None and self.until_step is not None:
            raise ValueError("set until (a fraction of the steps) or until_step (a step number), not both")
        return self


class DataConfig(Block):
    registry: str | None = Field(
        default=None,
        description="A dataset registry (LLaMA-Factory's dataset_info.json shape: names -> file_name / hf_hub_url, "
        "formatting, columns, tags); sources then name a dataset with name:.",
    )
    train: list[DataSource] = Field(description="One or more sources, mixed.")
    eval: list[DataSource] = Field(default_factory=list, description="Held-out sources for evaluation.")
    eval_split: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Fraction of train rows held out for evaluation when eval is empty.",
    )
    max_length: int = Field(default=2048, ge=8, description="Longest sequence, in tokens.")
    packing: bool = Field(
        default=False,
        description="cpt: concatenate and chunk; sft: several examples per row with restarting position ids.",
    )
    memory_map: bool | Literal["auto"] = Field(
        default="auto",
        description="cpt: local .txt / .jsonl files tokenized once into a token file in the data cache, and rows "
        "read from it through a memory map while training (the same rows as in memory; memory does not grow with "
        "the corpus). auto: on for cpt unless data.dedup / data.filter or a source it cannot read (a hub dataset, "
        "parquet, ...) needs the rows in memory (the log says so); true: on, refusing what it cannot do; false: "
        "off.",
    )
    on_bad_row: Literal["drop", "error"] = Field(
        default="drop",
        description="drop: skip malformed / empty / untrainable rows and count them; error: stop.",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where tokenized data is cached (default: $LLMTUNE_CACHE or ~/.cache/llmtune).",
    )
    shuffle: bool = Field(default=True, description="Shuffle training rows every epoch (seeded).")
    dedup: Literal["exact", "near"] | None = Field(
        default=None,
        description="Drop duplicate rows, keeping the first (the training sources together in order, the eval "
        "sources together): exact (same prompt text after lowercasing and collapsing whitespace) or near (word "
        "3-gram Jaccard >= dedup_threshold, found by MinHash); the prompt text is the user turns (sft) or the "
        "text (cpt).",
    )
    dedup_threshold: float = Field(
        default=0.7, gt=0, le=1, description="dedup near: the word 3-gram Jaccard similarity that makes a duplicate."
    )
    filter: DataFilter = Field(
        default_factory=DataFilter, description="Row filters: token length bounds and a perplexity filter."
    )
    replay: ReplayConfig | None = Field(
        default=None,
        description="sft: plain-text LM rows (every token learned, cut to max_length) mixed in so that `ratio` of "
        "the training examples are replay rows ({path, ratio, columns, max_samples}).",
    )
    schedule: list[SchedulePhase] | None = Field(
        default=None,
        description="cpt / sft: the mix of the training sources by phase of the run, e.g. [{until: 0.3, weights: "
        "{general: 1, domain: 0}}, {weights: {general: 0.2, domain: 0.8}, ramp: true}]: each step draws its rows "
        "from the sources in the phase's shares (each source cycles through its own shuffled rows); replaces "
        "the sources' weight. Phases end at increasing until (fraction of steps) or until_step; the last runs "
        "to the end.",
    )

    @field_validator("train")
    @classmethod
    def _nonempty(cls, v: list[DataSource]) -> list[DataSource]:
        if not v:
            raise ValueError("is empty: list at least one source, e.g. [{path: data/train.jsonl}]")
        return v

    @model_validator(mode="after")
    def _resolve_names(self) -> DataConfig:
        """A source with name: and no path takes its path, columns, tags, ... from the registry (the keys it
        sets itself win); a source with both is left as it is (a resolved recipe validates again unchanged)."""
        from llmtune.data.registry import RegistryError, resolve

        for group, sources in (("train", self.train), ("eval", self.eval)):
            for i, src in enumerate(sources):
                if src.name is None or src.path:
                    continue
                registry = src.registry or self.registry
                if registry is None:
                    raise ValueError(
                        f"data.{group}.{i}.name {src.name!r} needs a registry: set data.registry (or the source's "
                        "registry:) to a dataset_info.json file, or give path: instead"
                    )
                try:
                    fields = resolve(registry, src.name)
                except RegistryError as e:
                    raise ValueError(f"{group}.{i}.name: {e}") from None
                for key, value in fields.items():
                    if key not in src.model_fields_set:
                        setattr(src, key, value)
        return self

    @model_validator(mode="after")
    def _eval_choice(self) -> DataConfig:
        if self.eval and self.eval_split > 0:
            raise ValueError("set either data.eval (held-out files) or data.eval_split (a fraction), not both")
        return self

    @model_validator(mode="after")
    def _schedule(self) -> DataConfig:
        if self.schedule is None:
            return self
        phases = self.schedule
        if not phases:
            raise ValueError("data.schedule is empty: give at least one phase, or remove it")
        ids = [s.source_id() for s in self.train]
        for i, a in enumerate(ids):
            if a in ids[:i]:
                raise ValueError(
                    f"data.schedule names sources by id, and data.train[{ids.index(a)}] and data.train[{i}] are "
                    f"both {a!r}: give them different id: keys"
                )
        weighted = [i for i, s in enumerate(self.train) if s.weight != 1.0]
        if weighted:
            raise ValueError(
                f"data.train[{weighted[0]}] sets weight and data.schedule gives the sources' shares: remove the "
                "weight (the schedule's weights are the mix)"
            )
        known = ", ".join(ids)
        for k, p in enumerate(phases):
            where = f"data.schedule[{k}]"
            unknown = [n for n in p.weights if n not in ids]
            if unknown:
                raise ValueError(
                    f"{where}.weights: unknown source {unknown[0]!r}; the training sources are {known} (a source's "
                    "id:, registry name, or file name without suffixes)"
                )
            missing = [n for n in ids if n not in p.weights]
            if missing:
                raise ValueError(f"{where}.weights has no weight for {missing[0]!r}: list every source ({known})")
            last = k == len(phases) - 1
            if last and p.until_step is not None:
                raise ValueError(f"{where} is the last phase: it runs to the end of training; remove its until_step")
            if last and p.until is not None and p.until != 1:
                raise ValueError(
                    f"{where} is the last phase and ends at until {p.until}: the last phase runs to the end of "
                    "training; remove its until (or set 1.0)"
                )
            if not last and p.until is None and p.until_step is None:
                raise ValueError(f"{where} has no end: set until (a fraction of the steps, e.g. 0.3) or until_step")
            if k == 0 and p.ramp:
                raise ValueError(f"{where} ramps from the previous phase, and it is the first: remove ramp")
        ends = [p.until if p.until is not None else p.until_step for p in phases[:-1]]
        kinds = {"until" if p.until is not None else "until_step" for p in phases[:-1]}
        if len(kinds) > 1:
            raise ValueError("data.schedule mixes until and until_step: end every phase the same way")
        for k in range(1, len(ends)):
            if ends[k] <= ends[k - 1]:  # type: ignore[operator]
                raise ValueError(
                    f"data.schedule phases must end in increasing order: phase {k} ends at {ends[k]}, not after "
                    f"phase {k - 1} ({ends[k - 1]})"
                )
        if phases[:-1] and phases[-2].until == 1:
            raise ValueError(f"data.schedule[{len(phases) - 2}] ends at until 1.0, leaving the last phase no step")
        unused = [n for n in ids if all(p.weights[n] == 0 for p in phases)]
        if unused:
            raise ValueError(
                f"source {unused[0]!r} has weight 0 in every phase of data.schedule: remove it from data.train"
            )
        return self


class EmaConfig(Block):
    decay: float = Field(
        default=0.999, gt=0, lt=1, description="Weight of the old average at each update (0.999: ~1000 updates)."
    )
    every: int = Field(default=1, ge=1, description="Update the average every N optimizer steps.")


class TrainConfig(Block):
    epochs: float = Field(default=1, gt=0, description="Passes over the training data (max_steps wins when set).")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps to run; overrides epochs.")
    micro_batch_size: int = Field(default=4, ge=1, description="Sequences per forward pass per process.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(default=2.0e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="LR decay after warmup."
    )
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Fraction of steps for linear warmup.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Warmup steps; overrides warmup_ratio.")
    warmup_start_ratio: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="LR at the first warmup step as a fraction of lr. Re-warming for continued pretraining: "
        "warm up from a floor (e.g. the min_lr_ratio the earlier run ended at), then decay to min_lr_ratio.",
    )
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="Final LR as a fraction of lr (cosine, linear).")
    optimizer: Literal["adamw", "adamw_8bit", "sgd"] = Field(default="adamw", description="Optimizer.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay.")
    adam_beta1: float = Field(default=0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(default=0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(default=1.0, description="Clip gradients to this norm; null or 0 = off.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    log_every: int = Field(default=10, ge=1, description="Log every N optimizer steps.")
    eval_every: int | None = Field(default=None, ge=1, description="Evaluate every N steps (and at the end).")
    save_every: int | None = Field(default=None, ge=1, description="Write a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(
        default=2,
        ge=1,
        description="Keep the newest N checkpoints. Given in the recipe, they also stay after the run finishes "
        "(e.g. to --resume-from one with a longer schedule); not given, a finished run removes its checkpoints: "
        "the exported model is the output (the best_metric checkpoint stays).",
    )
    best_metric: str | None = Field(
        default=None,
        description="An evaluation metric (e.g. eval/loss): the checkpoint with its best value is kept as well.",
    )
    best_mode: Literal["min", "max"] = Field(default="min", description="best_metric: lower or higher is better.")
    eval_batch_size: int | None = Field(default=None, ge=1, description="Eval micro-batch (default micro_batch_size).")
    on_nan: Literal["stop", "skip"] = Field(
        default="stop",
        description="A step whose loss or gradient is NaN / Inf: stop (the newest checkpoint is kept, nothing is "
        "exported) or skip (that step changes no weight and no optimizer state; skips are counted in "
        "metrics.jsonl and run.json).",
    )
    max_nan_skips: int = Field(
        default=10, ge=1, description="on_nan: skip stops the run once more than this many steps were skipped."
    )
    ema: EmaConfig | None = Field(
        default=None,
        description="An exponential moving average of the trained weights, exported to output_dir/ema/ "
        "({decay, every}); null: off.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Trackers that get every metrics.jsonl row and the resolved recipe (rank 0 only): tensorboard "
        "(output_dir/tensorboard), wandb (offline in output_dir/wandb unless WANDB_MODE is set), mlflow (a local "
        "file store output_dir/mlruns unless MLFLOW_TRACKING_URI is set). One name, a list, or none. "
        "pip install llmtune[trackers].",
    )
    run_name: str | None = Field(
        default=None, description="The trackers' run name (default: the output_dir's folder name)."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v: object) -> object:
        if v is None or v == "none":
            return []
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]  # "wandb" or "tensorboard,wandb" (--set)
        if v == ["all"]:
            return ["tensorboard", "wandb", "mlflow"]
        if isinstance(v, list):
            return list(dict.fromkeys(v))  # each tracker once, in order
        return v

    @field_validator("max_grad_norm")
    @classmethod
    def _clip(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError("must be >= 0 (0 or null turns clipping off)")
        return v

    @model_validator(mode="after")
    def _best(self) -> TrainConfig:
        if self.best_metric is not None and not self.best_metric.startswith("eval/"):
            raise ValueError(
                f"best_metric {self.best_metric!r} must name an evaluation metric such as eval/loss "
                "(and needs data.eval or data.eval_split, eval_every and save_every)"
            )
        if self.best_metric is not None and (self.eval_every is None or self.save_every is None):
            raise ValueError(
                f"best_metric {self.best_metric!r} keeps the checkpoint with the best evaluation: set eval_every and "
                "save_every too (e.g. both 500)"
            )
        return self


class DistributedConfig(Block):
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="DeepSpeed ZeRO stage.")
    offload: Literal["none", "optimizer", "all"] = Field(
        default="none",
        description="ZeRO CPU offload: optimizer states (stage >= 1), or also parameters (stage 3).",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="Process-group backend. auto: nccl on GPU, gloo on CPU."
    )

    @model_validator(mode="after")
    def _offload(self) -> DistributedConfig:
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise ValueError("offload: optimizer needs zero_stage 1, 2 or 3 (set distributed.zero_stage: 2)")
        if self.offload == "all" and self.zero_stage != 3:
            raise ValueError("offload: all (parameters too) needs zero_stage: 3")
        return self


class SftConfig(Block):
    train_on_prompt: bool = Field(
        default=False,
        description="Also learn the system / user / tool tokens (default: assistant turns only).",
    )


class RmConfig(Block):
    loss: Literal["pairwise", "ranked", "pointwise", "process"] = Field(
        default="pairwise",
        description="pairwise: Bradley-Terry on (chosen, rejected), with the optional per-row `margin` column; "
        "ranked: all pairs of a list of responses in preference order; pointwise: MSE to a per-response `score`; "
        "process: a process reward model (PRM), a per-token good / bad head trained at the end of each step "
        "(format stepwise).",
    )
    step_separator: str = Field(
        default="\n",
        description="process: the text after each step, where its score is read (recorded in prm.json beside the "
        "model, and used to split completions into steps when the PRM scores them).",
    )
    center_rewards_coefficient: float = Field(
        default=0.0,
        ge=0,
        description="Reward centering: adds c * (r_chosen + r_rejected)^2 per pair so rewards stay near 0 "
        "(e.g. 0.01); 0 = off.",
    )
    export_merged: bool = Field(
        default=True,
        description="lora / qlora / adalora / ia3: also write a merged full reward model to output_dir/merged "
        "(loadable by AutoModelForSequenceClassification without peft).",
    )
    lm_loss_weight: float = Field(
        default=0.0,
        ge=0,
        description="Adds this weight times the language-model loss (mean per token) on each row's preferred "
        "response, computed with the base model's output embedding (frozen), as a regulariser; 0 = off.",
    )

    @model_validator(mode="after")
    def _lm_loss(self) -> RmConfig:
        if self.step_separator != "\n" and self.loss != "process":
            raise ValueError(f"step_separator is for loss process, not {self.loss}: remove it, or set loss: process")
        if self.lm_loss_weight > 0 and self.loss == "process":
            raise ValueError("lm_loss_weight is for loss pairwise or ranked, not process: set it to 0")
        if self.lm_loss_weight > 0 and self.loss == "pointwise":
            raise ValueError("lm_loss_weight needs a preferred response: use loss pairwise or ranked, or set it to 0")
        return self


class DpoConfig(Block):
    beta: float = Field(
        default=0.1, gt=0, description="Strength of the KL penalty to the reference (simpo: reward scale)."
    )
    loss: Literal["sigmoid", "robust", "ipo", "hinge", "simpo", "kto"] = Field(
        default="sigmoid",
        description="sigmoid: DPO (with label_smoothing: cDPO); robust: robust DPO (needs label_smoothing); ipo; "
        "hinge (SLiC); simpo: reference-free, length-normalised, margin simpo_gamma; kto: unpaired rows "
        "(format unpaired; pairs rows are split into a desirable chosen and an undesirable rejected example).",
    )
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, description="sigmoid / robust / simpo: assumed fraction of flipped labels."
    )
    simpo_gamma: float = Field(default=0.5, description="simpo: target reward margin gamma.")
    sft_weight: float = Field(
        default=0.0, ge=0, description="Adds weight x the per-token NLL of the chosen response (RPO); 0 = off."
    )
    reference: str | None = Field(
        default=None,
        description="Reference model (hub id or directory). null: with lora / qlora the same base with the adapter "
        "disabled (no second copy); with full / freeze a frozen copy of model.path.",
    )
    precompute_reference: bool = Field(
        default=True,
        description="Compute the reference log-probs once before training (no-grad pass) and cache them, "
        "so training runs one model.",
    )
    kto_desirable_weight: float = Field(default=1.0, gt=0, description="kto: weight of desirable rows.")
    kto_undesirable_weight: float = Field(default=1.0, gt=0, description="kto: weight of undesirable rows.")

    @model_validator(mode="after")
    def _combos(self) -> DpoConfig:
        if self.label_smoothing > 0 and self.loss not in ("sigmoid", "robust", "simpo"):
            raise ValueError(f"label_smoothing applies to loss sigmoid, robust or simpo, not {self.loss}: set it to 0")
        if self.loss == "robust" and self.label_smoothing == 0:
            raise ValueError("loss robust needs label_smoothing > 0 (e.g. 0.1); with 0 it is plain sigmoid")
        if self.loss == "simpo" and self.reference is not None:
            raise ValueError("loss simpo is reference-free: remove dpo.reference (set it to null)")
        return self


class JudgeConfig(Block):
    """An instruct model that reads each reply with a rubric and scores it (RLAIF; llmtune.rewards.judge)."""

    model: str = Field(description="The judge: an instruct causal LM (directory, hub id, or a .gguf file).")
    rubric: str | None = Field(
        default=None,
        description="The judge's instructions, sent as one user turn in its chat template: text with {prompt} "
        "and {reply} ({low}, {high} optional), or a .txt / .md file holding it. null: the built-in rubric "
        "(helpfulness, correctness, clarity; answer 'Score: N').",
    )
    scale: list[float] = Field(default=[1, 10], description="[low, high]: the scores the rubric asks for.")
    unit_scale: bool = Field(
        default=True,
        description="true: the source's score is (s - low) / (high - low), in [0, 1]; false: the judge's s as given.",
    )
    unparsable: float | Literal["mean"] = Field(
        default="mean",
        description="The score of a reply whose judgement has no score in [low, high] (counted and logged as "
        "reward/<judge>/unparsable): mean (the mean of the batch's parsed scores: no push either way), or a "
        "number on the source's scale.",
    )
    prefill: bool = Field(
        default=True,
        description="Start the judge's reply with 'Score:' so that it gives the number at once (small judges follow "
        "this far better than the instruction alone); false for a rubric that asks for reasoning first.",
    )
    max_new_tokens: int = Field(default=32, ge=1, description="Longest judgement, in tokens (greedy decoding).")
    batch_size: int = Field(default=8, ge=1, description="Judgements per generate call.")
    chat_template: str | None = Field(
        default=None, description="null: the judge's own; else chatml, llama3, alpaca or a .jinja file."
    )

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not v[0] < v[1]:
            raise ValueError(f"is {v}: give [low, high] with low < high, e.g. [1, 10]")
        return v

    @field_validator("rubric")
    @classmethod
    def _rubric(cls, v: str | None) -> str | None:
        if v is not None and not v.strip().lower().endswith((".txt", ".md")) and "{reply}" not in v:
            raise ValueError(
                "has no {reply} placeholder: write where the reply goes (and {prompt}), or name a .txt file"
            )
        return v


class RewardConfig(Block):
    """Where the online stages' scores come from: reward models, judges, rules, or a weighted mix."""

    model: str | list[str] | None = Field(
        default=None,
        description="Output directory of an rm run (full, or a lora adapter with its score head), or a list.",
    )
    rule: str | list[str] | None = Field(
        default=None,
        description="Rule name or list: exact_match, contains, gsm8k (the `#### <number>` answer), regex:PATTERN, "
        "length_penalty:CHARS, or module:function (user code: needs --trust-reward-code). Rules read the "
        "prompt row's `answer`.",
    )
    weights: list[float] | None = Field(
        default=None, description="One weight per source: models, then judges, then rules (default: all 1.0)."
    )
    normalize: Literal["none", "batch"] = Field(
        default="none",
        description="Per source, before weighting: none, or batch (subtract the batch mean, divide by its std).",
    )
    missing_eos_penalty: float = Field(
        default=0.0,
        ge=0,
        description="Subtracted from the total of a completion that hit max_new_tokens without an end token.",
    )
    batch_size: int = Field(default=8, ge=1, description="Reward-model scoring batch size.")
    aggregation: Literal["min", "last", "mean", "product"] = Field(
        default="min",
        description="Process reward models (an rm run with loss process: prm.json beside the model): how a "
        "completion's per-step probabilities of a good step become its score: min (the weakest step), last, "
        "mean, or product. Ignored for outcome reward models and rules.",
    )
    judge: JudgeConfig | list[JudgeConfig] | None = Field(
        default=None, description="Judge models (RLAIF): an instruct model scores each reply with a rubric."
    )

    @field_validator("model", "rule")
    @classmethod
    def _listify(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not v:
            return None
        return v

    def models(self) -> list[str]:
        return [] if self.model is None else [self.model] if isinstance(self.model, str) else list(self.model)

    def rules(self) -> list[str]:
        return [] if self.rule is None else [self.rule] if isinstance(self.rule, str) else list(self.rule)

    def judges(self) -> list[JudgeConfig]:
        return [] if self.judge is None else [self.judge] if isinstance(self.judge, JudgeConfig) else list(self.judge)

    @model_validator(mode="after")
    def _sources(self) -> RewardConfig:
        n = len(self.models()) + len(self.judges()) + len(self.rules())
        if n == 0:
            raise ValueError(
                "names no reward source: set model: (an rm output), judge: (an instruct model) and / or rule: "
                "(e.g. exact_match)"
            )
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(
                f"weights has {len(self.weights)} numbers for {n} sources (models, then judges, then rules): give "
                "one per source"
            )
        return self


class GenerationConfig(Block):
    """Sampling settings shared by the online stages."""

    max_new_tokens: int = Field(default=64, ge=1, description="Longest completion, in tokens.")
    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling: keep the top tokens of this mass.")
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens; 0 = off.")
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Completions per generate call, sized for throughput (default: 32, or train.micro_batch_size "
        "when larger); lower it if generation runs out of memory.",
    )


PROMPTS_PER_STEP_DESCRIPTION = (
    "Prompts feeding one optimizer step, summed over all processes (a multiple of the number of processes). "
    "Independent of train.micro_batch_size, which only splits the step's rows (completions) into forward "
    "passes for memory; the accumulation follows (rows / micro_batch_size)."
)


class GrpoConfig(Block):
    num_generations: int = Field(default=8, description="Completions per prompt (the group); at least 2.")
    prompts_per_step: int = Field(default=16, ge=1, description=PROMPTS_PER_STEP_DESCRIPTION)
    dynamic_sampling: bool = Field(
        default=False,
        description="DAPO's dynamic sampling: groups whose completions all scored alike (no reward spread, no "
        "signal) are dropped and more prompts drawn to replace them, up to dynamic_sampling_draws extra draws "
        "per step (then zero-spread groups fill the step).",
    )
    dynamic_sampling_draws: int = Field(
        default=3, ge=1, description="dynamic_sampling: at most this many extra draws of prompts per step."
    )
    beta: float = Field(default=0.0, ge=0, description="KL to the reference (k3, in the loss); 0 loads no reference.")
    reward: RewardConfig = Field(default_factory=lambda: RewardConfig(rule="exact_match"))
    advantage: Literal["group", "rloo"] = Field(
        default="group",
        description="group: reward minus the group mean (scaled by scale_rewards); rloo: reward minus the mean of "
        "the other completions of the same prompt (leave-one-out).",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group", description="group advantages: divide by the group's std, the batch's std, or nothing."
    )
    epsilon: float = Field(default=0.2, gt=0, lt=1, description="Lower clip of the importance ratio (1 - epsilon).")
    epsilon_high: float | None = Field(
        default=None, gt=0, description="Upper clip (1 + epsilon_high); default epsilon (DAPO suggests 0.28)."
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        default="dapo",
        description="grpo: mean per sequence, then over sequences; dr_grpo: sum / (sequences x max_new_tokens); "
        "dapo: mean over every completion token of the step.",
    )
    num_iterations: int = Field(default=1, ge=1, description="Optimizer steps on each batch of rollouts.")
    mask_truncated_completions: bool = Field(
        default=False, description="Leave completions that never ended out of the loss."
    )

    @field_validator("num_generations")
    @classmethod
    def _group(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"is {v}: grpo compares completions of the same prompt, so it needs at least 2 (e.g. 8)")
        return v


class PpoConfig(Block):
    """PPO with a critic (InstructGPT-style): rewards = the sequence score at the last token minus a per-token
    KL penalty to the reference; advantages by GAE; clipped policy and value losses."""

    reward: RewardConfig = Field(default_factory=lambda: RewardConfig(rule="exact_match"))
    memory: Literal["separate", "shared"] | None = Field(
        default=None,
        description="separate: the policy, critic, reference and reward models each hold their own weights (full "
        "fine-tuning, ZeRO-3); shared (lora / qlora): one base in memory, the policy and critic are adapters on it, "
        "the reference is the adapter disabled, a lora reward model of the same base is one more adapter. "
        "Default: shared for lora / qlora, separate otherwise.",
    )
    prompts_per_step: int = Field(default=16, ge=1, description=PROMPTS_PER_STEP_DESCRIPTION)
    rollout_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Completions each process generates per rollout (one per prompt); a multiple of its share "
        "of ppo.prompts_per_step (one optimizer step's mini-batch). Default: one mini-batch.",
    )
    ppo_epochs: int = Field(default=4, ge=1, description="Passes over each rollout's mini-batches.")
    kl_coef: float = Field(default=0.05, ge=0, description="Initial coefficient of the per-token KL penalty.")
    kl_estimator: Literal["k1", "k3"] = Field(
        default="k1", description="Per-token KL estimate in the reward: k1 (log-ratio) or k3 (non-negative)."
    )
    target_kl: float | None = Field(
        default=None,
        gt=0,
        description="Adaptive KL coefficient (Ziegler et al.): steer the per-sequence KL toward this; null: fixed.",
    )
    kl_horizon: int = Field(default=10000, ge=1, description="Horizon of the adaptive KL controller, in samples.")
    gamma: float = Field(default=1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(default=0.2, gt=0, lt=1, description="Clip of the policy's importance ratio.")
    dual_clip: float | None = Field(
        default=None, gt=1, description="Dual-clip constant c > 1 for negative advantages (Ye et al. 2020); null: off."
    )
    cliprange_value: float | None = Field(
        default=0.2, gt=0, description="Clip of the value update around the rollout's values; null: unclipped."
    )
    vf_coef: float = Field(default=0.1, gt=0, description="Weight of the value loss.")
    critic_lr: float | None = Field(
        default=None, gt=0, description="Learning rate of the critic (adapter and value head); default train.lr."
    )
    entropy_coef: float = Field(default=0.0, ge=0, description="Entropy bonus weight; 0 = off.")
    whiten_rewards: bool = Field(default=False, description="Whiten the per-token rewards of each rollout.")
    reward_clip: float | None = Field(
        default=None, gt=0, description="Clip the sequence score to [-reward_clip, reward_clip]; null: off."
    )
    whiten_advantages: bool = Field(default=True, description="Whiten the advantages of each rollout.")
    early_stop_kl: float | None = Field(
        default=None,
        gt=0,
        description="Skip the rest of a rollout's epochs once a step's approximate KL to the rollout policy "
        "exceeds this; null: off.",
    )
    critic_init: Literal["auto", "reward", "policy"] = Field(
        default="auto",
        description="Where the critic starts: reward (the first reward model: its backbone and score head), or "
        "policy (the starting model with a zero value head). auto: reward when a reward model is given.",
    )
    save_critic: bool = Field(default=False, description="Also write the trained critic to output_dir/critic/.")


class RejectionSamplingConfig(Block):
    num_samples: int = Field(
        default=8,
        description="Completions sampled per prompt each round; at least 2 (a best must beat a worst).",
    )
    rounds: int = Field(default=1, ge=1, description="generate -> score -> select -> fine-tune, this many times.")
    reward: RewardConfig = Field(default_factory=lambda: RewardConfig(rule="exact_match"))
    threshold: float | Literal["none"] | None = Field(
        default=None,
        description="A prompt's best completion is kept only when it beats the prompt's worst (the rewards "
        "spread) and its reward is at least this. null: the reward's known maximum for rules (exact_match, "
        "contains, gsm8k, regex give 1.0: only right answers are kept), no threshold for reward models and "
        "user code. none: no threshold (only the spread decides).",
    )
    selection: Literal["best", "best_and_worst"] = Field(
        default="best",
        description="best: the best completion per prompt (sft rows); best_and_worst: also writes chosen / "
        "rejected pairs (best vs worst, from the prompts whose best is kept) for a dpo stage.",
    )
    max_prompts: int | None = Field(default=None, ge=1, description="Prompts sampled per round (default: all).")

    @field_validator("num_samples")
    @classmethod
    def _samples(cls, v: int) -> int:
        if v < 2:
            raise ValueError(
                f"is {v}: a prompt's best completion is kept when it beats the prompt's worst, so best-of-N needs "
                "at least 2 samples (e.g. 8)"
            )
        return v


class RecipeBase(Block):
    output_dir: str = Field(description="Everything the run writes goes here.")
    seed: int = Field(default=42, description="Seed for data order, dropout and initialisation.")
    model: ModelConfig
    finetuning: FinetuningConfig = Field(default_factory=FinetuningConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    precision: Literal["bf16", "fp16", "fp32"] = Field(default="bf16", description="Training precision.")

    @model_validator(mode="after")
    def _cross(self) -> RecipeBase:
        if self.finetuning.method == "qlora" and self.distributed.zero_stage == 3:
            raise ValueError(
                "finetuning.method qlora cannot be combined with distributed.zero_stage 3 in this version: "
                "use zero_stage 0-2 (4-bit weights are already small), or method: lora with zero_stage 3"
            )
        if self.finetuning.method == "qlora" and self.precision == "fp16" and self.model.dtype == "bf16":
            raise ValueError("precision fp16 with model.dtype bf16: set both to bf16, or both to fp16")
        if self.data.memory_map is True and getattr(self, "stage", None) != "cpt":
            raise ValueError("data.memory_map is for stage cpt (raw text); remove it, or use stage: cpt")
        stage = getattr(self, "stage", "")
        d = self.data
        if stage not in ("cpt", "sft"):
            used = [k for k, on in (("data.dedup", d.dedup), ("data.filter", d.filter.active())) if on]
            if used:
                raise ValueError(
                    f"{used[0]} is supported for stages sft and cpt, not {stage}: remove it from the recipe"
                )
        if stage != "sft" and any(x.quality_column for x in [*d.train, *d.eval]):
            raise ValueError(f"quality_column conditions sft on a quality label; stage {stage} does not read it")
        if d.schedule is not None and stage not in ("cpt", "sft"):
            raise ValueError(
                f"data.schedule is supported for stages cpt and sft, not {stage}: remove it from the recipe"
            )
        if d.schedule is not None and d.replay is not None:
            raise ValueError(
                "data.replay and data.schedule both mix rows in: list the replay file under data.train and give it "
                "a share in the schedule's weights, or remove data.schedule"
            )
        if d.replay is not None and stage != "sft":
            raise ValueError(
                f"data.replay mixes plain-text rows into sft; stage {stage} does not use it: remove data.replay "
                "(for cpt, list the file under data.train)"
            )
        if d.memory_map is True and (d.dedup or d.filter.active()):
            raise ValueError(
                "data.memory_map reads the corpus as it is: data.dedup and data.filter do not apply to it; "
                "remove them, or set data.memory_map: auto (reads the rows into memory when they are set)"
            )
        if self.train.ema is not None and self.distributed.zero_stage == 3:
            raise ValueError(
                "train.ema cannot be combined with distributed.zero_stage 3 in this version (the average "
                "needs the whole weights on every process): use zero_stage 0-2, or remove train.ema"
            )
        _check_method_fits(self)
        return self

    def data_files(self) -> list[Path]:
        """Local paths named by the data sources (hub ids excluded)."""
        return [Path(s.path) for s in [*self.data.train, *self.data.eval] if looks_local(s.path)]


# stages a peft method other than lora / qlora cannot train in this version, and why
_STAGES_REFUSED = {
    "rm": (PROMPT_METHODS, "a reward model reads its score at the last real token, which virtual tokens shift"),
    "ppo": (
        ("adalora", "ia3", *PROMPT_METHODS),
        "ppo's policy and critic are lora adapters on one base (memory: shared) or full / freeze models",
    ),
    "grpo": (PROMPT_METHODS, "sampling with virtual tokens is not supported in this version"),
    "rejection_sampling": (
        ("adalora", "ia3", *PROMPT_METHODS),
        "each round merges a lora adapter into the next round's model",
    ),
}


def _check_method_fits(recipe: RecipeBase) -> None:
    """The combinations of a peft method with a stage, ZeRO-3 or packing that cannot work, refused up front."""
    method, stage = recipe.finetuning.method, getattr(recipe, "stage", None)
    refused, why = _STAGES_REFUSED.get(stage, ((), ""))
    if method in refused:
        allowed = "lora / qlora" if stage != "rm" else "lora / qlora / adalora / ia3"
        raise ValueError(
            f"finetuning.method {method} cannot train stage {stage}: {why}; use method {allowed} (or full / freeze)"
        )
    if method == "adalora" and recipe.distributed.zero_stage == 3:
        raise ValueError(
            "finetuning.method adalora cannot be combined with distributed.zero_stage 3: its rank allocation "
            "masks whole adapter weights, which ZeRO-3 partitions; use zero_stage 0-2 (adapters are small)"
        )
    if method == "prefix" and recipe.train.gradient_checkpointing:
        raise ValueError(
            "finetuning.method prefix cannot be combined with train.gradient_checkpointing (peft's prefix tuning "
            "passes its prefix as a key / value cache, which checkpointing does not support): set "
            "gradient_checkpointing: false, or use method prompt / ptuning"
        )
    if method in PROMPT_METHODS and recipe.data.packing:
        raise ValueError(
            f"finetuning.method {method} cannot be combined with data.packing: peft ignores the position ids "
            "that keep packed examples apart when it adds virtual tokens; set data.packing: false"
        )


class CptRecipe(RecipeBase):
    """Continued pretraining on raw text: every token is learned."""

    stage: Literal["cpt"]

    @model_validator(mode="after")
    def _text_only(self) -> CptRecipe:
        for i, s in enumerate([*self.data.train, *self.data.eval]):
            if s.format not in (None, "text"):
                raise ValueError(
                    f"data source {i} ({s.path}) has format {s.format}: cpt learns raw text; use format: text "
                    "(or stage: sft for conversations)"
                )
        return self


class SftRecipe(RecipeBase):
    """Supervised fine-tuning on conversations: the assistant turns are learned."""

    stage: Literal["sft"]
    sft: SftConfig = Field(default_factory=SftConfig)

    @model_validator(mode="after")
    def _conversations(self) -> SftRecipe:
        for i, s in enumerate([*self.data.train, *self.data.eval]):
            if s.format in (*PREFERENCE_FORMATS, "stepwise"):
                raise ValueError(
                    f"data source {i} ({s.path}) has format {s.format}: that is preference data; "
                    "use stage rm or dpo (sft reads alpaca, sharegpt or messages)"
                )
        return self


def _preference_sources(recipe: RecipeBase, allowed: tuple[str, ...], what: str) -> None:
    if recipe.data.packing:
        raise ValueError(f"data.packing is not supported for stage {recipe.stage}: set data.packing: false")
    for i, s in enumerate([*recipe.data.train, *recipe.data.eval]):
        if s.format is not None and s.format not in allowed:
            raise ValueError(
                f"data source {i} ({s.path}) has format {s.format}: {what} reads format {' or '.join(allowed)} "
                "(or omit format:)"
            )


class RmRecipe(RecipeBase):
    """Reward model: the causal LM backbone with a scalar head, trained on preferences."""

    stage: Literal["rm"]
    rm: RmConfig = Field(default_factory=RmConfig)

    @model_validator(mode="after")
    def _formats(self) -> RmRecipe:
        allowed = {
            "pairwise": ("pairs",),
            "ranked": ("ranked", "pairs"),
            "pointwise": ("pointwise",),
            "process": ("stepwise",),
        }[self.rm.loss]
        _preference_sources(self, allowed, f"rm.loss {self.rm.loss}")
        return self


class DpoRecipe(RecipeBase):
    """Direct preference optimisation (and its family: ipo, hinge, simpo, kto) of a causal LM."""

    stage: Literal["dpo"]
    dpo: DpoConfig = Field(default_factory=DpoConfig)

    @model_validator(mode="after")
    def _formats(self) -> DpoRecipe:
        allowed = ("unpaired", "pairs") if self.dpo.loss == "kto" else ("pairs",)
        _preference_sources(self, allowed, f"dpo.loss {self.dpo.loss}")
        return self


def _prompt_sources(recipe: RecipeBase) -> None:
    if recipe.data.packing:
        raise ValueError(f"data.packing does not apply to stage {recipe.stage}: set data.packing: false")
    for i, s in enumerate([*recipe.data.train, *recipe.data.eval]):
        if s.format is not None and s.format not in ("prompts", "alpaca", "sharegpt", "messages"):
            raise ValueError(
                f"data source {i} ({s.path}) has format {s.format}: {recipe.stage} reads prompts "
                "(format prompts, alpaca, sharegpt or messages; or omit format:)"
            )


def _step_in_prompts(recipe: RecipeBase, stage: str, generations: int) -> None:
    """grpo / ppo count a step in prompts (<stage>.prompts_per_step); train.grad_accum, which used to size
    the step (micro_batch_size x grad_accum completions per process), would now silently mean something
    else: refused unless it is 1, with the setting that keeps the old step."""
    t = recipe.train
    if t.grad_accum != 1:
        old = t.micro_batch_size * t.grad_accum // generations
        raise ValueError(
            f"train.grad_accum {t.grad_accum}: {stage} counts a step in prompts, {stage}.prompts_per_step (all "
            "processes), and splits its rows into micro-batches of train.micro_batch_size by itself; remove "
            f"train.grad_accum (to keep the step of micro_batch_size x grad_accum = "
            f"{t.micro_batch_size * t.grad_accum} completions per process, set {stage}.prompts_per_step: "
            f"{max(old, 1)} x the number of processes)"
        )


class GrpoRecipe(RecipeBase):
    """Group relative policy optimisation (and RLOO): sample a group per prompt, score, push up the better ones."""

    stage: Literal["grpo"]
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @model_validator(mode="after")
    def _batch(self) -> GrpoRecipe:
        _prompt_sources(self)
        _step_in_prompts(self, "grpo", self.grpo.num_generations)
        return self


class PpoRecipe(RecipeBase):
    """PPO with a critic and a KL-penalised reward: sample one completion per prompt, score it, optimise."""

    stage: Literal["ppo"]
    ppo: PpoConfig = Field(default_factory=PpoConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @model_validator(mode="after")
    def _ppo(self) -> PpoRecipe:
        _prompt_sources(self)
        p = self.ppo
        lora = self.finetuning.method in ("lora", "qlora")
        if p.memory is None:
            p.memory = "shared" if lora else "separate"
        if p.memory == "shared" and not lora:
            raise ValueError(
                f"ppo.memory shared needs finetuning.method lora or qlora (the policy and critic are adapters on one "
                f"base), not {self.finetuning.method}: use memory: separate, or method: lora"
            )
        _step_in_prompts(self, "ppo", 1)
        if p.critic_init == "reward" and not p.reward.models():
            raise ValueError(
                "ppo.critic_init reward needs a reward model: set ppo.reward.model, or critic_init: policy"
            )
        return self


class RejectionSamplingRecipe(RecipeBase):
    """Best-of-N: sample, score, keep the best per prompt, fine-tune on it (sft); repeated for `rounds`."""

    stage: Literal["rejection_sampling"]
    rejection_sampling: RejectionSamplingConfig = Field(default_factory=RejectionSamplingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    sft: SftConfig = Field(default_factory=SftConfig)

    @model_validator(mode="after")
    def _prompts(self) -> RejectionSamplingRecipe:
        _prompt_sources(self)
        return self


Recipe = Annotated[
    CptRecipe | SftRecipe | RmRecipe | DpoRecipe | PpoRecipe | GrpoRecipe | RejectionSamplingRecipe,
    Field(discriminator="stage"),
]
STAGES = ("cpt", "sft", "rm", "dpo", "ppo", "grpo", "rejection_sampling")
