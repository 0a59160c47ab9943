"""Export stage 2: the loaded checkpoint becomes a deployable model.

``deploy_model`` applies the family recipe's deploy transforms (condense, folds) and gathers
what the later stages need: the module to export and the one parity compares against, the
dynamic form, the image input, the decision outputs and threshold defaults, and the MACs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from slimdeploy.engines.base import TensorMeta
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.flops import MacsReport
    from slimdeploy.loading import LoadedModel
    from slimdeploy.parity import DecisionSpec
    from slimdeploy.recipes import Deployment, DeployRecipe


@dataclass
class DeployedModel:
    """A model ready to export.

    Attributes:
        loaded: the checkpoint as loaded.
        recipe: its family's deploy recipe.
        deployment: the deploy transforms' result (exported module, parity reference, folds).
        form: the dynamic form (None for static models).
        input_meta: the image input (``input``, NCHW float32, dynamic batch).
        decisions: the decision outputs parity judges (none for static models).
        thresholds: threshold inputs and their defaults (``gate_threshold``, ``exit_thresholds``).
        macs: MACs and parameters of the model as designed.
        graph_macs: MACs of the exported graph (more where a fold stores convolutions dense).
    """

    loaded: LoadedModel
    recipe: DeployRecipe
    deployment: Deployment
    form: str | None
    input_meta: TensorMeta
    decisions: list[DecisionSpec]
    thresholds: dict[str, Any]
    macs: MacsReport
    graph_macs: int

    @property
    def output_names(self) -> list[str]:
        """The graph outputs, in order."""
        return list(self.recipe.output_names)

    @property
    def input_size(self) -> tuple[int, ...]:
        """(C, H, W) of the image input."""
        return tuple(self.loaded.preprocessing.input_size)


def deploy_model(loaded: LoadedModel, recipe: DeployRecipe, form: str | None, options: ExportOptions,
                 say: Callable[[str], None]) -> DeployedModel:
    """Apply ``recipe``'s deploy transforms to ``loaded`` for ``options`` (target, precision,
    fold) and describe the result; ``form`` is the dynamic form already chosen."""
    from slimdeploy.engines.base import TensorMeta

    deployment = recipe.deploy(loaded, options, say)
    input_size = tuple(loaded.preprocessing.input_size)
    macs, graph_macs = recipe.count_macs(deployment, input_size)
    return DeployedModel(
        loaded=loaded,
        recipe=recipe,
        deployment=deployment,
        form=form,
        input_meta=TensorMeta("input", np.dtype(np.float32), ("batch", *input_size)),
        decisions=recipe.decisions(deployment.module),
        thresholds=recipe.thresholds(deployment.module),
        macs=macs,
        graph_macs=graph_macs,
    )
