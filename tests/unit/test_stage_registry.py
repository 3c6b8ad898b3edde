"""The one stage registry (llmtune.recipe.stages.STAGE_RECIPES): every stage it lists has a recipe class whose
`stage:` is its name and a module llmtune/stages/<name>.py whose STAGE is found by name; what derives from it
(the recipe union, the stage list, the help texts, validate's per-stage checks) follows it."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from llmtune.commands.help import ONLINE, stage_names, stage_summaries
from llmtune.recipe import validate_recipe
from llmtune.recipe.stages import ONLINE_STAGES, STAGE_RECIPES, STAGES, AnyRecipe, stages_with
from llmtune.stages import RunsItself, get_stage
from tests.conftest import base_recipe


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_is_a_recipe_and_a_module_found_by_name(name: str) -> None:
    info = STAGE_RECIPES[name]
    assert typing.get_args(info.recipe.model_fields["stage"].annotation) == (name,)
    stage = get_stage(name)
    assert stage.name == name
    assert get_stage(name) is not stage  # one fresh instance per run: stages keep state over a run
    # rejection sampling runs its own rounds; every other stage is driven by the trainer
    assert isinstance(stage, RunsItself) == (name == "rejection_sampling")


def test_an_unknown_stage_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown stage base"):
        get_stage("base")  # stages/base.py is a module, but no stage


def test_the_recipe_union_and_the_stage_list_are_the_registry() -> None:
    assert tuple(STAGE_RECIPES) == STAGES and STAGES[:2] == ("cpt", "sft")
    assert typing.get_args(AnyRecipe) == tuple(info.recipe for info in STAGE_RECIPES.values())


@pytest.mark.parametrize("name", STAGES)
def test_each_entry_is_consistent_with_its_recipe(name: str) -> None:
    info = STAGE_RECIPES[name]
    assert info.default_format is None or info.default_format in info.formats
    assert info.starter.format in info.formats
    if info.online:  # its own block, named after it, holds the reward (validate and preflight read it there)
        assert "reward" in info.recipe.model_fields[name].annotation.model_fields
    for variant in info.variants.values():
        assert variant.stage == name and set(variant.stage_values) <= set(info.recipe.model_fields)


def test_help_texts_name_every_stage_and_variant() -> None:
    names = stage_names()
    assert names.startswith("cpt | sft | rm | dpo | kto (dpo with loss kto) | ")
    assert names.endswith("rejection_sampling | iterative_dpo (rejection_sampling with train_with dpo, rounds 2)")
    assert all(f" {s}" in f" {names}" for s in STAGES)
    summaries = stage_summaries()
    assert summaries.startswith("continued pretraining (cpt), supervised fine-tuning (sft), ")
    assert summaries.endswith(" and best-of-N rejection sampling (rejection_sampling, iterative_dpo)")
    assert "preference optimisation (dpo, kto)" in summaries
    assert ONLINE == "ppo / grpo / rejection_sampling" and ONLINE_STAGES == ("ppo", "grpo", "rejection_sampling")


def test_data_keys_and_methods_a_stage_does_not_take_are_refused_naming_what_it_does(tmp_path: Path) -> None:
    assert stages_with("schedule") == "cpt and sft" and stages_with("memory_map") == "cpt"
    raw = base_recipe(tmp_path, stage="rm")
    raw["data"]["memory_map"] = True
    with pytest.raises(Exception, match=r"data\.memory_map is for stage cpt \(raw text\)"):
        validate_recipe(raw)
    raw = base_recipe(tmp_path, stage="dpo")
    raw["finetuning"] = {"method": "prompt"}
    assert validate_recipe(raw).finetuning.method == "prompt"  # dpo refuses no peft method
    raw = base_recipe(tmp_path, stage="grpo")
    raw["finetuning"] = {"method": "prompt"}
    with pytest.raises(Exception, match="use method lora / qlora / adalora / ia3 \\(or full / freeze\\)"):
        validate_recipe(raw)
