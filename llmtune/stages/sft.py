"""Supervised fine-tuning: conversations rendered with the chat template, assistant turns learned."""

from __future__ import annotations

from typing import Any

from llmtune.data.filters import model_scorer
from llmtune.data.packing import as_samples, pack_examples
from llmtune.data.pipeline import add_replay, build_data, conversation_encoder, fingerprint_tokenizer
from llmtune.engine.contract import StageData
from llmtune.recipe.stages import SftRecipe
from llmtune.stages.base import recipe_settings, shaped_data
from llmtune.stages.lm import LanguageModelStep


class SftStage(LanguageModelStep):
    name = "sft"
    needs_chat_template = True

    def build_data(
        self, recipe: SftRecipe, tokenizer: Any, template: str | None, *, trust_reward_code: bool = False
    ) -> StageData:
        assert template is not None  # resolved with required=True by the trainer
        d = recipe.data
        on_prompt = recipe.sft.train_on_prompt
        settings = recipe_settings(recipe, on_prompt, fingerprint_tokenizer(tokenizer, template))
        bounds = (d.filter.min_tokens, d.filter.max_tokens)
        encoder = conversation_encoder(tokenizer, template, d.max_length, on_prompt, bounds)
        scorer = model_scorer(recipe, tokenizer) if d.filter.perplexity is not None else None
        bundle = build_data(recipe, encoder, settings, scorer=scorer)
        if d.replay is not None:
            add_replay(recipe, bundle, tokenizer, settings)

        def shape(examples: list) -> list:
            return pack_examples(examples, d.max_length, recipe.seed) if d.packing else as_samples(examples)

        return shaped_data(bundle, shape, d.schedule is not None, bundle.notes)


STAGE = SftStage
