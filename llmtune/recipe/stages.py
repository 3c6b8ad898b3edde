"""Each stage's own recipe blocks and recipe class, and ``STAGE_RECIPES``, the one registry of stages: the
recipe union, the stage names, ``llmtune init``'s starters, validate's per-stage checks, ``data inspect`` and
the command line's help derive from it, and the stage's module is found by name (``llmtune.stages.<name>``).
A new stage is its blocks, recipe and entry here, and its module in llmtune/stages/. Imports only pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from llmtune.recipe.block import Block
from llmtune.recipe.data import PREFERENCE_FORMATS
from llmtune.recipe.online import GenerationConfig, RewardConfig
from llmtune.recipe.schema import (
    PEFT_METHODS,
    PROMPT_METHODS,
    RecipeBase,
    require_preference_formats,
    require_prompt_formats,
    require_step_in_prompts,
)

# rm.loss -> the preference format it reads (llmtune.stages.rm.FORMAT_OF_LOSS; a test keeps them equal)
RM_FORMAT_OF_LOSS = {"pairwise": "pairs", "ranked": "ranked", "pointwise": "pointwise"}


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
    train_with: Literal["sft", "dpo"] = Field(
        default="sft",
        description="How each round learns from its samples. sft: fine-tune on each kept prompt's best (best-of-N, "
        "as in LLaMA-2). dpo: train the dpo block's loss on the round's best / worst pairs, with the round's "
        "start model as the reference (iterative, on-policy dpo); each round then samples from the model the "
        "last one wrote.",
    )

    @field_validator("num_samples")
    @classmethod
    def _samples(cls, v: int) -> int:
        if v < 2:
            raise ValueError(
                f"is {v}: a prompt's best completion is kept when it beats the prompt's worst, so best-of-N needs "
                "at least 2 samples (e.g. 8)"
            )
        return v


DataFeature = Literal["memory_map", "dedup", "filter", "quality_column", "schedule", "replay"]


class StageRecipe(RecipeBase):
    """The base of each stage's recipe: the shared blocks, a ``stage:`` tag (each subclass's literal), and the
    checks of what the stage's entry in STAGE_RECIPES allows (data features, peft methods)."""

    def default_format(self) -> str | None:
        """The format a source is read in when it names none and its rows do not tell (None: one of the
        conversation formats, detected)."""
        return STAGE_RECIPES[self.stage].default_format  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _fits_stage(self) -> StageRecipe:
        stage: str = self.stage  # type: ignore[attr-defined]
        info, d = STAGE_RECIPES[stage], self.data
        if d.memory_map is True and "memory_map" not in info.data_features:
            only = stages_with("memory_map")
            raise ValueError(f"data.memory_map is for stage {only} (raw text); remove it, or use stage: {only}")
        for key, on in (("dedup", d.dedup), ("filter", d.filter.active())):
            if on and key not in info.data_features:
                raise ValueError(
                    f"data.{key} is supported for stages {stages_with(key)}, not {stage}: remove it from the recipe"
                )
        if "quality_column" not in info.data_features and any(x.quality_column for x in [*d.train, *d.eval]):
            raise ValueError(
                f"quality_column conditions {stages_with('quality_column')} on a quality label; stage {stage} does "
                "not read it"
            )
        if d.schedule is not None and "schedule" not in info.data_features:
            raise ValueError(
                f"data.schedule is supported for stages {stages_with('schedule')}, not {stage}: remove it from the "
                "recipe"
            )
        if d.replay is not None and "replay" not in info.data_features:
            raise ValueError(
                f"data.replay mixes plain-text rows into {stages_with('replay')}; stage {stage} does not use it: "
                "remove data.replay (for cpt, list the file under data.train)"
            )
        method = self.finetuning.method
        if method in info.refused_methods:
            allowed = " / ".join(m for m in PEFT_METHODS if m not in info.refused_methods)
            raise ValueError(
                f"finetuning.method {method} cannot train stage {stage}: {info.refused_why}; use method {allowed} "
                "(or full / freeze)"
            )
        return self


class CptRecipe(StageRecipe):
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


class SftRecipe(StageRecipe):
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


class RmRecipe(StageRecipe):
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
        require_preference_formats(self, allowed, f"rm.loss {self.rm.loss}")
        return self

    def default_format(self) -> str:
        return "stepwise" if self.rm.loss == "process" else RM_FORMAT_OF_LOSS[self.rm.loss]


class DpoRecipe(StageRecipe):
    """Direct preference optimisation (and its family: ipo, hinge, simpo, kto) of a causal LM."""

    stage: Literal["dpo"]
    dpo: DpoConfig = Field(default_factory=DpoConfig)

    @model_validator(mode="after")
    def _formats(self) -> DpoRecipe:
        allowed = ("unpaired", "pairs") if self.dpo.loss == "kto" else ("pairs",)
        require_preference_formats(self, allowed, f"dpo.loss {self.dpo.loss}")
        return self

    def default_format(self) -> str:
        return "unpaired" if self.dpo.loss == "kto" else "pairs"


