"""INT8 with explicit QuantizeLinear/DequantizeLinear, in the form each target runs.

    qdq = quantize_int8(model, ranges, target="ort")   # U8S8: what ONNX Runtime's x86 kernels speed up
    qdq = quantize_int8(model, ranges, target="trt")   # S8S8, zero points 0: what TensorRT's parser accepts

Built on ``onnxruntime.quantization.quantize_static`` (``QuantFormat.QDQ``, per-channel weights
on the output-channel axis) fed with stored ranges through its calibration cache, so the same
ranges give both forms without running the model again (``ranges.CalibrationRecord``):

- ``ort``: QUInt8 activations (asymmetric), QInt8 symmetric per-channel weights, INT32 biases;
- ``trt``: QInt8 activations and weights, both symmetric (``ActivationSymmetric``,
  ``WeightSymmetric``), so every zero point is 0; biases stay FP32, since the TensorRT parser
  dequantizes only INT8 (``trt_ops.json``: DequantizeLinear types INT8/FP8/FP4/INT4). With
  ``op_types`` (Conv/Gemm/MatMul), Q/DQ sits only on those layers' inputs, as TensorRT places it.

Decision nodes (``decisions.DecisionScope``) are left out of quantization and then fed the FP32
tensors they read before quantization: ONNX Runtime's quantizer rewires every consumer of a
quantized tensor to its DequantizeLinear, which would otherwise hand a gate the rounded
features.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from slimdeploy.calibration.ranges import quiet_quantizer
from slimdeploy.errors import BadInputError
from slimdeploy.exporters.rewrite import to_global_average_pool

INT8_TARGETS = ("ort", "trt")


def quantize_int8(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    target: str = "ort",
    exclude: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
    rounded: Sequence[str] = (),
) -> onnx.ModelProto:
    """The QDQ INT8 form of ``model`` for ``target`` from calibration ``ranges``.

    Args:
        model: the FP32 graph the ranges were collected on.
        ranges: tensor name → (min, max), from ``collect_ranges`` or a stored record.
        target: ``"ort"`` (U8S8) or ``"trt"`` (S8S8 symmetric). Defaults to ``"ort"``.
        exclude: node names kept FP32 (decision heads). Defaults to none.
        op_types: operator types to quantize. In the ``trt`` form only their inputs get
            Q/DQ (TensorRT's placement), in the ``ort`` form their outputs too (what ONNX
            Runtime fuses into QLinearConv). Defaults to every type ONNX Runtime's QDQ
            quantizer handles.
        rounded: tensors that ``exclude``'s nodes read through their Q/DQ round trip instead
            of in FP32 (a gate head's pooled feature, see ``decisions.entry_pools``). Defaults
            to none.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorData,
        TensorsData,
        save_tensors_data,
    )

    if target not in INT8_TARGETS:
        raise BadInputError(f"no INT8 form for target '{target}' | Note: expected one of {list(INT8_TARGETS)}")
    names = _tensor_names(model)
    usable = {name: (lo, hi) for name, (lo, hi) in ranges.items() if name in names and _finite(lo, hi)}
    if not usable:
        raise BadInputError("the calibration ranges name none of this graph's tensors | Fix: recalibrate (--calib digits|PATH) instead of reusing ranges from another model")
    # Nodes around tensors no calibration sample reached stay FP32: a range made up for them
    # would be wrong for the first sample that does reach them.
    exclude = sorted(set(exclude) | set(unranged_nodes(model, usable)))
    tensors = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in usable.items()
    })
    if target == "ort":
        activation, extra = QuantType.QUInt8, {}
    else:
        activation, extra = QuantType.QInt8, {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
        if op_types:
            # TensorRT's placement: Q/DQ where a weighted layer reads, never after it. TensorRT
            # fuses the next layer's input quantization into this layer's epilogue, so a Q/DQ
            # on the output only adds a rounding (before the ReLU, where half the codes are
            # spent on negatives the ReLU drops).
            extra["OpTypesToExcludeOutputQuantization"] = list(op_types)
    # Spatial means and whole-map pools as GlobalAveragePool (same tensor names, so the ranges
    # still apply): ONNX Runtime has no quantized ReduceMean and would run it in float on a full
    # feature map, and its quantized global pool is faster than a whole-map AveragePool.
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    to_global_average_pool(rewritten)
    with tempfile.TemporaryDirectory(prefix="slimdeploy-int8-") as tmp, quiet_quantizer():
        source, cache, result = Path(tmp) / "model.onnx", Path(tmp) / "ranges.json", Path(tmp) / "int8.onnx"
        onnx.save(rewritten, source)
        save_tensors_data(tensors, cache)
        try:
            quantize_static(
                source, result, None,
                calibration_cache_path=cache,
                calibrate_method=CalibrationMethod.MinMax,
                quant_format=QuantFormat.QDQ,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=list(op_types) if op_types else None,
                nodes_to_exclude=list(exclude),
                extra_options=extra,
            )
        except KeyError as exc:
            # A tensor the quantizer needs has no stored range: ranges of another graph.
            raise BadInputError(
                f"the calibration ranges lack tensor {exc} of this graph | Fix: recalibrate "
                "(--calib digits|PATH) instead of reusing ranges from a different graph"
            ) from exc
        quantized = onnx.load(result)
    if exclude:
        _feed_float(quantized, set(exclude), set(rounded))
    onnx.checker.check_model(quantized)
    return quantized


def unranged_nodes(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]]) -> list[str]:
    """Nodes that read or write a float tensor without a finite calibration range: the blocks
    of a compacted graph that no calibration sample executed (ONNX Runtime's calibrator reports
    (inf, -inf) for a tensor it only saw empty)."""
    missing = {name for name in float_tensors(model) if not _finite(*ranges.get(name, (np.inf, -np.inf)))}
    return [node.name for node in model.graph.node if missing & {*node.input, *node.output}]


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the FP32 tensors ``model`` computes or takes as input (not its weights), sorted."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    constants = {init.name for init in graph.initializer}
    return sorted(
        value.name for value in [*graph.value_info, *graph.input, *graph.output]
        if value.type.tensor_type.elem_type == TensorProto.FLOAT and value.name not in constants
    )


