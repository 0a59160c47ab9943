"""The CPU-side TensorRT lint: for each rule a small hand-built graph that breaks it and one that
passes, the version-dependent rules, the ``lint`` command's exit codes, and (slow) every demo
bundle in every form."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from slimdeploy.errors import BadInputError
from slimdeploy.exporters.trt_lint import (
    DEFAULT_TRT_VERSION,
    LintReport,
    lint_model,
    lint_path,
    rule_ids,
)
from slimdeploy.exporters.trt_lint.facts import FACTS_FILE
from tests.conftest import DEMO_EXPORT, REPO, SharedBundles, assert_clean_error, run_cli

F = T.FLOAT


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[np.ndarray | tuple[str, np.ndarray]] = (),
    opset: int = 18,
    functions: Sequence[onnx.FunctionProto] = (),
) -> onnx.ModelProto:
    """A model of ``nodes``; initializers are (name, array) pairs."""
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in initializers]
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    built = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    built.ir_version = 10
    return built


def vi(name: str, elem: int = F, shape: Sequence[int | str] | None = ("batch", 4)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None, domain: str = "", **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), name=name or f"n_{op}", domain=domain, **attrs)


def found(report: LintReport, rule: str, severity: str | None = None) -> list:
    return [f for f in report.findings if f.rule == rule and (severity is None or f.severity == severity)]


def relu_model(opset: int = 18) -> onnx.ModelProto:
    return model([node("Relu", ["x"], ["y"])], [vi("x")], [vi("y")], opset=opset)


# -- API, versions, opset ---------------------------------------------------------------------

def test_default_version_and_clean_graph() -> None:
    report = lint_model(relu_model())
    assert DEFAULT_TRT_VERSION == "10.15" and report.trt_version == "10.15" and report.matrix == "10.15"
    assert report.passed and report.findings == [] and bool(report)
    data = report.to_dict()
    assert data["passed"] is True and data["errors"] == 0 and data["findings"] == []


def test_trt_version_newer_than_matrix_warns() -> None:
    report = lint_model(relu_model(), "11.1")
    [finding] = found(report, "trt-version", "warning")
    assert "10.15" in finding.message and report.passed and report.matrix == "10.15"
    assert not found(lint_model(relu_model(), "10.15"), "trt-version")
    assert lint_model(relu_model(), "10.3").matrix == "10.1"


@pytest.mark.parametrize("version", ["8.6", "12.0", "ten", "10.2"])
def test_versions_outside_range_are_bad_input(version: str) -> None:
    with pytest.raises(BadInputError, match="TensorRT"):
        lint_model(relu_model(), version)


def test_opset_range() -> None:
    [low] = found(lint_model(relu_model(opset=8)), "opset", "error")
    assert "below 9" in low.message
    assert not found(lint_model(relu_model(opset=18)), "opset")
    # 21 is beyond the 10.1 matrix (9-20) but within 10.15's (9-24): for 10.3, not known.
    assert found(lint_model(relu_model(opset=21), "10.3"), "opset", "warning")
    assert not found(lint_model(relu_model(opset=21), "10.15"), "opset")


def test_opset_above_newest_matrix() -> None:
    high = model([node("Relu", ["x"], ["y"])], [vi("x")], [vi("y")], opset=25)
    assert found(lint_model(high, "10.15"), "opset", "error")
    assert found(lint_model(high, "11.1"), "opset", "warning")  # newer than any matrix read


# -- operators ------------------------------------------------------------------------------------

def test_unsupported_op_from_the_matrix() -> None:
    bad = model([node("Compress", ["x", "c"], ["y"], axis=0)], [vi("x"), vi("c", T.BOOL, ["batch"])], [vi("y", F, None)])
    [finding] = found(lint_model(bad), "unsupported-op", "error")
    assert finding.node == "n_Compress" and "Compress" in finding.message and "staged" in finding.fix
    assert not found(lint_model(relu_model()), "unsupported-op")


def test_custom_domain_op_is_unsupported() -> None:
    bad = model([node("FusedConv", ["x"], ["y"], domain="com.microsoft")], [vi("x")], [vi("y", F, None)])
    bad.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    [finding] = found(lint_model(bad), "unsupported-op", "error")
    assert "com.microsoft::FusedConv" in finding.message


def test_op_supported_only_in_newer_matrix_warns_for_older_targets() -> None:
    window = model([node("BlackmanWindow", ["n"], ["y"])], [vi("n", T.INT64, [])], [vi("y", F, None)])
    assert found(lint_model(window, "10.3"), "unsupported-op", "warning")
    assert not found(lint_model(window, "10.15"), "unsupported-op")


def test_local_function_body_is_linted() -> None:
    def fn(body_op: str) -> onnx.FunctionProto:
        return helper.make_function("local", "Block", ["a"], ["b"], [helper.make_node(body_op, ["a"], ["b"])],
                                    [helper.make_opsetid("", 18)])

    call = [node("Block", ["x"], ["y"], domain="local")]
    good = model(call, [vi("x")], [vi("y", F, None)], functions=[fn("Relu")])
    bad = model(call, [vi("x")], [vi("y", F, None)], functions=[fn("Unique")])
    assert lint_model(good).passed
    [finding] = found(lint_model(bad), "unsupported-op", "error")
    assert "function local::Block" in finding.node


def test_op_types() -> None:
    def reduce_over(elem: int) -> onnx.ModelProto:
        return model([node("ReduceMax", ["x"], ["y"], keepdims=0)], [vi("x", elem)], [vi("y", elem, [])])

    [finding] = found(lint_model(reduce_over(T.BOOL)), "op-types", "error")
    assert "BOOL" in finding.message and "ReduceMax" in finding.message
    assert not found(lint_model(reduce_over(T.INT32)), "op-types")
    # NonZero: the doc lists FP32, FP16, the parser also takes BOOL (requested_ops).
    nonzero = model([node("NonZero", ["x"], ["y"])], [vi("x", T.BOOL)], [vi("y", T.INT64, None)])
    assert not found(lint_model(nonzero), "op-types")


def test_uint8_only_at_network_boundary() -> None:
    axes = ("axes", np.array([1], np.int64))
    inside = model([node("Cast", ["x"], ["u"], to=T.UINT8), node("Unsqueeze", ["u", "axes"], ["y"])],
                   [vi("x", T.BOOL, ["batch"])], [vi("y", T.UINT8, ["batch", 1])], [axes])
    [finding] = found(lint_model(inside), "uint8-tensor", "error")
    assert finding.node == "n_Cast" and "'u'" in finding.message
    last = model([node("Unsqueeze", ["x", "axes"], ["b"]), node("Cast", ["b"], ["y"], to=T.UINT8)],
                 [vi("x", T.BOOL, ["batch"])], [vi("y", T.UINT8, ["batch", 1])], [axes])
    assert lint_model(last).findings == []


def test_double_is_a_warning() -> None:
    double = model([node("Cast", ["x"], ["d"], to=T.DOUBLE), node("Cast", ["d"], ["y"], to=F)], [vi("x")], [vi("y")])
    report = lint_model(double)
    assert found(report, "double-tensor", "warning") and report.passed
    assert not found(lint_model(relu_model()), "double-tensor")


def conv(c_in: int, weight: tuple[int, ...], group: int = 1) -> onnx.ModelProto:
    return model([node("Conv", ["x", "w"], ["y"], group=group)], [vi("x", F, ["batch", c_in, 8, 8])],
                 [vi("y", F, None)], [("w", np.ones(weight, np.float32))])


def test_conv_groups() -> None:
    [finding] = found(lint_model(conv(4, (8, 2, 3, 3))), "conv-groups", "error")
    assert "group=1" in finding.message and "4" in finding.message
    assert lint_model(conv(4, (8, 2, 3, 3), group=2)).findings == []
    assert found(lint_model(conv(4, (8, 4, 3, 3, 3, 3))), "conv-groups", "error")  # a 4-D kernel


# -- restrictions the matrix prints ----------------------------------------------------------------

def test_maxpool_indices_and_dilations() -> None:
    x = vi("x", F, ["batch", 2, 8, 8])
    indices = model([node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2])], [x], [vi("y", F, None), vi("i", T.INT64, None)])
    [finding] = found(lint_model(indices), "op-restriction", "error")
    assert "Indices" in finding.message
    dilated = model([node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])], [x], [vi("y", F, None)], opset=19)
    assert found(lint_model(dilated), "op-restriction", "error")
    plain = model([node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])], [x], [vi("y", F, None)])
    assert lint_model(plain).findings == []


def reduce_with_axes(constant: bool) -> onnx.ModelProto:
    x = vi("x", F, ["batch", 4, 3])
    if constant:
        return model([node("ReduceSum", ["x", "axes"], ["y"])], [x], [vi("y", F, None)], [("axes", np.array([1], np.int64))])
    return model([node("ReduceSum", ["x", "axes"], ["y"])], [x, vi("axes", T.INT64, [1])], [vi("y", F, None)])


def test_reduce_axes_must_be_initializer() -> None:
    [finding] = found(lint_model(reduce_with_axes(False)), "op-restriction", "error")
    assert "axes 'axes' is computed" in finding.message and "initializer" in finding.message
    assert lint_model(reduce_with_axes(True)).findings == []


def test_unsqueeze_and_slice_axes_depend_on_version() -> None:
    computed = model([node("Shape", ["x"], ["s"]), node("Slice", ["s", "st", "en"], ["axes"]),
                      node("Unsqueeze", ["x", "axes"], ["y"])],
                     [vi("x", F, [2, 1])], [vi("y", F, None)],
                     [("st", np.array([1], np.int64)), ("en", np.array([2], np.int64))])
    # 10.15: "axes must be resolvable to a constant" (TensorRT may fold it); 10.1: "a constant tensor".
    assert found(lint_model(computed, "10.15"), "op-restriction", "warning")
    assert found(lint_model(computed, "10.3"), "op-restriction", "error")
    # Slice axes: a restriction in the 10.1 matrix only.
    sliced = model([node("Slice", ["x", "st", "en", "ax"], ["y"])], [vi("x", F, [4, 4]), vi("ax", T.INT64, [1])], [vi("y", F, None)],
                   [("st", np.array([0], np.int64)), ("en", np.array([2], np.int64))])
    assert found(lint_model(sliced, "10.3"), "op-restriction", "error")
    assert not found(lint_model(sliced, "10.15"), "op-restriction")


def test_topk_scatternd_dropout_resize() -> None:
    x = vi("x", F, ["batch", 8])
    k = ("k", np.array([3], np.int64))
    assert found(lint_model(model([node("TopK", ["x", "k"], ["v", "i"], sorted=0)], [x], [vi("v", F, None), vi("i", T.INT64, None)], [k])), "op-restriction", "error")
    assert lint_model(model([node("TopK", ["x", "k"], ["v", "i"])], [x], [vi("v", F, None), vi("i", T.INT64, None)], [k])).findings == []

    scatter = [("idx", np.array([[0]], np.int64)), ("upd", np.ones((1, 8), np.float32))]
    added = model([node("ScatterND", ["x", "idx", "upd"], ["y"], reduction="add")], [x], [vi("y", F, None)], scatter)
    assert "reduction='add'" in found(lint_model(added), "op-restriction", "error")[0].message
    plain = model([node("ScatterND", ["x", "idx", "upd"], ["y"])], [x], [vi("y", F, None)], scatter)
    assert lint_model(plain).findings == []

    training = model([node("Dropout", ["x", "r", "t"], ["y"])], [x], [vi("y", F, None)],
                     [("r", np.array(0.5, np.float32)), ("t", np.array(True))])
    assert found(lint_model(training), "op-restriction", "error")
    inference = model([node("Dropout", ["x", "r", "t"], ["y"])], [x], [vi("y", F, None)],
                      [("r", np.array(0.5, np.float32)), ("t", np.array(False))])
    assert lint_model(inference).findings == []

    image = vi("x", F, ["batch", 2, 4, 4])
    scales = [("scales", np.array([1, 1, 2, 2], np.float32))]
    cubic = model([node("Resize", ["x", "", "scales"], ["y"], mode="cubic")], [image], [vi("y", F, None)], scales)
    [finding] = found(lint_model(cubic), "op-restriction", "error")
    assert "mode='cubic'" in finding.message
    linear = model([node("Resize", ["x", "", "scales"], ["y"], mode="linear")], [image], [vi("y", F, None)], scales)
    assert lint_model(linear).findings == []


def test_unchecked_restriction_is_quoted() -> None:
    deform = model([node("DeformConv", ["x", "w", "off"], ["y"])],
                   [vi("x", F, [1, 1, 4, 4]), vi("off", F, [1, 18, 2, 2])], [vi("y", F, None)],
                   [("w", np.ones((1, 1, 3, 3), np.float32))], opset=19)
    [finding] = found(lint_model(deform), "op-restriction", "warning")
    assert "does not check" in finding.message and "spatial dimensions" in finding.message


# -- control flow -------------------------------------------------------------------------------------

def branch(name: str, nodes: Sequence[onnx.NodeProto], out: str, elem: int = F) -> onnx.GraphProto:
    return helper.make_graph(list(nodes), name, [], [helper.make_tensor_value_info(out, elem, None)])


def if_model(cond_nodes: Sequence[onnx.NodeProto], cond_input: onnx.ValueInfoProto | None = None,
             then_nodes: Sequence[onnx.NodeProto] = (), else_nodes: Sequence[onnx.NodeProto] = (),
             then_out: str = "t", else_out: str = "e", initializers: Sequence = ()) -> onnx.ModelProto:
    then_b = branch("then", then_nodes or [node("Relu", ["x"], [then_out])], then_out)
    else_b = branch("else", else_nodes or [node("Neg", ["x"], [else_out])], else_out)
    nodes = [*cond_nodes, node("If", ["cond"], ["y"], name="block1_if", then_branch=then_b, else_branch=else_b)]
    inputs = [vi("x", F, ["batch", 4])] + ([cond_input] if cond_input else [])
    return model(nodes, inputs, [vi("y", F, None)], initializers)


SCALAR_COND = [node("ReduceMax", ["x"], ["m"], keepdims=0), node("Greater", ["m", "zero"], ["cond"])]
ZERO = [("zero", np.array(0.0, np.float32))]


def test_if_condition_must_be_scalar() -> None:
    per_sample = if_model([], vi("cond", T.BOOL, ["batch"]))
    [finding] = found(lint_model(per_sample), "if-condition", "error")
    assert finding.node == "block1_if" and "Failed to convert the input cond to a scalar" in finding.message
    assert "ReduceMax" in finding.fix and "staged" in finding.fix
    assert found(lint_model(if_model([], vi("cond", T.BOOL, [2]))), "if-condition", "error")
    # 0-D, and a static one-element tensor (converted), pass.
    assert not found(lint_model(if_model(SCALAR_COND, initializers=ZERO)), "if-condition")
    assert not found(lint_model(if_model([], vi("cond", T.BOOL, [1]))), "if-condition")


def test_if_with_constant_condition_is_inlined() -> None:
    constant = if_model([], initializers=[("cond", np.array(True))])
    report = lint_model(constant)
    assert report.findings == []  # no if-condition, no if-form warning


def test_if_form_warning() -> None:
    report = lint_model(if_model(SCALAR_COND, initializers=ZERO))
    [finding] = found(report, "if-form", "warning")
    assert "1 If node" in finding.message and "staged" in finding.fix
    assert report.passed


def test_if_branch_ranks_shapes_types_and_names() -> None:
    flat = [node("ReduceMax", ["x"], ["e"], keepdims=0)]  # rank 0 against rank 2
    [rank] = found(lint_model(if_model(SCALAR_COND, then_nodes=[], else_nodes=flat, initializers=ZERO)), "if-branches", "error")
    assert "ranks" in rank.message

    doubled = [node("Concat", ["x", "x"], ["e"], axis=1)]  # [batch, 8] against [batch, 4]
    shape_model = if_model(SCALAR_COND, else_nodes=doubled, initializers=ZERO)
    [shape] = found(lint_model(shape_model), "if-branches", "error")
    assert "IIfConditionalOutputLayer inputs must have the same shape" in shape.message

    same_name = if_model(SCALAR_COND, then_nodes=[node("Relu", ["x"], ["r"])], else_nodes=[node("Neg", ["x"], ["r"])],
                         then_out="r", else_out="r", initializers=ZERO)
    assert "different names" in found(lint_model(same_name), "if-branches", "error")[0].message

    typed = if_model(SCALAR_COND, else_nodes=[node("Cast", ["x"], ["e"], to=T.INT32)], initializers=ZERO)
    else_branch = next(a.g for a in typed.graph.node[-1].attribute if a.name == "else_branch")
    else_branch.output[0].type.tensor_type.elem_type = T.INT32
    assert any("types FLOAT and INT32" in f.message for f in found(lint_model(typed), "if-branches", "error"))

    assert not found(lint_model(if_model(SCALAR_COND, initializers=ZERO)), "if-branches")


def test_if_transpose_resize_on_11_1() -> None:
    image = vi("x", F, ["batch", 2, 4, 4])
    then_b = branch("then", [node("Relu", ["x"], ["t"])], "t")
    else_b = branch("else", [node("Neg", ["x"], ["e"])], "e")
    nodes = [node("ReduceMax", ["x"], ["m"], keepdims=0), node("Greater", ["m", "zero"], ["cond"]),
             node("If", ["cond"], ["y"], name="gate_if", then_branch=then_b, else_branch=else_b),
             node("Transpose", ["y"], ["z"], name="tr", perm=[0, 1, 3, 2]),
             node("Resize", ["z", "", "scales"], ["out"], mode="linear")]
    built = model(nodes, [image], [vi("out", F, None)], [*ZERO, ("scales", np.array([1, 1, 2, 2], np.float32))])
    [finding] = found(lint_model(built, "11.1"), "if-version", "warning")
    assert finding.node == "tr" and "TensorRT#4846" in finding.message
    assert not found(lint_model(built, "10.15"), "if-version")


def loop_model(trip_constant: bool, grow: bool = False, trip: int = 3, condition: bool = False) -> onnx.ModelProto:
    body_nodes = [node("Identity", ["c_in"], ["c_out"])]
    if grow:  # the carried value gains a row every iteration
        body_nodes.append(node("Concat", ["v_in", "v_in"], ["v_out"], axis=0))
    else:
        body_nodes.append(node("Add", ["v_in", "v_in"], ["v_out"]))
    body_nodes.append(node("Identity", ["v_in"], ["scan"]))
    body = helper.make_graph(body_nodes, "body",
                             [vi("i", T.INT64, []), vi("c_in", T.BOOL, []), vi("v_in", F, [1, 4])],
                             [vi("c_out", T.BOOL, []), vi("v_out", F, None), vi("scan", F, None)])
    nodes = [node("Loop", ["trip", "go" if condition else "", "v0"], ["v_final", "scans"], name="loop", body=body)]
    inits = [("v0", np.ones((1, 4), np.float32))]
    inputs = [vi("dummy", F, [1]), *([vi("go", T.BOOL, [])] if condition else [])]
    if trip_constant:
        inits.append(("trip", np.array(trip, np.int64)))
    else:
        inputs.append(vi("trip", T.INT64, []))
    return model(nodes, inputs, [vi("v_final", F, None), vi("scans", F, None)], inits)


def test_loop_scan_length_and_carried_shape() -> None:
    [dynamic] = found(lint_model(loop_model(trip_constant=False)), "loop", "error")
    assert dynamic.node == "loop" and "scan output length" in dynamic.message
    assert lint_model(loop_model(trip_constant=True)).findings == []
    [unbounded] = found(lint_model(loop_model(trip_constant=True, trip=np.iinfo(np.int64).max)), "loop", "error")
    assert "no count limit" in unbounded.message
    [grow] = found(lint_model(loop_model(trip_constant=True, grow=True)), "loop", "error")
    assert "same shape in every iteration" in grow.message
    [condition] = found(lint_model(loop_model(trip_constant=True, condition=True)), "loop", "error")
    assert "run-time condition 'go'" in condition.message and "kWHILE" in condition.message


def stacked_loop_model(rows: int, trip: int, routed: bool = False) -> onnx.ModelProto:
    """A Loop whose body gathers row ``iteration`` of stacked weights ([rows, 4]), as the gated
    ``loop`` form does; ``routed`` puts the Gather in an If branch (as the form's blocks are)."""
    gather = node("Gather", ["stacked", "i"], ["w"], name="pick", axis=0)
    if routed:
        then_branch = helper.make_graph([gather, node("Add", ["v_in", "w"], ["then_v"])], "then", [], [vi("then_v", F, [1, 4])])
        else_branch = helper.make_graph([node("Identity", ["v_in"], ["else_v"])], "else", [], [vi("else_v", F, [1, 4])])
        step = [node("If", ["flag"], ["v_out"], name="route", then_branch=then_branch, else_branch=else_branch)]
    else:
        step = [gather, node("Add", ["v_in", "w"], ["v_out"])]
    body = helper.make_graph([node("Identity", ["c_in"], ["c_out"]), *step, node("Identity", ["v_in"], ["scan"])], "body",
                             [vi("i", T.INT64, []), vi("c_in", T.BOOL, []), vi("v_in", F, [1, 4])],
                             [vi("c_out", T.BOOL, []), vi("v_out", F, [1, 4]), vi("scan", F, None)])
    inits = [("v0", np.ones((1, 4), np.float32)), ("trip", np.array(trip, np.int64)),
             ("stacked", np.ones((rows, 4), np.float32)), ("flag", np.array(True))]
    return model([node("Loop", ["trip", "", "v0"], ["v_final", "scans"], name="loop", body=body)],
                 [vi("dummy", F, [1])], [vi("v_final", F, None), vi("scans", F, None)], inits)


def test_loop_gathers_of_stacked_weights_cover_every_iteration() -> None:
    assert not found(lint_model(stacked_loop_model(rows=3, trip=3)), "loop")
    [short] = found(lint_model(stacked_loop_model(rows=2, trip=3)), "loop", "error")
    assert short.node == "loop/body/pick" and "2 rows" in short.message and "runs 3 times" in short.message
    [nested] = found(lint_model(stacked_loop_model(rows=2, trip=3, routed=True)), "loop", "error")
    assert nested.node == "loop/body/route/then_branch/pick"


def test_loop_that_routes_with_if_gets_the_loop_form_warning() -> None:
    assert not found(lint_model(stacked_loop_model(rows=3, trip=3)), "loop-form")
    [warning] = found(lint_model(stacked_loop_model(rows=3, trip=3, routed=True)), "loop-form", "warning")
    assert warning.node == "loop" and "IIfConditional" in warning.message and "staged" in warning.fix


def test_data_dependent_shape_is_a_warning_naming_outputs() -> None:
    axes = ("axes", np.array([0], np.int64))
    gathered = model([node("Greater", ["x", "zero"], ["m"]), node("NonZero", ["m"], ["nz"], name="rows"),
                      node("Squeeze", ["nz", "axes"], ["idx"]), node("Gather", ["x", "idx"], ["y"], axis=0)],
                     [vi("x", F, ["batch"])], [vi("y", F, None)], [*ZERO, axes])
    report = lint_model(gathered)
    [finding] = found(report, "data-dependent-shape", "warning")
    assert finding.node == "rows" and "IOutputAllocator" in finding.message and "['y']" in finding.message
    assert "indexed by Gather 'n_Gather'" in finding.message
    assert report.passed
    # Scattered back over the full tensor: the output shape no longer depends on the data.
    scattered = model([node("Greater", ["x", "zero"], ["m"]), node("NonZero", ["m"], ["nz"], name="rows"),
                       node("Transpose", ["nz"], ["idx"], perm=[1, 0]), node("Squeeze", ["nz", "axes"], ["flat"]),
                       node("Gather", ["x", "flat"], ["picked"], axis=0), node("ScatterND", ["x", "idx", "picked"], ["y"])],
                      [vi("x", F, ["batch"])], [vi("y", F, ["batch"])], [*ZERO, axes])
    [finding] = found(lint_model(scattered), "data-dependent-shape", "warning")
    assert "network output" not in finding.message
    assert not found(lint_model(relu_model()), "data-dependent-shape")


# -- quantization -------------------------------------------------------------------------------------

def qdq(zero: np.ndarray | None, scale: float = 0.1) -> onnx.ModelProto:
    zero_inputs = ["zp"] if zero is not None else []
    inits = [("s", np.array(scale, np.float32))] + ([("zp", zero)] if zero is not None else [])
    x = vi("x", F, ["batch", 4])
    nodes = [node("QuantizeLinear", ["x", "s", *zero_inputs], ["q"]), node("DequantizeLinear", ["q", "s", *zero_inputs], ["y"])]
    return model(nodes, [x], [vi("y", F, None)], inits)


def test_qdq_symmetric_int8_passes() -> None:
    assert lint_model(qdq(np.array(0, np.int8))).findings == []


def test_qdq_zero_point_rules() -> None:
    unsigned = lint_model(qdq(np.array(0, np.uint8)))
    assert any("UINT8" in f.message for f in found(unsigned, "qdq-zero-point", "error"))
    shifted = lint_model(qdq(np.array(3, np.int8)))
    assert any("symmetric" in f.message for f in found(shifted, "qdq-zero-point", "error"))
    missing = lint_model(qdq(None))  # ONNX: no zero point → UINT8 output
    assert any("produces UINT8" in f.message for f in found(missing, "qdq-zero-point", "error"))


def test_qdq_scale_rules() -> None:
    negative = lint_model(qdq(np.array(0, np.int8), scale=-0.1))
    assert found(negative, "qdq-scale", "error")
    computed = model([node("Abs", ["x"], ["s"]), node("ReduceMax", ["s"], ["sm"], keepdims=0),
                      node("QuantizeLinear", ["x", "sm", "zp"], ["q"]), node("DequantizeLinear", ["q", "sm", "zp"], ["y"])],
                     [vi("x", F, ["batch", 4])], [vi("y", F, None)], [("zp", np.array(0, np.int8))])
    assert any("not a constant" in f.message for f in found(lint_model(computed), "qdq-scale", "error"))
    # Per-channel weights: fine when the scale count matches the axis.
    weight = [("w", np.ones((3, 2), np.int8)), ("ws", np.full(3, 0.1, np.float32)), ("wz", np.zeros(3, np.int8))]
    per_channel = model([node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0), node("MatMul", ["x", "wf"], ["y"])],
                        [vi("x", F, ["batch", 3])], [vi("y", F, None)], weight)
    assert lint_model(per_channel).findings == []
    wrong_axis = model([node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=1), node("MatMul", ["x", "wf"], ["y"])],
                       [vi("x", F, ["batch", 3])], [vi("y", F, None)], weight)
    assert any("per-channel" in f.message for f in found(lint_model(wrong_axis), "qdq-scale", "error"))


