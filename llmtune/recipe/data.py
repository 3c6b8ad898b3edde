"""The recipe's ``data:`` block: the sources, their formats and registry names, row filters, replay and the
mixing schedule. Imports only pydantic and the dataset registry (no torch)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmtune.paths import looks_local
from llmtune.recipe.block import Block
from llmtune.recipe.registry import TAG_KEYS, RegistryError, resolve

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
