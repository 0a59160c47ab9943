"""Graph simplification with onnxslim (constant folding, dead-node removal, fusions), then the
rewrites onnxslim leaves (``exporters.rewrite``): whole-map pools as ``GlobalAveragePool``, the
recurrent gate's LSTM state round trips dropped and its embedding conv folded into the LSTM.
Each saves fixed per-node costs that matter for gates at batch 1 (issue 16).

The caller re-checks parity after simplifying; ``simplify`` itself only reports what changed.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass
from typing import Any

from slimdeploy._optional import optional_import
from slimdeploy.exporters.rewrite import (
    drop_unit_axis_round_trips,
    fold_embedding_into_lstm,
    to_global_average_pool,
)


@dataclass
class SimplifyResult:
    """The simplified model and the node counts before and after."""

    model: Any
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    error: str = ""


def op_counts(model: Any) -> dict[str, int]:
    """Node count per op type in the main graph."""
    return dict(Counter(node.op_type for node in model.graph.node))


def simplify(model: Any) -> SimplifyResult:
    """Simplify ``model`` with onnxslim; on an onnxslim failure return it unchanged with the
    error recorded (simplification is an optimisation, not a requirement)."""
    onnxslim = optional_import("onnxslim", "simplify ONNX graphs")
    before = op_counts(model)
    # Graph inputs with a default (an initializer of the same name: thresholds) would be folded
    # into constants by onnxslim; take the defaults out while simplifying and put them back.
    input_names = {value.name for value in model.graph.input}
    defaults = [init for init in model.graph.initializer if init.name in input_names]
    stripped = model
    if defaults:
        stripped = type(model)()
        stripped.CopyFrom(model)
        keep = [init for init in stripped.graph.initializer if init.name not in input_names]
        del stripped.graph.initializer[:]
        stripped.graph.initializer.extend(keep)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            slimmed = onnxslim.slim(stripped)
    except Exception as exc:  # onnxslim raises assorted errors on graphs it cannot handle
        return SimplifyResult(model, sum(before.values()), sum(before.values()), before, before, error=str(exc)[:300])
    to_global_average_pool(slimmed)
    drop_unit_axis_round_trips(slimmed)  # before the fold: it turns Reshape + Unsqueeze into the Reshape the fold reads
    fold_embedding_into_lstm(slimmed)
    kept_inputs = {value.name for value in slimmed.graph.input}
    slimmed.graph.initializer.extend(init for init in defaults if init.name in kept_inputs)
    after = op_counts(slimmed)
    return SimplifyResult(slimmed, sum(before.values()), sum(after.values()), before, after)
