"""Rewards: the one scoring interface of the online stages (grpo, rejection_sampling, ppo) and ``llmtune eval``.

A recipe's ``reward:`` block (:class:`~llmtune.recipe.schema.RewardConfig`) names its sources: reward models
(``model:``, outputs of an ``rm`` run, see :mod:`llmtune.rewards.model`; a directory with ``prm.json`` is a
process reward model, scored per step and aggregated with ``aggregation:``, see :mod:`llmtune.rewards.prm`), judges
(``judge:``, an instruct model that scores each reply with a rubric, see :mod:`llmtune.rewards.judge`) and rules
(``rule:``, see :mod:`llmtune.rewards.rules`). :func:`check_rewards` checks them before anything loads; :func:`build_rewards`
loads them into a :class:`Rewards`, which scores a batch of decoded completions::

    rewards = build_rewards(cfg, trust_code=False, device="cpu", dtype="fp32")
    result = rewards(prompts, completions, answers, ended)   # RewardResult
    rewards.close()

total[i] = sum over sources k (models, then judges, then rules) of weights[k] * s_k[i], where s_k is source k's raw
score, or with ``normalize: batch`` (s_k - mean(s_k)) / (std(s_k) + 1e-6) over the call's batch (population
std); then ``missing_eos_penalty`` is subtracted where ``ended[i]`` is False (the completion hit
max_new_tokens without an end token).

Importing this package loads neither torch nor transformers: they come with the model sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from llmtune.errors import DataError, RecipeError, UserError

if TYPE_CHECKING:
    from llmtune.model.load import Partition
    from llmtune.recipe.online import RewardConfig

__all__ = [
    "RewardResult",
    "RewardSource",
    "Rewards",
    "RuleSource",
    "build_rewards",
    "check_rewards",
    "model_source_name",
    "normalize_batch",
    "reward_maximum",
]

NORMALIZE_EPS = 1e-6
REWARD_MODEL_FIX = (
    "give the output_dir of a finished rm run: no reward model yet? train one with stage: rm (see recipes/rm.yaml); "
    "with lora / qlora that directory holds the adapter with its score head"
)


@dataclass
class RewardResult:
    """total: one number per completion (weighted sum of the, possibly normalised, sources minus the
    missing-EOS penalty); per_source: each source's raw scores, keyed by its name; stats: counts the sources
    report about the call, keyed ``<source>/<count>`` (a judge's ``unparsable`` and ``cached`` judgements),
    the same keys on every call."""

    total: list[float]
    per_source: dict[str, list[float]] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class RewardSource(Protocol):
    name: str

    def score(self, prompts: list[list[dict]], completions: list[str], answers: list[str | None]) -> list[float]: ...


class RuleSource:
    """A rule (see :mod:`llmtune.rewards.rules`) as a RewardSource: scores each completion against its row's
    answer (``#### <number>`` reduced to the number)."""

    def __init__(self, spec: str, *, trust_code: bool, name: str | None = None) -> None:
        from llmtune.rewards.rules import get_rule

        self.spec = spec
        self.name = name or f"rule/{spec}"
        self.rule, self.needs_answer = get_rule(spec, trust_code=trust_code)

    def score(self, prompts: list[list[dict]], completions: list[str], answers: list[str | None]) -> list[float]:
        from llmtune.rewards.rules import reference_answer

        if self.needs_answer:
            missing = sum(1 for a in answers if a is None)
            if missing:
                raise DataError(
                    f"rule {self.spec} scores against each prompt's `answer`, and {missing} of {len(answers)} "
                    "prompts have none",
                    hint="give every prompt row an `answer`, or use a rule that needs none (regex:..., "
                    "length_penalty:N) or a reward model",
                )
        return [
            self.rule(c, reference_answer(a) if a is not None else None)
            for c, a in zip(completions, answers, strict=True)
        ]

    def close(self) -> None:
        pass


def normalize_batch(scores: list[float]) -> list[float]:
    """(s - mean) / (std + 1e-6) over the list, with the population std."""
    if not scores:
        return []
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    return [(s - mean) / (std + NORMALIZE_EPS) for s in scores]


class Rewards:
    """The sources of a reward block with their weights (models, then judges, then rules)."""

    def __init__(
        self,
        sources: list[Any],
        weights: list[float] | None = None,
        *,
        normalize: str = "none",
        missing_eos_penalty: float = 0.0,
    ) -> None:
        if weights is not None and len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} reward sources")
        if normalize not in ("none", "batch"):
            raise ValueError(f"normalize must be none or batch, not {normalize!r}")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"reward source names are not unique: {names}")
        self.sources = list(sources)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(sources)
        self.normalize = normalize
        self.missing_eos_penalty = float(missing_eos_penalty)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def needs_answer(self) -> bool:
        """Whether some source scores against each prompt's answer (check the data has one before training)."""
        return any(getattr(s, "needs_answer", False) for s in self.sources)

    def __call__(
        self,
        prompts: list[list[dict]],
        completions: list[str],
        answers: list[str | None],
        ended: list[bool] | None = None,
    ) -> RewardResult:
        n = len(completions)
        if len(prompts) != n or len(answers) != n or (ended is not None and len(ended) != n):
            raise ValueError(
                f"rewards: {len(prompts)} prompts, {n} completions, {len(answers)} answers"
                + (f", {len(ended)} ended flags" if ended is not None else "")
                + ": give one of each per completion"
            )
        per_source: dict[str, list[float]] = {}
        stats: dict[str, float] = {}
        for source in self.sources:
            scores = [float(s) for s in source.score(prompts, completions, answers)]
            if len(scores) != n:
                raise ValueError(f"reward source {source.name} gave {len(scores)} scores for {n} completions")
            per_source[source.name] = scores
            for k, v in (getattr(source, "stats", None) or {}).items():
                stats[f"{source.name}/{k}"] = float(v)
        total = [0.0] * n
        for w, scores in zip(self.weights, per_source.values(), strict=True):
            vals = normalize_batch(scores) if self.normalize == "batch" else scores
            for i, v in enumerate(vals):
                total[i] += w * v
        if ended is not None and self.missing_eos_penalty:
            total = [t - self.missing_eos_penalty if not e else t for t, e in zip(total, ended, strict=True)]
        return RewardResult(total, per_source, stats)

    def close(self) -> None:
        """Free the reward models (the rules hold nothing)."""
        for source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Rewards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reward_maximum(cfg: RewardConfig) -> float | None:
    """The highest total a reward block can give, when it is known: rules only (no reward model, no user
    code), not normalised; sum over rules of weight x (the rule's maximum, or its minimum for a negative
    weight). exact_match / contains / gsm8k / regex give 1.0 (a right answer), length_penalty 0.0. None when
    unknown or unbounded. rejection_sampling's default threshold."""
    from llmtune.rewards.rules import rule_range

    if cfg.models() or cfg.judges() or cfg.normalize != "none":
        return None
    rules = cfg.rules()
    weights = cfg.weights if cfg.weights is not None else [1.0] * len(rules)
    total = 0.0
    for spec, w in zip(rules, weights, strict=True):
        r = rule_range(spec)
        if r is None:
            return None
        total += w * (r[1] if w >= 0 else r[0])
    return total if math.isfinite(total) else None


