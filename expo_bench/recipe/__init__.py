"""Recipes: the schema of a recipe file, ``--set`` overrides, method entries resolved into runs, the world of
processes a recipe trains in, and loading with every problem named by file and field."""

from expo_bench.recipe.experiment import Experiment, MethodRun, World, common_world
from expo_bench.recipe.loading import load_recipe, select, validate_recipe
from expo_bench.recipe.overrides import apply_override
from expo_bench.recipe.schema import MethodEntry, Recipe, TrackingConfig

__all__ = [
    "Experiment",
    "MethodEntry",
    "MethodRun",
    "Recipe",
    "TrackingConfig",
    "World",
    "apply_override",
    "common_world",
    "load_recipe",
    "select",
    "validate_recipe",
]
