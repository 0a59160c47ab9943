"""Registry of deploy recipes, keyed by the architecture family they serve.

Registering a family twice raises, as the architecture registry does. A model whose family has
no recipe (a static family, or a pickled module of an unregistered class) gets the plain one.

    @register_recipe("skipnet")
    class GatedRecipe(DeployRecipe): ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from slimdeploy.errors import DuplicateRegistrationError

if TYPE_CHECKING:
    from slimdeploy.recipes.base import DeployRecipe

_RECIPES: dict[str, DeployRecipe] = {}

# Modules whose import registers recipes (one per family that contributes something).
RECIPE_MODULES = (
    "slimdeploy.recipes.gated",
    "slimdeploy.recipes.early_exit",
    "slimdeploy.recipes.condensenet",
    "slimdeploy.recipes.spconv",
)


def register_recipe(family: str) -> Callable[[type[DeployRecipe]], type[DeployRecipe]]:
    """Class decorator registering one instance of the recipe for ``family``; duplicates raise."""

    def wrap(cls: type[DeployRecipe]) -> type[DeployRecipe]:
        if family in _RECIPES:
            raise DuplicateRegistrationError(f"a deploy recipe for family '{family}' is already registered")
        _RECIPES[family] = cls()
        return cls

    return wrap


def recipe_for(family: str | None) -> DeployRecipe:
    """The recipe of ``family``; the plain recipe when it has none (or for None: a module of an
    unregistered class)."""
    from slimdeploy.recipes.base import DeployRecipe

    _ensure_loaded()
    return _RECIPES.get(family or "", DeployRecipe())


def registered_recipes() -> dict[str, DeployRecipe]:
    """Every registered recipe by family."""
    _ensure_loaded()
    return dict(_RECIPES)


def _ensure_loaded() -> None:
    # Filled lazily, on the first question, as the architecture registry is.
    for module in RECIPE_MODULES:
        importlib.import_module(module)
