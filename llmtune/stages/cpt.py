"""Continued pretraining: raw text, every token learned; packed (concatenate + chunk) or chunked per document."""

from __future__ import annotations

from typing import Any

from llmtune.data.filters import model_scorer
from llmtune.data.packing import as_samples, pack_stream
from llmtune.data.pipeline import build_data, fingerprint_tokenizer, text_encoder
from llmtune.engine.contract import StageData
from llmtune.recipe.stages import CptRecipe
from llmtune.stages.base import recipe_settings, shaped_data
from llmtune.stages.lm import LanguageModelStep


class CptStage(LanguageModelStep):
    name = "cpt"
    needs_chat_template = False

    def build_data(
        self, recipe: CptRecipe, tokenizer: Any, template: str | None, *, trust_reward_code: bool = False
    ) -> StageData:
        from llmtune.data.corpus import build_corpus, memory_map_plan

        d = recipe.data
        fingerprint = fingerprint_tokenizer(tokenizer, None)
        settings = recipe_settings(recipe, d.packing, fingerprint)
        mapped, note = memory_map_plan(recipe)
        if mapped:  # tokenized once into the cache, read through a memory map while training
            train, evals, reports, sources = build_corpus(recipe, tokenizer, fingerprint, settings)
            return StageData(train=train, eval=evals, reports=reports, sources=sources)
        encode = text_encoder(tokenizer, d.max_length, d.packing, (d.filter.min_tokens, d.filter.max_tokens))
        scorer = model_scorer(recipe, tokenizer) if d.filter.perplexity is not None else None
        bundle = build_data(recipe, encode, settings, "text", scorer=scorer)
        shape = (lambda ex: pack_stream(ex, d.max_length)) if d.packing else as_samples
        notes = [note, *bundle.notes] if note else bundle.notes
        return shaped_data(bundle, shape, d.schedule is not None, notes)


STAGE = CptStage
