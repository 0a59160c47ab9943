"""FP16: cast a graph's weights and arithmetic to half precision, keeping what needs FP32.

    half = convert_fp16(model, keep=DecisionScope().nodes(model))

Built on ``onnxruntime.transformers.float16.convert_float_to_float16`` with
``keep_io_types=True``: inputs and outputs stay FP32, so feeds, golden files and the staged
controller do not change. Kept in FP32 (Cast nodes at the boundaries):
- the decision nodes passed in ``keep`` (gate and exit heads: a flipped decision changes the
  answer);
- ``FP32_OPS``: Softmax and the normalisations (their reductions lose accuracy in FP16), LSTM
  (no FP16 kernel in ONNX Runtime's CPU provider), plus ONNX Runtime's default block list.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from slimdeploy.calibration.ranges import quiet_quantizer

FP32_OPS = ("Softmax", "LogSoftmax", "BatchNormalization", "LayerNormalization", "InstanceNormalization",
            "GroupNormalization", "LSTM", "GRU", "RNN")


def convert_fp16(model: onnx.ModelProto, keep: Sequence[str] = (), fp32_ops: Sequence[str] = FP32_OPS) -> onnx.ModelProto:
    """The FP16 form of ``model`` with FP32 inputs and outputs.

    Args:
        model: the FP32 graph.
        keep: node names kept FP32 (decision heads). Defaults to none.
        fp32_ops: operator types kept FP32. Defaults to ``FP32_OPS``.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the converter edits what it is given
    with quiet_quantizer():
        half = convert_float_to_float16(
            copy,
            keep_io_types=True,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(fp32_ops)),
            node_block_list=list(keep),
        )
    _sort_nodes(half.graph)  # the converter appends its Cast nodes at the end
    onnx.checker.check_model(half)
    return half


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Put ``graph``'s nodes in topological order (stable: the original order where free)."""
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:  # outer-scope names (If branches) or a cycle: leave the rest in order
            ordered.extend(pending)
            break
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        chosen = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in chosen]
    del graph.node[:]
    graph.node.extend(ordered)
