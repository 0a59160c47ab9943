"""ONNX rewrites that keep a graph's results and make ONNX Runtime's work cheaper.

``to_global_average_pool``: torch.export lowers ``adaptive_avg_pool2d(x, 1)`` and
``x.mean((2, 3), keepdim=True)`` to ``ReduceMean`` over the spatial axes. ONNX Runtime has no
quantized ReduceMean, so in an INT8 graph it runs in float on a dequantized (and transposed
back to NCHW) full feature map; ``GlobalAveragePool`` computes the same and becomes
``QLinearGlobalAveragePool`` in NHWC. ``AveragePool`` whose window is the whole (static)
feature map, unpadded (CondenseNet's last pooling), is the same ``GlobalAveragePool`` and runs
much faster quantized than ``QLinearAveragePool``.

``drop_unit_axis_round_trips``: the recurrent gate's LSTM state goes through a Gather, an
Unsqueeze and a Slice on an axis of size 1 between two steps; they are the identity and cost a
few microseconds each per gate at batch 1. ``fold_embedding_into_lstm``: the gate's 1x1
embedding conv folded into the LSTM's input weights (equal up to float32 rounding). Measured in
benchmarks/README.md (``skipnet.py``, per-piece overheads).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slimdeploy._optional import optional_import

SPATIAL_AXES = ({2, 3}, {-2, -1})


def _axes(node: Any, constants: dict[str, Any]) -> list[int] | None:
    """The axes of a ReduceMean (attribute before opset 18, constant input since), or None."""
    numpy_helper = optional_import("onnx", "rewrite ONNX graphs").numpy_helper
    for attribute in node.attribute:
        if attribute.name == "axes":
            return list(attribute.ints)
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(a) for a in numpy_helper.to_array(constants[node.input[1]]).ravel()]
    return None


def _whole_map_pool(node: Any, shapes: dict[str, list[int]]) -> bool:
    """An unpadded 2D AveragePool whose window covers its whole (static) input map."""
    shape = shapes.get(node.input[0], [])
    attributes = {a.name: a for a in node.attribute}
    kernel = list(attributes["kernel_shape"].ints) if "kernel_shape" in attributes else []
    pads = list(attributes["pads"].ints) if "pads" in attributes else []
    auto_pad = attributes["auto_pad"].s.decode() if "auto_pad" in attributes else "NOTSET"
    dilations = list(attributes["dilations"].ints) if "dilations" in attributes else []
    return (all(d == 1 for d in dilations) and len(shape) == 4 and len(kernel) == 2 and kernel == shape[2:] and all(d > 0 for d in kernel)
            and not any(pads) and auto_pad in ("NOTSET", "VALID"))


def to_global_average_pool(model: Any) -> int:
    """Replace, in place, every ``ReduceMean`` over the two spatial axes of a rank-4 tensor with
    ``keepdims=1``, and every unpadded ``AveragePool`` over a whole map, by
    ``GlobalAveragePool``; returns how many were replaced."""
    onnx = optional_import("onnx", "rewrite ONNX graphs")
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    shapes = _static_shapes(model)
    replaced = 0
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "AveragePool" and _whole_map_pool(node, shapes):
            graph.node[index].CopyFrom(
                onnx.helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
            replaced += 1
            continue
        if node.op_type != "ReduceMean":
            continue
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        axes = _axes(node, constants)
        if keepdims != 1 or axes is None or set(axes) not in SPATIAL_AXES or len(shapes.get(node.input[0], [])) != 4:
            continue
        pool = onnx.helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name)
        graph.node[index].CopyFrom(pool)
        replaced += 1
    return replaced


def graph_links(graph: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """Of a graph's main nodes: the node producing each tensor, and how many node inputs read
    each tensor (subgraphs not counted)."""
    producer = {output: node for node in graph.node for output in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for tensor in node.input:
            readers[tensor] = readers.get(tensor, 0) + 1
    return producer, readers


def drop_unit_axis_round_trips(model: Any) -> int:
    """Remove, in place, the axis-0 round trips that the recurrent gate's LSTM state takes
    between two ``LSTM`` nodes, which onnxslim leaves; returns how many nodes were removed.

    torch exports each step of a one-layer ``nn.LSTM`` as ``LSTM`` with its state wrapped:
    ``h = Gather(Y_h, 0, axis=0)`` after the step, ``Slice(Unsqueeze(h, 0), 0:1, axis=0)``
    before the next. ``Y_h`` is ``[1, B, H]`` (one direction), so both are the identity:

    - ``Slice(Unsqueeze(t, axes=[0]), starts=[0], ends>=[1], axes=[0], steps=[1])`` is the
      Unsqueeze's output (its axis 0 has size 1);
    - ``Unsqueeze(Gather(Y, 0, axis=0), axes=[0])`` is ``Y`` where ``Y``'s axis 0 has size 1
      (a forward LSTM's ``Y_h``/``Y_c``);
    - ``Unsqueeze(Reshape(x, shape), axes=[0])``, the Reshape read by nothing else and ``shape``
      a constant without zeros, is ``Reshape(x, [1, *shape])`` (the LSTM's input step).

    Each gate then costs 5 to 6 nodes fewer (a few microseconds each on ONNX Runtime's CPU
    kernels at batch 1). Only the main graph; nodes whose output is a graph output stay.
    """
    onnx = optional_import("onnx", "rewrite ONNX graphs")
    numpy_helper = onnx.numpy_helper
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer, readers = graph_links(graph)
    graph_outputs = {value.name for value in graph.output}

    def ints(name: str) -> list[int] | None:
        value = constants.get(name)
        return None if value is None else [int(v) for v in value.ravel()]

    def unsqueeze_axes(node: Any) -> list[int] | None:
        attribute = next((a for a in node.attribute if a.name == "axes"), None)
        return list(attribute.ints) if attribute is not None else ints(node.input[1]) if len(node.input) > 1 else None

    def unit_leading_axis(tensor: str) -> bool:
        """``tensor`` is a forward one-direction LSTM's Y_h or Y_c ([1, B, H])."""
        node = producer.get(tensor)
        if node is None or node.op_type != "LSTM" or tensor not in node.output[1:3]:
            return False
        direction = next((a.s.decode() for a in node.attribute if a.name == "direction"), "forward")
        return direction in ("forward", "reverse")

    renamed: dict[str, str] = {}  # output of a removed node -> the tensor it equals
    reshaped: set[str] = set()  # Reshape outputs that gained the unit axis
    for node in graph.node:
        if node.output[0] in graph_outputs or node.domain not in ("", "ai.onnx"):
            continue
        source = producer.get(node.input[0]) if node.input else None
        if node.op_type == "Slice" and source is not None and source.op_type == "Unsqueeze" and unsqueeze_axes(source) == [0]:
            starts, ends = ints(node.input[1]), ints(node.input[2])
            axes = ints(node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
            steps = ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
            if starts == [0] and ends is not None and len(ends) == 1 and ends[0] >= 1 and axes == [0] and steps == [1]:
                renamed[node.output[0]] = node.input[0]
        elif node.op_type == "Unsqueeze" and unsqueeze_axes(node) == [0] and source is not None and source.op_type == "Gather":
            axis = next((a.i for a in source.attribute if a.name == "axis"), 0)
            index = constants.get(source.input[1])
            if axis == 0 and index is not None and index.ndim == 0 and int(index) == 0 and unit_leading_axis(source.input[0]):
                renamed[node.output[0]] = source.input[0]
        elif (node.op_type == "Unsqueeze" and unsqueeze_axes(node) == [0] and source is not None
              and source.op_type == "Reshape" and readers.get(node.input[0]) == 1 and source.output[0] not in graph_outputs):
            shape = ints(source.input[1])
            if shape is not None and 0 not in shape:  # without zeros, allowzero changes nothing
                lifted = f"{source.input[1]}_with_unit_axis"
                if lifted not in constants:
                    constants[lifted] = np.array([1, *shape], dtype=np.int64)
                    graph.initializer.append(numpy_helper.from_array(constants[lifted], lifted))
                source.input[1] = lifted
                reshaped.add(source.output[0])
                renamed[node.output[0]] = source.output[0]
    if not renamed:
        return 0

    def resolve(tensor: str) -> str:
        while tensor in renamed:
            tensor = renamed[tensor]
        return tensor

    for node in graph.node:
        for index, tensor in enumerate(node.input):
            if tensor in renamed:
                node.input[index] = resolve(tensor)
    # Drop what no longer feeds anything (the removed nodes, and Gathers of Y_c read only by them).
    removed = 0
    while True:
        used = {tensor for node in graph.node for tensor in node.input} | graph_outputs
        dead = [node for node in graph.node if node.output and not any(output in used for output in node.output)
                and node.op_type in ("Slice", "Unsqueeze", "Gather")]
        if not dead:
            # Shapes recorded for the tensors that changed rank or went away are stale.
            _drop_value_info(graph, reshaped | set(renamed))
            return removed
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)


def fold_embedding_into_lstm(model: Any) -> int:
    """Fold, in place, a 1x1 convolution on a 1x1 map that only feeds an ``LSTM``'s input
    (through a Reshape to ``[1, B, E]``) into the LSTM's input weights; returns how many.

    The recurrent gate embeds each block's pooled feature with a 1x1 conv before the LSTM step:
    ``gates = W (Wc p + bc) + Wb + ...`` equals ``(W Wc) p + (Wb + W bc) + ...``, so the LSTM
    can read the pooled ``p`` itself (weights folded in float64, stored as float32: the result
    moves by float32 rounding, ~1e-7). It saves the Conv and the layout reorders ONNX Runtime
    puts around it, per gate. Only the main graph; nothing shared with other readers changes.
    """
    onnx = optional_import("onnx", "rewrite ONNX graphs")
    numpy_helper = onnx.numpy_helper
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    producer, readers = graph_links(graph)
    graph_outputs = {value.name for value in graph.output}
    shapes = _static_shapes(model)

    def single_reader(tensor: str) -> bool:
        return readers.get(tensor) == 1 and tensor not in graph_outputs

    folded, stale = 0, set()
    for lstm in list(graph.node):
        if lstm.op_type != "LSTM" or len(lstm.input) < 4 or lstm.input[1] not in weights or lstm.input[3] not in weights:
            continue
        if next((a.s.decode() for a in lstm.attribute if a.name == "direction"), "forward") != "forward":
            continue
        reshape = producer.get(lstm.input[0])
        if reshape is None or reshape.op_type != "Reshape" or not single_reader(reshape.output[0]):
            continue
        conv = producer.get(reshape.input[0])
        if conv is None or conv.op_type != "Conv" or not single_reader(conv.output[0]) or conv.input[1] not in weights:
            continue
        attributes = {a.name: a for a in conv.attribute}
        if any(list(attributes[name].ints) not in ([], [0, 0, 0, 0], [1, 1]) for name in ("pads", "strides") if name in attributes):
            continue
        if "group" in attributes and attributes["group"].i != 1:
            continue
        if "auto_pad" in attributes and attributes["auto_pad"].s not in (b"NOTSET", b"VALID"):
            continue
        kernel = numpy_helper.to_array(weights[conv.input[1]])
        if kernel.ndim != 4 or kernel.shape[2:] != (1, 1) or shapes.get(conv.input[0], [])[2:] != [1, 1]:
            continue
        embed, channels = kernel.shape[:2]
        lstm_weight = numpy_helper.to_array(weights[lstm.input[1]]).astype(np.float64)  # [1, 4H, E]
        lstm_bias = numpy_helper.to_array(weights[lstm.input[3]]).astype(np.float64)  # [1, 8H]: Wb then Rb
        if lstm_weight.shape[0] != 1 or lstm_weight.shape[2] != embed:
            continue
        conv_weight = kernel.reshape(embed, channels).astype(np.float64)
        conv_bias = (numpy_helper.to_array(weights[conv.input[2]]).astype(np.float64)
                     if len(conv.input) > 2 and conv.input[2] else np.zeros(embed))
        hidden4 = lstm_weight.shape[1]
        bias = lstm_bias.copy()
        bias[0, :hidden4] += lstm_weight[0] @ conv_bias
        names = {"W": f"{lstm.name}_W_folded", "B": f"{lstm.name}_B_folded", "shape": f"{lstm.name}_input_shape"}
        graph.initializer.extend([
            numpy_helper.from_array((lstm_weight[0] @ conv_weight)[None].astype(np.float32), names["W"]),
            numpy_helper.from_array(bias.astype(np.float32), names["B"]),
            numpy_helper.from_array(np.array([1, -1, channels], dtype=np.int64), names["shape"]),
        ])
        reshape.input[0], reshape.input[1] = conv.input[0], names["shape"]
        lstm.input[1], lstm.input[3] = names["W"], names["B"]
        graph.node.remove(conv)
        stale |= {conv.output[0], reshape.output[0]}  # their recorded shapes no longer hold
        folded += 1
    if folded:
        _drop_value_info(graph, stale)  # the replaced weights, where nothing (subgraphs included) reads them any more
        used = _tensors_read(graph)
        kept = [init for init in graph.initializer if init.name in used or init.name in {v.name for v in graph.input}]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return folded


def _tensors_read(graph: Any) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs (If/Loop bodies) reads."""
    read: set[str] = set()
    for node in graph.node:
        read.update(node.input)
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                read |= _tensors_read(body)
    return read


def _static_shapes(model: Any) -> dict[str, list[int]]:
    """Inferred shapes by tensor name: static dims as ints, symbolic ones (batch) as 0."""
    onnx = optional_import("onnx", "rewrite ONNX graphs")
    inferred = onnx.shape_inference.infer_shapes(model).graph
    return {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in [*inferred.input, *inferred.value_info, *inferred.output]
            if value.type.tensor_type.HasField("shape")}


def _drop_value_info(graph: Any, names: set[str]) -> None:
    """Remove the recorded shapes of ``names`` (tensors a rewrite changed or removed)."""
    kept = [value for value in graph.value_info if value.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)
