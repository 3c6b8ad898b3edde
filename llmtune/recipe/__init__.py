"""Recipe schema, loading, overrides and error messages (imports no torch)."""

from llmtune.recipe.load import dump_recipe, load_recipe, resolved_dict, validate_recipe
from llmtune.recipe.schema import RecipeBase
from llmtune.recipe.stages import AnyRecipe, CptRecipe, DpoRecipe, RmRecipe, SftRecipe

__all__ = [
    "AnyRecipe",
    "CptRecipe",
    "DpoRecipe",
    "RecipeBase",
    "RmRecipe",
    "SftRecipe",
    "dump_recipe",
    "load_recipe",
    "resolved_dict",
    "validate_recipe",
]
