"""Empirical bias correction of QDQ INT8 graphs (``calibration.bias_correction``) on the trained
SPConv ResNet-20 demo: corrected on the digits calibration split, judged on held-out digits.
The corrected graph keeps its structure and its target's form, moves only the biases, and its
layers' mean per-channel output error against FP32 drops in both INT8 forms. Also TensorRT's
Q/DQ placement, and the S2D early-exit demo's TensorRT INT8 bundle passing check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli
from onnx import TensorProto, helper, numpy_helper

from slimdeploy.calibration import (
    CONV_OPS,
    collect_ranges,
    load_calibration,
    qdq_violations,
    quantize_int8,
)
from slimdeploy.calibration.bias_correction import correct_biases
from slimdeploy.data import digits_inputs


@pytest.fixture(scope="module")
def setup(exported_bundle: Path) -> dict:
    """The FP32 demo graph, its calibration images and ranges, held-out digits."""
    manifest = json.loads((exported_bundle / "manifest.json").read_text())
    prep = manifest["preprocessing"]
    size, mean, std = tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"])
    model = onnx.load(exported_bundle / "model.onnx")
    calib = load_calibration("digits", size, mean, std, size=100).inputs
    heldout, _ = digits_inputs("heldout", size, mean, std, count=100)
    return {"model": model, "calib": calib, "heldout": heldout, "ranges": collect_ranges(model, [{"input": calib}], "MinMax")}


def _run(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """``names`` of ``model`` on ``x`` (exposed as outputs where they are not)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {out.name for out in exposed.graph.output}
    exposed.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in present)
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {"input": x})))


