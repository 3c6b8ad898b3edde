"""Continued pretraining: raw text, every token learned; packed (concatenate + chunk) or chunked per document."""

from __future__ import annotations

from typing import Any

from llmtune.data.pipeline import as_samples, build_data, fingerprint_tokenizer, pack_stream, text_encoder
from llmtune.recipe.schema import CptRecipe
from llmtune.stages.base import StageData, recipe_settings
from llmtune.stages.lm import LanguageModelStep


class CptStage(LanguageModelStep):
    name = "cpt"
    needs_chat_template = False

    def build_data(self, recipe: CptRecipe, tokenizer: Any, template: str | None) -> StageData:
        d = recipe.data
        if d.memory_map:  # tokenized once into the cache, read through a memory map while training
            from llmtune.data.corpus import build_corpus

            train, evals, reports = build_corpus(recipe, tokenizer, fingerprint_tokenizer(tokenizer, None))
            return StageData(train=train, eval=evals, reports=reports)
        settings = recipe_settings(recipe, d.packing, fingerprint_tokenizer(tokenizer, None))
        bundle = build_data(recipe, text_encoder(tokenizer, d.max_length, d.packing), settings, "text")
        shape = (lambda ex: pack_stream(ex, d.max_length)) if d.packing else as_samples
        return StageData(train=shape(bundle.train), eval=shape(bundle.eval), reports=bundle.reports)
