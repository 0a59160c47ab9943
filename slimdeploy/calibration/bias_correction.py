"""Empirical bias correction of a QDQ INT8 graph: undo the mean shift that rounding adds.

    corrected = correct_biases(fp32_graph, qdq_graph, {"input": calibration_images})
    corrected.model    # the QDQ graph with shifted biases
    corrected.layers   # node name -> mean |shift| applied to its bias

Rounding weights and activations to INT8 is not zero-mean per output channel: a convolution's
channel comes out a little too high or too low on average, a ReLU after it turns that into a
changed share of active units, and the shift adds up layer after layer. Post-ReLU features lose
the most in the symmetric (S8S8) form, which spends half its codes on negatives that never come.
The correction (empirical bias correction, Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", 2019) runs the FP32 and the QDQ graph on the calibration
images, measures each quantized Conv/Gemm's mean output error per output channel and subtracts
it from that layer's bias. Layers are corrected in topological order, so a later layer's error
is measured after the earlier layers' corrections (it corrects what reaches it, not what
would have). Only the bias initializers change, so the graph keeps its structure:

- S8S8 (TensorRT) keeps biases FP32: the correction is a plain initializer edit;
- U8S8 (ONNX Runtime) stores them INT32 with scale x_scale·w_scale: the corrected bias is
  quantized again on the same scale (the error is then measured with the rounded bias).

Only a mean is taken, so the parity samples are never needed: the calibration images are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimdeploy.engines.ort_runner import OrtRunner
from slimdeploy.exporters.rewrite import graph_links

# Operators with a per-output-channel bias on axis 1 of their output (MatMul has none).
BIAS_OPS = ("Conv", "Gemm")
INT32 = np.iinfo(np.int32)
# Activations the U8S8 quantizer folds into the layer before them.
ACTIVATIONS = ("Relu", "Clip")


@dataclass
class BiasCorrection:
    """The corrected graph and what changed.

    Attributes:
        model: the QDQ graph with the corrected biases.
        layers: node name → mean |bias shift| over its channels (FP32 units).
        error_before: node name → mean over channels of |mean output error| before correction.
        error_after: node name → the same after its correction (its own output, measured once
            every layer before it was corrected too).
        skipped: quantized Conv/Gemm nodes left alone and why (no bias, shared bias, ...).
    """

    model: onnx.ModelProto
    layers: dict[str, float] = field(default_factory=dict)
    error_before: dict[str, float] = field(default_factory=dict)
    error_after: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class _Layer:
    """One correctable layer and the state of its bias while correcting."""

    node: str
    output: str  # its output in the quantized graph
    reference: str  # the same tensor in the FP32 graph
    bias: np.ndarray  # current FP32 bias
    scale: np.ndarray | None  # INT32 bias scale (U8S8), None for an FP32 bias
    initializer: str  # the initializer holding the bias (FP32, or INT32 when scale is set)
    feed_name: str  # the overridable input that carries the bias while measuring
    level: int  # quantized layers on the longest path to it, itself included


def correct_biases(
    fp32: onnx.ModelProto,
    quantized: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    quantized_feed: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 64,
    threads: int = 0,
) -> BiasCorrection:
    """``quantized`` with each quantized Conv/Gemm's bias shifted by its mean output error per
    channel against ``fp32`` over ``feed``.

    Args:
        fp32: the FP32 graph ``quantized`` was made from (same tensor names).
        quantized: its QDQ INT8 form (S8S8 with FP32 biases, or U8S8 with INT32 biases).
        feed: calibration inputs of the graph (``{"input": images}``, or a staged piece's feed).
        quantized_feed: the same rows as ``quantized`` receives them in the INT8 model (a later
            piece of a staged bundle reads the rounded features of the pieces before it), so
            that the correction also takes out the error they bring. Defaults to ``feed``.
        batch_size: rows per run. Defaults to 64.
        threads: ONNX Runtime intra-op threads; 0 lets it choose. Defaults to 0.
    """
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    layers, skipped = _layers(model, fp32)
    result = BiasCorrection(model, skipped=skipped)
    if not layers:
        return result
    rows = len(next(iter(feed.values())))
    names = [layer.reference for layer in layers]
    reference = _channel_means(_with_outputs(fp32, names), feed, names, batch_size, threads, rows)
    probe = _probe(model, layers)
    qfeed = feed if quantized_feed is None else quantized_feed
    with OrtRunner(probe.SerializeToString(), threads=threads, spinning=False, name="bias-correction") as runner:
        # One run per level: layers of a level do not feed one another (a residual block's
        # first convolution and its shortcut), so they are measured and corrected together.
        for level in sorted({layer.level for layer in layers}):
            todo = [layer for layer in layers if layer.level == level]
            means = _run_means(runner, qfeed, layers, [layer.output for layer in todo], batch_size, rows)
            for layer in todo:
                error = means[layer.output] - reference[layer.reference]
                result.error_before[layer.node] = float(np.abs(error).mean())
                old = layer.bias
                layer.bias = _representable(old - error, layer.scale)
                result.layers[layer.node] = float(np.abs(layer.bias - old).mean())
        # The remaining error of each layer, once everything before it was corrected.
        means = _run_means(runner, qfeed, layers, [layer.output for layer in layers], batch_size, rows)
    for layer in layers:
        result.error_after[layer.node] = float(np.abs(means[layer.output] - reference[layer.reference]).mean())
    _write_biases(model, layers)
    return result


def _layers(model: onnx.ModelProto, fp32: onnx.ModelProto) -> tuple[list[_Layer], dict[str, str]]:
    """The quantized Conv/Gemm nodes whose bias can be corrected, in graph order, with levels."""
    fp32_producers = {out: node for node in fp32.graph.node for out in node.output}
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producers, readers = graph_links(graph)
    layers: list[_Layer] = []
    skipped: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in BIAS_OPS or len(node.input) < 2:
            continue
        if not _is_dequantized_constant(node.input[1], producers, inits):
            continue  # an FP32 layer (a decision head): not quantized, nothing of its own to correct
        reference = _reference_name(node, graph, fp32_producers)
        if reference is None:
            skipped[node.name] = "output not in the FP32 graph"
            continue
        if (len(node.input) < 3 or not node.input[2]) and not _add_bias(node, graph, producers, inits):
            skipped[node.name] = "no bias (the U8S8 form would need an INT32 one)"
            continue
        bias_name = node.input[2]
        if bias_name in inits and inits[bias_name].data_type == TensorProto.FLOAT:
            initializer, scale, shared = bias_name, None, readers.get(bias_name, 0) > 1
            value = numpy_helper.to_array(inits[bias_name]).astype(np.float32)
        else:
            dq = producers.get(bias_name)
            parts = _int32_bias(dq, inits) if dq is not None else None
            if parts is None:
                skipped[node.name] = "bias is neither an FP32 nor a dequantized INT32 constant"
                continue
            initializer, scale = parts
            shared = readers.get(bias_name, 0) > 1 or readers.get(initializer, 0) > 1
            value = (numpy_helper.to_array(inits[initializer]).astype(np.float64) * scale).astype(np.float32)
        if shared:
            skipped[node.name] = "bias shared with another node"
            continue
        layers.append(_Layer(node.name, node.output[0], reference, value, scale, initializer, f"{node.name}/corrected_bias", 0))
    _assign_levels(graph, layers)
    return layers, skipped


def _reference_name(node: onnx.NodeProto, graph: onnx.GraphProto, fp32_producers: Mapping[str, onnx.NodeProto]) -> str | None:
    """The FP32 graph's name of a quantized layer's output. Usually the same name, but the
    quantizer renames a graph output (the DequantizeLinear after the layer carries the name),
    and the U8S8 form drops a ReLU/Clip after a layer (the unsigned range clips instead) and
    gives the layer the activation's output name: the FP32 tensor is then the activation's input."""
    name = node.output[0]
    if name not in fp32_producers:
        readers = {value: reader for reader in graph.node for value in reader.input}
        quantize = readers.get(name)
        dequantize = readers.get(quantize.output[0]) if quantize is not None and quantize.op_type == "QuantizeLinear" else None
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return None
        name = dequantize.output[0]
    producer = fp32_producers.get(name)
    while producer is not None and producer.op_type in ACTIVATIONS:
        name = producer.input[0]
        producer = fp32_producers.get(name)
    return name if producer is not None and producer.op_type == node.op_type else None


def _add_bias(node: onnx.NodeProto, graph: onnx.GraphProto, producers: Mapping[str, onnx.NodeProto],
              inits: dict[str, onnx.TensorProto]) -> bool:
    """Give a bias-less layer a zero FP32 bias to correct, where FP32 biases are the form
    (S8S8: its activations dequantize from INT8); False for the U8S8 form."""
    source = producers.get(node.input[0])
    if source is not None and source.op_type == "DequantizeLinear":
        zero = inits.get(source.input[2]) if len(source.input) > 2 else None
        if zero is None or zero.data_type != TensorProto.INT8:
            return False
    weight = inits[producers[node.input[1]].input[0]]
    transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    channels = weight.dims[0] if node.op_type == "Conv" or transposed else weight.dims[1]
    bias = numpy_helper.from_array(np.zeros(channels, np.float32), f"{node.name}/bias")
    graph.initializer.append(bias)
    inits[bias.name] = graph.initializer[-1]
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = bias.name
    return True


def _is_dequantized_constant(name: str, producers: Mapping[str, onnx.NodeProto], inits: Mapping[str, onnx.TensorProto]) -> bool:
    node = producers.get(name)
    return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in inits


def _int32_bias(dq: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> tuple[str, np.ndarray] | None:
    """(INT32 initializer, scale) of a DequantizeLinear of a quantized bias with zero point 0."""
    if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
        return None
    if inits[dq.input[0]].data_type != TensorProto.INT32:
        return None
    if len(dq.input) > 2 and dq.input[2] and numpy_helper.to_array(inits[dq.input[2]]).any():
        return None
    return dq.input[0], numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)


def _assign_levels(graph: onnx.GraphProto, layers: list[_Layer]) -> None:
    """Each layer's level: 1 + the highest level among the quantized layers upstream of it."""
    by_node = {layer.node: layer for layer in layers}
    depth: dict[str, int] = {}  # tensor -> highest level of a corrected layer upstream
    for node in graph.node:  # graph order is topological
        upstream = max((depth.get(name, 0) for name in node.input), default=0)
        if node.name in by_node:
            by_node[node.name].level = upstream + 1
            upstream += 1
        for out in node.output:
            depth[out] = upstream


def _representable(bias: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The bias as the graph will hold it: FP32, or rounded to its INT32 grid."""
    if scale is None:
        return bias.astype(np.float32)
    return (_int32_steps(bias, scale) * scale).astype(np.float32)


def _int32_steps(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``bias`` in steps of ``scale``, rounded and clipped to INT32. A channel whose scale is 0
    (all its weights 0, so its input scale times 0) holds 0: dividing by it would give NaN."""
    bias, scale = np.broadcast_arrays(np.asarray(bias, dtype=np.float64), np.asarray(scale, dtype=np.float64))
    steps = np.divide(bias, scale, out=np.zeros(bias.shape), where=scale > 0)
    return np.clip(np.round(steps), INT32.min, INT32.max)


def _probe(model: onnx.ModelProto, layers: Sequence[_Layer]) -> onnx.ModelProto:
    """A copy of ``model`` whose layers read their bias from an overridable FP32 input (so one
    session measures every correction) and that outputs every layer's result."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    nodes = {node.name: node for node in probe.graph.node}
    for layer in layers:
        nodes[layer.node].input[2] = layer.feed_name
        probe.graph.initializer.append(numpy_helper.from_array(layer.bias, layer.feed_name))
        probe.graph.input.append(helper.make_tensor_value_info(layer.feed_name, TensorProto.FLOAT, list(layer.bias.shape)))
    return _with_outputs(probe, [layer.output for layer in layers])


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names``."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    outputs = {out.name for out in exposed.graph.output}
    for name in names:
        if name not in outputs:
            exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return exposed


def _channel_means(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], names: Sequence[str], batch_size: int, threads: int, rows: int) -> dict[str, np.ndarray]:
    with OrtRunner(model.SerializeToString(), threads=threads, spinning=False, name="fp32") as runner:
        return _means(lambda part: _fetch(runner, part, names), feed, names, batch_size, rows)


def _run_means(runner: OrtRunner, feed: Mapping[str, np.ndarray], layers: Sequence[_Layer], names: Sequence[str], batch_size: int, rows: int) -> dict[str, np.ndarray]:
    biases = {layer.feed_name: layer.bias for layer in layers}
    return _means(lambda part: _fetch(runner, {**part, **biases}, names), feed, names, batch_size, rows)


def _fetch(runner: OrtRunner, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Only ``names``: the session computes just what they need (``infer`` returns everything)."""
    session = runner.session
    return dict(zip(names, session.run(list(names), dict(feed))))


def _means(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], feed: Mapping[str, np.ndarray], names: Sequence[str], batch_size: int, rows: int) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of ``names`` over every row of ``feed``, run in batches."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for start in range(0, rows, batch_size):
        part = {name: value[start:start + batch_size] for name, value in feed.items()}
        for name, value in run(part).items():
            axes = tuple(axis for axis in range(value.ndim) if axis != 1)
            sums[name] = sums.get(name, 0) + value.astype(np.float64).sum(axis=axes)
            counts[name] = counts.get(name, 0) + value.size // value.shape[1]
    return {name: sums[name] / counts[name] for name in names}


def _write_biases(model: onnx.ModelProto, layers: Sequence[_Layer]) -> None:
    inits = {init.name: init for init in model.graph.initializer}
    for layer in layers:
        if layer.scale is None:
            value = layer.bias.astype(np.float32)
        else:
            value = _int32_steps(layer.bias, layer.scale).astype(np.int32)
        inits[layer.initializer].CopyFrom(numpy_helper.from_array(value.reshape(numpy_helper.to_array(inits[layer.initializer]).shape), layer.initializer))
