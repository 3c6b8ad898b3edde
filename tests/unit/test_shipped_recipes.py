"""Every recipe in recipes/ is schema-valid, documented, names data in the format it has, and passes
``llmtune validate`` as shipped from the repository root.

The recipes for real models name hub models and the small demo files in ``../shared/data/`` beside the
repository (each recipe's comment says where they come from and how to use your own); the quickstart is
fully local. Also here: ``llmtune --version``, and the hint a missing data file gets.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmtune import __version__
from llmtune.data.formats import detect_format
from llmtune.data.preference import detect_preference_format
from llmtune.data.sources import read_rows
from llmtune.errors import DataError
from llmtune.recipe import load_recipe
from llmtune.recipe.checks import check_paths, same_name_files
from llmtune.recipe.schema import DataSource, looks_local
from tests.conftest import ROOT, SHARED_DATA, assert_ok, assert_refused, base_recipe, run_cli, write_recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
IDS = [p.stem for p in RECIPES]


def test_recipes_are_found() -> None:
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "cpt.yaml", "sft_lora.yaml", "sft_qlora.yaml", "sft_full_zero3.yaml"} <= names
    assert {"rm.yaml", "dpo_lora.yaml", "dpo_qlora.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_is_schema_valid(path: Path) -> None:
    r = load_recipe(path)
    assert r.stage in ("cpt", "sft", "rm", "dpo", "ppo", "grpo", "rejection_sampling")
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
    if _outputs_of_other_recipes(path):  # another recipe's run (ppo's reward model): its check is the test above
        import llmtune.recipe.checks

        monkeypatch.setattr(llmtune.recipe.checks, "_check_reward_block", lambda recipe: None)
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
        if src.path.startswith("../shared/data/"):
            local = shared_data / src.path.removeprefix("../shared/data/")
        else:  # a user's data/ file named after a demo file
            local = shared_data / "llama-factory" / Path(src.path).name
        if not local.is_file():
            continue
        rows = [row.data for row in read_rows(DataSource(path=str(local))) if row.data is not None]
        if src.format == "prompts":  # the online stages: questions with answers (GSM8K)
            from llmtune.generation.prompts import to_prompt

            assert all(to_prompt(row).answer for row in rows[:50])
            checked += 1
            continue
        found = detect_preference_format(rows) if r.stage in ("rm", "dpo") else detect_format(rows)
        assert found == src.format
        checked += 1
    assert checked == len(r.data.train), f"{path.name} names data files not among the demo files"


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_shipped_recipe_validates_from_repo_root(path: Path) -> None:
    """The first thing a new user runs: `llmtune validate recipes/X.yaml` in the repository root, as shipped."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} (../shared/data beside the repository, the recipes' demo data) does not exist")
    proc = run_cli("validate", f"recipes/{path.name}", cwd=ROOT)
    needs = [d for d in _outputs_of_other_recipes(path) if not (ROOT / d).exists()]
    if needs:  # a later stage of a chain (ppo on rm's reward model): validate names the missing run, and how
        assert_refused(proc, needs[0], "rm run")
        return
    assert_ok(proc)
    assert f"recipes/{path.name} is a valid" in proc.stdout
    for src in load_recipe(path).data.train:  # no data is copied into the repository
        assert not (ROOT / src.path).resolve().is_relative_to(ROOT) or path.stem == "quickstart", src.path


def _outputs_of_other_recipes(path: Path) -> list[str]:
    """The output_dirs of other shipped recipes that this one reads (e.g. ppo_lora's reward model)."""
    text = path.read_text(encoding="utf-8")
    outs = {load_recipe(p).output_dir for p in RECIPES if p != path}
    return sorted(d for d in outs if d in text.split("\nstage:", 1)[-1])


def test_version_option() -> None:
    """`llmtune --version` prints the version and exits 0 without importing torch (fast)."""
    proc = run_cli("--version", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"llmtune {__version__}\n"
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "llmtune.cli" in imported  # the import log is there to check
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "--version imported torch"


def _missing_data_recipe(tmp_path: Path, data_path: str) -> Path:
    recipe = base_recipe(tmp_path)
    recipe["data"]["train"] = [recipe["data"]["train"][0], {"path": data_path}]
    return write_recipe(tmp_path, recipe)


def test_missing_data_hint_names_a_file_of_the_same_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data path that does not exist: the first line as before, then where relative paths are taken from,
    the key to set, and a file of the same name under ../shared/data/ (likely the one meant)."""
    repo = tmp_path / "work" / "repo"
    demo = tmp_path / "work" / "shared" / "data" / "llama-factory" / "c4_demo.jsonl"
    demo.parent.mkdir(parents=True)
    demo.write_text('{"text": "a"}\n')
    repo.mkdir()
    monkeypatch.chdir(repo)
    r = load_recipe(_missing_data_recipe(tmp_path, "data/c4_demo.jsonl"))
    with pytest.raises(DataError) as info:
        check_paths(r)
    lines = str(info.value).splitlines()
    assert lines[0] == f"data.train.1.path: data/c4_demo.jsonl does not exist (looked in {repo / 'data'})"
    assert lines[1].startswith("  fix: fix the path: relative paths are taken from the directory you run llmtune in")
    assert "point data.train[1].path at your file" in lines[1]
    assert "--set data.train.1.path=FILE" in lines[1]
    assert lines[2].strip() == "likely the one meant (the same file name): ../shared/data/llama-factory/c4_demo.jsonl"
    assert os.path.samefile(lines[2].rsplit(": ", 1)[1], demo)  # the path works from where llmtune runs


def test_missing_data_hint_searches_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for sub in ("a", "b", ".hidden"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        (tmp_path / "data" / sub / "train.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    assert same_name_files("train.json") == ["data/a/train.json", "data/b/train.json"]  # sorted, hidden skipped
    with pytest.raises(DataError) as info:
        check_paths(load_recipe(_missing_data_recipe(tmp_path, "train.json")))
    assert "files of the same name, likely one of them: data/a/train.json, data/b/train.json" in str(info.value)


def test_missing_data_hint_without_a_match_stays_general(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        check_paths(load_recipe(_missing_data_recipe(tmp_path, "mine/nowhere.jsonl")))
    msg = str(info.value)
    assert msg.startswith("data.train.1.path: mine/nowhere.jsonl does not exist (looked in ")
    assert (
        "relative paths are taken from the directory you run llmtune in; point data.train[1].path at your file" in msg
    )
    assert "likely" not in msg and len(msg.splitlines()) == 2


def test_validate_names_the_shared_demo_file(shared_data: Path) -> None:
    """The issue's case through the CLI: a recipe naming data/c4_demo.jsonl, run from the repository root."""
    proc = run_cli("validate", "recipes/cpt.yaml", "--set", "data.train.0.path=data/c4_demo.jsonl", cwd=ROOT)
    stderr = assert_refused(proc, "data.train.0.path: data/c4_demo.jsonl does not exist", "point data.train[0].path")
    assert "likely the one meant (the same file name): ../shared/data/llama-factory/c4_demo.jsonl" in stderr
