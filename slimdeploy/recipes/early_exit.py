"""The recipe of early-exit networks (S2D, BranchyNet-style heads): exits that really exit.

Forms (``exporters.early_exit``): ``staged`` (default on both targets: the host drops the
samples that exited before the next stage, the form that saves at every batch size,
benchmarks/early_exit.py), ``if``, ``mask`` (the baseline). Outputs ``logits``,
``exit_stage`` ([B] int64) and ``exit_confidence`` ([B, n_stages] float32); the threshold input
``exit_thresholds`` ([n_stages] float32, defaults from the checkpoint). Held-out samples are
chosen so that every exit stage is seen; MACs are those of every stage (``forward_all``), since
``forward`` stops at the first confident one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from slimdeploy.forms import EXIT_FORMS
from slimdeploy.recipes.base import DeployRecipe
from slimdeploy.recipes.registry import register_recipe

if TYPE_CHECKING:
    from slimdeploy.engines.base import TensorMeta
    from slimdeploy.flops import MacsReport
    from slimdeploy.parity import DecisionSpec


@register_recipe("early_exit")
class ExitRecipe(DeployRecipe):
    """Early-exit networks with the ``nn.exit_stage.EarlyExitNet`` API."""

    name: ClassVar[str] = "early_exit"
    decision_kind: ClassVar[str | None] = "early_exit"
    forms: ClassVar[tuple[str, ...]] = EXIT_FORMS
    default_forms: ClassVar[Mapping[str, str]] = {"ort": "staged", "trt": "staged"}
    output_names: ClassVar[tuple[str, ...]] = ("logits", "exit_stage", "exit_confidence")

    def design_macs(self, module: Any, input_size: tuple[int, ...]) -> MacsReport:
        from slimdeploy._optional import optional_import
        from slimdeploy.flops import count_macs_of

        torch = optional_import("torch", "count MACs")
        return count_macs_of(module, module.forward_all, torch.zeros(1, *input_size))

    def thresholds(self, module: Any) -> dict[str, Any]:
        return {"exit_thresholds": [float(t) for t in module.exit_thresholds]}

    def decisions(self, module: Any) -> list[DecisionSpec]:
        from slimdeploy.parity import DecisionSpec

        return [DecisionSpec("exit_stage", "exit_confidence", self.thresholds(module)["exit_thresholds"],
                             kind="exit", threshold_input="exit_thresholds")]

    def decision_bits(self, reference: Mapping[str, np.ndarray], module: Any) -> np.ndarray | None:
        # One-hot exit stages: every stage should be seen answering.
        return np.eye(len(module.exit_thresholds), dtype=np.uint8)[reference["exit_stage"]]

    def export_graphs(self, module: Any, form: str | None, input_size: tuple[int, ...], spec: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from slimdeploy.exporters import early_exit

        pieces, plan = early_exit.exit_pieces(module, input_size, opset=spec.opset)
        if form == "staged":
            return pieces, plan.to_dict()
        return {"model": early_exit.compose_form(form, pieces, plan, input_size)}, plan.to_dict()

    def io_specs(self, input_meta: TensorMeta, reference: Mapping[str, np.ndarray],
                 thresholds: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        inputs, outputs = super().io_specs(input_meta, reference, thresholds)
        defaults = thresholds["exit_thresholds"]
        inputs.append({"name": "exit_thresholds", "dtype": "float32", "shape": [len(defaults)], "optional": True,
                       "default": defaults})
        outputs += [{"name": "exit_stage", "dtype": "int64", "shape": ["batch"]},
                    {"name": "exit_confidence", "dtype": "float32", "shape": ["batch", len(defaults)]}]
        return inputs, outputs

    def plan_fields(self, plan: dict[str, Any] | None) -> dict[str, Any]:
        return {"gating": {}, "exits": plan}

