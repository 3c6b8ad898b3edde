"""The command line's help texts that name the stages, derived from the stage registry (no torch)."""

from __future__ import annotations

from llmtune.recipe.stages import ONLINE_STAGES, STAGE_RECIPES


def stage_names(separator: str = " | ") -> str:
    """Every stage and its variants: "cpt | sft | rm | dpo | kto (dpo with loss kto) | ppo | ..."."""
    names = []
    for stage, info in STAGE_RECIPES.items():
        names.append(stage)
        for name, v in info.variants.items():
            settings = ", ".join(f"{k} {x}" for values in v.stage_values.values() for k, x in values.items())
            names.append(f"{name} ({stage} with {settings})")
    return separator.join(names)


def stage_summaries() -> str:
    """What the stages do, in one phrase: "continued pretraining (cpt), ... and best-of-N ... (rejection_sampling)"."""
    parts = [f"{info.summary} ({', '.join([stage, *info.variants])})" for stage, info in STAGE_RECIPES.items()]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


ONLINE = " / ".join(ONLINE_STAGES)  # "ppo / grpo / rejection_sampling"
