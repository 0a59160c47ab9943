"""The recipes of networks built with the decision protocol (``slimdeploy.nn.GatedBlock``,
``Exit``) that no family recipe serves: the user's own gated MobileNet, a ResNet with exits
where they chose.

``recipe_for`` falls back to these (``register_fallback``) when a model holds the protocol's
modules. Their deploy
transform is discovery (``slimdeploy.discovery``): the model is traced and cut into the API the
gated or the early-exit recipe already exports, so forms, outputs, decisions, thresholds,
sample cover and MACs are those recipes' own. The plan records the module path of each gated
block or exit (``modules``), in the order of the ``gates`` columns or the exit stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from slimdeploy.bundle.runners import DISCOVER
from slimdeploy.recipes.base import Deployment, DeployRecipe
from slimdeploy.recipes.early_exit import ExitRecipe
from slimdeploy.recipes.gated import GatedRecipe
from slimdeploy.recipes.registry import register_fallback

if TYPE_CHECKING:
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.loading import LoadedModel
    from slimdeploy.recipes.base import Progress


class _Discovered(DeployRecipe):
    """Deploy by discovery; the gated or early-exit recipe does the rest."""

    def deploy(self, loaded: LoadedModel, options: ExportOptions, say: Progress) -> Deployment:
        say("finding the gated blocks and exits (torch.fx)")
        network = self.reference_module(loaded)
        return Deployment(network, loaded.arch, loaded.arch_args, network, loaded.arch, loaded.arch_args, network,
                          transforms=[DISCOVER], stored_module=loaded.module)

    def reference_module(self, loaded: LoadedModel) -> Any:
        from slimdeploy.discovery import discover

        return discover(loaded.module, tuple(loaded.preprocessing.input_size))

    def export_graphs(self, module: Any, form: str | None, input_size: tuple[int, ...], spec: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        graphs, plan = super().export_graphs(module, form, input_size, spec)
        return graphs, {**(plan or {}), "modules": list(module.paths)}


class DiscoveredGatedRecipe(_Discovered, GatedRecipe):
    """A network with ``GatedBlock``s: SkipNet's forms and outputs."""

    name: ClassVar[str] = "discovered_gated"


class DiscoveredExitRecipe(_Discovered, ExitRecipe):
    """A network with ``Exit``s: the early-exit forms and outputs."""

    name: ClassVar[str] = "discovered_exits"


@register_fallback
def discovered_recipe(module: Any) -> DeployRecipe | None:
    """The recipe of a module built with the decision protocol; None when it holds none."""
    from slimdeploy.discovery import protocol_kind

    kind = protocol_kind(module)
    if kind is None:
        return None
    return DiscoveredGatedRecipe() if kind == "gated" else DiscoveredExitRecipe()
