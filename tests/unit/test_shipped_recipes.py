"""Every recipe in recipes/ is schema-valid, documented, names data in the format it has, and passes
``llmtune validate`` as shipped from the repository root, with nothing beside the repository.

The recipes for real models name hub models and the first rows of public demo files in ``recipes/data/``
(recipes/data/README.md: sources and licences); the quickstart is fully local. A recipe that reads another's
output (ppo_lora the reward model of rm) validates with a note naming that recipe, and train refuses it until
the run exists. Also here: ``llmtune --version``, and the hint a missing data file gets.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from llmtune import __version__
from llmtune.commands.preflight import check_paths, same_name_files, written_by
from llmtune.data.formats import detect_format
from llmtune.data.preference import detect_preference_format
from llmtune.data.sources import read_rows
from llmtune.errors import DataError, RecipeError
from llmtune.paths import looks_local
from llmtune.recipe import load_recipe
from llmtune.recipe.data import DataSource
from tests.conftest import ROOT, assert_ok, assert_refused, base_recipe, run_cli, write_recipe

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
def test_recipe_paths_check_from_repo_root(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the repository root, check_paths passes on the data in the repository: only hub ids are left
    as notes, and another recipe's output that does not exist yet (ppo's reward model) names that recipe."""
    r = load_recipe(path)
    monkeypatch.chdir(ROOT)
    for src in [*r.data.train, *r.data.eval]:
        assert looks_local(src.path), f"{path.name}: data {src.path} would be taken as a hub dataset"
        assert (ROOT / src.path).is_file(), f"{path.name}: {src.path} is not in the repository"
        assert (ROOT / src.path).resolve().is_relative_to(ROOT / "recipes"), src.path  # never ../shared
    notes = check_paths(r, planned_ok=True)
    later = [n for n in notes if "loaded from the hub" not in n]
    for out in _outputs_of_other_recipes(path):
        if not (ROOT / out).exists():
            assert any(f"{out} is written by recipes/rm.yaml: run it first" in n for n in later), notes
            later = [n for n in later if out not in n]
    assert later == [], notes
    if path.stem == "quickstart":
        assert notes == []  # fully offline


def test_no_recipe_reads_from_beside_the_repository() -> None:
    for path in RECIPES:
        assert "../shared" not in path.read_text(encoding="utf-8"), f"{path.name} names ../shared"


def test_demo_data_is_small_and_documented() -> None:
    """A few hundred rows at most per file, each file in the data README (with its source and licence)."""
    readme = (ROOT / "recipes" / "data" / "README.md").read_text(encoding="utf-8")
    assert "Licences:" in readme
    files = sorted(p for p in (ROOT / "recipes" / "data").rglob("*") if p.is_file() and p.name != "README.md")
    assert files
    for f in files:
        rows = [row for row in read_rows(DataSource(path=str(f))) if row.data is not None]
        assert 0 < len(rows) <= 300, (f, len(rows))
        assert f"`{f.relative_to(ROOT / 'recipes' / 'data').as_posix()}`" in readme, f


def test_train_refuses_the_reward_model_until_rm_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ppo_lora's reward model is rm.yaml's output_dir: validate notes it (above); train refuses, naming the
    recipe that writes it. Shown in a copy of recipes/ (the repository's runs/ may hold the rm run)."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes", ignore=shutil.ignore_patterns("model", "data"))
    monkeypatch.chdir(tmp_path)
    r = load_recipe(
        ROOT / "recipes" / "ppo_lora.yaml",
        ["data.train.0.path=" + str(ROOT / "recipes/data/gsm8k/train_first300.jsonl")],
    )
    with pytest.raises(RecipeError) as info:
        check_paths(r)
    assert info.value.message == "ppo.reward.model: ./runs/rm-qwen2.5-1.5b does not exist"
    assert info.value.hint == (
        "./runs/rm-qwen2.5-1.5b is written by recipes/rm.yaml: run it first (llmtune train recipes/rm.yaml)"
    )
    notes = check_paths(r, planned_ok=True)
    assert any(n.startswith("ppo.reward.model ./runs/rm-qwen2.5-1.5b is written by recipes/rm.yaml") for n in notes)


def test_written_by(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.yaml").write_text("stage: sft\noutput_dir: runs/a\n")
    (tmp_path / "recipes" / "broken.yaml").write_text(": : [\n")  # unreadable files are skipped
    monkeypatch.chdir(tmp_path)
    assert written_by("./runs/a") == "recipes/a.yaml"
    assert written_by(str(tmp_path / "runs" / "a" / "merged")) == "recipes/a.yaml"  # inside it
    assert written_by("runs/b") is None
    assert written_by("Qwen/Qwen2.5-0.5B") is None  # a hub id


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
def test_named_demo_data_has_the_declared_format(path: Path) -> None:
    """The recipes name the demo files in recipes/data/; each has the format the recipe declares."""
    r = load_recipe(path)
    for src in r.data.train:
        rows = [row.data for row in read_rows(DataSource(path=str(ROOT / src.path))) if row.data is not None]
        if src.format == "prompts":  # the online stages: questions with answers (GSM8K)
            from llmtune.data.prompts import to_prompt

            assert all(to_prompt(row).answer for row in rows[:50])
            continue
        found = detect_preference_format(rows) if r.stage in ("rm", "dpo") else detect_format(rows)
        assert found == src.format


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_shipped_recipe_validates_from_repo_root(path: Path) -> None:
    """The first thing a new user runs: `llmtune validate recipes/X.yaml` in the repository root, as shipped."""
    proc = run_cli("validate", f"recipes/{path.name}", cwd=ROOT)
    assert_ok(proc)
    assert f"recipes/{path.name} is a valid" in proc.stdout
    for out in _outputs_of_other_recipes(path):  # a later stage of a chain (ppo on rm's reward model)
        if not (ROOT / out).exists():
            assert "is written by recipes/rm.yaml: run it first" in proc.stdout, proc.stdout


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


def test_validate_names_the_demo_file() -> None:
    """The issue's case through the CLI: a recipe naming data/c4_demo.jsonl, run from the repository root."""
    proc = run_cli("validate", "recipes/cpt.yaml", "--set", "data.train.0.path=data/c4_demo.jsonl", cwd=ROOT)
    stderr = assert_refused(proc, "data.train.0.path: data/c4_demo.jsonl does not exist", "point data.train[0].path")
    assert "recipes/data/llama-factory/c4_demo.jsonl" in stderr
