"""Write docs/recipe-reference.md from the recipe schema (every key, its type, default and meaning).

python scripts/gen_recipe_docs.py          # rewrite the file
python scripts/gen_recipe_docs.py --check  # exit 1 if the file is out of date (the tests do this)
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llmtune.recipe.data import DataConfig, DataSource, SchedulePhase
from llmtune.recipe.online import GenerationConfig, JudgeConfig, RewardConfig
from llmtune.recipe.schema import (
    AdaLoraOptions,
    DistributedConfig,
    FinetuningConfig,
    Ia3Options,
    ModelConfig,
    PromptOptions,
    RecipeBase,
    TrainConfig,
)
from llmtune.recipe.stages import (
    STAGE_RECIPES,
    DpoConfig,
    GrpoConfig,
    PpoConfig,
    RejectionSamplingConfig,
    RmConfig,
    SftConfig,
)

OUT = Path(__file__).resolve().parents[1] / "docs" / "recipe-reference.md"
BLOCKS: list[tuple[str, type[BaseModel], str]] = [
    (
        "top level",
        RecipeBase,
        "Keys every stage shares. `stage:` is "
        + ", ".join(f"`{name}`" for name in list(STAGE_RECIPES)[:-1])
        + f" or `{list(STAGE_RECIPES)[-1]}`.",
    ),
    ("model", ModelConfig, "The model a stage starts from."),
    ("finetuning", FinetuningConfig, "What trains."),
    ("finetuning.adalora (method adalora)", AdaLoraOptions, "AdaLoRA's rank budget over the run's optimizer steps."),
    ("finetuning.ia3 (method ia3)", Ia3Options, "(IA)^3's rescaled modules."),
    ("finetuning.prompt (methods prefix, prompt, ptuning)", PromptOptions, "The virtual tokens."),
    ("data", DataConfig, "Where the rows come from and how they become batches."),
    ("data.train[] / data.eval[]", DataSource, "One data source."),
    ("data.schedule[]", SchedulePhase, "One phase of a multi-stage data mix (cpt, sft)."),
    ("train", TrainConfig, "The optimisation loop."),
    ("distributed", DistributedConfig, "DeepSpeed."),
    ("sft (stage sft only)", SftConfig, "Supervised fine-tuning options."),
    ("rm (stage rm only)", RmConfig, "Reward model options."),
    ("dpo (stage dpo only)", DpoConfig, "Direct preference optimisation options (and KTO, SimPO, IPO)."),
    ("grpo (stage grpo only)", GrpoConfig, "Group relative policy optimisation (and RLOO)."),
    ("ppo (stage ppo only)", PpoConfig, "Proximal policy optimisation with a critic."),
    (
        "rejection_sampling (stage rejection_sampling only)",
        RejectionSamplingConfig,
        "Best-of-N sampling, then sft on the winners; `rounds` repeats it.",
    ),
    (
        "grpo.reward / ppo.reward / rejection_sampling.reward",
        RewardConfig,
        "Where the online stages' scores come from.",
    ),
    (
        "<stage>.reward.judge (one, or a list)",
        JudgeConfig,
        "A judge model (RLAIF): an instruct LM scores each reply with a rubric (llmtune.rewards.judge).",
    ),
    ("generation (grpo, ppo, rejection_sampling)", GenerationConfig, "Sampling settings of the online stages."),
]


def _type(tp: object) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin is not None and args and str(origin) in ("typing.Union", "<class 'types.UnionType'>"):
        return " \\| ".join(_type(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    if tp is type(None):
        return "null"
    names = {"str": "text", "int": "integer", "float": "number", "bool": "true/false", "SecretStr": "secret text"}
    name = getattr(tp, "__name__", str(tp))
    return names.get(name, name)


def _default(field: object) -> str:
    default = getattr(field, "default", PydanticUndefined)
    factory = getattr(field, "default_factory", None)
    if default is PydanticUndefined and factory is None:
        return "**required**"
    value = factory() if factory is not None else default
    if isinstance(value, BaseModel):
        return "(its block below)"
    if isinstance(value, bool):
        value = str(value).lower()
    return f"`{'null' if value is None else value}`"


def render() -> str:
    lines = [
        "# Recipe reference",
        "",
        "Generated from the recipe schema (`llmtune/recipe/`) by `scripts/gen_recipe_docs.py`; do not edit by hand.",
        "Unknown keys are errors (with a did-you-mean). `llmtune validate RECIPE` prints a recipe with every",
        "default filled in.",
    ]
    for title, model, blurb in BLOCKS:
        lines += ["", f"## {title}", "", blurb, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if model is RecipeBase and name in ("model", "finetuning", "data", "train", "distributed"):
                continue
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/gen_recipe_docs.py")
            sys.exit(1)
    else:
        OUT.write_text(text)
        print(f"wrote {OUT}")