def model_source_name(path: str) -> str:
    """``model/<last path part>``: a run's output directory name, or a hub id's model name."""
    return "model/" + (path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or path)


def _unique(names: list[str]) -> list[str]:
    """The names, a repeated one suffixed #2, #3, ..."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def source_names(cfg: RewardConfig) -> list[str]:
    """The names sources get in RewardResult.per_source: models, then judges, then rules."""
    from llmtune.rewards.judge import judge_source_name

    return _unique(
        [model_source_name(p) for p in cfg.models()]
        + [judge_source_name(j.model) for j in cfg.judges()]
        + [f"rule/{r}" for r in cfg.rules()]
    )


def check_rewards(cfg: RewardConfig, *, trust_code: bool, what: str = "reward") -> None:
    """Everything about ``cfg`` that can be checked before a model loads (no rule code runs, no module is
    imported): rule names, regexes and lengths, module:function only with ``trust_code``, and each reward
    model path: it exists, is a finished run, and is a reward model (not a causal LM). RecipeError otherwise."""
    from llmtune.rewards.rules import check_rule

    for spec in cfg.rules():
        try:
            check_rule(spec, trust_code=trust_code)
        except UserError as e:
            raise RecipeError(f"{what}.rule: {e.message}", hint=e.hint) from None
    if cfg.judges():
        from llmtune.rewards.judge import check_judge, require_judge_model

        for judge in cfg.judges():
            check_judge(judge, f"{what}.judge")
            require_judge_model(judge.model, f"{what}.judge.model")
    if not cfg.models():
        return
    from llmtune.model.load import REWARD_MODEL_HINT
    from llmtune.model.resolve import require_reward_model
    from llmtune.model.reward import read_prm_info

    for path in cfg.models():
        try:
            if read_prm_info(path) is not None:
                from llmtune.rewards.prm import require_prm

                require_prm(path, f"{what}.model")
                continue
            require_reward_model(path, f"{what}.model")
        except UserError as e:
            hint = REWARD_MODEL_FIX if e.hint in (None, REWARD_MODEL_HINT) else e.hint
            raise RecipeError(e.message, hint=hint) from None


def build_rewards(
    cfg: RewardConfig,
    *,
    trust_code: bool,
    device: Any,
    dtype: Any,
    what: str = "reward",
    loaded: dict[str, Any] | None = None,
    zero3: Partition | None = None,
) -> Rewards:
    """The Rewards of ``cfg``, reward models loaded on ``device`` in ``dtype`` (a torch dtype, or a name:
    auto, bf16, fp16, fp32). Checks ``cfg`` first (see check_rewards). ``loaded``: reward-model path ->
    a source the caller built already (ppo's shared memory: a reward adapter on the policy's base). zero3: how a
    training run partitions the reward models over its processes under ZeRO-3 (its strategy's partition)."""
    check_rewards(cfg, trust_code=trust_code, what=what)
    names = source_names(cfg)
    sources: list[Any] = []
    try:
        if cfg.models():
            from llmtune.rewards.model import RewardModelSource

            for path, name in zip(cfg.models(), names, strict=False):
                if loaded and path in loaded:
                    loaded[path].name = name
                    sources.append(loaded[path])
                    continue
                from llmtune.model.reward import read_prm_info

                if read_prm_info(path) is not None:
                    from llmtune.rewards.prm import PrmSource

                    sources.append(
                        PrmSource(
                            path,
                            device=device,
                            dtype=dtype,
                            aggregation=cfg.aggregation,
                            batch_size=cfg.batch_size,
                            name=name,
                            what=f"{what}.model",
                            zero3=zero3,
                        )
                    )
                    continue
                sources.append(
                    RewardModelSource(
                        path,
                        device=device,
                        dtype=dtype,
                        batch_size=cfg.batch_size,
                        name=name,
                        what=f"{what}.model",
                        zero3=zero3,
                    )
                )
        judge_names = names[len(cfg.models()) : len(cfg.models()) + len(cfg.judges())]
        for judge, name in zip(cfg.judges(), judge_names, strict=True):
            from llmtune.rewards.judge import JudgeSource

            sources.append(JudgeSource(judge, device=device, dtype=dtype, name=name, what=f"{what}.judge"))
        for spec, name in zip(cfg.rules(), names[len(cfg.models()) + len(cfg.judges()) :], strict=True):
            sources.append(RuleSource(spec, trust_code=trust_code, name=name))
    except BaseException:
        for s in sources:
            s.close()
        raise
    return Rewards(sources, cfg.weights, normalize=cfg.normalize, missing_eos_penalty=cfg.missing_eos_penalty)