def graph_signature(model: onnx.ModelProto) -> str:
    """SHA-256 of ``float_tensors(model)``: stored ranges fit a graph only if its signature is
    the one they were collected on (an export's folds depend on precision and --no-fold, its graphs on the dynamic form)."""
    return hashlib.sha256("\n".join(float_tensors(model)).encode()).hexdigest()


def _finite(low: float, high: float) -> bool:
    return bool(np.isfinite(low) and np.isfinite(high) and low <= high)


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    names = {value.name for value in model.graph.input}
    for node in model.graph.node:
        names.update(node.output)
    return names


def _feed_float(model: onnx.ModelProto, keep: set[str], rounded: set[str] = frozenset()) -> None:
    """Let the nodes in ``keep`` read the FP32 tensors again, not their Q→DQ round trips (but
    for the tensors in ``rounded``), and drop the Q/DQ nodes nothing reads any more."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name for init in graph.initializer}

    def float_source(name: str) -> str:
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return name
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in initializers or q.input[0] in rounded:
            return name
        return q.input[0]

    for node in graph.node:
        if node.name in keep:
            node.input[:] = [float_source(name) if name else name for name in node.input]
    # Remove Q/DQ nodes left without readers (repeat: a dead DQ leaves its Q dead).
    outputs = {out.name for out in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in read for o in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used and init.name not in {i.name for i in graph.input}]:
        graph.initializer.remove(init)


def qdq_violations(model: onnx.ModelProto) -> list[str]:
    """Where ``model``'s Q/DQ nodes break TensorRT's rules: zero points must be 0 and INT8
    (never UINT8), scales constant and positive, dequantized data INT8 (no INT32 biases).
    Empty when the graph is in the TensorRT form."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            constants[node.output[0]] = node.attribute[0].t
    problems: list[str] = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = constants.get(node.input[1])
        if scale is None:
            problems.append(f"{node.name}: scale '{node.input[1]}' is not a constant")
        elif not (numpy_helper.to_array(scale) > 0).all():
            problems.append(f"{node.name}: scale '{node.input[1]}' is not positive")
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is not None:
            if zero.data_type != TensorProto.INT8:
                problems.append(f"{node.name}: zero point is {TensorProto.DataType.Name(zero.data_type)}, not INT8")
            elif numpy_helper.to_array(zero).any():
                problems.append(f"{node.name}: zero point is not 0")
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            data_type = constants[node.input[0]].data_type
            if data_type != TensorProto.INT8:
                problems.append(f"{node.name}: dequantizes {TensorProto.DataType.Name(data_type)} data (TensorRT takes INT8)")
        if node.op_type == "QuantizeLinear" and zero is None:
            # Without a zero point the output type defaults to UINT8.
            problems.append(f"{node.name}: no zero point, so the output is UINT8")
    return problems
