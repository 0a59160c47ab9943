"""INT8 and FP16 graphs (docs/design.md §6) on a small hand-built graph: the ONNX Runtime form
(U8S8) and the TensorRT form (S8S8, zero points 0, per-channel weights on axis 0), ranges
reused without recalibrating, decision heads kept FP32, FP16 parity in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimdeploy.calibration import (
    CalibrationRecord,
    DecisionScope,
    apply_precision,
    collect_ranges,
    convert_fp16,
    decision_nodes,
    qdq_violations,
    quantize_int8,
)
from slimdeploy.errors import BadInputError

CHANNELS = 8


def _gated_model() -> onnx.ModelProto:
    """input [N,3,8,8] -> conv1 -> relu -> x1; a gate head ``gate0/`` on x1 -> gate_probs;
    conv2 on x1 -> pool -> fc -> logits. Names follow the composed forms' prefixes."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.standard_normal((CHANNELS, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(CHANNELS).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) * 0.2, "w2"),
        numpy_helper.from_array(rng.standard_normal((10, CHANNELS)).astype(np.float32), "fc"),
        numpy_helper.from_array(rng.standard_normal((1, CHANNELS)).astype(np.float32), "gate_fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="stem/conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["x1"], name="stem/relu1"),
        helper.make_node("GlobalAveragePool", ["x1"], ["gp"], name="gate0/pool"),
        helper.make_node("Flatten", ["gp"], ["gf"], name="gate0/flatten"),
        helper.make_node("Gemm", ["gf", "gate_fc"], ["gl"], name="gate0/fc", transB=1),
        helper.make_node("Sigmoid", ["gl"], ["gate_probs"], name="gate0/sigmoid"),
        helper.make_node("Conv", ["x1", "w2"], ["c2"], name="exec1/conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["x2"], name="exec1/relu2"),
        helper.make_node("GlobalAveragePool", ["x2"], ["p"], name="head/pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="head/flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="head/fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "gated", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
         helper.make_tensor_value_info("gate_probs", TensorProto.FLOAT, ["batch", 1])], init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return _gated_model()


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((64, 3, 8, 8)).astype(np.float32), rng.standard_normal((32, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def ranges(model: onnx.ModelProto, data: tuple[np.ndarray, np.ndarray]) -> dict[str, tuple[float, float]]:
    return collect_ranges(model, [{"input": data[0]}])


def _run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _qdq(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op]


def _weight_dq(model: onnx.ModelProto, weight: str) -> onnx.NodeProto:
    return next(n for n in _qdq(model, "DequantizeLinear") if n.output[0].startswith(weight) or n.input[0].startswith(weight))


def test_ort_form_is_u8_activations_and_s8_per_channel_weights(model: onnx.ModelProto, ranges: dict, data: tuple) -> None:
    qdq = quantize_int8(model, ranges, target="ort", exclude=decision_nodes(model))
    consts = _consts(qdq)
    activation_zero_points = [consts[n.input[2]] for n in _qdq(qdq, "QuantizeLinear")]
    assert activation_zero_points and all(z.dtype == np.uint8 for z in activation_zero_points)
    for weight in ("w1", "w2"):
        dq = _weight_dq(qdq, weight)
        assert consts[dq.input[0]].dtype == np.int8
        assert consts[dq.input[1]].shape == (CHANNELS,)  # one scale per output channel
        assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
        assert not consts[dq.input[2]].any()  # symmetric weights
    # Biases are INT32 here (ONNX Runtime fuses them into QLinearConv): not TensorRT's form.
    assert any("INT32" in problem for problem in qdq_violations(qdq))
    fp32, int8 = _run(model, data[1]), _run(qdq, data[1])
    assert np.abs(int8["logits"] - fp32["logits"]).max() < 0.1 * np.abs(fp32["logits"]).max()


def test_trt_form_is_symmetric_s8_with_zero_points_0(model: onnx.ModelProto, ranges: dict, data: tuple) -> None:
    qdq = quantize_int8(model, ranges, target="trt", exclude=decision_nodes(model))
    assert qdq_violations(qdq) == []
    consts = _consts(qdq)
    for node in _qdq(qdq, "QuantizeLinear") + _qdq(qdq, "DequantizeLinear"):
        zero = consts[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name
        assert (consts[node.input[1]] > 0).all()
    dq = _weight_dq(qdq, "w2")
    assert consts[dq.input[1]].shape == (CHANNELS,) and {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
    # Biases stay FP32 (TensorRT dequantizes INT8 only).
    assert "b1" in consts and consts["b1"].dtype == np.float32
    # Symmetric activations: scale = max(|min|, |max|) / 127 from the stored range.
    x1_q = next(n for n in _qdq(qdq, "QuantizeLinear") if n.input[0] == "x1")
    low, high = ranges["x1"]
    assert float(consts[x1_q.input[1]]) == pytest.approx(max(abs(low), abs(high)) / 127, rel=1e-6)
    fp32, int8 = _run(model, data[1]), _run(qdq, data[1])
    assert np.abs(int8["logits"] - fp32["logits"]).max() < 0.1 * np.abs(fp32["logits"]).max()


def test_stored_ranges_give_identical_scales_without_recalibrating(model: onnx.ModelProto, ranges: dict, tmp_path) -> None:
    record = CalibrationRecord("MinMax", {"model": ranges}, {"source": "test", "size": 64, "synthetic": False})
    record.save(tmp_path / "calibration.json")
    reloaded = CalibrationRecord.load(tmp_path / "calibration.json").graphs["model"]
    for target in ("ort", "trt"):
        first = _consts(quantize_int8(model, ranges, target=target))
        again = _consts(quantize_int8(model, reloaded, target=target))
        assert first.keys() == again.keys()
        for name in first:
            np.testing.assert_array_equal(first[name], again[name], err_msg=name)
    # Through apply_precision: a record is used as is (no calibration data needed).
    result = apply_precision({"model": model}, "int8", target="trt", calibration=CalibrationRecord.load(tmp_path))
    assert result.record.graphs == record.graphs and qdq_violations(result.graphs["model"]) == []


def test_decision_heads_stay_fp32_unless_asked(model: onnx.ModelProto, ranges: dict) -> None:
    heads = decision_nodes(model)
    assert set(heads) == {"gate0/pool", "gate0/flatten", "gate0/fc", "gate0/sigmoid"}
    qdq = quantize_int8(model, ranges, target="ort", exclude=heads)
    producers = {out: node for node in qdq.graph.node for out in node.output}
    for node in qdq.graph.node:
        if node.name in heads:
            # The head reads FP32 values: no DequantizeLinear feeds it, nothing quantizes its output.
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input), node.name
    assert "x1" in {i for n in qdq.graph.node if n.name == "gate0/pool" for i in n.input}
    assert not any(n.input[0] in ("gl", "gate_probs", "gf") for n in _qdq(qdq, "QuantizeLinear"))
    # --quantize-decisions: the gate's Gemm reads dequantized INT8 too.
    everything = quantize_int8(model, ranges, target="ort", exclude=[])
    gate_fc = next(n for n in everything.graph.node if n.name == "gate0/fc")
    producers = {out: node for node in everything.graph.node for out in node.output}
    assert producers[gate_fc.input[0]].op_type == "DequantizeLinear"


def test_decision_scope_takes_patterns_and_outputs(model: onnx.ModelProto) -> None:
    assert decision_nodes(model, patterns=(), outputs=()) == []
    # By output only: the nodes whose results flow only into gate_probs.
    by_output = decision_nodes(model, patterns=(), outputs=("gate_probs",))
    assert set(by_output) == {"gate0/pool", "gate0/flatten", "gate0/fc", "gate0/sigmoid"}
    scope = DecisionScope(patterns=("exit*",), outputs=())
    assert scope.nodes(model) == [] and scope.is_decision_piece("exit2") and not scope.is_decision_piece("exec2")


def test_fp16_keeps_heads_and_io_fp32(model: onnx.ModelProto, data: tuple) -> None:
    half = convert_fp16(model, keep=decision_nodes(model))
    onnx.checker.check_model(half, full_check=True)
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [TensorProto.FLOAT]
    weights = {init.name: init.data_type for init in half.graph.initializer}
    assert weights["w2"] == TensorProto.FLOAT16 and weights["gate_fc"] == TensorProto.FLOAT
    fp32, fp16 = _run(model, data[1]), _run(half, data[1])
    np.testing.assert_allclose(fp16["logits"], fp32["logits"], atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(fp16["gate_probs"], fp32["gate_probs"], atol=1e-3)


def test_int8_refuses_if_and_needs_data(model: onnx.ModelProto) -> None:
    # The gated blocks of 'if' and 'loop' sit in subgraphs, which neither converter reaches.
    for form, subgraphs in (("if", "If branches"), ("loop", "Loop bodies")):
        with pytest.raises(BadInputError, match=f"int8 cannot calibrate the '{form}' form.*{subgraphs}.*compact, staged or mask"):
            apply_precision({"model": model}, "int8", form=form)
        with pytest.raises(BadInputError, match=f"fp16 does not convert the '{form}' form yet \\(its {subgraphs}"):
            apply_precision({"model": model}, "fp16", form=form)
    with pytest.raises(BadInputError, match="needs calibration data"):
        apply_precision({"model": model}, "int8")
    with pytest.raises(BadInputError, match="unknown precision"):
        apply_precision({"model": model}, "int4")
    with pytest.raises(BadInputError, match="no INT8 form"):
        quantize_int8(model, {}, target="tflite")
    with pytest.raises(BadInputError, match="same model and dynamic form"):
        apply_precision({"stem": model}, "int8", form="staged", calibration=CalibrationRecord("MinMax", {"model": {}}))
    with pytest.raises(BadInputError, match="name none of this graph"):
        quantize_int8(model, {"other": (0.0, 1.0)})


def test_tensors_without_a_range_keep_their_nodes_fp32(model: onnx.ModelProto, ranges: dict) -> None:
    """What a compacted block no calibration sample executed looks like: (inf, -inf) or no
    range at all. Its nodes stay FP32 rather than being quantized with a made-up range."""
    partial = {**{name: value for name, value in ranges.items() if name != "x2"}, "c2": (np.inf, -np.inf)}
    from slimdeploy.calibration.int8 import unranged_nodes

    assert unranged_nodes(model, partial) == ["exec1/conv2", "exec1/relu2", "head/pool"]
    qdq = quantize_int8(model, partial, target="trt")
    producers = {out: node for node in qdq.graph.node for out in node.output}
    conv2 = next(n for n in qdq.graph.node if n.name == "exec1/conv2")
    assert conv2.input[1] == "w2"  # FP32 weight, no DequantizeLinear
    assert producers["c2"].op_type == "Conv" and not any(n.input[0] == "c2" for n in _qdq(qdq, "QuantizeLinear"))
    assert qdq_violations(qdq) == []


def test_exit_head_classifier_and_confidence_stay_fp32() -> None:
    """An exit stage decides from its own logits: the classifier, softmax and max are the head."""
    from onnx import TensorProto, helper, numpy_helper

    from slimdeploy.calibration.decisions import decision_nodes

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Relu", ["x"], ["features"], name="body_relu"),
        helper.make_node("Gemm", ["features", "w"], ["logits"], name="head_linear"),
        helper.make_node("Softmax", ["logits"], ["softmax"], name="head_softmax"),
        helper.make_node("ReduceMax", ["softmax"], ["confidence"], name="head_max", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "stage0", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("logits", "confidence", "features")],
        [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")])
    chosen = decision_nodes(helper.make_model(graph))
    assert chosen == ["head_linear", "head_softmax", "head_max"]
    # Without a confidence output (a gated or static graph) the logits classifier is not a head.
    graph.output.remove(graph.output[1])
    assert decision_nodes(helper.make_model(graph)) == []


def test_the_last_exit_stage_keeps_only_its_classifier_fp32() -> None:
    """In the last stage of an early-exit network every feature flows only into the logits: the
    head is the classifier back to its pooling, not the backbone behind it."""
    from onnx import TensorProto, helper, numpy_helper

    from slimdeploy.calibration.decisions import classifier_nodes, decision_nodes

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["c"], name="body_conv"),
        helper.make_node("Relu", ["c"], ["r"], name="body_relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="head_pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="head_flatten"),
        helper.make_node("Gemm", ["f", "w"], ["logits"], name="head_linear"),
        helper.make_node("Softmax", ["logits"], ["softmax"], name="head_softmax"),
        helper.make_node("ReduceMax", ["softmax"], ["confidence"], name="head_max", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "stage2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 4, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("logits", "confidence")],
        [numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(np.float32), "k"),
         numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "w")])
    model = helper.make_model(graph)
    assert classifier_nodes(list(model.graph.node), "logits") == {"head_pool", "head_flatten", "head_linear"}
    assert decision_nodes(model) == ["head_pool", "head_flatten", "head_linear", "head_softmax", "head_max"]
