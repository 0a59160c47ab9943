"""Rules on operators: opset range, unsupported operators, supported types, UINT8 and DOUBLE
tensors, the restrictions the operator matrix prints, and Conv's group arithmetic.

Facts: ``trt_ops.json`` (onnx-tensorrt ``docs/operators.md`` of 10.15 and 10.1, its
``data_types_note``, and the parser constraints of ``requested_ops``); docs/tensorrt-facts.md
"Operator constraints a CNN graph meets".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto

from slimdeploy.exporters.trt_lint.core import (
    ERROR,
    WARNING,
    Context,
    Finding,
    graph_rule,
    model_rule,
)
from slimdeploy.exporters.trt_lint.facts import (
    DEFAULT_TRT_VERSION,
    QUANTIZED_TYPES,
    TYPE_NAMES,
    requested,
)
from slimdeploy.exporters.trt_lint.graph import Scope, attribute, dim_text

DEFAULT_DOMAINS = ("", "ai.onnx")
STAGED_FIX = "export the staged form (slimdeploy export ... --dynamic staged)"
# Ops whose own rules check their types and restrictions (control flow, quantization).
OWN_RULES = frozenset({"If", "Loop", "Scan", "QuantizeLinear", "DequantizeLinear"})
# The input whose element type the matrix's "Supported Types" column is about (default 0):
# Where's input 0 is its BOOL condition, the values are inputs 1 and 2.
DATA_INPUT = {"Where": 1}


@model_rule
def trt_version_newer_than_matrix(scopes: list[Scope], ctx: Context) -> Iterator[Finding]:
    """trt-version: targets newer than the newest operator matrix read get a warning.

    Fact: trt_ops.json ``_meta.primary_source.note``: the 10.15 matrix is the newest read (no
    11.x matrix), "warn when the target TensorRT is newer than 10.15".
    """
    if ctx.matrix.newer_than_read:
        yield Finding(
            "trt-version", WARNING, None,
            f"TensorRT {ctx.version} is newer than the newest operator matrix read ({ctx.matrix.name}); "
            f"the lint applies the {ctx.matrix.name} matrix, so operators added or changed since are not known to it",
            "on the target, cross-check with `polygraphy inspect capability` or the parser's supports_model_v2",
        )


@model_rule
def opset_range(scopes: list[Scope], ctx: Context) -> Iterator[Finding]:
    """opset: the default-domain opset must lie in the matrix's range.

    Fact: operators.md header: TensorRT 10.15 "supports operators in the inclusive range of opset
    9 to opset 24"; the 10.1 doc: "TensorRT 10.0 supports ... opset 9 to opset 20".
    """
    matrix = ctx.matrix
    for opset in ctx.model.opset_import:
        if opset.domain not in DEFAULT_DOMAINS:
            continue
        version = int(opset.version)
        fix = f"export with an opset from {matrix.opset_min} to {matrix.opset_max} (slimdeploy export --opset 18)"
        if version < matrix.opset_min:
            yield Finding("opset", ERROR, None, f"opset {version} is below {matrix.opset_min}, the lowest TensorRT {matrix.name} parses", fix)
        elif version > matrix.opset_max:
            newest = DEFAULT_TRT_VERSION if matrix.newer else matrix.name
            # Beyond the applied matrix but within a newer one read, or on a target newer than
            # any matrix read: possibly fine, not known.
            unknown = (matrix.newer is not None and version <= _newest_opset_max()) or matrix.newer_than_read
            yield Finding(
                "opset", WARNING if unknown else ERROR, None,
                f"opset {version} is above {matrix.opset_max}, the highest the TensorRT {matrix.name} operator matrix names"
                + (f" (the {newest} matrix names up to {_newest_opset_max()}; TensorRT {ctx.version} is in between or newer)" if unknown else ""),
                fix,
            )


def _newest_opset_max() -> int:
    from slimdeploy.exporters.trt_lint.facts import load_facts

    return int(load_facts()["_meta"]["primary_source"]["header"]["opset_max"])


@graph_rule
def unsupported_ops(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """unsupported-op: every node's operator must be supported in the matrix.

    Facts: operators.md "Supported" column (N: Compress, Unique, Sequence*, Optional*, QLinear*,
    *Integer, DynamicQuantizeLinear, ...); operators outside the default ONNX domain or outside
    the matrix are not parsed without a plugin. Workarounds from ``requested_ops``.
    """
    functions = ctx.functions
    for node in scope.graph.node:
        if (node.domain, node.op_type) in functions:
            continue  # a model-local function: its body is linted as a graph
        name = scope.node_name(node)
        if node.domain not in DEFAULT_DOMAINS:
            yield Finding(
                "unsupported-op", ERROR, name,
                f"{node.domain}::{node.op_type} is outside the default ONNX domain; the TensorRT ONNX parser has no importer for it",
                "replace it with standard ONNX operators, or provide a TensorRT plugin of that name",
            )
            continue
        entry = ctx.matrix.op(node.op_type)
        newer = (ctx.matrix.newer or {}).get(node.op_type)
        if entry is None and newer is None:
            yield Finding(
                "unsupported-op", ERROR, name,
                f"{node.op_type} is not in the TensorRT {ctx.matrix.name} operator matrix",
                "replace it with operators the matrix lists (docs/trt-lint.md)",
            )
        elif entry is None or not entry.get("supported"):
            if newer and newer.get("supported"):
                yield Finding(
                    "unsupported-op", WARNING, name,
                    f"{node.op_type} is unsupported in the TensorRT {ctx.matrix.name} matrix but supported in {DEFAULT_TRT_VERSION}; "
                    f"TensorRT {ctx.version} lies in between",
                    f"check the operator matrix of TensorRT {ctx.version}, or target {DEFAULT_TRT_VERSION} or newer",
                )
                continue
            workaround = " ".join(requested(node.op_type).get("extra_constraints", []))
            yield Finding(
                "unsupported-op", ERROR, name,
                f"TensorRT {ctx.matrix.name} does not support {node.op_type}" + (f" ({workaround})" if workaround else ""),
                _unsupported_fix(node.op_type),
            )


def _unsupported_fix(op_type: str) -> str:
    if op_type in ("Compress", "Unique") or op_type.startswith(("Sequence", "Optional")):
        return f"route with fixed shapes instead; for gated models {STAGED_FIX}"
    if op_type.startswith("QLinear") or op_type.endswith("Integer") or op_type == "DynamicQuantizeLinear":
        return "quantize with explicit QuantizeLinear/DequantizeLinear pairs (QuantFormat.QDQ, symmetric QInt8)"
    return "replace it with operators the matrix supports"


def _type_name(elem_type: int) -> str:
    return TYPE_NAMES.get(elem_type, onnx.TensorProto.DataType.Name(elem_type) if elem_type else "unknown")


@graph_rule
def op_types(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """op-types: each node's data input (Cast: also its target type) must have a type the
    matrix lists for the operator.

    Fact: operators.md "Supported Types" column (e.g. Reduce ops take no BOOL; Gather rejects
    UINT8 data). NonZero also takes the types its parser importer accepts (``requested_ops``:
    FLOAT/HALF/BF16/INT32/INT64/INT8/BOOL, although the doc lists FP32, FP16). UINT8 inside the
    network, DOUBLE and the quantized types have rules of their own.
    """
    for node in scope.graph.node:
        entry = ctx.matrix.op(node.op_type)
        if node.domain not in DEFAULT_DOMAINS or node.op_type in OWN_RULES or not entry or not entry.get("supported"):
            continue
        allowed = ctx.matrix.types(node.op_type) | _parser_types(node.op_type)
        if not allowed:
            continue
        checked: list[tuple[str, int]] = []
        index = DATA_INPUT.get(node.op_type, 0)
        if len(node.input) > index and node.input[index]:
            checked.append((node.input[index], scope.elem_type(node.input[index])))
        elif node.output:  # no data input (Constant, RandomNormal): the produced type
            checked.append((node.output[0], scope.elem_type(node.output[0])))
        if node.op_type in ("Cast", "CastLike") and node.output:
            checked.append((node.output[0], scope.elem_type(node.output[0])))
        for value, elem_type in checked:
            if not elem_type or elem_type == TensorProto.DOUBLE:
                continue
            if elem_type == TensorProto.UINT8 and value not in scope.network_inputs | scope.network_outputs:
                continue  # reported once by uint8-tensor
            if elem_type in QUANTIZED_TYPES:
                continue  # reported by int8-outside-qdq
            if _type_name(elem_type) not in allowed:
                yield Finding(
                    "op-types", ERROR, scope.node_name(node),
                    f"{node.op_type} on '{value}' of type {_type_name(elem_type)}: TensorRT {ctx.matrix.name} "
                    f"supports {node.op_type} for {', '.join(sorted(allowed))}",
                    f"cast '{value}' to a supported type before {node.op_type} (e.g. INT32 or FP32)",
                )


def _parser_types(op_type: str) -> set[str]:
    """Types a parser constraint in ``requested_ops`` adds to the doc's list."""
    for text in requested(op_type).get("extra_constraints", []):
        match = re.search(r"Parser: accepts ([A-Z0-9/]+) input", text)
        if match:
            names = {"FLOAT": "FP32", "HALF": "FP16"}
            return {names.get(t, t) for t in match.group(1).split("/")}
    return set()


