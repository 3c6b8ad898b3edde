"""finetuning.method beyond full / freeze / lora / qlora: each method's keys, their defaults and checks, the
dora / rslora aliases, keys of another method refused, and the stage / ZeRO-3 / packing combinations that cannot
work refused at validate time. In-process and fast (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmtune.errors import RecipeError
from llmtune.recipe import dump_recipe, load_recipe, validate_recipe
from tests.conftest import base_recipe, write_recipe


def _recipe(tmp_path: Path, finetuning: dict[str, Any], **sections: Any) -> dict[str, Any]:
    recipe = base_recipe(tmp_path, **sections)
    recipe["finetuning"] = finetuning
    return recipe


def _load(tmp_path: Path, finetuning: dict[str, Any], **sections: Any) -> Any:
    return load_recipe(write_recipe(tmp_path, _recipe(tmp_path, finetuning, **sections)))


def _error(tmp_path: Path, finetuning: dict[str, Any], **sections: Any) -> str:
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, finetuning, **sections)
    return str(info.value)


@pytest.mark.parametrize("method", ["adalora", "ia3", "prefix", "prompt", "ptuning"])
def test_each_method_validates_with_its_defaults_and_round_trips(tmp_path: Path, method: str) -> None:
    r = _load(tmp_path, {"method": method})
    assert r.finetuning.method == method
    assert (r.finetuning.adalora.init_r, r.finetuning.adalora.target_r, r.finetuning.adalora.delta_t) == (12, 8, 1)
    assert r.finetuning.prompt.num_virtual_tokens == 16 and r.finetuning.prompt.encoder_type == "mlp"
    assert validate_recipe(yaml.safe_load(dump_recipe(r))) == r  # the saved recipe.yaml loads back as it was


@pytest.mark.parametrize(("alias", "key"), [("dora", "use_dora"), ("rslora", "use_rslora")])
def test_dora_and_rslora_are_lora_options(tmp_path: Path, alias: str, key: str) -> None:
    r = _load(tmp_path, {"method": alias, "lora_r": 4})
    assert r.finetuning.method == "lora" and getattr(r.finetuning, key) is True and r.finetuning.lora_r == 4
    assert _load(tmp_path, {"method": "qlora", key: True}).finetuning.method == "qlora"
    msg = _error(tmp_path, {"method": alias, key: False})
    assert f"method {alias} with {key}: false" in msg and "use method: lora" in msg


def test_dora_and_rslora_can_be_combined(tmp_path: Path) -> None:
    ft = _load(tmp_path, {"method": "dora", "use_rslora": True}).finetuning
    assert ft.method == "lora" and ft.use_dora and ft.use_rslora


@pytest.mark.parametrize(
    ("finetuning", "phrases"),
    [
        ({"method": "lora", "adalora": {"init_r": 16}}, ["finetuning: adalora is not used by method lora", "adalora"]),
        ({"method": "ia3", "lora_r": 4}, ["finetuning: lora_r is not used by method ia3", "lora / qlora"]),
        ({"method": "adalora", "lora_r": 4}, ["finetuning: lora_r is not used by method adalora"]),
        ({"method": "prefix", "ia3": {"target_modules": ["v_proj"]}}, ["finetuning: ia3 is not used by method prefix"]),
        ({"method": "full", "use_dora": True}, ["finetuning: use_dora is not used by method full"]),
        ({"method": "prompt", "prompt": {"encoder_type": "lstm"}}, ["prompt.encoder_type", "it is for ptuning"]),
        ({"method": "ptuning", "prompt": {"init_text": "Hi"}}, ["prompt.init_text", "it is for prompt"]),
        ({"method": "prompt", "prompt": {"prefix_projection": True}}, ["prompt.prefix_projection", "for prefix"]),
        ({"method": "lora", "prompt": {"num_virtual_tokens": 4}}, ["finetuning: prompt is not used by method lora"]),
    ],
)
def test_a_key_of_another_method_is_refused(tmp_path: Path, finetuning: dict[str, Any], phrases: list[str]) -> None:
    msg = _error(tmp_path, finetuning)
    for phrase in phrases:
        assert phrase in msg, msg
    assert "remove it, or choose that method" in msg


def test_prefix_reads_the_encoder_size_with_its_projection(tmp_path: Path) -> None:
    ft = _load(tmp_path, {"method": "prefix", "prompt": {"prefix_projection": True, "encoder_hidden_size": 32}})
    assert ft.finetuning.prompt.encoder_hidden_size == 32


@pytest.mark.parametrize(
    ("adalora", "phrase"),
    [
        ({"init_r": 4, "target_r": 8}, "target_r 8 is above init_r 4"),
        ({"delta_t": 0}, "finetuning.adalora.delta_t"),
        ({"tinit": -1}, "finetuning.adalora.tinit"),
        ({"beta1": 1.0}, "finetuning.adalora.beta1"),
        ({"init_rank": 4}, "init_rank"),
    ],
)
def test_adalora_keys_are_checked(tmp_path: Path, adalora: dict[str, Any], phrase: str) -> None:
    assert phrase in _error(tmp_path, {"method": "adalora", "adalora": adalora})


@pytest.mark.parametrize(
    ("ia3", "phrase"),
    [
        (
            {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]},
            "['down_proj'] are not in target_modules",
        ),
        ({"feedforward_modules": ["down_proj"]}, "set without target_modules"),
        ({"target_modules": []}, "target_modules is empty"),
    ],
)
def test_ia3_modules_are_checked(tmp_path: Path, ia3: dict[str, Any], phrase: str) -> None:
    assert phrase in _error(tmp_path, {"method": "ia3", "ia3": ia3})


def test_num_virtual_tokens_must_be_positive(tmp_path: Path) -> None:
    assert "finetuning.prompt.num_virtual_tokens" in _error(
        tmp_path, {"method": "prompt", "prompt": {"num_virtual_tokens": 0}}
    )


@pytest.mark.parametrize(
    ("stage", "method", "phrase"),
    [
        ("rm", "prefix", "virtual tokens shift"),
        ("rm", "ptuning", "virtual tokens shift"),
        ("ppo", "ia3", "ppo's policy and critic"),
        ("ppo", "adalora", "ppo's policy and critic"),
        ("grpo", "prompt", "sampling with virtual tokens"),
        ("rejection_sampling", "ia3", "merges a lora adapter"),
        ("rejection_sampling", "prefix", "merges a lora adapter"),
    ],
)
def test_stage_method_combinations_that_cannot_work(tmp_path: Path, stage: str, method: str, phrase: str) -> None:
    msg = _error(tmp_path, {"method": method}, stage=stage)
    assert f"finetuning.method {method} cannot train stage {stage}" in msg and phrase in msg
    assert "use method" in msg


@pytest.mark.parametrize(("stage", "method"), [("rm", "ia3"), ("rm", "adalora"), ("dpo", "prefix"), ("grpo", "ia3")])
def test_stage_method_combinations_that_validate(tmp_path: Path, stage: str, method: str) -> None:
    train = {"micro_batch_size": 8} if stage == "grpo" else {}
    assert _load(tmp_path, {"method": method}, stage=stage, train=train).finetuning.method == method


def test_adalora_with_zero3_and_prompt_methods_with_packing_are_refused(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"method": "adalora"}, distributed={"zero_stage": 3})
    assert "adalora cannot be combined with distributed.zero_stage 3" in msg and "use zero_stage 0-2" in msg
    assert _load(tmp_path, {"method": "adalora"}, distributed={"zero_stage": 2}).distributed.zero_stage == 2
    recipe = _recipe(tmp_path, {"method": "ptuning"})
    recipe["data"]["packing"] = True
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, recipe))
    assert "ptuning cannot be combined with data.packing" in str(info.value)
    assert "set data.packing: false" in str(info.value)


def test_prefix_with_gradient_checkpointing_is_refused(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"method": "prefix"}, train={"gradient_checkpointing": True})
    assert "prefix cannot be combined with train.gradient_checkpointing" in msg and "use method prompt" in msg
    assert _load(tmp_path, {"method": "ptuning"}, train={"gradient_checkpointing": True}).train.gradient_checkpointing


def test_method_set_from_the_command_line(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, _recipe(tmp_path, {"method": "lora"}))
    r = load_recipe(path, ["finetuning.method=dora"])
    assert r.finetuning.method == "lora" and r.finetuning.use_dora
    r = load_recipe(path, ["finetuning.method=ia3", "finetuning.ia3.target_modules=[v_proj]"])
    assert r.finetuning.ia3.target_modules == ["v_proj"]


def test_a_prompt_adapter_as_model_path_is_refused_without_the_merge_hint(tmp_path: Path) -> None:
    import json

    from llmtune.commands.preflight import check_model_dir

    d = tmp_path / "prefix-out"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "base_model_name_or_path": "b"}))
    with pytest.raises(RecipeError) as info:
        check_model_dir("model.path", str(d))
    msg = str(info.value)
    assert "is a PREFIX_TUNING adapter" in msg and "cannot be merged" in msg and "merge-lora" not in msg
    assert "its base model (b)" in msg
