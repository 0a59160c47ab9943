"""Never slower without saying so: an INT8 export times its graph against FP32 on this CPU,
records the ratio in the manifest, and warns (naming the costliest layers from ONNX Runtime's
profile) when INT8 is slower. No timing bound is asserted anywhere: the slower path is forced
by replacing the timing with a fixed ratio, and the real timing is checked for its fields and
for consistency with itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import run_cli

from slimdeploy.calibration import speed
from slimdeploy.engines.base import TensorMeta
from slimdeploy.engines.ort_profile import LayerNamer, compare_layers, layer_times
from slimdeploy.engines.ort_runner import OrtRunner
from slimdeploy.errors import SlimDeployError
from slimdeploy.exporters.forms import ExportedGraphs

SMALL = {"samples": 40, "batch_sizes": (8,), "calib_size": 40}
MODEL = "mobilenet_v1_digits"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """FP32 and INT8 bundles of the MobileNet demo, and the INT8 export's result."""
    from slimdeploy.export import export
    from slimdeploy.zoo import zoo_checkpoint_path

    root = tmp_path_factory.mktemp("speed")
    checkpoint = zoo_checkpoint_path(MODEL)
    fp32 = export(checkpoint, root / "fp32", samples=40, batch_sizes=(8,))
    int8 = export(checkpoint, root / "int8", precision="int8", calib="digits", **SMALL)
    assert fp32.passed and int8.passed
    return {"fp32": root / "fp32", "int8": root / "int8", "result": int8}


def _graphs(bundle: Path) -> ExportedGraphs:
    meta = TensorMeta("input", np.dtype(np.float32), ("batch", 3, 32, 32))
    return ExportedGraphs({"model": onnx.load(bundle / "model.onnx")}, None, None, meta, {}, 18)


def _images(count: int) -> np.ndarray:
    from slimdeploy.data import digits_inputs, digits_statistics

    mean, std = digits_statistics()
    return digits_inputs("calib", (3, 32, 32), mean, std, count=count)[0]


def _weights(bundle: Path) -> set[str]:
    return {init.name.removesuffix(".weight") for init in onnx.load(bundle / "model.onnx").graph.initializer if init.name.endswith(".weight")}


def _forced(speedups: dict[int, float]):
    """A stand-in for the timing of one batch size that reports ``speedups[batch]``."""
    def time_batch(runners: dict[str, Any], feeds: list[dict[str, np.ndarray]], precision: str, budget_s: float) -> dict[str, Any]:
        batch = len(feeds[0]["input"])
        return {"batch": batch, "calls_per_round": 1, "rounds": 1, "fp32_ms": 1.0,
                "reduced_ms": 1.0 / speedups[batch], "speedup": speedups[batch]}
    return time_batch


@pytest.mark.slow
def test_int8_export_records_its_measured_speed_against_fp32(bundles: dict[str, Any]) -> None:
    manifest = json.loads((bundles["int8"] / "manifest.json").read_text())
    info = manifest["calibration"]["speed_vs_fp32"]
    assert info["measured"] is True and info["precision"] == "int8" and info["device"] == "cpu"
    assert info["runtime"].startswith("onnxruntime ") and info["threads"] == 0 and info["cores"] >= 1
    assert info["inputs"] == "calibration inputs (digits:calib[:40])"
    assert [row["batch"] for row in info["batches"]] == [1, 32]
    for row in info["batches"]:
        assert row["fp32_ms"] > 0 and row["reduced_ms"] > 0 and row["calls_per_round"] >= 1 and row["rounds"] == speed.ROUNDS
        assert row["speedup"] == pytest.approx(row["fp32_ms"] / row["reduced_ms"], rel=2e-3)
    # Whatever this machine measured, the verdict follows from it and a slower graph is said.
    slower = any(row["speedup"] < 1 for row in info["batches"])
    assert info["slower"] is slower
    warnings = bundles["result"].warnings
    if slower:
        assert warnings == [info["warning"]] and "INT8 is slower than FP32 on this CPU" in warnings[0]
        assert info["profile"]["layers"] and info["profile"]["batch"] in (1, 32)
    else:
        assert warnings == [] and "warning" not in info and "profile" not in info


@pytest.mark.slow
def test_a_slower_int8_graph_is_warned_about_naming_its_costliest_layers(bundles: dict[str, Any],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speed, "_time_batch", _forced({1: 1.25, 32: 0.5}))
    check = speed.speed_vs_fp32(_graphs(bundles["fp32"]), _graphs(bundles["int8"]), _images(64), "int8", threads=1, source="test")
    info = check.info
    assert info["slower"] is True and [row["speedup"] for row in info["batches"]] == [1.25, 0.5]
    # Profiled where it is slowest, from ONNX Runtime's profile of both graphs.
    assert info["profile"]["batch"] == 32 and info["profile"]["calls"] == speed.PROFILE_CALLS
    layers = info["profile"]["layers"]
    assert len(layers) == speed.RECORDED_LAYERS
    extras = [layer["extra_ms"] for layer in layers]
    assert extras == sorted(extras, reverse=True)
    for layer in layers:
        assert layer["extra_ms"] == pytest.approx(layer["reduced_ms"] - layer["fp32_ms"], abs=1e-3)
    weighted = [layer for layer in layers if "QLinearConv" in layer["reduced_ops"]]
    assert weighted, layers
    names = _weights(bundles["fp32"])
    for layer in weighted:  # a quantized convolution is named after its layer, and FP32 ran it too
        assert layer["layer"] in names and "Conv" in layer["fp32_ops"]
    warning = check.warning
    assert warning == info["warning"] and warning.count(" | ") == 2
    assert warning.startswith("INT8 is slower than FP32 on this CPU (ONNX Runtime, 1 threads): 1.25x FP32's speed at batch 1")
    assert "0.50x FP32's speed at batch 32" in warning and "| Fix: deploy the FP32 bundle" in warning
    costly = [layer for layer in layers if layer["extra_ms"] > 0][: speed.NAMED_LAYERS] or layers[: speed.NAMED_LAYERS]
    for layer in costly:
        assert f"{layer['layer']} (" in warning