class GrpoRecipe(StageRecipe):
    """Group relative policy optimisation (and RLOO): sample a group per prompt, score, push up the better ones."""

    stage: Literal["grpo"]
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @model_validator(mode="after")
    def _batch(self) -> GrpoRecipe:
        require_prompt_formats(self)
        require_step_in_prompts(self, "grpo", self.grpo.num_generations)
        return self


class PpoRecipe(StageRecipe):
    """PPO with a critic and a KL-penalised reward: sample one completion per prompt, score it, optimise."""

    stage: Literal["ppo"]
    ppo: PpoConfig = Field(default_factory=PpoConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @model_validator(mode="after")
    def _ppo(self) -> PpoRecipe:
        require_prompt_formats(self)
        p = self.ppo
        lora = self.finetuning.method in ("lora", "qlora")
        if p.memory is None:
            p.memory = "shared" if lora else "separate"
        if p.memory == "shared" and not lora:
            raise ValueError(
                f"ppo.memory shared needs finetuning.method lora or qlora (the policy and critic are adapters on one "
                f"base), not {self.finetuning.method}: use memory: separate, or method: lora"
            )
        require_step_in_prompts(self, "ppo", 1)
        if p.critic_init == "reward" and not p.reward.models():
            raise ValueError(
                "ppo.critic_init reward needs a reward model: set ppo.reward.model, or critic_init: policy"
            )
        return self


class RejectionSamplingRecipe(StageRecipe):
    """Best-of-N rounds: sample, score, train on each prompt's best (sft) or best / worst pair (dpo)."""

    stage: Literal["rejection_sampling"]
    rejection_sampling: RejectionSamplingConfig = Field(default_factory=RejectionSamplingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)

    @model_validator(mode="after")
    def _prompts(self) -> RejectionSamplingRecipe:
        require_prompt_formats(self)
        return self


# ------------------------------------------------------------------------------------------------- the registry
OMIT = object()  # a shared key a stage's starter leaves out (grpo / ppo: train.grad_accum, their step is in prompts)


@dataclass(frozen=True)
class Starter:
    """What ``llmtune init NAME`` writes beyond the schema's defaults (llmtune.recipe.starter renders it)."""

    data: str  # a file under recipes/quickstart
    format: str
    data_note: str  # what the rows of your own file need
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)  # block -> key -> value (shared blocks)
    stage_values: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage block -> key -> value
    stage: str | None = None  # the recipe's stage when the name is a variant (kto -> dpo)
    model_note: str = "the model to start from (hub id or local directory)"


@dataclass(frozen=True)
class StageInfo:
    """One stage, as the layers above the recipe ask about it without loading it."""

    recipe: type[StageRecipe]
    summary: str  # a noun phrase for the command line's help: "supervised fine-tuning"
    formats: tuple[str, ...]  # the data formats it trains on (validate checks a source's format: against them)
    default_format: str | None  # a source's format when it names none and the rows do not tell (rm, dpo: by loss)
    starter: Starter  # what `llmtune init` writes for it
    online: bool = False  # samples from the model it trains: reads every row as a prompt; its block holds reward:
    data_features: frozenset[DataFeature] = frozenset()  # data keys only this stage's pipeline reads
    refused_methods: tuple[str, ...] = ()  # peft methods it cannot train in this version, and why
    refused_why: str = ""
    variants: dict[str, Starter] = field(default_factory=dict)  # other names with some of its keys set (kto)
    # `data inspect` without --stage: the formats it reads with this stage, and the keys that make it read them
    inspected: dict[str, dict[str, Any]] = field(default_factory=dict)


_LM_FEATURES: frozenset[DataFeature] = frozenset({"dedup", "filter", "schedule"})
_CONVERSATIONS = ("alpaca", "sharegpt", "messages")
_PROMPT_FORMATS = ("prompts", *_CONVERSATIONS)
_PREFERENCE = "one JSON object per line: prompt, chosen, rejected"
_PROMPTS = "one JSON object per line: prompt and the answer the reward rule checks"
_FROM_SFT = "usually the output_dir of an sft run (e.g. runs/sft); hub id or local directory"
# a step is <stage>.prompts_per_step; lr: a lora rate (about 10x what a full fine-tune of the same model takes)
# log_every 1: an online step is a rollout plus an update, minutes on a CPU; each one is worth a line
_ONLINE_TRAIN = {"micro_batch_size": 8, "grad_accum": OMIT, "lr": 5.0e-5, "log_every": 1}


def _preference_starter(data_note: str, lr: float, **more: Any) -> Starter:
    blocks = {"data": {"eval_split": 0.05}, "train": {"lr": lr}}
    return Starter("pairs.jsonl", "pairs", data_note, blocks=blocks, model_note=_FROM_SFT, **more)


