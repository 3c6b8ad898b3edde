"""Quality-conditioned sft: each row's label (quality_column) goes before its first user turn, the replies
are learned as before, and a row without a label is dropped with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.recipe import validate_recipe
from llmtune.stages.sft import SftStage
from tests.conftest import base_recipe


def test_the_label_prefixes_the_prompt_and_the_replies_stay_learned(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Name a colour.", "output": "Blue.", "score": 5},
        {"instruction": "Name a fruit.", "output": "Apple.", "score": 2.0},
        {"instruction": "Name a tree.", "output": "Oak."},  # no label: dropped
    ]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = {"path": str(data), "quality_column": "score"}
    recipe = validate_recipe(base_recipe(tmp_path, data={"train": [src], "cache_dir": str(tmp_path / "c")}))
    from llmtune.model.tokenizer import load_tokenizer

    tok = load_tokenizer(recipe.model)
    out = SftStage().build_data(recipe, tok, tok.chat_template)
    texts = [tok.decode(s.input_ids) for s in out.train]
    assert len(texts) == 2 and "[quality: 5] Name a colour." in texts[0] and "[quality: 2] Name a fruit." in texts[1]
    learned = [tok.decode([t for t in s.labels if t != -100]) for s in out.train]
    assert learned[0].startswith("Blue.") and "quality" not in learned[0]
    (report,) = out.reports
    assert report.dropped == 1 and "no quality label" in next(iter(report.reasons))


def test_bad_prefixes_are_refused(tmp_path: Path) -> None:
    for bad, why in (("[q] ", "must hold {label}"), ("{label} {other}", "only {label}")):
        src = {"path": "x.jsonl", "quality_column": "score", "quality_prefix": bad}
        with pytest.raises(Exception, match=why.replace("{", r"\{").replace("}", r"\}")):
            validate_recipe(base_recipe(tmp_path, data={"train": [src]}))