def test_int8_only_between_q_and_dq() -> None:
    leaking = model([node("QuantizeLinear", ["x", "s", "zp"], ["q"]), node("Relu", ["q"], ["r"]),
                     node("DequantizeLinear", ["r", "s", "zp"], ["y"])],
                    [vi("x", F, ["batch", 4])], [vi("y", F, None)], [("s", np.array(0.1, np.float32)), ("zp", np.array(0, np.int8))])
    [finding] = found(lint_model(leaking), "int8-outside-qdq", "error")
    assert finding.node == "n_Relu"
    uint8_weights = model([node("DequantizeLinear", ["w", "s", "zp"], ["y"])], [], [vi("y", F, None)],
                          [("w", np.ones(4, np.uint8)), ("s", np.array(0.1, np.float32)), ("zp", np.array(0, np.uint8))])
    assert found(lint_model(uint8_weights), "qdq-type", "error")


def test_every_rule_is_documented() -> None:
    docs = (REPO / "docs" / "trt-lint.md").read_text()
    ids = {"trt-version", "opset", "unsupported-op", "op-types", "uint8-tensor", "double-tensor", "conv-groups",
           "op-restriction", "if-condition", "if-branches", "if-form", "if-version", "loop", "loop-form", "data-dependent-shape",
           "qdq-zero-point", "qdq-type", "qdq-scale", "int8-outside-qdq", "shape-inference"}
    for rule in ids:
        assert f"`{rule}`" in docs, rule
    assert len(rule_ids()) == 19  # a new rule needs a test and a docs entry