STAGE_RECIPES: dict[str, StageInfo] = {
    "cpt": StageInfo(
        CptRecipe,
        "continued pretraining",
        ("text",),
        "text",
        Starter(
            "cpt.txt",
            "text",
            "plain text: .txt (one document per line) or json / jsonl rows with a `text` field",
            blocks={"data": {"packing": True, "eval_split": 0.05}, "train": {"lr": 2.0e-4}},
            model_note="the model to continue pretraining (usually a base model; hub id or local directory)",
        ),
        data_features=_LM_FEATURES | {"memory_map"},
        inspected={"text": {}},
    ),
    "sft": StageInfo(
        SftRecipe,
        "supervised fine-tuning",
        _CONVERSATIONS,
        None,
        Starter(
            "sft.jsonl",
            "messages",
            "conversations: messages (role / content), alpaca or sharegpt rows",
            blocks={"data": {"eval_split": 0.05}, "train": {"lr": 2.0e-4}},
        ),
        data_features=_LM_FEATURES | {"replay", "quality_column"},
        inspected={f: {} for f in _CONVERSATIONS},
    ),
    "rm": StageInfo(
        RmRecipe,
        "reward models",
        ("pairs", "ranked", "pointwise", "stepwise"),
        "pairs",
        _preference_starter(_PREFERENCE, 1.0e-4),
        refused_methods=PROMPT_METHODS,
        refused_why="a reward model reads its score at the last real token, which virtual tokens shift",
        inspected={"ranked": {"rm": {"loss": "ranked"}}, "pointwise": {"rm": {"loss": "pointwise"}}},
    ),
    "dpo": StageInfo(
        DpoRecipe,
        "preference optimisation",
        ("pairs", "unpaired"),
        "pairs",
        _preference_starter(_PREFERENCE, 5.0e-5),
        variants={
            "kto": _preference_starter(  # not a stage: dpo with the kto loss
                "unpaired rows (prompt, completion, label true / false) or pairs (split into a desirable and an "
                "undesirable example)",
                5.0e-5,
                stage_values={"dpo": {"loss": "kto"}},
                stage="dpo",
            ),
        },
        inspected={"pairs": {}, "unpaired": {"dpo": {"loss": "kto"}}},
    ),
    "ppo": StageInfo(
        PpoRecipe,
        "PPO with a critic",
        _PROMPT_FORMATS,
        "prompts",
        Starter("facts/prompts.jsonl", "prompts", _PROMPTS, blocks={"train": _ONLINE_TRAIN}, model_note=_FROM_SFT),
        online=True,
        refused_methods=("adalora", "ia3", *PROMPT_METHODS),
        refused_why="ppo's policy and critic are lora adapters on one base (memory: shared) or full / freeze models",
    ),
    "grpo": StageInfo(
        GrpoRecipe,
        "group relative policy optimisation",
        _PROMPT_FORMATS,
        "prompts",
        # a step is grpo.prompts_per_step prompts x num_generations; micro_batch_size only splits it
        Starter("facts/prompts.jsonl", "prompts", _PROMPTS, blocks={"train": _ONLINE_TRAIN}, model_note=_FROM_SFT),
        online=True,
        refused_methods=PROMPT_METHODS,
        refused_why="sampling with virtual tokens is not supported in this version",
        inspected={"prompts": {"train": {"micro_batch_size": 8}}},  # whole groups of grpo.num_generations (8)
    ),
    "rejection_sampling": StageInfo(
        RejectionSamplingRecipe,
        "best-of-N rejection sampling",
        _PROMPT_FORMATS,
        "prompts",
        Starter("facts/prompts.jsonl", "prompts", _PROMPTS, blocks={"train": {"lr": 1.0e-4}}, model_note=_FROM_SFT),
        online=True,
        refused_methods=("adalora", "ia3", *PROMPT_METHODS),
        refused_why="each round merges a lora adapter into the next round's model",
        variants={
            "iterative_dpo": Starter(  # not a stage: rounds of sampling, then dpo on each round's best / worst
                "facts/prompts.jsonl",
                "prompts",
                _PROMPTS,
                # a round's pairs are few (one per prompt whose best beats its worst): lr 5e-5 left dpo's loss
                # at 0.69 after a round's 6 steps on SmolLM2-135M; 1e-4 is the rejection-sampling starter's
                blocks={"train": {"lr": 1.0e-4}},
                stage_values={"rejection_sampling": {"train_with": "dpo", "rounds": 2}},
                stage="rejection_sampling",
                model_note=_FROM_SFT,
            ),
        },
    ),
}
STAGES = tuple(STAGE_RECIPES)
ONLINE_STAGES = tuple(name for name, info in STAGE_RECIPES.items() if info.online)
AnyRecipe = Union[tuple(info.recipe for info in STAGE_RECIPES.values())]  # type: ignore[valid-type]
Recipe = Annotated[AnyRecipe, Field(discriminator="stage")]


def stages_with(feature: DataFeature) -> str:
    """The stages whose data pipeline reads a data key, in words: "cpt and sft"."""
    *most, last = [name for name, info in STAGE_RECIPES.items() if feature in info.data_features]
    return f"{', '.join(most)} and {last}" if most else last
