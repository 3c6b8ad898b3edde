"""The model card (README.md) written beside every export: llmtune's, not peft's template ("[More Information
Needed]"), with the base model, stage, method, data, key settings, final metrics and how to load it; a local
path never appears as it stands on this machine (adapter_config.json keeps the base path, where loading
needs it), a hub base stays in the card's metadata."""

from __future__ import annotations

from pathlib import Path

from llmtune.engine.card import model_card, write_model_card
from llmtune.recipe.load import validate_recipe
from tests.conftest import ROOT, TINY_MODEL, base_recipe


def _recipe(tmp_path: Path, **sections: object):
    return validate_recipe(base_recipe(tmp_path, **sections))


def test_an_adapter_card_says_what_the_model_is_and_how_to_load_it(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, train={"epochs": 2, "lr": 3e-3, "micro_batch_size": 8})
    metrics = {"loss (last step)": 2.8308, "eval/loss": 1.6437, "eval/units": 213.0}
    card = model_card(recipe, adapter=True, steps=144, epochs=2.0, metrics=metrics)
    assert "[More Information Needed]" not in card
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "- llmtune\n- sft\n- lora\n" in card
    assert "| base model | `model (local)` |" in card
    assert "| stage | sft |" in card
    assert "| method | lora, r 8, alpha 16: an adapter |" in card
    assert "| data | `sft.jsonl (local)` |" in card
    assert "144 steps (2 epochs); lr 3.00e-03 cosine" in card and "batch 8 x accum 1" in card
    assert "| loss (last step) | 2.8308 |" in card and "| eval/loss | 1.6437 |" in card
    assert "| eval/units | 213 |" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("PATH_TO_THIS_FOLDER")' in card
    assert "llmtune merge-lora --adapter" in card and "recipe.yaml" in card
    for local in (str(tmp_path), str(TINY_MODEL), str(ROOT)):
        assert local not in card


def test_a_full_model_card_and_a_hub_base(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, finetuning={"method": "full"}).model_copy()
    recipe.model.path = "Qwen/Qwen2.5-0.5B"
    card = model_card(recipe, adapter=False, steps=4)
    assert "library_name: transformers\nbase_model: Qwen/Qwen2.5-0.5B\n" in card
    assert "| method | full: full weights |" in card
    assert 'AutoModelForCausalLM.from_pretrained("PATH_TO_THIS_FOLDER")' in card
    assert "merge-lora" not in card and "## Final metrics" not in card


def test_a_reward_model_card_loads_a_sequence_classifier(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    recipe = validate_recipe(base_recipe(tmp_path, stage="rm", data={"train": [{"path": str(pairs)}]}))
    card = model_card(recipe, adapter=True, steps=4)
    assert "AutoPeftModelForSequenceClassification" in card and "llmtune chat" not in card


def test_the_card_replaces_peft_s_template(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "README.md").write_text("# Model Card\n[More Information Needed]\n")
    write_model_card(tmp_path, _recipe(tmp_path), steps=4, what="The weight average.")
    text = (tmp_path / "README.md").read_text()
    assert "[More Information Needed]" not in text and "The weight average." in text and "library_name: peft" in text


def test_a_critic_folder_is_loaded_as_a_classifier(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}')
    write_model_card(tmp_path, _recipe(tmp_path), steps=4, what="PPO's critic.")
    text = (tmp_path / "README.md").read_text()
    assert "AutoModelForSequenceClassification" in text and "llmtune chat" not in text
