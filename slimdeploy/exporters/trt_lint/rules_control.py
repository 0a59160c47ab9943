"""Rules on control flow and data-dependent shapes: ``If`` conditions and branches, the
documented warning for ``If`` graphs, ``Loop`` scan lengths, carried shapes and gathered
weights, the documented warning for ``Loop`` graphs that route with ``If``, and tensors whose
shape depends on the data (NonZero).

Facts: trt_ops.json ``requested_ops`` If / Loop / NonZero (parser source 10.1-GA, NvInfer.h and
pyGraphDoc.h 11.1, NVIDIA/TensorRT issues), docs/tensorrt-facts.md "Control flow".
"""

from __future__ import annotations

import math
from collections.abc import Iterator

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
from slimdeploy.exporters.trt_lint.graph import Dim, Scope, attribute, dim_text, walk
from slimdeploy.exporters.trt_lint.rules_ops import STAGED_FIX

# Operators whose output shape depends on input values (ONNX operator specs): NonZero's
# [rank, nnz]; NonMaxSuppression's [num_selected, 3].
DATA_DEPENDENT_OPS = ("NonZero", "NonMaxSuppression")
# Operators whose output has the shape of their data input (input 0) whatever the indices.
SHAPE_OF_DATA = ("ScatterND", "ScatterElements", "Scatter")


def _branches(node: onnx.NodeProto) -> dict[str, onnx.GraphProto]:
    return {attr.name: attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH}


def _child(scope: Scope, node: onnx.NodeProto, name: str, graph: onnx.GraphProto) -> Scope:
    return Scope(graph, f"{scope.node_name(node)}/{name}", parent=scope, is_main=False)


