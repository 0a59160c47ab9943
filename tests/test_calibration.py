"""Calibration data readers and calibration ranges (docs/design.md §6): image folders decoded and
preprocessed like the model's inputs, arrays, the digits calibration split, synthetic data
flagged; ranges collected by ONNX Runtime, stored and read back unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimdeploy.calibration import CalibrationRecord, collect_ranges, is_record, load_calibration
from slimdeploy.data import digits_inputs, resize_bilinear
from slimdeploy.errors import BadInputError

SIZE = (3, 16, 16)
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)


def test_digits_is_the_calibration_split() -> None:
    calib = load_calibration("digits", SIZE, MEAN, STD, size=40)
    expected, _ = digits_inputs("calib", SIZE, MEAN, STD, count=40)
    np.testing.assert_array_equal(calib.inputs, expected)
    assert not calib.synthetic
    assert calib.describe() == {"source": "digits:calib[:40]", "size": 40, "synthetic": False}
    heldout, _ = digits_inputs("heldout", SIZE, MEAN, STD, count=40)
    assert not np.array_equal(calib.inputs, heldout)  # never the parity samples


def test_synthetic_only_by_name_and_flagged() -> None:
    calib = load_calibration("synthetic", SIZE, MEAN, STD, size=8)
    assert calib.synthetic and calib.describe()["synthetic"] is True
    assert calib.inputs.shape == (8, *SIZE) and calib.inputs.dtype == np.float32
    with pytest.raises(BadInputError, match="neither a file nor a folder"):
        load_calibration("no/such/folder", SIZE, MEAN, STD)


def test_image_folder_is_resized_and_normalised(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 256, size=(8 + i, 10, 3), dtype=np.uint8) for i in range(3)]
    for i, pixels in enumerate(pictures):
        image_module.fromarray(pixels).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    calib = load_calibration(tmp_path, SIZE, MEAN, STD, size=2)  # the first two by name
    assert calib.inputs.shape == (2, *SIZE) and not calib.synthetic
    for got, pixels in zip(calib.inputs, pictures):
        planes = pixels.transpose(2, 0, 1).astype(np.float32) / 255.0
        want = (resize_bilinear(planes, 16, 16) - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_image_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(BadInputError, match="holds no"):
        load_calibration(tmp_path, SIZE, MEAN, STD)


def test_npz_and_npy_arrays(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((12, *SIZE)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x, labels=np.zeros(12))
    np.save(tmp_path / "calib.npy", x)
    np.testing.assert_array_equal(load_calibration(tmp_path / "calib.npz", SIZE, MEAN, STD, size=5).inputs, x[:5])
    np.testing.assert_array_equal(load_calibration(tmp_path / "calib.npy", SIZE, MEAN, STD, size=None).inputs, x)
    np.save(tmp_path / "wrong.npy", x[:, :, :8])
    with pytest.raises(BadInputError, match=r"expected \[N, 3, 16, 16\]"):
        load_calibration(tmp_path / "wrong.npy", SIZE, MEAN, STD)


def _tiny_model() -> onnx.ModelProto:
    """input [N, 2] -> MatMul -> Relu -> logits: two tensors whose ranges are easy to state."""
    weight = numpy_helper.from_array(np.array([[1.0, -1.0], [2.0, 0.5]], np.float32), "w")
    nodes = [helper.make_node("MatMul", ["input", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["logits"], name="relu")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_minmax_ranges_are_the_data_ranges_and_survive_storage(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((50, 2)).astype(np.float32)
    ranges = collect_ranges(_tiny_model(), [{"input": x[:25]}, {"input": x[25:]}], "MinMax")
    h = x @ np.array([[1.0, -1.0], [2.0, 0.5]], np.float32)
    # ONNX Runtime widens each range to include 0 (so that 0 is exactly representable).
    assert ranges["h"] == pytest.approx((min(h.min(), 0.0), max(h.max(), 0.0)), rel=1e-6)
    assert ranges["input"] == pytest.approx((x.min(), x.max()), rel=1e-6)
    record = CalibrationRecord("MinMax", {"model": ranges}, {"source": "test", "size": 50, "synthetic": False})
    record.save(tmp_path / "calibration.json")
    assert is_record(tmp_path / "calibration.json") and is_record(tmp_path)
    loaded = CalibrationRecord.load(tmp_path)
    assert loaded.graphs == record.graphs and loaded.method == "MinMax" and loaded.data["size"] == 50


@pytest.mark.parametrize("method", ["Percentile", "Entropy"])
def test_histogram_methods_stay_within_the_minmax_range(method: str, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500_000, 2)).astype(np.float32)
    x[0] = [40.0, -40.0]  # one outlier: MinMax spans it, the histogram methods clip it
    minmax = collect_ranges(_tiny_model(), [{"input": x}], "MinMax")
    clipped = collect_ranges(_tiny_model(), [{"input": x}], method)
    assert clipped.keys() == minmax.keys()
    for name, (low, high) in clipped.items():
        assert minmax[name][0] - 1e-6 <= low <= high <= minmax[name][1] + 1e-6, name
    if method == "Percentile":  # 99.999th percentile: the two outlying values fall outside
        assert clipped["input"][1] - clipped["input"][0] < 0.5 * (minmax["input"][1] - minmax["input"][0])
    assert capsys.readouterr().out == ""  # ONNX Runtime's progress prints stay off stdout


def test_unknown_method_and_bad_record(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="unknown calibration method"):
        collect_ranges(_tiny_model(), [], "Median")
    (tmp_path / "calibration.json").write_text('{"format": 99}')
    with pytest.raises(BadInputError, match="not a slimdeploy calibration record"):
        CalibrationRecord.load(tmp_path / "calibration.json")


def test_stored_ranges_fit_only_the_graph_they_were_collected_on() -> None:
    from slimdeploy.calibration import CalibrationSet, apply_precision

    x = np.random.default_rng(0).standard_normal((40, 2)).astype(np.float32)
    calibrated = apply_precision({"model": _tiny_model()}, "int8", calibration=CalibrationSet(x, "test"),
                                 method="MinMax", bias_correction=False)
    record = calibrated.record
    assert set(record.data["signatures"]) == {"model"}
    # The same graph takes the ranges back and gives the same Q/DQ graph.
    again = apply_precision({"model": _tiny_model()}, "int8", calibration=record, bias_correction=False)
    assert again.graphs["model"].SerializeToString() == calibrated.graphs["model"].SerializeToString()
    # A graph whose tensors differ (here one more op, as a target-specific fold would make) is refused.
    other = _tiny_model()
    other.graph.node[1].output[0] = "r"
    other.graph.node.append(helper.make_node("Neg", ["r"], ["logits"], name="neg"))
    with pytest.raises(BadInputError, match="collected on another graph"):
        apply_precision({"model": other}, "int8", calibration=record, bias_correction=False)


def test_histogram_methods_refuse_a_tensor_float32_cannot_bin() -> None:
    """Percentile and Entropy bin each tensor in float32: a tensor that barely varies at a large
    magnitude (a sharp gate's logit) cannot be binned. Percentile says so in one line (auto then
    leaves it out); MinMax ranges it."""
    from slimdeploy.calibration.ranges import HistogramRangeError

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "sharp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = (15439.2 + np.random.default_rng(0).random((8, 4)) * 0.05).astype(np.float32)
    assert collect_ranges(model, [{"x": x}], "MinMax")["y"] == (float(x.min()), float(x.max()))
    with pytest.raises(HistogramRangeError, match=r"Percentile calibrator cannot histogram a tensor of graph 'sharp'.*Fix: pass --calib-method MinMax"):
        collect_ranges(model, [{"x": x}], "Percentile")
