"""Exact ONNX rewrites that let ONNX Runtime quantize more of a graph.

``to_global_average_pool``: torch.export lowers ``adaptive_avg_pool2d(x, 1)`` and
``x.mean((2, 3), keepdim=True)`` to ``ReduceMean`` over the spatial axes. ONNX Runtime has no
quantized ReduceMean, so in an INT8 graph it runs in float on a dequantized (and transposed
back to NCHW) full feature map; ``GlobalAveragePool`` computes the same and becomes
``QLinearGlobalAveragePool`` in NHWC. ``AveragePool`` whose window is the whole (static)
feature map, unpadded (CondenseNet's last pooling), is the same ``GlobalAveragePool`` and runs
much faster quantized than ``QLinearAveragePool``.
"""

from __future__ import annotations

from typing import Any

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
    inferred = onnx.shape_inference.infer_shapes(model).graph
    # Static dims as ints, symbolic ones (batch) as 0.
    shapes = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in [*inferred.input, *inferred.value_info, *inferred.output]
              if value.type.tensor_type.HasField("shape")}
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
