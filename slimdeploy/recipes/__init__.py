"""Deploy recipes: what each family of architectures contributes to a deployment (its
transforms, forms, outputs, decisions, thresholds, held-out sample cover, MACs and manifest
fields), so that the export pipeline names no family. ``recipe_for(family)`` looks one up;
``recipes/base.py`` states the contract and is the plain recipe of static models.

Importing this package is torch-free; recipes import torch where they use it.
"""

from slimdeploy.recipes.base import Deployment, DeployRecipe, pick_rows
from slimdeploy.recipes.registry import recipe_for, register_recipe, registered_recipes

__all__ = ["DeployRecipe", "Deployment", "pick_rows", "recipe_for", "register_recipe", "registered_recipes"]
