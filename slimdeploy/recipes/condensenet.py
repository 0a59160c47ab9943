"""The recipe of CondenseNet and CondenseNetV2: learned group convolutions condensed at export.

A learned (training-form) checkpoint is condensed with the official converter's semantics
(``transforms.condense``, ``transforms.condense_v2``); the condensed model's logits equal the
learned model's, so parity compares the graph with the learned model. Then, with ``fold`` (the
default):

- CondenseNet: BatchNorm and the channel shuffle are folded into the condensed convolutions
  (``transforms.fold``). The 3x3 convolutions are stored dense for ONNX Runtime, whose CPU
  kernels run small grouped 3x3 convolutions slower than the dense equivalent
  (benchmarks/condensenet.py); other targets keep them grouped in FP32 and FP16. INT8 also turns
  the channel Gathers and the BNs before a ReLU into convolutions, so that the quantized graph
  needs no layout Transposes; an INT8 graph is the same for every target, so its stored
  calibration ranges carry over to the other target.
- CondenseNetV2: each sparse feature reactivation is stored as one dense 1x1 convolution
  (``transforms.condense_v2.fold_sfr``: far fewer MACs than the official 0/1 index matrix).

``--condense-classifier`` (CondenseNet only) prunes the classifier as the official converter
does; that changes the logits by design, so parity then compares with the condensed model.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

from slimdeploy.errors import BadInputError
from slimdeploy.recipes.base import Deployment, DeployRecipe, Progress
from slimdeploy.recipes.registry import register_recipe

if TYPE_CHECKING:
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.loading import LoadedModel

# Training-form architectures that export condenses, and the deploy architecture of each.
CONDENSED_ARCH = {"condensenet": "condensenet_converted", "condensenetv2": "condensenetv2_converted"}
# Targets whose kernels run small grouped 3x3 convolutions slower than the dense equivalent.
EXPAND_GROUPED_3X3 = ("ort",)


@register_recipe("condensenet")
class CondenseNetRecipe(DeployRecipe):
    """CondenseNet (``condensenet``, ``condensenet_converted``) and CondenseNetV2
    (``condensenetv2``, ``condensenetv2_converted``)."""

    name: ClassVar[str] = "condensenet"

    def check_options(self, arch: str, options: ExportOptions) -> None:
        if options.condense_classifier and arch == "condensenetv2":
            raise BadInputError("--condense-classifier: the official CondenseNetV2 converter keeps the classifier "
                                "(and fc) as they are | Fix: drop --condense-classifier")
        if options.condense_classifier and arch != "condensenet":
            super().check_options(arch, options)

    def deploy(self, loaded: LoadedModel, options: ExportOptions, say: Progress) -> Deployment:
        deployment = Deployment.as_loaded(loaded)
        if loaded.arch in CONDENSED_ARCH:
            say("condensing learned group convolutions")
            deployment.module, deployment.arch, deployment.args = _condense(loaded.arch, loaded.module, options.condense_classifier)
            deployment.design = deployment.module
            deployment.transforms.append("condense" + ("+classifier" if options.condense_classifier else ""))
            if options.condense_classifier:
                # The official lossy classifier changes the logits by design: compare the graph
                # with the condensed PyTorch model instead of the learned one.
                deployment.reference, deployment.reference_arch, deployment.reference_args = (
                    deployment.module, deployment.arch, deployment.args)
        if not options.fold:
            return deployment
        if deployment.arch == "condensenet_converted":
            say("folding BatchNorm and channel shuffles into the condensed convolutions")
            deployment.module, deployment.folds = _fold(deployment.module, options.target, options.precision)
            deployment.transforms.append("fold")
        elif deployment.arch == "condensenetv2_converted":
            say("storing the sparse feature reactivations as dense 1x1 convolutions")
            deployment.module, deployment.folds = _fold_v2(deployment.module)
            deployment.transforms.append("fold")
        return deployment


def _condense(arch: str, module: Any, condense_classifier: bool) -> tuple[Any, str, dict[str, Any]]:
    """The deploy form of a training-form CondenseNet or CondenseNetV2, its architecture and
    arguments."""
    from slimdeploy.models.condensenet import infer_condensenet_args
    from slimdeploy.transforms import condense

    if arch == "condensenetv2":
        from slimdeploy.transforms.condense_v2 import condense_v2

        deployed_v2 = condense_v2(module)
        # The learned model's own config: it also holds hs_start_block, which no key shows.
        return deployed_v2, CONDENSED_ARCH[arch], dict(deployed_v2.config)
    deployed = condense(module, condense_classifier=condense_classifier)
    return deployed, CONDENSED_ARCH[arch], infer_condensenet_args(deployed.state_dict())


def _fold(module: Any, target: str, precision: str) -> tuple[Any, dict[str, int]]:
    """A folded copy of a condensed CondenseNet (the original stays the parity reference) and
    the count of each fold (see the module docstring for what is stored dense when)."""
    from slimdeploy.transforms.fold import fold_condensed

    dense = target in EXPAND_GROUPED_3X3 or precision == "int8"
    folded, report = fold_condensed(copy.deepcopy(module), expand_3x3=dense, gather_into_conv=precision == "int8")
    return folded, report.to_dict()


def _fold_v2(module: Any) -> tuple[Any, dict[str, int]]:
    """A copy of a condensed CondenseNetV2 whose sparse feature reactivations are dense 1x1
    convolutions; the original stays the parity reference."""
    from slimdeploy.transforms.condense_v2 import fold_sfr

    folded, count = fold_sfr(copy.deepcopy(module))
    return folded, {"sfr_index_into_dense_conv": count}
