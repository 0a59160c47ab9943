"""The recipe of SPConv ResNets (split convolutions): folded for INT8 only.

Before an INT8 export (with ``fold``, the default), BatchNorms (the layer's and the block's
after it), the stride-2 pooling, the channel split and the two-way softmax attention are folded
into two dense convolutions, a global pool, a sigmoid, a Mul and an Add
(``transforms.fold_spconv``): a graph quantized end to end, with no float op between quantized
ones. Only INT8 gains: the folded form has more MACs and runs slower than ONNX Runtime's own
FP32 fusions of the original graph (benchmarks/README.md). The INT8 graph is the same for every
target, so its stored calibration ranges carry over to the other target.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, ClassVar

from slimdeploy.recipes.base import Deployment, DeployRecipe, Progress
from slimdeploy.recipes.registry import register_recipe

if TYPE_CHECKING:
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.loading import LoadedModel


@register_recipe("spconv")
class SPConvRecipe(DeployRecipe):
    """SPConv ResNets (``spconv_resnet*``)."""

    name: ClassVar[str] = "spconv"

    def deploy(self, loaded: LoadedModel, options: ExportOptions, say: Progress) -> Deployment:
        deployment = Deployment.as_loaded(loaded)
        if options.fold and options.precision == "int8":
            from slimdeploy.transforms.fold_spconv import fold_spconv

            say("folding BatchNorm, pooling and attention into the SPConv layers")
            folded, report = fold_spconv(copy.deepcopy(loaded.module), dense=True)
            deployment.module, deployment.folds = folded, report.to_dict()
            deployment.transforms.append("fold")
        return deployment
