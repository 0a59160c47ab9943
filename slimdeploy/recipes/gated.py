"""The recipe of gated residual networks (SkipNet): gates that really skip.

Forms (``exporters.gated``): ``compact`` (default on ONNX Runtime: it routes per sample inside
one flat graph), ``if``, ``staged`` (default on TensorRT: one engine per piece, decisions on the
host, docs/tensorrt-facts.md "Control flow"), ``loop`` (``if`` with each stage's repeated
blocks in one ``Loop`` over stacked weights: a small graph), ``mask`` (the baseline). Outputs
``logits``, ``gates`` ([B, n-1] uint8, 1 = executed) and ``gate_probs`` ([B, n-1] float32); the
threshold input ``gate_threshold`` (0-D float32, default 0.5: a block runs iff its gate's
probability is strictly greater). Held-out samples are chosen so that every gate is seen open
and closed where the data allows (a gate frozen at trace time is the typical silent failure).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from slimdeploy.forms import GATED_FORMS
from slimdeploy.recipes.base import DeployRecipe
from slimdeploy.recipes.registry import register_recipe

if TYPE_CHECKING:
    from slimdeploy.engines.base import TensorMeta
    from slimdeploy.parity import DecisionSpec

DEFAULT_GATE_THRESHOLD = 0.5


@register_recipe("skipnet")
class GatedRecipe(DeployRecipe):
    """Gated residual networks with the SkipNet model API (``models.skipnet``): ``stem``,
    ``n_blocks``, ``block(k)``, ``run_block``, ``skip``, ``gate_init_state``, ``gate``, ``head``."""

    name: ClassVar[str] = "skipnet"
    decision_kind: ClassVar[str | None] = "gated"
    forms: ClassVar[tuple[str, ...]] = GATED_FORMS
    default_forms: ClassVar[Mapping[str, str]] = {"ort": "compact", "trt": "staged"}
    output_names: ClassVar[tuple[str, ...]] = ("logits", "gates", "gate_probs")

    def thresholds(self, module: Any) -> dict[str, Any]:
        return {"gate_threshold": DEFAULT_GATE_THRESHOLD}

    def decisions(self, module: Any) -> list[DecisionSpec]:
        from slimdeploy.parity import DecisionSpec

        return [DecisionSpec("gates", "gate_probs", DEFAULT_GATE_THRESHOLD, threshold_input="gate_threshold")]

    def decision_bits(self, reference: Mapping[str, np.ndarray], module: Any) -> np.ndarray | None:
        return reference["gates"]

    def export_graphs(self, module: Any, form: str | None, input_size: tuple[int, ...], spec: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from slimdeploy.exporters import gated

        pieces, plan = gated.gated_pieces(module, input_size, opset=spec.opset)
        if form == "staged":
            return pieces, plan.to_dict()
        return {"model": gated.compose_form(form, pieces, plan, input_size)}, plan.to_dict()

    def io_specs(self, input_meta: TensorMeta, reference: Mapping[str, np.ndarray],
                 thresholds: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        inputs, outputs = super().io_specs(input_meta, reference, thresholds)
        n_gated = int(reference["gates"].shape[1])
        inputs.append({"name": "gate_threshold", "dtype": "float32", "shape": [], "optional": True,
                       "default": thresholds["gate_threshold"]})
        outputs += [{"name": "gates", "dtype": "uint8", "shape": ["batch", n_gated]},
                    {"name": "gate_probs", "dtype": "float32", "shape": ["batch", n_gated]}]
        return inputs, outputs

    def plan_fields(self, plan: dict[str, Any] | None) -> dict[str, Any]:
        return {"gating": plan, "exits": {}}