def test_packaged_facts_are_the_documented_ones() -> None:
    """docs/tensorrt-facts.md says where ``trt_ops.json`` comes from and pins its SHA-256: a change
    to the facts the lint applies comes with a change to the document that accounts for them."""
    docs = (REPO / "docs" / "tensorrt-facts.md").read_text()
    assert f"`{hashlib.sha256(FACTS_FILE.read_bytes()).hexdigest()}`" in docs
    meta = json.loads(FACTS_FILE.read_text())["_meta"]
    assert f"TensorRT {meta['primary_source']['header']['trt_version']}" in docs


# -- lint_path and the command line ----------------------------------------------------------------

def test_lint_path_file_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(relu_model(), str(path))
    report = lint_path(path)
    assert report.passed and report.target == str(path) and report.graphs == ["m"]
    with pytest.raises(BadInputError, match="does not exist"):
        lint_path(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(BadInputError, match="cannot read"):
        lint_path(tmp_path / "junk.onnx")


@pytest.mark.slow
def test_cli_exit_codes(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(relu_model(), str(good))
    onnx.save(if_model([], vi("cond", T.BOOL, ["batch"])), str(bad))
    result = run_cli("lint", str(good))
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout

    result = run_cli("lint", str(bad), "--json", str(tmp_path / "r.json"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "if-condition" in result.stdout and "block1_if" in result.stdout and "FAILED" in result.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False and data["findings"][0]["rule"] in ("if-condition", "if-form")

    result = run_cli("lint", str(bad), "--json", "-")
    assert result.returncode == 1 and json.loads(result.stdout)["errors"] >= 1

    assert_clean_error(run_cli("lint", str(tmp_path / "nope.onnx")), 2, "does not exist")
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    assert_clean_error(run_cli("lint", str(tmp_path / "junk.onnx")), 2, "cannot read")
    assert_clean_error(run_cli("lint", str(good), "--trt-version", "8.6"), 2, "10.3")
    result = run_cli("lint", str(good), "--trt-version", "11.1", "--json", "-")
    assert result.returncode == 0 and json.loads(result.stdout)["warnings"] == 1


def test_cli_lints_without_torch(tmp_path: Path) -> None:
    from tests.test_no_torch import BLOCKER

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = tmp_path / "m.onnx"
    onnx.save(relu_model(), str(path))
    result = run_cli("lint", str(path), env={"PYTHONPATH": f"{site}:{REPO}"})
    assert result.returncode == 0, result.stderr


# -- the demo bundles ------------------------------------------------------------------------------------

DEMOS = [
    ("spconv_resnet20_digits", None),
    ("mobilenet_v1_digits", None),
    ("condensenet_digits", None),
    ("skipnet38_digits", "staged"),
    ("skipnet38_digits", "if"),
    ("skipnet38_digits", "compact"),
    ("skipnet38_digits", "loop"),
]


@pytest.fixture(scope="module")
def demo_bundles(shared_bundles: SharedBundles, exported_bundle: Path) -> dict[tuple[str, str | None], Path]:
    """Every demo model's bundle, in each form for the gated one (shared with other test files)."""
    bundles: dict[tuple[str, str | None], Path] = {("spconv_resnet20_digits", None): exported_bundle}  # the session's
    for name, form in DEMOS:
        if (name, form) not in bundles:
            forms = {"dynamic": form} if form else {}
            bundles[(name, form)] = shared_bundles.get(name, **forms, **DEMO_EXPORT)
    return bundles


@pytest.mark.slow
@pytest.mark.parametrize(("name", "form"), DEMOS, ids=[f"{n}-{f or 'static'}" for n, f in DEMOS])
def test_demo_bundles(demo_bundles: dict, name: str, form: str | None) -> None:
    report = lint_path(demo_bundles[(name, form)])
    rules = {f.rule for f in report.findings}
    assert report.passed, [f.to_dict() for f in report.errors]
    if form == "staged":
        assert len(report.graphs) > 10 and report.findings == []  # every stage linted, all clean
    elif form == "if":
        assert rules == {"if-form"}  # the documented warning only
    elif form == "loop":
        # The documented warnings only: trip counts, carried shapes and stacked rows check clean.
        assert rules == {"if-form", "loop-form"}
    elif form == "compact":
        # Flagged per the facts: NonZero needs an IOutputAllocator and rules out CUDA graphs.
        assert rules == {"data-dependent-shape"}
        assert all("staged" in f.fix for f in report.findings)
        # One per gated block, all saying the same: read as one group with its count.
        assert [(g.rule, g.count) for g in report.groups()] == [("data-dependent-shape", len(report.findings))]
    else:
        assert report.findings == []
    # The same holds for the oldest target, where the 10.1 matrix applies; a target newer than
    # the matrices read adds one version warning per bundle (not one per stage).
    assert lint_path(demo_bundles[(name, form)], "10.3").passed
    newer = lint_path(demo_bundles[(name, form)], "11.1")
    assert newer.passed and len(found(newer, "trt-version")) == 1
