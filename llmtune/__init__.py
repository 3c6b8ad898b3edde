"""llmtune: YAML-driven adaptation of open LLMs, one recipe per stage (the stages: llmtune.recipe.stages)."""

__version__ = "0.1.0"
