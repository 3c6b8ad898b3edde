"""Recipe schema, loading, overrides and error messages (imports no torch)."""

from llmtune.recipe.load import dump_recipe, load_recipe, resolved_dict, validate_recipe
from llmtune.recipe.schema import CptRecipe, RecipeBase, SftRecipe

AnyRecipe = CptRecipe | SftRecipe

__all__ = [
    "AnyRecipe",
    "CptRecipe",
    "RecipeBase",
    "SftRecipe",
    "dump_recipe",
    "load_recipe",
    "resolved_dict",
    "validate_recipe",
]
