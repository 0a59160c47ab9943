"""Rules on explicit quantization: TensorRT parses Quantize/DequantizeLinear only when they are
symmetric signed INT8 (zero points all 0, not UINT8) with constant, positive, static scales,
and takes INT8/INT4/FP8/FP4 tensors only between such nodes.

Facts: trt_ops.json QuantizeLinear / DequantizeLinear restrictions and parser constraints
(onnxOpImporters.cpp QuantDequantLinearHelper 10.1), ``data_types_note``; facts file "Precision".
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from onnx import TensorProto

from slimdeploy.exporters.trt_lint.core import ERROR, WARNING, Context, Finding, graph_rule
from slimdeploy.exporters.trt_lint.facts import QUANTIZED_TYPES, TYPE_NAMES
from slimdeploy.exporters.trt_lint.graph import Scope, attribute, dim_text

QDQ = ("QuantizeLinear", "DequantizeLinear")
S8S8_FIX = ("quantize for TensorRT with symmetric signed INT8: onnxruntime quantize_static(..., quant_format=QuantFormat.QDQ, "
            "activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, extra_options={'ActivationSymmetric': True, "
            "'WeightSymmetric': True})")


def _name(elem: int) -> str:
    return TensorProto.DataType.Name(elem) if elem else "unknown"


@graph_rule
def qdq_zero_point(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """qdq-zero-point: zero points must be constant, signed (not UINT8) and all 0; a
    QuantizeLinear must produce INT8, not the UINT8 ONNX gives it when the zero point is left out.

    Facts: QuantizeLinear restriction "`y_zero_point` must be 0", DequantizeLinear
    "`x_zero_point` must be zero"; parser: "input must not be UINT8; zero point must not be UINT8
    for QuantizeLinear; zero points must be all zeros ('TensorRT only supports symmetric
    quantization')"; "UINT8 zero point in DequantizeLinear is converted to INT8 with a warning".
    """
    for node in scope.graph.node:
        if node.op_type not in QDQ:
            continue
        name = scope.node_name(node)
        zero = node.input[2] if len(node.input) > 2 else ""
        if zero:
            elem = scope.elem_type(zero)
            if elem == TensorProto.UINT8:
                yield Finding("qdq-zero-point", ERROR, name, f"{node.op_type} zero point '{zero}' is UINT8: TensorRT needs signed INT8 (asymmetric U8 is refused)", S8S8_FIX)
            value = scope.constant(zero)
            if value is None:
                yield Finding("qdq-zero-point", ERROR, name, f"{node.op_type} zero point '{zero}' is not a constant: TensorRT needs zero points that are all 0", S8S8_FIX)
            elif np.any(value.astype(np.int64) != 0):
                yield Finding("qdq-zero-point", ERROR, name,
                              f"{node.op_type} zero point '{zero}' is not all 0 (e.g. {int(value.reshape(-1)[np.flatnonzero(value.reshape(-1))[0]])}): "
                              "TensorRT only supports symmetric quantization", S8S8_FIX)
        if node.op_type == "QuantizeLinear" and node.output:
            produced = scope.elem_type(node.output[0])
            if produced == TensorProto.UINT8 and not zero:
                yield Finding("qdq-zero-point", ERROR, name,
                              f"QuantizeLinear without a zero point produces UINT8 '{node.output[0]}' in ONNX; TensorRT needs INT8",
                              "give it an INT8 zero point of 0; " + S8S8_FIX)


@graph_rule
def qdq_types(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """qdq-type: QuantizeLinear quantizes FP32/FP16/BF16; DequantizeLinear reads INT8/FP8/FP4/INT4.

    Facts: the matrix's Supported Types for QuantizeLinear (FP32, FP16, BF16) and DequantizeLinear
    (INT8, FP8, FP4, INT4; 10.1: no FP4); parser: "input must not be UINT8".
    """
    for node in scope.graph.node:
        if node.op_type not in QDQ or not node.input:
            continue
        elem = scope.elem_type(node.input[0])
        allowed = ctx.matrix.types(node.op_type)
        if elem and allowed and TYPE_NAMES.get(elem, _name(elem)) not in allowed:
            yield Finding("qdq-type", ERROR, scope.node_name(node),
                          f"{node.op_type} input '{node.input[0]}' is {_name(elem)}; TensorRT {ctx.matrix.name} takes {', '.join(sorted(allowed))}",
                          S8S8_FIX)


@graph_rule
def qdq_scale(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """qdq-scale: scales must be constant, positive and of static shape; a per-channel scale
    matches the quantized axis.

    Facts: parser "scales must be positive and of static shape"; facts file "scales constant,
    positive, static shape ... per-channel weights are fine". Per-channel quantization of an
    activation (a computed input) is outside what the facts cover: a warning.
    """
    for node in scope.graph.node:
        if node.op_type not in QDQ or len(node.input) < 2:
            continue
        name, scale = scope.node_name(node), node.input[1]
        value = scope.constant(scale)
        if value is None:
            yield Finding("qdq-scale", ERROR, name, f"{node.op_type} scale '{scale}' is not a constant: TensorRT needs constant scales", S8S8_FIX)
            continue
        if value.size == 0 or not np.all(value > 0):
            yield Finding("qdq-scale", ERROR, name, f"{node.op_type} scale '{scale}' has values <= 0: TensorRT needs positive scales",
                          "recalibrate; clamp scales to a small positive minimum")
        if value.size > 1:
            data = scope.shape(node.input[0])
            axis = int(attribute(node, "axis", 1))
            if data is not None and -len(data) <= axis < len(data) and isinstance(data[axis], int) and data[axis] != value.size:
                yield Finding("qdq-scale", ERROR, name,
                              f"{node.op_type} has {value.size} per-channel scales but axis {axis} of '{node.input[0]}' {dim_text(data)} has {data[axis]}",
                              "quantize per channel along the output-channel axis (axis 0 for Conv weights)")
            if node.op_type == "QuantizeLinear" and not scope.is_constant(node.input[0]):
                yield Finding("qdq-scale", WARNING, name,
                              f"per-channel quantization of the activation '{node.input[0]}': the facts cover per-channel weights only",
                              "quantize activations per tensor (one scale)")


@graph_rule
def quantized_outside_qdq(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """int8-outside-qdq: INT8/INT4/FP8/FP4 tensors only between QuantizeLinear and DequantizeLinear.

    Fact: data_types_note "INT8/INT4/FP8/FP4 only via quantization (Q/DQ)".
    """
    reported: set[str] = set()
    for value in scope.network_inputs | scope.network_outputs:
        if scope.elem_type(value) in QUANTIZED_TYPES:
            reported.add(value)
            yield Finding("int8-outside-qdq", ERROR, value,
                          f"network input/output '{value}' is {_name(scope.elem_type(value))}: TensorRT takes quantized types only through Q/DQ",
                          "keep network inputs and outputs in FP32/FP16 and quantize inside the graph with Q/DQ pairs")
    for node in scope.graph.node:
        for index, value in enumerate(node.input):
            if not value or value in reported or scope.elem_type(value) not in QUANTIZED_TYPES:
                continue
            ok = (node.op_type == "DequantizeLinear" and index in (0, 2)) or (node.op_type == "QuantizeLinear" and index == 2)
            if not ok:
                reported.update([value, *node.output])  # one finding per node
                yield Finding("int8-outside-qdq", ERROR, scope.node_name(node),
                              f"{node.op_type} reads the {_name(scope.elem_type(value))} tensor '{value}': TensorRT takes quantized types only into DequantizeLinear",
                              "dequantize before every operator (Q → DQ → op), as QuantFormat.QDQ does")
        for value in node.output:
            if value and value not in reported and scope.elem_type(value) in QUANTIZED_TYPES and node.op_type not in ("QuantizeLinear", "Constant"):
                reported.add(value)
                yield Finding("int8-outside-qdq", ERROR, scope.node_name(node),
                              f"{node.op_type} produces the {_name(scope.elem_type(value))} tensor '{value}': only QuantizeLinear may",
                              "produce quantized values with QuantizeLinear only")