@graph_rule
def if_condition(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """if-condition: an ``If`` condition must be a 0-D bool (a static 1-element tensor is converted).

    Facts: requested_ops If: "``cond`` must convert to a 0-D scalar: convertToScalar() fails unless
    the tensor volume is exactly 1 (static shape) -> a per-sample batched gate of shape [N] or
    [N,1] with N>1 or dynamic N cannot drive an If"; "TRT API: condition must be a 0D kBOOL";
    a build-time constant condition inlines the chosen branch.
    """
    for node in scope.graph.node:
        if node.op_type != "If" or not node.input:
            continue
        cond, name = node.input[0], scope.node_name(node)
        if scope.is_constant(cond):
            continue  # the parser inlines the selected branch
        elem = scope.elem_type(cond)
        if elem and elem != TensorProto.BOOL:
            yield Finding("if-condition", ERROR, name, f"If condition '{cond}' has type {TensorProto.DataType.Name(elem)}; TensorRT needs a 0-D BOOL",
                          "Cast the condition to BOOL")
        dims = scope.shape(cond)
        fix = ("reduce the per-sample gate to one scalar (Cast to INT32, ReduceMax/ReduceMin keepdims=0, "
               f"Cast to BOOL), or {STAGED_FIX}")
        if dims is None:
            yield Finding("if-condition", WARNING, name, f"the shape of If condition '{cond}' is unknown; TensorRT needs a 0-D bool",
                          "make the condition's shape inferable: " + fix)
        elif not all(isinstance(d, int) for d in dims):
            yield Finding("if-condition", ERROR, name,
                          f"If condition '{cond}' has shape {dim_text(dims)} with a dynamic dimension: TensorRT fails with "
                          "'Failed to convert the input cond to a scalar'", fix)
        elif math.prod(dims) != 1:
            yield Finding("if-condition", ERROR, name,
                          f"If condition '{cond}' has shape {dim_text(dims)} ({math.prod(dims)} elements): TensorRT fails with "
                          "'Failed to convert the input cond to a scalar'", fix)


def _compatible(a: Dim, b: Dim) -> bool | None:
    """True same (or not knowable: a size shape inference could not name), False different,
    None when two differently named sizes may or may not agree."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, str) and a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and not a.startswith("unk__") and not b.startswith("unk__"):
        return None  # two named sizes: equal only if the data makes them so
    return True  # an unknown size (onnx names them unk__N): nothing to prove either way


@graph_rule
def if_branches(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """if-branches: both branches exist and give as many outputs, pairwise of the same type and
    rank, in practice the same shape, under different names.

    Facts: If restriction "Output tensors of the two conditional branches must have the same rank
    and must have different names"; NvInfer.h 11.1 "same number of outputs; corresponding outputs
    same type and rank" / pyGraphDoc.h "same type and shape"; failures "IIfConditionalOutputLayer
    inputs must have the same shape" (TensorRT#1731, #4603), "dimensions not compatible for
    if-conditional outputs" (TensorRT#4032).
    """
    for node in scope.graph.node:
        if node.op_type != "If" or scope.is_constant(node.input[0] if node.input else ""):
            continue
        name = scope.node_name(node)
        branches = _branches(node)
        if set(branches) != {"then_branch", "else_branch"}:
            yield Finding("if-branches", ERROR, name, f"If has branches {sorted(branches)}; both then_branch and else_branch must exist",
                          "give the If both branches")
            continue
        then_scope = _child(scope, node, "then_branch", branches["then_branch"])
        else_scope = _child(scope, node, "else_branch", branches["else_branch"])
        then_out, else_out = list(then_scope.graph.output), list(else_scope.graph.output)
        if len(then_out) != len(else_out):
            yield Finding("if-branches", ERROR, name, f"then_branch gives {len(then_out)} outputs, else_branch {len(else_out)}",
                          "make both branches return the same outputs")
            continue
        for index, (t, e) in enumerate(zip(then_out, else_out)):
            where = f"output {index} ('{t.name}' / '{e.name}')"
            if t.name == e.name:
                yield Finding("if-branches", ERROR, name, f"{where}: both branches output the same tensor name; TensorRT requires different names",
                              "copy each branch's result with an Identity node inside the branch (a name of its own)")
            t_type, e_type = then_scope.elem_type(t.name), else_scope.elem_type(e.name)
            if t_type and e_type and t_type != e_type:
                yield Finding("if-branches", ERROR, name,
                              f"{where}: types {TensorProto.DataType.Name(t_type)} and {TensorProto.DataType.Name(e_type)} differ",
                              "make both branches return the same type")
            t_dims, e_dims = then_scope.shape(t.name), else_scope.shape(e.name)
            if t_dims is None or e_dims is None:
                continue
            if len(t_dims) != len(e_dims):
                yield Finding("if-branches", ERROR, name, f"{where}: ranks {len(t_dims)} and {len(e_dims)} differ ({dim_text(t_dims)} vs {dim_text(e_dims)})",
                              "make both branches return tensors of the same rank and shape")
                continue
            verdicts = [_compatible(a, b) for a, b in zip(t_dims, e_dims)]
            if False in verdicts:
                yield Finding("if-branches", ERROR, name,
                              f"{where}: shapes {dim_text(t_dims)} and {dim_text(e_dims)} differ; TensorRT fails with "
                              "'IIfConditionalOutputLayer inputs must have the same shape'",
                              "make both branches return the same shape (e.g. apply the skip path's downsampling in the other branch)")
            elif None in verdicts:
                yield Finding("if-branches", WARNING, name,
                              f"{where}: shapes {dim_text(t_dims)} and {dim_text(e_dims)} cannot be proven equal; TensorRT needs the same shape at run time",
                              "give both branches' outputs the same (symbolic) dimensions")


@model_rule
def if_lazy_evaluation(scopes: list[Scope], ctx: Context) -> Iterator[Finding]:
    """if-form: the documented warning for graphs that route with ``If``.

    Facts: facts file "Control flow": branch layers are evaluated lazily, but users report no
    speed-up in some versions (an If routing to resnet18 or resnet101 took ~3.8 ms either way on
    10.7) and wrong results for If → Transpose → Resize on 11.1/11.2 (TensorRT#4846); so the
    staged form is the TensorRT default and ``if`` is offered with this warning.
    """
    found = [(scope, node) for scope in scopes for node in scope.graph.node
             if node.op_type == "If" and node.input and not scope.is_constant(node.input[0])]
    if found:
        scope, node = found[0]
        yield Finding(
            "if-form", WARNING, scope.node_name(node),
            f"{len(found)} If node(s) with a run-time condition: TensorRT evaluates branches lazily, but users report no "
            "speed-up from skipping in some versions (TensorRT#4846 also reports wrong results for If→Transpose→Resize on 11.1/11.2)",
            f"measure on the target; for dependable savings {STAGED_FIX}",
        )


@model_rule
def if_known_failures(scopes: list[Scope], ctx: Context) -> Iterator[Finding]:
    """if-version: failures reported for particular TensorRT versions.

    Facts: requested_ops If "Known failure modes": "Attention op inside If fails in 10.16
    (TensorRT#4739, #4757); wrong results for If->Transpose->Resize in 11.1/11.2 (TensorRT#4846)".
    """
    if_outputs: set[str] = set()
    for scope in scopes:
        for node in scope.graph.node:
            if node.op_type == "If":
                if_outputs.update(v for v in node.output if v)
    for scope in scopes:
        nested = "/then_branch" in scope.path or "/else_branch" in scope.path
        for node in scope.graph.node:
            if ctx.target == (10, 16) and nested and node.op_type == "Attention":
                yield Finding("if-version", ERROR, scope.node_name(node),
                              "Attention inside an If branch fails to build on TensorRT 10.16 (TensorRT#4739, #4757)",
                              "move the Attention out of the If, or target another TensorRT version")
            if ctx.target in ((11, 1), (11, 2)) and node.op_type == "Transpose" and node.input and node.input[0] in if_outputs:
                resizes = [c for c in scope.consumers.get(node.output[0], []) if c.op_type == "Resize"]
                if resizes:
                    yield Finding("if-version", WARNING, scope.node_name(node),
                                  f"If → Transpose → Resize ({scope.node_name(resizes[0])}) gives wrong results on TensorRT 11.1/11.2 (TensorRT#4846)",
                                  f"check parity on the target with slimdeploy build; or {STAGED_FIX}; or another TensorRT version")


@graph_rule
def loop_constraints(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """loop: scan outputs need a static length; loop-carried values keep their shape; weights
    gathered by the iteration number cover every iteration.

    Facts: Loop restriction "Scan output length cannot be dynamic. The shape of Loop carried
    dependencies must be the same across all loop iterations."; NvInfer.h 11.1 IRecurrenceLayer
    "input 1 must have same dims as input 0"; the parser wires the trip count as a kCOUNT limit,
    treats an INT64-max trip count as "no count limit" and a condition input as a kWHILE limit
    (a scan output's length then depends on the data). A Gather whose index is past the end of
    its axis is an error in ONNX; the ``loop`` form gathers row ``iteration`` of stacked weights.
    """
    for node in scope.graph.node:
        if node.op_type != "Loop":
            continue
        name = scope.node_name(node)
        body = _branches(node).get("body")
        if body is None:
            continue
        body_scope = _child(scope, node, "body", body)
        carried = max(0, len(node.input) - 2)
        scans = len(body.output) - 1 - carried
        trip = node.input[0] if node.input else ""
        trip_value = scope.constant(trip) if trip else None
        # The parser treats an INT64-max trip count as "no count limit" (requested_ops Loop).
        unbounded = trip_value is not None and trip_value.size == 1 and int(trip_value.reshape(-1)[0]) == np.iinfo(np.int64).max
        if scans > 0 and (not trip or not scope.is_constant(trip) or unbounded):
            yield Finding("loop", ERROR, name,
                          f"Loop has {scans} scan output(s) and "
                          + ("no trip count" if not trip else "an INT64-max trip count (no count limit)" if unbounded else f"a computed trip count '{trip}'")
                          + ": TensorRT needs the scan output length to be static",
                          "give the Loop a constant trip count (an initializer), or carry the results instead of scanning them")
        condition = node.input[1] if len(node.input) > 1 else ""
        condition_value = scope.constant(condition) if condition else None
        always = condition_value is not None and condition_value.size == 1 and bool(condition_value.reshape(-1)[0])
        if scans > 0 and condition and not always:
            yield Finding("loop", ERROR, name,
                          f"Loop has {scans} scan output(s) and a run-time condition '{condition}' (a kWHILE limit): the scan "
                          "output length depends on the data, and TensorRT needs it static",
                          "leave the condition input empty and stop by the trip count alone")
        for index in range(carried):
            initial = node.input[2 + index]
            if len(body.output) <= 1 + index:
                break
            produced = body.output[1 + index].name
            before, after = scope.shape(initial), body_scope.shape(produced)
            if before is None or after is None:
                continue
            verdicts = [_compatible(a, b) for a, b in zip(before, after)]
            if len(before) != len(after) or False in verdicts:
                yield Finding("loop", ERROR, name,
                              f"loop-carried value '{initial}' has shape {dim_text(before)} but the body returns {dim_text(after)} "
                              f"('{produced}'): TensorRT needs the same shape in every iteration",
                              "keep each loop-carried value's shape fixed (pad to the final size)")
        if trip_value is not None and trip_value.size == 1 and not unbounded and body.input:
            yield from _gathers_past_the_end(body_scope, body.input[0].name, int(trip_value.reshape(-1)[0]), name)


def _gathers_past_the_end(body: Scope, iteration: str, trips: int, loop: str) -> Iterator[Finding]:
    """Gathers on axis 0 of a constant by the iteration number (anywhere in the body, its
    branches included) whose axis is shorter than the trip count."""
    for scope in walk(body):
        for node in scope.consumers.get(iteration, []):
            if node.op_type != "Gather" or list(node.input[1:2]) != [iteration] or attribute(node, "axis", 0) != 0:
                continue
            data = scope.constant(node.input[0])
            if data is not None and data.ndim and data.shape[0] < trips:
                yield Finding("loop", ERROR, scope.node_name(node),
                              f"Gather reads row 'iteration' of '{node.input[0]}' ({data.shape[0]} rows) in Loop '{loop}', "
                              f"which runs {trips} times: the last iterations index past the end",
                              "stack one row per iteration (the trip count must not exceed the stacked axis)")


@model_rule
def loop_form(scopes: list[Scope], ctx: Context) -> Iterator[Finding]:
    """loop-form: what TensorRT builds of a ``Loop`` that routes with ``If`` (the ``loop`` form).

    Facts: facts file "Control flow": a Loop becomes an ILoop (trip count a kCOUNT limit known
    before the loop starts, loop-carried values IRecurrenceLayers of fixed shape, checked by the
    ``loop`` rule); loops may nest conditionals, TensorRT infers the nesting from the data flow
    (developer guide, "Working with Loops"); convolutions whose weights are computed in the loop
    are multi-input convolutions (requested_ops Conv, 10.x); the ``If`` caveats of ``if-form``
    hold in every iteration.
    """
    routed = [(scope, node) for scope in scopes for node in scope.graph.node
              if node.op_type == "Loop" and _routes_with_if(_branches(node).get("body"))]
    if routed:
        scope, node = routed[0]
        yield Finding(
            "loop-form", WARNING, scope.node_name(node),
            f"{len(routed)} Loop node(s) that route with If: TensorRT builds an ILoop each (a constant trip count, "
            "loop-carried values of fixed shape: see the 'loop' rule) with IIfConditionals nested inside, which it supports; "
            "weights gathered per iteration make multi-input convolutions, and the If caveats (no speed-up from skipping "
            "reported in some versions) hold in every iteration",
            f"measure on the target; for dependable savings {STAGED_FIX}",
        )


def _routes_with_if(body: onnx.GraphProto | None) -> bool:
    """Whether a Loop body (or a graph nested in it) has an If node."""
    return body is not None and any(node.op_type == "If" for scope in walk(Scope(body, is_main=False))
                                    for node in scope.graph.node)


def _consumers_everywhere(scope: Scope, value: str) -> list[tuple[Scope, onnx.NodeProto]]:
    """Nodes reading ``value`` in ``scope`` and in its subgraphs (outer-scope reads)."""
    return [(s, n) for s in walk(scope) for n in s.consumers.get(value, [])]


@graph_rule
def data_dependent_shapes(scope: Scope, ctx: Context) -> Iterator[Finding]:
    """data-dependent-shape: NonZero (and NonMaxSuppression) give shapes that depend on the data.

    Facts: requested_ops NonZero: "Data-dependent output shape ([rank, nnz]); runtime output needs
    IOutputAllocator (reallocateOutputAsync/notifyShape) or upper-bound allocation"; "Not CUDA-graph
    capturable in general"; facts file: "NonZero is supported but its output shape depends on the
    data: the runtime needs an IOutputAllocator ... and CUDA-graph capture is lost". Supported, so a
    warning; the data-dependent shape is followed through the graph (Gather with NonZero indices
    inherits it; ScatterND gives its data input's shape) to say whether a network output has it.
    """
    for node in scope.graph.node:
        if node.op_type not in DATA_DEPENDENT_OPS:
            continue
        tainted: list[str] = []
        indexing: list[str] = []  # Gather/Scatter nodes that index with data-dependent values
        frontier = [v for v in node.output if v]
        seen = set(frontier)
        while frontier:
            value = frontier.pop()
            tainted.append(value)
            for owner, consumer in _consumers_everywhere(scope, value):
                if consumer.op_type.startswith(("Gather", "Scatter")) and list(consumer.input[1:2]) == [value]:
                    indexing.append(f"{consumer.op_type} '{owner.node_name(consumer)}'")
                if consumer.op_type in SHAPE_OF_DATA and consumer.input and consumer.input[0] != value:
                    continue  # the output has the data input's shape
                for out in consumer.output:
                    dims = owner.shape(out)
                    if out and out not in seen and not (dims is not None and all(isinstance(d, int) for d in dims)):
                        seen.add(out)
                        frontier.append(out)
        outputs = sorted(set(tainted) & scope.network_outputs)
        yield Finding(
            "data-dependent-shape", WARNING, scope.node_name(node),
            f"{node.op_type} gives '{node.output[0]}' a shape that depends on the data ({len(tainted)} tensor(s) inherit it"
            + (f", including network output(s) {outputs}" if outputs else "")
            + (f"; indexed by {', '.join(sorted(set(indexing))[:3])}" if indexing else "") + "): TensorRT supports it, but the runtime needs an "
            "IOutputAllocator for data-dependent shapes and the engine cannot be captured in a CUDA graph",
            f"for per-sample routing on TensorRT {STAGED_FIX}; otherwise the TensorRT runner must allocate outputs on demand",
        )
