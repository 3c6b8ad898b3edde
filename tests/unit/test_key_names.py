"""Other tools' key names (HF TrainingArguments, TRL, LLaMA-Factory, axolotl) get llmtune's name, at any
nesting level, before the spelling matcher (which sent save_steps to max_steps); llmtune keys at the wrong
level get their place."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmtune.errors import RecipeError
from llmtune.recipe import load_recipe
from llmtune.recipe.stages import DpoRecipe, GrpoRecipe, SftRecipe
from llmtune.recipe.synonyms import SYNONYMS, SYNONYMS_DOC, key_paths, render_doc, synonym_message
from tests.conftest import ROOT, assert_refused, base_recipe, run_cli, write_recipe


def _refusal(tmp_path: Path, overrides: list[str]) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)), overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("train.save_steps=10", "train.save_steps: unknown key; llmtune calls it train.save_every"),
        (
            "train.per_device_train_batch_size=2",
            "train.per_device_train_batch_size: unknown key; llmtune calls it train.micro_batch_size",
        ),
        ("train.learning_rate=1e-4", "train.learning_rate: unknown key; llmtune calls it train.lr"),
        ("train.num_train_epochs=3", "train.num_train_epochs: unknown key; llmtune calls it train.epochs"),
        (
            "train.gradient_accumulation_steps=4",
            "train.gradient_accumulation_steps: unknown key; llmtune calls it train.grad_accum",
        ),
        ("data.cutoff_len=512", "data.cutoff_len: unknown key; llmtune calls it data.max_length"),
        ("train.sequence_len=512", "train.sequence_len: unknown key; llmtune calls it data.max_length"),
        (
            "finetuning.lora_target_modules=[q_proj]",
            "finetuning.lora_target_modules: unknown key; llmtune calls it finetuning.target_modules",
        ),
        ("bf16=true", "bf16: unknown key; llmtune calls it precision (precision: bf16)"),
        ("learning_rate=1e-4", "learning_rate: unknown key; llmtune calls it train.lr"),  # the wrong level
        ("lr=1e-4", "lr: unknown key here; it belongs at train.lr"),  # llmtune's key at the wrong level
        ("lora_alpha=16", "lora_alpha: unknown key here; it belongs at finetuning.lora_alpha"),
        ("train.warmup_ratio=0.1", None),  # llmtune's own key, where it belongs: fine
    ],
)
def test_other_tools_key_names(tmp_path: Path, override: str, line: str | None) -> None:
    if line is None:
        assert load_recipe(write_recipe(tmp_path, base_recipe(tmp_path)), [override]).train.warmup_ratio == 0.1
        return
    msg = _refusal(tmp_path, [override])
    assert f"\n  {line}" in msg
    assert "Did you mean" not in msg and "Valid keys here" not in msg  # one line, no misleading guess
    assert f"fix: rename or move the keys as shown ({SYNONYMS_DOC}" in msg


def test_synonym_depends_on_stage() -> None:
    """loss_type is TRL's name of dpo.loss and of grpo.loss_type: the recipe's stage decides; a stage
    without the key gets no synonym (the spelling matcher then answers)."""
    assert synonym_message(DpoRecipe, ["dpo", "loss_type"]) == "unknown key; llmtune calls it dpo.loss"
    assert synonym_message(GrpoRecipe, ["train", "loss_type"]) == "unknown key; llmtune calls it grpo.loss_type"
    assert synonym_message(SftRecipe, ["train", "loss_type"]) is None
    assert synonym_message(DpoRecipe, ["beta"]) == "unknown key here; it belongs at dpo.beta"
    # a key under a data source: the list index is no different place
    assert (
        synonym_message(SftRecipe, ["data", "train", 0, "cutoff_len"])
        == "unknown key; llmtune calls it data.max_length"
    )
    assert synonym_message(SftRecipe, ["data", "max_samples"]) == (
        "unknown key; llmtune calls it data.train[i].max_samples (per data source)"
    )
    assert synonym_message(SftRecipe, ["train", "foo"]) is None


def test_every_synonym_names_a_real_key() -> None:
    """A table entry that names no key of any stage would send users to nothing."""
    known = {p for root in (SftRecipe, DpoRecipe, GrpoRecipe) for ps in key_paths(root).values() for p in ps}
    from llmtune.recipe.stages import PpoRecipe

    known |= {p for ps in key_paths(PpoRecipe).values() for p in ps}
    for key, (paths, _) in SYNONYMS.items():
        assert all(p in known for p in paths), (key, paths)


def test_key_names_doc_is_generated() -> None:
    assert (ROOT / SYNONYMS_DOC).read_text(encoding="utf-8") == render_doc(), "run scripts/gen_key_names.py"


def test_validate_names_the_llmtune_key(tmp_path: Path) -> None:
    """The issue's case through the CLI: save_steps is not sent to max_steps."""
    recipe = write_recipe(tmp_path, base_recipe(tmp_path))
    proc = run_cli("validate", str(recipe), "--set", "train.save_steps=50", cwd=ROOT)
    assert_refused(proc, "train.save_steps: unknown key; llmtune calls it train.save_every")
    assert "max_steps" not in proc.stderr
