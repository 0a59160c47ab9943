"""Registry of deploy recipes, keyed by the architecture family they serve.

Registering a family twice raises, as the architecture registry does. A model whose family has
no recipe gets the recipe of the decision protocol when it is built with it (``GatedBlock``,
``Exit``: ``recipes.discovered``), else the plain one (a static family, or a module of an
unregistered class).

    @register_recipe("skipnet")
    class GatedRecipe(DeployRecipe): ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from slimdeploy.errors import DuplicateRegistrationError

if TYPE_CHECKING:
    from slimdeploy.recipes.base import DeployRecipe

_RECIPES: dict[str, DeployRecipe] = {}
# Asked in order, for a model whose family has no recipe: module -> a recipe, or None.
_FALLBACKS: list[Callable[[Any], DeployRecipe | None]] = []

# Modules whose import registers recipes (one per family that contributes something).
RECIPE_MODULES = (
    "slimdeploy.recipes.gated",
    "slimdeploy.recipes.early_exit",
    "slimdeploy.recipes.condensenet",
    "slimdeploy.recipes.spconv",
    "slimdeploy.recipes.discovered",
)


def register_recipe(family: str) -> Callable[[type[DeployRecipe]], type[DeployRecipe]]:
    """Class decorator registering one instance of the recipe for ``family``; duplicates raise."""

    def wrap(cls: type[DeployRecipe]) -> type[DeployRecipe]:
        if family in _RECIPES:
            raise DuplicateRegistrationError(f"a deploy recipe for family '{family}' is already registered")
        _RECIPES[family] = cls()
        return cls

    return wrap


def register_fallback(find: Callable[[Any], DeployRecipe | None]) -> Callable[[Any], DeployRecipe | None]:
    """Register ``find(module)``: the recipe of a model whose family has none (None to pass)."""
    _FALLBACKS.append(find)
    return find


def recipe_for(family: str | None, module: Any = None) -> DeployRecipe:
    """The recipe of ``family``; when it has none (or for None: a module of an unregistered
    class), the discovered recipe of ``module`` if it is built with the decision protocol, else
    the plain recipe."""
    from slimdeploy.recipes.base import DeployRecipe

    _ensure_loaded()
    if family in _RECIPES:
        return _RECIPES[family]
    for find in _FALLBACKS if module is not None else []:
        found = find(module)
        if found is not None:
            return found
    return DeployRecipe()


def registered_recipes() -> dict[str, DeployRecipe]:
    """Every registered recipe by family."""
    _ensure_loaded()
    return dict(_RECIPES)


def _ensure_loaded() -> None:
    # Filled lazily, on the first question, as the architecture registry is.
    for module in RECIPE_MODULES:
        importlib.import_module(module)
