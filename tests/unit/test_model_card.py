"""The model card peft writes beside an adapter names no local absolute path (adapter_config.json keeps
the base path, where loading needs it); a hub base stays in the card's metadata."""

from __future__ import annotations

from pathlib import Path

from llmtune.engine.checkpoint import _card_without_local_base

CARD = """---
base_model: {base}
library_name: peft
tags:
- base_model:adapter:{base}
- lora
---

# Model Card
"""


def test_local_base_is_left_out_of_the_card(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    card.write_text(CARD.format(base=tmp_path))
    _card_without_local_base(card)
    text = card.read_text()
    assert str(tmp_path) not in text
    assert "library_name: peft" in text and "- lora" in text and "# Model Card" in text


def test_hub_base_stays(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    card.write_text(CARD.format(base="Qwen/Qwen2.5-0.5B"))
    _card_without_local_base(card)
    assert card.read_text() == CARD.format(base="Qwen/Qwen2.5-0.5B")
