"""Recipe loading, ``--set`` overrides, validation messages, the resolved recipe and path checks.

In-process and fast: nothing here imports torch. Every error test asserts that the message names the
key path and says how to fix it, since that message is all a user sees (the CLI prints it, exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmtune.commands.preflight import check_paths
from llmtune.errors import DataError, RecipeError, UserError
from llmtune.paths import looks_local
from llmtune.recipe import dump_recipe, load_recipe, resolved_dict, validate_recipe
from llmtune.recipe.load import apply_overrides, parse_override
from llmtune.recipe.stages import CptRecipe, SftRecipe
from tests.conftest import TINY_MODEL, base_recipe, write_recipe


def _error(tmp_path: Path, recipe: dict[str, Any], overrides: list[str] | None = None) -> str:
    """Load ``recipe`` from a file and return the RecipeError message it must raise."""
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def _write_text(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "recipe.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------- the good case


def test_base_recipe_loads_typed(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)))
    assert isinstance(r, SftRecipe)
    assert r.model.path == str(TINY_MODEL)
    assert r.train.max_steps == 4
    assert r.finetuning.lora_alpha == 16.0


def test_cpt_stage_selects_cpt_schema(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, stage="cpt")
    recipe["data"]["train"][0]["format"] = "text"
    r = load_recipe(write_recipe(tmp_path, recipe))
    assert isinstance(r, CptRecipe)
    assert r.stage == "cpt"


# ------------------------------------------------------------------------------------ schema messages


def test_misspelled_top_level_key(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path)
    recipe["trian"] = recipe.pop("train")
    msg = _error(tmp_path, recipe)
    assert "trian: unknown key 'trian'" in msg
    assert "Did you mean 'train'?" in msg


def test_misspelled_nested_key(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, train={"lrr": 1e-4}))
    assert "train.lrr: unknown key 'lrr'" in msg
    assert "Did you mean 'lr'?" in msg


def test_misspelled_key_in_list_item(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path)
    recipe["data"]["train"][0]["formt"] = "messages"
    msg = _error(tmp_path, recipe)
    assert "data.train.0.formt: unknown key 'formt'" in msg
    assert "Did you mean 'format'?" in msg


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, distributed={"xyzzy": 1}))
    assert "distributed.xyzzy: unknown key 'xyzzy'" in msg
    assert "Valid keys here:" in msg
    assert "zero_stage" in msg and "offload" in msg


def test_wrong_type(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, train={"micro_batch_size": "four"}))
    assert "train.micro_batch_size" in msg
    assert "expected a whole number, got 'four'" in msg
    assert "e.g. 4" in msg


def test_several_problems_reported_at_once(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, train={"micro_batch_size": "four", "lrr": 1}))
    assert "(2 problems)" in msg
    assert "train.micro_batch_size" in msg and "train.lrr" in msg


def test_bad_literal_suggests_the_closest(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, train={"lr_scheduler": "cosin"}))
    assert "train.lr_scheduler: 'cosin' is not allowed" in msg
    assert "'linear'" in msg and "'constant'" in msg
    assert "Did you mean cosine?" in msg


def test_out_of_range_value(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, train={"lr": -1.0}))
    assert "train.lr: -1.0 is out of range" in msg
    assert "greater than 0" in msg


def test_missing_required_key(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path)
    del recipe["model"]["path"]
    msg = _error(tmp_path, recipe)
    assert "model.path: required key is missing" in msg
    assert "Hub id" in msg  # the field's description says what to put there
    assert "Fix: add it" in msg


def test_missing_stage(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path)
    del recipe["stage"]
    msg = _error(tmp_path, recipe)
    assert "missing key `stage`" in msg
    assert "stage: sft" in msg


def test_misspelled_stage_key(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path)
    recipe["stgae"] = recipe.pop("stage")
    msg = _error(tmp_path, recipe)
    assert "missing key `stage`" in msg
    assert "found 'stgae'" in msg and "Did you mean 'stage'?" in msg


def test_unknown_stage(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, stage="sfft"))
    assert "unknown stage 'sfft'" in msg
    assert "Did you mean 'sft'?" in msg
    assert "cpt, sft" in msg


def test_ppo_block_defaults_and_checks(tmp_path: Path) -> None:
    from llmtune.recipe import load_recipe

    full = {"finetuning": {"method": "full"}}
    p = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, stage="ppo", **full)))
    assert (p.ppo.kl_coef, p.ppo.kl_estimator, p.ppo.gamma, p.ppo.lam, p.ppo.vf_coef) == (0.05, "k1", 1.0, 0.95, 0.1)
    assert (p.ppo.ppo_epochs, p.ppo.cliprange, p.ppo.cliprange_value, p.ppo.whiten_advantages) == (4, 0.2, 0.2, True)
    assert p.ppo.memory == "separate" and p.ppo.target_kl is None  # method full: each model its own weights
    assert p.ppo.reward.rules() == ["exact_match"]
    lora = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, stage="ppo", finetuning={"method": "lora"})))
    assert lora.ppo.memory == "shared"  # lora: one base for every model

    msg = _error(tmp_path, base_recipe(tmp_path, stage="ppo", ppo={"memory": "shared"}, **full))
    assert "ppo.memory shared needs finetuning.method lora or qlora" in msg
    assert p.ppo.prompts_per_step == 16  # a step counted in prompts, all processes
    msg = _error(tmp_path, base_recipe(tmp_path, stage="ppo", train={"grad_accum": 2}))
    assert "train.grad_accum 2" in msg and "ppo.prompts_per_step" in msg
    msg = _error(tmp_path, base_recipe(tmp_path, stage="ppo", ppo={"critic_init": "reward"}))
    assert "critic_init reward needs a reward model" in msg
    msg = _error(tmp_path, base_recipe(tmp_path, stage="ppo", ppo={"dual_clip": 0.5}))
    assert "ppo.dual_clip" in msg
    msg = _error(tmp_path, base_recipe(tmp_path, stage="ppo", ppo={"kl_estimater": "k3"}))
    assert "kl_estimater" in msg and "kl_estimator" in msg


def test_grpo_block_defaults_and_checks(tmp_path: Path) -> None:
    from llmtune.recipe import load_recipe

    g = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, stage="grpo", train={"micro_batch_size": 8})))
    assert (g.grpo.num_generations, g.grpo.beta, g.grpo.loss_type, g.grpo.scale_rewards) == (8, 0.0, "dapo", "group")
    assert g.grpo.reward.rules() == ["exact_match"] and g.grpo.reward.models() == []
    assert (g.generation.max_new_tokens, g.generation.temperature) == (64, 0.7)

    msg = _error(tmp_path, base_recipe(tmp_path, stage="grpo", grpo={"num_generations": 1}))
    assert "grpo.num_generations" in msg and "at least 2" in msg
    assert (g.grpo.prompts_per_step, g.grpo.dynamic_sampling) == (16, False)
    # a step counted in prompts: any micro-batch size holds whole groups; grad_accum no longer sizes the step
    assert load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, stage="grpo", grpo={"num_generations": 3})))
    msg = _error(tmp_path, base_recipe(tmp_path, stage="grpo", train={"micro_batch_size": 8, "grad_accum": 2}))
    assert "train.grad_accum 2" in msg and "grpo.prompts_per_step: 2 x the number of processes" in msg
    msg = _error(tmp_path, base_recipe(tmp_path, stage="grpo", grpo={"num_generations": 2, "reward": {}}))
    assert "names no reward source" in msg
    msg = _error(
        tmp_path,
        base_recipe(
            tmp_path, stage="grpo", grpo={"num_generations": 2, "reward": {"rule": "gsm8k", "weights": [1, 2]}}
        ),
    )
    assert "weights has 2 numbers for 1 sources" in msg
    sft_data = base_recipe(tmp_path)["data"]
    sft_data["train"][0]["format"] = "pairs"
    msg = _error(tmp_path, base_recipe(tmp_path, stage="grpo", grpo={"num_generations": 2}, data=sft_data))
    assert "grpo reads prompts" in msg


def test_rm_and_dpo_blocks_defaults_and_checks(tmp_path: Path) -> None:
    from llmtune.recipe import load_recipe

    rm = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, stage="rm")))
    assert (rm.rm.loss, rm.rm.center_rewards_coefficient, rm.rm.export_merged) == ("pairwise", 0.0, True)
    dpo = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, stage="dpo")))
    assert (dpo.dpo.beta, dpo.dpo.loss, dpo.dpo.reference, dpo.dpo.precompute_reference) == (0.1, "sigmoid", None, True)
    msg = _error(tmp_path, base_recipe(tmp_path, stage="dpo", dpo={"loss": "simpo", "reference": "x/y"}))
    assert "reference-free" in msg
    msg = _error(tmp_path, base_recipe(tmp_path, stage="dpo", dpo={"loss": "robust"}))
    assert "needs label_smoothing" in msg
    msg = _error(tmp_path, base_recipe(tmp_path, stage="dpo", dpo={"los": "ipo"}))
    assert "Did you mean 'loss'?" in msg
    src = {"path": "x.jsonl", "format": "alpaca"}
    msg = _error(tmp_path, base_recipe(tmp_path, stage="rm", data={"train": [src]}))
    assert "rm.loss pairwise reads format pairs" in msg
    src = {"path": "x.jsonl", "format": "ranked"}
    msg = _error(tmp_path, base_recipe(tmp_path, stage="dpo", dpo={"loss": "kto"}, data={"train": [src]}))
    assert "dpo.loss kto reads format unpaired or pairs" in msg
    src = {"path": "x.jsonl", "format": "pairs"}
    msg = _error(tmp_path, base_recipe(tmp_path, data={"train": [src]}))
    assert "use stage rm or dpo" in msg
    msg = _error(tmp_path, base_recipe(tmp_path, stage="rm", data={"train": [{"path": "x.jsonl"}], "packing": True}))
    assert "packing is not supported for stage rm" in msg


def test_empty_train_sources(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, data={"train": []}))
    assert "data.train: is empty" in msg
    assert "at least one source" in msg


# ----------------------------------------------------------------------------------- the file itself


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = _write_text(tmp_path, "stage: sft\nmodel:\n  path: x\n data: [\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "is not valid YAML at line 4" in msg
    assert "indentation" in msg


def test_yaml_nested_too_deeply_is_a_recipe_error(tmp_path: Path) -> None:
    path = _write_text(tmp_path, "stage: sft\nmodel: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(path)


def test_tab_indentation_names_the_line(tmp_path: Path) -> None:
    path = _write_text(tmp_path, "stage: sft\nmodel:\n\tpath: x\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line 3"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(RecipeError, match="is empty") as info:
        load_recipe(_write_text(tmp_path, text))
    assert "recipes/" in str(info.value)  # the fix: start from a shipped recipe


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "str"), ("42\n", "int")])
def test_non_mapping_yaml(tmp_path: Path, text: str, kind: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(_write_text(tmp_path, text))
    msg = str(info.value)
    assert "must be a mapping of keys" in msg
    assert f"not a {kind}" in msg


def test_non_utf8_file(tmp_path: Path) -> None:
    path = _write_text(tmp_path, b"stage: sft\nmodel: {path: \xff\xfe}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "is not UTF-8 text" in msg
    assert "byte 25" in msg
    assert "save the file as UTF-8" in msg


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is not a file"):
        load_recipe(tmp_path)


# ------------------------------------------------------------------------------------ --set overrides


def test_set_float_is_typed_by_schema(tmp_path: Path) -> None:
    # YAML 1.1 reads "1e-4" (no dot) as a string; the schema makes it the float it names.
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)), ["train.lr=1e-4"])
    assert isinstance(r.train.lr, float)
    assert r.train.lr == pytest.approx(1e-4)


def test_set_int(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)), ["train.micro_batch_size=8"])
    assert r.train.micro_batch_size == 8
    assert isinstance(r.train.micro_batch_size, int)


def test_set_number_for_a_text_key_stays_text(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)), ["model.revision=20240101", "output_dir=2024"])
    assert r.model.revision == "20240101"
    assert r.output_dir == "2024"


def test_set_bool_null_and_string(tmp_path: Path) -> None:
    r = load_recipe(
        write_recipe(tmp_path, base_recipe(tmp_path)),
        ["train.gradient_checkpointing=true", "train.max_steps=null", "finetuning.method=full"],
    )
    assert r.train.gradient_checkpointing is True
    assert r.train.max_steps is None
    assert r.finetuning.method == "full"


def test_set_list_index(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)), ["data.train.0.max_samples=5"])
    assert r.data.train[0].max_samples == 5


def test_set_creates_a_missing_block(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path)
    assert "distributed" not in recipe and "sft" not in recipe
    r = load_recipe(write_recipe(tmp_path, recipe), ["distributed.zero_stage=2", "sft.train_on_prompt=true"])
    assert r.distributed.zero_stage == 2
    assert isinstance(r, SftRecipe) and r.sft.train_on_prompt is True


def test_set_later_override_wins(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)), ["train.lr=1e-3", "train.lr=5e-5"])
    assert r.train.lr == pytest.approx(5e-5)


def test_set_value_is_validated_like_the_file(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path), ["train.micro_batch_size=four"])
    assert "train.micro_batch_size: expected a whole number" in msg
    msg = _error(tmp_path, base_recipe(tmp_path), ["train.lrr=1e-4"])
    assert "Did you mean 'lr'?" in msg


@pytest.mark.parametrize("item", ["foo", "=3", "a..b=1", "train.=1"])
def test_set_bad_form(item: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_override(item)
    msg = str(info.value)
    assert "is not of the form key.path=value" in msg
    assert "--set train.lr=1e-4" in msg


def test_set_bad_form_through_load(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path), ["foo"])
    assert "--set 'foo' is not of the form key.path=value" in msg


def test_set_index_out_of_range(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path), ["data.train.5.max_samples=5"])
    assert "data.train.5" in msg
    assert "index 5 is out of range (the list has 1 items)" in msg


def test_set_non_numeric_index(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path), ["data.train.first.max_samples=5"])
    assert "data.train is a list; index it with a number" in msg


def test_set_into_a_value(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path), ["seed.x=1"])
    assert "seed is a value, not a block of keys" in msg


def test_apply_overrides_parses_yaml_values() -> None:
    raw = apply_overrides({"a": {"b": 1}}, ["a.b=[1, 2]", "a.c={x: y}", "d=hello world"])
    assert raw == {"a": {"b": [1, 2], "c": {"x": "y"}}, "d": "hello world"}


# -------------------------------------------------------------------------------- cross-field checks


def test_qlora_with_zero3(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, finetuning={"method": "qlora"}, distributed={"zero_stage": 3}))
    assert "finetuning.method qlora" in msg and "distributed.zero_stage 3" in msg
    assert "use zero_stage 0-2" in msg


def test_qlora_with_zero2_is_fine(tmp_path: Path) -> None:
    r = load_recipe(
        write_recipe(tmp_path, base_recipe(tmp_path, finetuning={"method": "qlora"}, distributed={"zero_stage": 2}))
    )
    assert r.finetuning.method == "qlora" and r.distributed.zero_stage == 2


def test_offload_optimizer_needs_zero(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, distributed={"zero_stage": 0, "offload": "optimizer"}))
    assert "distributed:" in msg
    assert "offload: optimizer needs zero_stage 1, 2 or 3" in msg
    assert "distributed.zero_stage: 2" in msg


def test_offload_all_needs_zero3(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, distributed={"zero_stage": 2, "offload": "all"}))
    assert "offload: all" in msg and "zero_stage: 3" in msg


def test_eval_and_eval_split_both_set(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path)
    recipe["data"]["eval"] = [{"path": str(tmp_path / "eval.jsonl")}]
    recipe["data"]["eval_split"] = 0.1
    msg = _error(tmp_path, recipe)
    assert "data:" in msg
    assert "set either data.eval" in msg and "data.eval_split" in msg and "not both" in msg


def test_cpt_rejects_conversation_format(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, stage="cpt")
    recipe["data"]["train"][0]["format"] = "alpaca"
    msg = _error(tmp_path, recipe)
    assert "has format alpaca" in msg
    assert "use format: text" in msg and "stage: sft" in msg


def test_lora_target_modules_empty_list(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, finetuning={"target_modules": []}))
    assert "finetuning.target_modules: is empty" in msg
    assert "all-linear" in msg


def test_lora_target_modules_single_name_becomes_list(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, finetuning={"target_modules": "q_proj"})))
    assert r.finetuning.target_modules == ["q_proj"]


# -------------------------------------------------------------------------------- the resolved recipe


def test_resolved_dict_fills_defaults(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)))
    d = resolved_dict(r)
    assert d["stage"] == "sft"
    assert d["train"]["lr_scheduler"] == "cosine"
    assert d["train"]["keep_checkpoints"] == 2
    assert d["distributed"] == {"zero_stage": 0, "offload": "none", "backend": "auto"}
    assert d["data"]["train"][0]["weight"] == 1.0
    assert d["data"]["packing"] is False
    assert d["sft"] == {"train_on_prompt": False}
    assert d["model"]["dtype"] == "auto"


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)), ["train.lr=1e-4"])
    again = validate_recipe(yaml.safe_load(dump_recipe(r)))
    assert again == r


def test_hub_token_never_in_resolved_recipe(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, model={"hub_token": "hf_secret123"})))
    assert r.model.hub_token is not None
    assert r.model.hub_token.get_secret_value() == "hf_secret123"  # still usable by the loader
    assert "hub_token" not in resolved_dict(r)["model"]
    dumped = dump_recipe(r)
    assert "hf_secret123" not in dumped
    assert "hub_token" not in yaml.safe_load(dumped)["model"]
    assert "hf_secret123" not in repr(r)


def test_hub_token_from_set_not_in_dump(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)), ["model.hub_token=hf_secret123"])
    assert "hf_secret123" not in dump_recipe(r)


# ------------------------------------------------------------------------------------ paths on disk


@pytest.mark.parametrize(
    ("path", "local"),
    [
        ("Qwen/Qwen2.5-0.5B", False),
        ("meta-llama/Llama-3.1-8B-Instruct", False),
        ("gpt2", False),
        ("tatsu-lab/alpaca", False),
        ("data/train.jsonl", True),  # a data-file suffix
        ("owner/name.json", True),
        ("train.parquet", True),
        ("./model", True),
        ("../model", True),
        ("/abs/model", True),
        ("~/model", True),
        ("runs/sft/final", True),  # more than one slash
    ],
)
def test_looks_local(path: str, local: bool) -> None:
    assert looks_local(path) is local


def test_looks_local_existing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert looks_local("org/model") is True  # exists here, so it is not a hub id
    assert looks_local("org/other") is True  # org/ is a folder here: a mistyped local path, not a hub id
    assert looks_local("elsewhere/other") is False


def test_check_paths_ok_on_local_recipe(tmp_path: Path) -> None:
    assert check_paths(load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)))) == []


def test_check_paths_missing_data_file(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path)
    recipe["data"]["train"][0]["path"] = str(tmp_path / "missing.jsonl")
    r = load_recipe(write_recipe(tmp_path, recipe))
    with pytest.raises(DataError) as info:
        check_paths(r)
    msg = str(info.value)
    assert msg.startswith(f"data.train.0.path: {tmp_path / 'missing.jsonl'} does not exist")
    assert "fix the path" in msg
    assert isinstance(info.value, UserError) and info.value.exit_code == 2


def test_check_paths_missing_eval_file(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path)
    recipe["data"]["eval"] = [{"path": "nowhere/eval.jsonl"}]
    with pytest.raises(DataError, match=r"data\.eval\.0\.path: nowhere/eval\.jsonl does not exist"):
        check_paths(load_recipe(write_recipe(tmp_path, recipe)))


def test_check_paths_missing_local_model_dir(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, model={"path": str(tmp_path / "no-model")})))
    with pytest.raises(RecipeError) as info:
        check_paths(r)
    msg = str(info.value)
    assert msg.startswith(f"model.path: {tmp_path / 'no-model'} does not exist")
    assert "hub id" in msg


def test_check_paths_unknown_chat_template(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, model={"chat_template": "chatmll"})))
    with pytest.raises(RecipeError) as info:
        check_paths(r)
    assert "model.chat_template: 'chatmll'" in str(info.value)
    assert "chatml, llama3, alpaca" in str(info.value)


def test_check_paths_notes_hub_ids(tmp_path: Path) -> None:
    recipe = base_recipe(tmp_path, model={"path": "Qwen/Qwen2.5-0.5B"})
    recipe["data"]["train"].append({"path": "tatsu-lab/alpaca"})
    notes = check_paths(load_recipe(write_recipe(tmp_path, recipe)))
    assert len(notes) == 2
    assert any(n.startswith("data.train.1.path 'tatsu-lab/alpaca'") and "hub dataset" in n for n in notes)
    assert any(n.startswith("model.path 'Qwen/Qwen2.5-0.5B'") and "from the hub" in n for n in notes)


def test_best_metric_needs_an_eval_metric_and_eval_and_save_steps(tmp_path: Path) -> None:
    msg = _error(tmp_path, base_recipe(tmp_path, train={"best_metric": "loss", "eval_every": 5, "save_every": 5}))
    assert "must name an evaluation metric such as eval/loss" in msg
    msg = _error(tmp_path, base_recipe(tmp_path, train={"best_metric": "eval/loss", "save_every": 5}))
    assert "set eval_every and save_every too" in msg
    ok = base_recipe(tmp_path, train={"best_metric": "eval/loss", "eval_every": 5, "save_every": 5})
    assert load_recipe(write_recipe(tmp_path, ok)).train.best_metric == "eval/loss"


def test_a_key_given_twice_is_an_error_and_merge_keys_still_work(tmp_path: Path) -> None:
    text = "stage: sft\nmodel:\n  path: m\ndata:\n  train: [{path: d.jsonl}]\ntrain:\n  lr: 1e-4\n  lr: 1e-3\n"
    with pytest.raises(RecipeError, match=r"the key 'lr' twice in one block \(line 8\)"):
        load_recipe(_write_text(tmp_path, text))
    text = (
        "stage: sft\noutput_dir: o\nmodel:\n  path: m\n"
        "data:\n  train: [&src {path: d.jsonl, max_samples: 5}]\n  eval: [{<<: *src, max_samples: 2}]\n"
    )
    r = load_recipe(_write_text(tmp_path, text))  # a merge key's values may be overridden: not a duplicate
    assert (r.data.eval[0].path, r.data.eval[0].max_samples, r.data.train[0].max_samples) == ("d.jsonl", 2, 5)


@pytest.mark.parametrize("value", ["inf", ".inf", "-.inf", ".nan"])
def test_infinite_and_nan_numbers_are_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(RecipeError, match="finite number"):
        load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)), [f"train.lr={value}"])


def test_rejection_sampling_threshold_defaults_to_the_rule_maximum(tmp_path: Path) -> None:
    """threshold null: exact_match's maximum 1.0 (a right answer); none for a reward model; "none": none."""
    from llmtune.recipe import load_recipe
    from llmtune.stages.best_of_n import selection_threshold

    def rs(**block) -> object:
        recipe = base_recipe(tmp_path, stage="rejection_sampling", rejection_sampling=block)
        return load_recipe(write_recipe(tmp_path, recipe)).rejection_sampling

    assert rs().threshold is None and selection_threshold(rs()) == 1.0
    assert selection_threshold(rs(reward={"rule": ["contains", "length_penalty:80"]})) == 1.0
    assert selection_threshold(rs(reward={"model": "runs/rm"})) is None
    assert selection_threshold(rs(threshold=0.5)) == 0.5
    assert selection_threshold(rs(threshold="none")) is None
    msg = _error(tmp_path, base_recipe(tmp_path, stage="rejection_sampling", rejection_sampling={"num_samples": 1}))
    assert "rejection_sampling.num_samples" in msg and "at least 2" in msg
