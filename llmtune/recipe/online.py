"""The blocks the online stages share: the reward (rules, reward models, a judge model) and generation.

Imports only pydantic, as the rest of the schema does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmtune.recipe.block import Block


class JudgeConfig(Block):
    """An instruct model that reads each reply with a rubric and scores it (RLAIF; llmtune.rewards.judge)."""

    model: str = Field(description="The judge: an instruct causal LM (directory, hub id, or a .gguf file).")
    mode: Literal["pointwise", "pairwise"] = Field(
        default="pointwise",
        description="pointwise: the judge scores each reply on `scale`. pairwise: the judge compares each reply "
        "with the prompt row's `answer` (a reference reply), asked in both orders to cancel position bias: 1.0 "
        "when the reply wins both, 0.0 when the reference does, 0.5 for a tie or two verdicts that disagree; "
        "an unparsable verdict gets `unparsable`.",
    )
    rubric: str | None = Field(
        default=None,
        description="The judge's instructions, sent as one user turn in its chat template: text with {prompt} "
        "and {reply} ({low}, {high} optional; pairwise: {reply_a} and {reply_b}), or a .txt / .md file holding "
        "it. null: the built-in rubric (helpfulness, correctness, clarity; answer 'Score: N' or 'Verdict: A').",
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

    @model_validator(mode="after")
    def _rubric(self) -> JudgeConfig:
        v = self.rubric
        if v is None or v.strip().lower().endswith((".txt", ".md")):
            return self
        if self.mode == "pointwise" and "{reply}" not in v:
            raise ValueError(
                "rubric has no {reply} placeholder: write where the reply goes (and {prompt}), or name a .txt file"
            )
        if self.mode == "pairwise" and ("{reply_a}" not in v or "{reply_b}" not in v):
            raise ValueError(
                "rubric (mode pairwise) needs {reply_a} and {reply_b} placeholders: write where the two replies "
                "go (and {prompt}), or name a .txt file"
            )
        return self


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
    temperature: float = Field(
        default=0.7,
        ge=0,
        description="Sampling temperature; 0 = greedy. 0.7 keeps a small model's samples on topic (SmolLM2-135M "
        "answered 2-digit sums right in 9% of its samples at 0.7, 4% at 1.0); raise it when most groups score alike.",
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling: keep the top tokens of this mass.")
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens; 0 = off.")
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Completions per generate call, sized for throughput (default: 32, or train.micro_batch_size "
        "when larger); lower it if generation runs out of memory.",
    )