def quantized_layers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The quantized weighted layers of a QDQ graph, found from the graph itself: the Conv and
    Gemm nodes whose weights come through a DequantizeLinear."""
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    return {node.name: node for node in model.graph.node
            if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 and producer.get(node.input[1]) == "DequantizeLinear"}


def _channel_error(fp32: dict[str, np.ndarray], quantized: dict[str, np.ndarray]) -> float:
    """Mean over layers and channels of |mean output error| per channel."""
    errors = [np.abs((quantized[n] - fp32[n]).mean(axis=tuple(a for a in range(fp32[n].ndim) if a != 1))).mean() for n in fp32]
    return float(np.mean(errors))


@pytest.mark.parametrize("target", ["trt", "ort"])
@pytest.mark.slow
def test_bias_correction_reduces_the_per_channel_error(setup: dict, target: str) -> None:
    model, calib, heldout = setup["model"], setup["calib"], setup["heldout"]
    quantized = quantize_int8(model, setup["ranges"], target=target)
    result = correct_biases(model, quantized, {"input": calib})
    corrected = result.model
    # Every quantized layer is corrected, or left alone only for want of a bias in the U8S8 form
    # (an INT32 bias would have to be made; the S8S8 form gives bias-less layers an FP32 one).
    weighted = quantized_layers(quantized)
    assert len(weighted) > 20 and set(result.layers) | set(result.skipped) == set(weighted)
    assert result.layers and not set(result.layers) & set(result.skipped)
    for name, why in result.skipped.items():
        assert target == "ort" and (len(weighted[name].input) < 3 or not weighted[name].input[2]), (name, why)
    layers = {node.name: node for node in corrected.graph.node}
    fp32_names = {out for node in model.graph.node for out in node.output}
    outputs = [layers[name].output[0] for name in result.layers if layers[name].output[0] in fp32_names]

    # Only bias initializers changed: same nodes, same weights and scales, same form.
    assert [n.op_type for n in corrected.graph.node] == [n.op_type for n in quantized.graph.node]
    before = {init.name: numpy_helper.to_array(init) for init in quantized.graph.initializer}
    after = {init.name: numpy_helper.to_array(init) for init in corrected.graph.initializer}
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed and all("bias" in name for name in changed), sorted(changed)[:5]
    assert all(after[name].dtype == before[name].dtype for name in changed)  # FP32 (S8S8) or INT32 (U8S8)
    if target == "trt":
        assert qdq_violations(corrected) == []

    # On the calibration images (what it measured) and on held-out digits (never seen).
    assert np.mean(list(result.error_after.values())) < 0.5 * np.mean(list(result.error_before.values()))
    fp32 = _run(model, heldout, [*outputs, "logits"])
    plain = _run(quantized, heldout, [*outputs, "logits"])
    fixed = _run(corrected, heldout, [*outputs, "logits"])
    layer_fp32 = {n: fp32[n] for n in outputs}
    assert _channel_error(layer_fp32, fixed) < 0.7 * _channel_error(layer_fp32, plain)
    assert np.abs(fixed["logits"] - fp32["logits"]).mean() < np.abs(plain["logits"] - fp32["logits"]).mean()


def test_graph_without_quantized_layers_is_unchanged(setup: dict) -> None:
    model = setup["model"]
    result = correct_biases(model, model, {"input": setup["calib"][:8]})
    assert not result.layers and result.model.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("target", ["trt", "ort"])
def test_conv_placement_puts_qdq_only_where_layers_read_in_the_trt_form(setup: dict, target: str) -> None:
    """``op_types=CONV_OPS``: TensorRT's placement rounds what a weighted layer reads and nothing
    it writes; the ONNX Runtime form also rounds the outputs (what QLinearConv fusion needs)."""
    model = setup["model"]
    quantized = quantize_int8(model, setup["ranges"], target=target, op_types=CONV_OPS)
    producer = {out: node.op_type for node in quantized.graph.node for out in node.output}
    rounded = [producer.get(node.input[0], "input") for node in quantized.graph.node if node.op_type == "QuantizeLinear"]
    readers = {name for node in quantized.graph.node if node.op_type == "Conv" for name in node.input}
    assert sum(node.op_type == "DequantizeLinear" and node.output[0] in readers for node in quantized.graph.node) > 40
    assert ("Conv" in rounded) == (target == "ort") and "Add" not in rounded
    if target == "trt":
        assert qdq_violations(quantized) == []


@pytest.mark.slow
def test_s2d_trt_int8_export_passes_check(tmp_path: Path) -> None:
    """The S2D early-exit demo in the TensorRT INT8 form (S8S8): exit decisions flip at the
    0.994 threshold for 5 % of the parity samples with the former defaults (full placement, no
    correction). With TensorRT's placement and bias correction (every stage's quantized layers)
    the export passes its own parity check, then ``check`` and ``lint`` from the bundle."""
    bundle = tmp_path / "s2d-trt-int8"
    result = run_cli("export", "zoo:s2d_resnet20_digits", "--target", "trt", "--precision", "int8",
                     "--calib", "digits", "--prepare-only", "--out", str(bundle))
    assert result.returncode == 0, result.stdout + result.stderr
    stages = {stage: onnx.load(bundle / "stages" / f"{stage}.onnx") for stage in ("stage0", "stage1", "stage2")}
    layers = sum(len(quantized_layers(model)) for model in stages.values())
    calibration = json.loads((bundle / "manifest.json").read_text())["calibration"]
    assert calibration["method_choice"]["chosen"].endswith("Q/DQ on Conv/Gemm/MatMul only")
    assert calibration["placement"] == "inputs of Conv/Gemm/MatMul"
    correction = calibration["bias_correction"]
    # Every quantized layer of every stage (the exit heads stay FP32), none skipped.
    assert correction["applied"] and correction["layers"] == layers > 0 and correction["skipped"] == 0
    assert correction["mean_channel_error_after"] < 0.1 * correction["mean_channel_error_before"]
    for model in stages.values():
        assert qdq_violations(model) == []
    report = json.loads((bundle / "report.json").read_text())
    assert report["passed"] and min(entry["agreement"] for entry in report["decisions"]["exit_stage"]) >= 0.98
    check = run_cli("check", str(bundle))
    assert check.returncode == 0, check.stdout + check.stderr
    lint = run_cli("lint", str(bundle))
    assert lint.returncode == 0, lint.stdout + lint.stderr
