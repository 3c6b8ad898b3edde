"""Every recipe in recipes/ is schema-valid, documented, and names data in the format it has.

The recipes for real models name hub models and ``data/...`` files the user downloads (each recipe's
comment says from where); the quickstart is fully local and must pass the path checks as it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmtune.data.formats import detect_format
from llmtune.data.preference import detect_preference_format
from llmtune.data.sources import read_rows
from llmtune.recipe import load_recipe
from llmtune.recipe.checks import check_paths
from llmtune.recipe.schema import DataSource, looks_local
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
IDS = [p.stem for p in RECIPES]


def test_recipes_are_found() -> None:
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "cpt.yaml", "sft_lora.yaml", "sft_qlora.yaml", "sft_full_zero3.yaml"} <= names
    assert {"rm.yaml", "dpo_lora.yaml", "dpo_qlora.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_is_schema_valid(path: Path) -> None:
    r = load_recipe(path)
    assert r.stage in ("cpt", "sft", "rm", "dpo", "grpo", "rejection_sampling")
    assert r.output_dir.startswith("runs/")  # all runs land under runs/ (git-ignored)


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_opens_with_how_to_run_it(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    header: list[str] = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 3, f"{path.name} must open with a comment block"
    text = "\n".join(header)
    assert f"recipes/{path.name}" in text  # the command that runs this very file
    assert "llmtune train" in text or "-m llmtune train" in text


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_paths_check_once_data_is_there(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a directory holding the recipe's data files, check_paths passes: only hub ids are left as notes."""
    r = load_recipe(path)
    monkeypatch.chdir(ROOT if path.stem == "quickstart" else tmp_path)
    for src in [*r.data.train, *r.data.eval]:
        assert looks_local(src.path), f"{path.name}: data {src.path} would be taken as a hub dataset"
        if src.path.startswith("../shared/data/"):  # the shared data beside the repository
            assert (ROOT / src.path).is_file() or not (ROOT.parent / "shared").is_dir(), src.path
            src.path = str(ROOT / src.path)
            continue
        if not Path(src.path).exists():
            assert src.path.startswith("data/"), f"{path.name}: {src.path} is neither in the repo nor under data/"
            Path(src.path).parent.mkdir(parents=True, exist_ok=True)
            Path(src.path).touch()
    notes = check_paths(r)
    assert all("loaded from the hub" in n for n in notes), notes
    if path.stem == "quickstart":
        assert notes == []  # fully offline


def test_quickstart_passes_check_paths_from_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    r = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert check_paths(r) == []
    assert Path(r.model.path, "config.json").is_file()


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem != "quickstart"], ids=lambda p: p.stem)
def test_real_model_recipes_name_hub_models(path: Path) -> None:
    r = load_recipe(path)
    assert not looks_local(r.model.path)
    assert r.precision == "bf16"


# What each shipped recipe promises in its name and comment.
EXPECTED = {
    "cpt": {
        "stage": "cpt",
        "model.path": "Qwen/Qwen2.5-0.5B",
        "finetuning.method": "full",
        "data.packing": True,
        "data.max_length": 2048,
        "distributed.zero_stage": 2,
        "precision": "bf16",
    },
    "sft_lora": {
        "stage": "sft",
        "model.path": "Qwen/Qwen2.5-1.5B-Instruct",
        "finetuning.method": "lora",
        "finetuning.target_modules": "all-linear",
    },
    "sft_qlora": {
        "stage": "sft",
        "model.path": "meta-llama/Llama-3.1-8B-Instruct",
        "finetuning.method": "qlora",
        "finetuning.quant_type": "nf4",
        "finetuning.double_quant": True,
        "train.gradient_checkpointing": True,
        "data.packing": True,
    },
    "sft_full_zero3": {
        "stage": "sft",
        "model.path": "Qwen/Qwen2.5-7B-Instruct",
        "finetuning.method": "full",
        "distributed.zero_stage": 3,
        "precision": "bf16",
    },
    "rm": {"stage": "rm", "rm.loss": "pairwise", "finetuning.method": "lora", "rm.export_merged": True},
    "dpo_lora": {
        "stage": "dpo",
        "finetuning.method": "lora",
        "dpo.loss": "sigmoid",
        "dpo.beta": 0.1,
        "dpo.reference": None,
        "dpo.precompute_reference": True,
    },
    "dpo_qlora": {"stage": "dpo", "finetuning.method": "qlora", "train.gradient_checkpointing": True},
    "grpo_gsm8k": {"stage": "grpo", "grpo.reward.rule": "gsm8k", "grpo.beta": 0.0, "grpo.num_generations": 8},
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_recipe_settings(name: str) -> None:
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    for key, want in EXPECTED[name].items():
        node: object = r
        for part in key.split("."):
            node = getattr(node, part)
        assert node == want, f"{name}: {key} is {node!r}, expected {want!r}"


def test_cpt_recipe_learns_text() -> None:
    r = load_recipe(ROOT / "recipes" / "cpt.yaml")
    assert {s.format for s in r.data.train} == {"text"}


def test_sft_lora_mixes_alpaca_and_sharegpt_with_weights() -> None:
    r = load_recipe(ROOT / "recipes" / "sft_lora.yaml")
    assert {s.format for s in r.data.train} == {"alpaca", "sharegpt"}
    assert len({s.weight for s in r.data.train}) > 1  # the weights really mix
    assert r.data.eval_split > 0 and r.data.eval == []


def test_sft_full_zero3_launch_commands_documented() -> None:
    text = (ROOT / "recipes" / "sft_full_zero3.yaml").read_text(encoding="utf-8")
    assert "torchrun --nproc_per_node 8 -m llmtune train recipes/sft_full_zero3.yaml" in text
    assert "deepspeed --num_gpus 8 --module llmtune train recipes/sft_full_zero3.yaml" in text
    assert "# offload: optimizer" in text


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem != "quickstart"], ids=lambda p: p.stem)
def test_named_demo_data_has_the_declared_format(path: Path, shared_data: Path) -> None:
    """The recipes name LLaMA-Factory's demo files; the copies in ../shared/data have the declared format."""
    r = load_recipe(path)
    checked = 0
    for src in r.data.train:
        if src.path.startswith("../shared/data/"):  # the online stages: questions with answers (GSM8K)
            from llmtune.generation.prompts import to_prompt

            local = shared_data.parent / src.path.removeprefix("../shared/")
            rows = [row.data for row in read_rows(DataSource(path=str(local))) if row.data is not None]
            assert src.format == "prompts" and all(to_prompt(row).answer for row in rows[:50])
            checked += 1
            continue
        local = shared_data / "llama-factory" / Path(src.path).name
        if not local.is_file():
            continue
        rows = [row.data for row in read_rows(DataSource(path=str(local))) if row.data is not None]
        found = detect_preference_format(rows) if r.stage in ("rm", "dpo") else detect_format(rows)
        assert found == src.format
        checked += 1
    assert checked == len(r.data.train), f"{path.name} names data files not among the demo files"