@graph_rule
def uint8_tensors(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """uint8-tensor: UINT8 tensors may only be network inputs or outputs.

    Fact: trt_ops.json ``data_types_note``: "UINT8 only as network input/output";
    docs/tensorrt-facts.md, "Operator constraints a CNN graph meets".
    """
    boundary = scope.network_inputs | scope.network_outputs
    for node in scope.graph.node:
        for value in node.output:
            if value and value not in boundary and scope.elem_type(value) == TensorProto.UINT8:
                yield Finding(
                    "uint8-tensor", ERROR, scope.node_name(node),
                    f"'{value}' is a UINT8 tensor inside the network; TensorRT takes UINT8 only at network inputs and outputs",
                    "keep the values in INT32 or BOOL inside the graph and Cast to UINT8 only as the last node before the output",
                )


@graph_rule
def double_tensors(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """double-tensor: DOUBLE tensors are computed in FLOAT.

    Fact: data_types_note "DOUBLE (cast to FLOAT)"; facts file "DOUBLE is cast down to FLOAT".
    """
    names = [v.name for v in scope.graph.input] + [t.name for t in scope.graph.initializer]
    names += [v for node in scope.graph.node for v in node.output if v]
    doubles = [n for n in dict.fromkeys(names) if scope.elem_type(n) == TensorProto.DOUBLE]
    if doubles:
        node = scope.producers.get(doubles[0])
        yield Finding(
            "double-tensor", WARNING, scope.node_name(node) if node else doubles[0],
            f"{len(doubles)} DOUBLE tensor(s) (first '{doubles[0]}'): TensorRT casts DOUBLE down to FLOAT, so results differ from a float64 reference",
            "export in float32",
        )


@graph_rule
def conv_shapes(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """conv-groups: Conv needs ``W.shape[1] * group == C_in`` and a 1-D, 2-D or 3-D kernel.

    Fact: requested_ops Conv (parser 10.1): "requires W.shape[1]*group == C_in when C_in is
    static ('Kernel weight dimension failed to broadcast to input'); 1D conv is unsqueezed to
    2D; 2D/3D supported"; facts file "Conv: 1-D/2-D/3-D; W.shape[1] * group == C_in".
    """
    for node in scope.graph.node:
        if node.op_type != "Conv" or node.domain not in DEFAULT_DOMAINS or len(node.input) < 2:
            continue
        weight, data = scope.shape(node.input[1]), scope.shape(node.input[0])
        group = int(attribute(node, "group", 1))
        if weight is not None and not 1 <= len(weight) - 2 <= 3:
            yield Finding("conv-groups", ERROR, scope.node_name(node),
                          f"Conv with a {len(weight) - 2}-D kernel; TensorRT parses 1-D, 2-D and 3-D convolutions",
                          "reshape to a 2-D or 3-D convolution")
        if weight and data and len(data) > 1 and isinstance(weight[1], int) and isinstance(data[1], int) and weight[1] * group != data[1]:
            yield Finding("conv-groups", ERROR, scope.node_name(node),
                          f"Conv weight {dim_text(weight)} with group={group} covers {weight[1] * group} input channels, "
                          f"the input has {data[1]} ('Kernel weight dimension failed to broadcast to input')",
                          "export the convolution with W.shape[1] * group equal to the input channels")


# -- restrictions printed in the matrix --------------------------------------------------------

Check = Callable[[onnx.NodeProto, Scope, Context, str], Iterator[Finding]]
CHECKS: dict[str, Check] = {}


def _checks(*op_types: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        for op_type in op_types:
            CHECKS[op_type] = fn
        return fn

    return register


@graph_rule
def op_restrictions(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """op-restriction: the restriction the matrix prints for an operator, where it has one.

    Fact: operators.md "Restrictions" column of the applied matrix (10.15, or 10.1 for targets
    before 10.15: e.g. Slice and Pad ``axes`` must be initializers there). A restriction with no
    check here gives one warning per operator type that quotes it.
    """
    unchecked: dict[str, onnx.NodeProto] = {}
    for node in scope.graph.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type in OWN_RULES:
            continue
        text = ctx.matrix.restriction(node.op_type)
        if not text:
            continue
        check = CHECKS.get(node.op_type)
        if check is None:
            unchecked.setdefault(node.op_type, node)
        else:
            yield from check(node, scope, ctx, text)
    for op_type, node in unchecked.items():
        yield Finding("op-restriction", WARNING, scope.node_name(node),
                      f"{op_type} has restrictions in TensorRT {ctx.matrix.name} that the lint does not check: {ctx.matrix.restriction(op_type)}",
                      "check the restriction by hand, or build the engine on the target to confirm")


def _restricted(node: onnx.NodeProto, scope: Scope, text: str, what: str, fix: str, severity: str = ERROR) -> Finding:
    return Finding("op-restriction", severity, scope.node_name(node), f"{node.op_type}: {what} (TensorRT: {text})", fix)


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


@_checks("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
         "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze", "Slice",
         "Pad", "CumSum", "OneHot")
def _constant_input(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    """``axes``/``axis``/``depth`` must be an initializer (or resolvable to a constant)."""
    index = {"Slice": 3, "Pad": 3}.get(node.op_type, 1)
    value = _input(node, index)
    if not value or scope.is_constant(value):
        return
    soft = "resolvable" in text  # 10.15 Squeeze/Unsqueeze: TensorRT may fold a computed value
    label = {"CumSum": "axis", "OneHot": "depth"}.get(node.op_type, "axes")
    yield _restricted(node, scope, text, f"{label} '{value}' is computed, not an initializer",
                      f"make {label} a constant initializer (export with static {label})", WARNING if soft else ERROR)


@_checks("AveragePool", "MaxPool", "LpPool")
def _pooling(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    kernel = list(attribute(node, "kernel_shape", []) or [])
    if "2D or 3D" in text and kernel and len(kernel) not in (2, 3):
        yield _restricted(node, scope, text, f"{len(kernel)}-D pooling", "pool over 2 or 3 spatial dimensions")
    dilations = list(attribute(node, "dilations", []) or [])
    if "dilations" in text and any(d != 1 for d in dilations):
        yield _restricted(node, scope, text, f"dilations {dilations}", "use dilations of 1")
    if "Indices" in text and len(node.output) > 1 and node.output[1]:
        yield _restricted(node, scope, text, f"the Indices output '{node.output[1]}' is requested", "drop the Indices output")


@_checks("Dropout")
def _dropout(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    value = _input(node, 2)
    if not value:
        return
    constant = scope.constant(value)
    if constant is None or bool(np.any(constant)):
        yield _restricted(node, scope, text, f"is_training '{value}' is not an initializer that is False",
                          "export in eval mode (model.eval()) so Dropout is inference-only")


@_checks("TopK")
def _topk(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    if int(attribute(node, "sorted", 1)) != 1:
        yield _restricted(node, scope, text, "sorted=0", "use sorted=1")
    k = scope.constant(_input(node, 1)) if _input(node, 1) else None
    match = re.search(r"less than (\d+)", text)
    if k is not None and match and k.size and int(np.max(k)) >= int(match.group(1)):
        yield _restricted(node, scope, text, f"K={int(np.max(k))}", f"use K below {match.group(1)}")


@_checks("ScatterND")
def _scatternd(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    reduction = attribute(node, "reduction", b"none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
    if reduction != "none":
        yield _restricted(node, scope, text, f"reduction='{reduction}'", "use reduction='none'")


# Resize: the labels of the restriction text ("Supported <label>: `a`, `b`.") → attribute, default.
_RESIZE_ATTRIBUTES = {
    "resize transformation modes": ("coordinate_transformation_mode", "half_pixel"),
    "resize modes": ("mode", "nearest"),
    "nearest modes": ("nearest_mode", "round_prefer_floor"),
    "aspect ratio policy": ("keep_aspect_ratio_policy", "stretch"),
}


@_checks("Resize")
def _resize(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    mode = attribute(node, "mode", b"nearest")
    for part in re.split(r"<br\s*/?>", text):
        match = re.match(r"\s*Supported (.+?):\s*(.+)", part)
        if not match or match.group(1) not in _RESIZE_ATTRIBUTES:
            continue
        name, default = _RESIZE_ATTRIBUTES[match.group(1)]
        if name == "nearest_mode" and mode not in (b"nearest", "nearest"):
            continue
        value = attribute(node, name, default)
        value = value.decode() if isinstance(value, bytes) else str(value)
        allowed = re.findall(r"`([^`]+)`", match.group(2))
        if allowed and value not in allowed:
            yield _restricted(node, scope, text, f"{name}='{value}'", f"use one of {allowed}")
    if "Antialiasing" in text and int(attribute(node, "antialias", 0)):
        yield _restricted(node, scope, text, "antialias=1", "use antialias=0")
    axes = attribute(node, "axes")
    rank = scope.shape(node.input[0]) if node.input else None
    if "iota" in text and axes is not None and _input(node, 2) and rank is not None and list(axes) != list(range(len(rank))):
        yield _restricted(node, scope, text, f"axes={list(axes)} with a scales input", "resize over every axis (no axes attribute)")


@_checks("LSTM", "GRU", "RNN")
def _recurrent(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    for name in ("input_forget", "layout"):
        if f"`{name}` attribute must be 0" in text and int(attribute(node, name, 0)) != 0:
            yield _restricted(node, scope, text, f"{name}={attribute(node, name)}", f"export with {name}=0")
    direction = attribute(node, "direction", b"forward")
    activations = [a.decode() if isinstance(a, bytes) else a for a in (attribute(node, "activations", []) or [])]
    if direction in (b"bidirectional", "bidirectional") and activations:
        half = len(activations) // 2
        if activations[:half] != activations[half:]:
            yield _restricted(node, scope, text, f"forward activations {activations[:half]} differ from reverse {activations[half:]}",
                              "use the same activations in both directions")


@_checks("Constant")
def _constant(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    for attr in node.attribute:
        if f"`{attr.name}`" in text:
            yield _restricted(node, scope, text, f"uses the {attr.name} attribute", "store a dense numeric tensor (value)")


@_checks("LayerNormalization")
def _layer_norm(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    used = [v for v in node.output[1:] if v and (v in scope.consumers or v in scope.network_outputs)]
    if used:
        yield _restricted(node, scope, text, f"outputs {used} are used", "use only the first output Y")


@_checks("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike")
def _random(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    if attribute(node, "seed") is not None:
        yield _restricted(node, scope, text, "a seed is set", "do not rely on the seed for reproducible values", WARNING)


@_checks("EyeLike", "Hardmax", "GridSample")
def _static_input(node: onnx.NodeProto, scope: Scope, ctx: Context, text: str) -> Iterator[Finding]:
    dims = scope.shape(node.input[0]) if node.input else None
    if dims is None:
        return
    if node.op_type == "GridSample" and len(dims) != 4:
        yield _restricted(node, scope, text, f"input of rank {len(dims)}", "sample a 4-D input")
    elif node.op_type == "EyeLike" and not all(isinstance(d, int) for d in dims):
        yield _restricted(node, scope, text, f"input shape {dim_text(dims)} is not static", "give the input a static shape")
    elif node.op_type == "Hardmax":
        axis = int(attribute(node, "axis", -1))
        if -len(dims) <= axis < len(dims) and not isinstance(dims[axis], int):
            yield _restricted(node, scope, text, f"axis {axis} has dimension {dims[axis]}", "make that dimension static")