@pytest.mark.slow
def test_faster_int8_has_no_warning_and_no_profile(bundles: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speed, "_time_batch", _forced({1: 1.0, 32: 2.0}))
    check = speed.speed_vs_fp32(_graphs(bundles["fp32"]), _graphs(bundles["int8"]), _images(40), "int8")
    assert check.warning is None and check.info["slower"] is False and "profile" not in check.info


@pytest.mark.slow
def test_the_export_command_prints_the_warning(bundles: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from slimdeploy import cli

    monkeypatch.setattr(speed, "_time_batch", _forced({1: 0.8, 32: 0.9}))
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "int8"
    monkeypatch.setattr(sys, "argv", ["slimdeploy", "export", f"zoo:{MODEL}", "--out", str(out), "--precision", "int8",
                                      "--calib-size", "40", "--samples", "40", "--batch-sizes", "8"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code in (0, None)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "INT8 is slower than FP32 on this CPU" in lines[0] and "at batch 32" in lines[0]
    assert "speed vs FP32 on this CPU: 0.80x at batch 1, 0.90x at batch 32" in " ".join(captured.out.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["speed_vs_fp32"]["warning"] == lines[0].removeprefix("warning: ")
    # The bundle with the extra manifest fields passes the schema and its own check.
    assert run_cli("check", str(out)).returncode == 0


@pytest.mark.slow
def test_speed_check_off_and_trt_target_record_why_not_measured(tmp_path: Path) -> None:
    from slimdeploy.export import export
    from slimdeploy.zoo import zoo_checkpoint_path

    checkpoint = zoo_checkpoint_path(MODEL)
    off = export(checkpoint, tmp_path / "off", precision="int8", speed_check=False, **SMALL)
    assert off.manifest["calibration"]["speed_vs_fp32"] == {"measured": False, "reason": "turned off (speed_check=False)"}
    assert off.warnings == []
    trt = export(checkpoint, tmp_path / "trt", precision="int8", target="trt", **SMALL)
    info = trt.manifest["calibration"]["speed_vs_fp32"]
    assert info["measured"] is False and "TensorRT" in info["reason"] and trt.warnings == []


@pytest.mark.slow
def test_profile_names_every_quantized_convolution_after_its_layer(bundles: dict[str, Any]) -> None:
    path = bundles["int8"] / "model.onnx"
    graph = onnx.load(path)
    feed = {"input": _images(8)}
    with OrtRunner(path, threads=1, profile=True) as runner:
        for _ in range(3):
            runner.infer(feed)
        times = layer_times(runner, {"model": graph}, 3)
        with pytest.raises(SlimDeployError, match="profile"):  # the trace is handed out once
            runner.profile_events()
    convs = {name for name, t in times.items() if "QLinearConv" in t.ops}
    # Every convolution of MobileNet is one layer, and every one but the stem (which reads the
    # image and stays FP32: calibration.apply.image_convs) is quantized: 26 QLinearConv layers.
    assert convs == _weights(bundles["fp32"]) - {"classifier", "stem.conv"} and len(convs) == 26
    assert all(t.ms > 0 for t in times.values())
    assert times["classifier"].ops == ("QGemm",)
    rows = compare_layers(times, times)
    assert all(row["extra_ms"] == 0 for row in rows) and {row["layer"] for row in rows} == set(times)


def _tiny_conv(path: Path) -> None:
    """A Conv (weight ``0.weight``, as torch's Sequential names it) and a ReLU."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), dtype=np.float32), "0.weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "0.weight"], ["conv"], name="node_conv"),
         helper.make_node("Relu", ["conv"], ["y"], name="node_relu")],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 6, 6])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_profile_events_need_a_profiling_runner_and_leave_no_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    _tiny_conv(path)
    feed = {"input": np.zeros((1, 3, 8, 8), dtype=np.float32)}
    with OrtRunner(path) as plain:
        plain.infer(feed)
        with pytest.raises(SlimDeployError, match="profile=True"):
            plain.profile_events()
    with OrtRunner(path, profile=True) as runner:
        runner.infer(feed)
        folder = Path(runner._profile_dir.name)
        assert [p.suffix for p in folder.iterdir()] == [".json"]
        events = runner.profile_events()
        assert not folder.exists()  # the trace and its folder are removed once read
        with pytest.raises(SlimDeployError, match="read its profile once"):
            runner.profile_events()
    nodes = [event for event in events if event.get("cat") == "Node"]
    assert {event["args"]["op_name"] for event in nodes} >= {"Conv"}
    namer = LayerNamer(onnx.load(path))
    conv = next(event["name"].removesuffix("_kernel_time") for event in nodes if event["args"]["op_name"] == "Conv")
    assert namer.label(conv, "Conv") == ("0", True)  # the layer is its weight's name less ".weight"
    assert namer.label("node_relu", "Relu") == ("node_relu", False)  # weightless: the node's own name
    assert namer.label("Transpose_token_3", "Transpose") == ("Transpose", False)  # added by ONNX Runtime


def test_a_profiling_runner_released_unread_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    _tiny_conv(path)
    runner = OrtRunner(path, profile=True).activate()
    folder = Path(runner._profile_dir.name)
    runner.deactivate()
    assert not folder.exists()  # released without reading: nothing is left behind
