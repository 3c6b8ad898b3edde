"""The eval settings: one pydantic model shared by ``llmtune eval EVAL.yaml`` and the command-line options
(options given on the command line override the file). Unknown keys are errors with a did-you-mean.
Imports only pydantic and yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmtune.errors import RecipeError
from llmtune.rewards.rules import is_code_rule

TASKS = ("perplexity", "preference", "reward", "generate", "compare")
EVAL_FORMATS = ("text", "alpaca", "sharegpt", "messages", "prompts", "pairs")


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), coerce_numbers_to_str=True, allow_inf_nan=False)

    task: Literal["perplexity", "preference", "reward", "generate", "compare"] = Field(
        description="perplexity | preference | reward | generate | compare"
    )
    model: str = Field(
        description="Model directory or hub id (an adapter directory also works: its base is read from "
        "adapter_config.json). For preference, a reward model is scored directly; a policy is scored by its "
        "implicit DPO reward against `reference`."
    )
    adapter: str | None = Field(default=None, description="A peft adapter directory applied on `model`.")
    data: str = Field(description="The data file or directory (json, jsonl, parquet, csv, txt).")
    format: Literal["text", "alpaca", "sharegpt", "messages", "prompts", "pairs"] | None = Field(
        default=None, description="Row format; omitted = detected from the first rows."
    )
    output: str | None = Field(default=None, description="Write the JSON report here.")
    generations: str | None = Field(
        default=None,
        description="Write per-example generations / scores as JSONL here (default: beside `output`, "
        "<output stem>.generations.jsonl).",
    )
    max_samples: int | None = Field(default=None, ge=1, description="Evaluate at most this many rows.")
    max_length: int = Field(default=1024, ge=8, description="Longest sequence (prompt + reply), in tokens.")
    batch_size: int = Field(default=8, ge=1, description="Sequences per forward pass / generate call.")
    seed: int = Field(default=0, description="Seed for sampling, random few-shot choice.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 on a GPU that supports it, else fp32."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when available.")
    chat_template: str | None = Field(
        default=None, description="null: the tokenizer's template; else chatml, llama3, alpaca or a .jinja file."
    )
    system: str | None = Field(default=None, description="System prompt for rows that have none.")

    max_new_tokens: int = Field(default=128, ge=1, description="Generation: most new tokens per reply.")
    temperature: float = Field(default=0.0, ge=0, description="Generation: 0 = greedy, else sampling.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Generation: nucleus sampling mass.")

    regex: str | None = Field(
        default=None,
        description="generate: also score `regex_match`: the pattern's first group (or match) in the "
        "generation equals the answer.",
    )
    few_shot: int = Field(default=0, ge=0, description="generate: k examples (with answers) put before each input.")
    few_shot_selection: Literal["jaccard", "random"] = Field(
        default="jaccard", description="jaccard: the k most similar by word-set IoU; random: seeded."
    )
    few_shot_data: str | None = Field(
        default=None, description="Where few-shot examples come from (default: the other rows of `data`)."
    )

    reward_models: list[str] = Field(
        default_factory=list,
        description="reward: reward models (full directory or SEQ_CLS adapter); compare: the judge (one).",
    )
    rules: list[str] = Field(
        default_factory=list,
        description="reward: rule rewards: exact_match, contains, gsm8k, regex:PATTERN, length_penalty:CHARS, "
        "module:function.",
    )
    trust_reward_code: bool = Field(
        default=False,
        description="Allow module:function rules: they import and run that module's Python code.",
    )
    reward_weights: list[float] | None = Field(
        default=None, description="reward: weight of each reward model, the judge, then each rule (default 1)."
    )
    judge: str | None = Field(
        default=None,
        description="reward: a judge model (an instruct LM or .gguf) that scores each reply 1-10 with a rubric, "
        "reported in [0, 1]; compare: the judge that picks the better reply, asked in both orders.",
    )
    judge_rubric: str | None = Field(
        default=None,
        description="The judge's rubric (text or a .txt file): reward needs {reply}, compare {reply_a} and "
        "{reply_b} (and {prompt}). Default: the built-in ones (llmtune.rewards.judge).",
    )
    model_b: str | None = Field(default=None, description="compare: the second model.")
    adapter_b: str | None = Field(default=None, description="compare: an adapter on `model_b`.")
    tie_margin: float = Field(default=0.0, ge=0, description="compare: |score a - score b| <= margin is a tie.")
    reference: str | None = Field(
        default=None,
        description="preference with a policy: the reference model (default: the base under `adapter`).",
    )
    beta: float = Field(default=0.1, gt=0, description="preference with a policy: DPO beta of the implicit reward.")

    @model_validator(mode="after")
    def _task_needs(self) -> EvalConfig:
        if self.task == "reward" and not (self.reward_models or self.rules or self.judge):
            raise ValueError(
                "task reward needs reward_models (--reward-model PATH), a judge (--judge PATH) and / or rules "
                "(--rule gsm8k)"
            )
        if self.task == "compare":
            if self.model_b is None:
                raise ValueError("task compare needs model_b (--model-b PATH), the model to compare against")
            if self.judge is not None and (self.reward_models or self.rules):
                raise ValueError(
                    "task compare with a judge model (--judge, asked which reply is better) takes no reward model "
                    "or rule beside it: use --judge alone, or --reward-model / --rule (scored and summed)"
                )
            if not (self.judge or self.reward_models or self.rules):
                raise ValueError(
                    "task compare needs a judge: a reward model (--reward-model PATH), rules (--rule exact_match, "
                    "scored against each row's answer) or a judge model (--judge PATH)"
                )
        if (self.judge is not None or self.judge_rubric is not None) and self.task not in ("reward", "compare"):
            raise ValueError(
                f"task {self.task} uses no judge: --judge and --judge-rubric go with task reward or compare"
            )
        code = [r for r in self.rules if is_code_rule(r)]
        if code and not self.trust_reward_code:
            raise ValueError(
                f"rule {code[0]!r} imports and runs Python code from module {code[0].partition(':')[0]!r}; that "
                "happens only when asked for: pass --trust-reward-code (trust_reward_code: true in an eval file)"
            )
        n = len(self.reward_models) + (self.judge is not None) + len(self.rules)
        if self.reward_weights is not None and len(self.reward_weights) != n:
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries for {n} rewards (reward models, then the "
                "judge, then rules)"
            )
        return self

    def generations_path(self) -> Path | None:
        if self.generations:
            return Path(self.generations)
        if self.output:
            out = Path(self.output)
            return out.with_name(out.stem + ".generations.jsonl")
        return None


def load_eval_config(path: str | Path | None, options: dict[str, Any]) -> EvalConfig:
    """The YAML file (if any) with ``options`` (the command-line values that were given) on top."""
    from llmtune.recipe.load import format_validation_error, read_yaml

    raw: dict[str, Any] = dict(read_yaml(path)) if path is not None else {}
    if raw.get("stage") == "eval":  # a file may say what it is
        raw.pop("stage")
    raw.update({k: v for k, v in options.items() if v is not None and v != [] and v != ()})
    source = str(path) if path is not None else "eval options"
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as e:
        msg = format_validation_error(e, source, EvalConfig, what="eval file")
        if path is None:
            msg = msg.replace("is not a valid eval file", "are not valid")
            msg += "\n  (pass --task, --model and --data, or an eval YAML file)"
        raise RecipeError(msg) from None


# model paths of an eval, by option: checked (existence, lengths) before torch is imported
_MODEL_OPTIONS = ("model", "adapter", "model_b", "adapter_b", "reference", "judge")
_FILE_OPTIONS = ("data", "few_shot_data", "output", "generations")


def check_eval_paths(cfg: EvalConfig) -> None:
    """Refuse, before anything heavy loads, a path the filesystem cannot hold and a local-looking model or
    data path that does not exist (with close names: a mistyped run directory is never looked up on the hub)."""
    from llmtune.errors import UserError
    from llmtune.paths import check_path_length, looks_local, missing_path_message

    models = [(f"--{k.replace('_', '-')}", getattr(cfg, k)) for k in _MODEL_OPTIONS]
    models += [("--reward-model", m) for m in cfg.reward_models]
    files = [(f"--{k.replace('_', '-')}", getattr(cfg, k)) for k in _FILE_OPTIONS]
    for key, value in [*models, *files]:
        check_path_length(key, value)
    for key, value in [*models, *files[:2]]:  # inputs; --output and --generations are written
        if value and looks_local(value) and not Path(value).expanduser().exists():
            msg, hint = missing_path_message(key, value)
            raise UserError(msg, hint=hint)
    from llmtune.model.hub import check_hub_models

    hub = [(k, v, None) for k, v in models if k not in ("--adapter", "--adapter-b")]
    check_hub_models(hub, refuse=True, option="eval")
