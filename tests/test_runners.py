"""One contract test suite, run against every runner (PyTorch, ONNX Runtime, and OpenVINO where
``slimdeploy[openvino]`` is installed; its cases skip cleanly, saying why, where it is not)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from slimdeploy.engines import OrtRunner, Runner, TensorMeta, TorchRunner
from slimdeploy.errors import InputValidationError, SlimDeployError
from slimdeploy.exporters import ExportSpec, export_onnx

META = {"input": TensorMeta("input", np.dtype(np.float32), ("batch", 3, 8, 8))}


class TinyNet(torch.nn.Module):
    """Conv + BN + pool + linear: enough to exercise every contract point quickly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def tiny_onnx(tiny: TinyNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    path.write_bytes(export_onnx(tiny, (torch.randn(2, 3, 8, 8),), ExportSpec()).SerializeToString())
    return path


def _openvino() -> type[Runner]:
    """The OpenVINO runner class, or a skip saying how to get it."""
    from slimdeploy.engines.openvino_runner import OpenVinoRunner, is_available

    if not is_available():
        pytest.skip("openvino is not installed (pip install 'slimdeploy[openvino]'): the OpenVINO runner is not tested")
    return OpenVinoRunner


@pytest.fixture(params=["torch", "onnxruntime", "openvino"])
def make_runner(request: pytest.FixtureRequest, tiny: TinyNet, tiny_onnx: Path) -> Callable[[], Runner]:
    if request.param == "torch":
        return lambda: TorchRunner(tiny, META, ["logits"])
    if request.param == "openvino":
        runner = _openvino()
        return lambda: runner(tiny_onnx)
    return lambda: OrtRunner(tiny_onnx)


def _x(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)


def test_infer_returns_named_outputs(make_runner: Callable[[], Runner]) -> None:
    with make_runner() as runner:
        for batch in (1, 3):
            outputs = runner.infer({"input": _x(batch)})
            assert list(outputs) == ["logits"]
            assert outputs["logits"].shape == (batch, 5)
            assert outputs["logits"].dtype == np.float32


def test_metadata(make_runner: Callable[[], Runner]) -> None:
    with make_runner() as runner:
        meta = runner.input_metadata()["input"]
        assert meta.dtype == np.float32
        assert meta.shape[1:] == (3, 8, 8) and isinstance(meta.shape[0], str)
        assert runner.output_names() == ["logits"]


@pytest.mark.parametrize(
    ("feed", "fragment"),
    [
        ({}, "missing input(s) ['input']"),
        ({"input": _x(2), "other": _x(2)}, "unexpected input(s) ['other']"),
        ({"input": _x(2).astype(np.float64)}, "dtype float64, expected float32"),
        ({"input": _x(2)[:, :2]}, "axis 1 should be 3"),
        ({"input": _x(2)[0]}, "expected rank 4"),
    ],
)
def test_bad_feeds_are_refused_with_what_was_expected(
    make_runner: Callable[[], Runner], feed: dict, fragment: str
) -> None:
    with make_runner() as runner, pytest.raises(InputValidationError) as info:
        runner.infer(feed)
    assert fragment in str(info.value)
    assert "expected input: float32[" in str(info.value)


def test_inactive_runner_refuses(make_runner: Callable[[], Runner]) -> None:
    runner = make_runner()
    with pytest.raises(SlimDeployError, match="not active"):
        runner.infer({"input": _x(1)})
    with runner:
        assert runner.is_active
        with pytest.raises(SlimDeployError, match="already active"):
            runner.activate()
    assert not runner.is_active


def test_runners_agree(tiny: TinyNet, tiny_onnx: Path) -> None:
    x = {"input": _x(4)}
    with TorchRunner(tiny, META, ["logits"]) as reference, OrtRunner(tiny_onnx) as candidate:
        np.testing.assert_allclose(candidate.infer(x)["logits"], reference.infer(x)["logits"], atol=1e-5, rtol=1e-4)


def test_openvino_agrees_with_onnx_runtime_from_a_file_or_bytes(tiny: TinyNet, tiny_onnx: Path) -> None:
    runner = _openvino()
    x = {"input": _x(5)}
    with OrtRunner(tiny_onnx) as reference, runner(tiny_onnx) as from_file, runner(tiny_onnx.read_bytes()) as from_bytes:
        expected = reference.infer(x)["logits"]
        for candidate in (from_file, from_bytes):
            # f32 inference precision: float32 noise, not the bf16 error the CPU plugin's default would give.
            np.testing.assert_allclose(candidate.infer(x)["logits"], expected, atol=1e-5, rtol=1e-4)
        assert from_file.input_metadata() == reference.input_metadata()
        assert from_file.output_metadata() == reference.output_metadata()


def _scaled_by_threshold(path: Path) -> None:
    """y = x * gate_threshold, where gate_threshold is an input with a stored default (2.0),
    as slimdeploy's threshold inputs are."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "gate_threshold"], ["y"])], "scaled",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("gate_threshold", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array(2.0, dtype=np.float32), "gate_threshold")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_threshold_inputs_are_optional_and_overridable(tmp_path: Path, backend: str) -> None:
    # OpenVINO would read an input backed by an initializer as a constant: the runner keeps it an input.
    runner_class = _openvino() if backend == "openvino" else OrtRunner
    path = tmp_path / "scaled.onnx"
    _scaled_by_threshold(path)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with runner_class(path) as runner:
        metadata = runner.input_metadata()
        assert list(metadata) == ["input", "gate_threshold"] and metadata["gate_threshold"].optional
        assert not metadata["input"].optional
        np.testing.assert_array_equal(runner.infer({"input": x})["y"], x * 2)
        np.testing.assert_array_equal(runner.infer({"input": x, "gate_threshold": np.array(0.5, dtype=np.float32)})["y"], x * 0.5)


def test_openvino_unreadable_model(tmp_path: Path) -> None:
    from slimdeploy.errors import BundleError

    runner = _openvino()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(BundleError, match="cannot read"):
        runner(bad).activate()


def test_ort_unknown_device_is_backend_error(tiny_onnx: Path) -> None:
    from slimdeploy.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"cuda|CUDA|unknown device"):
        OrtRunner(tiny_onnx, device="cuda").activate()


def test_ort_unreadable_model(tmp_path: Path) -> None:
    from slimdeploy.errors import BundleError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(BundleError, match="cannot load"):
        OrtRunner(bad).activate()


def test_empty_batch_gives_empty_outputs_of_the_right_shape(make_runner: Callable[[], Runner]) -> None:
    with make_runner() as runner:
        full = runner.infer({"input": _x(2)})
        empty = runner.infer({"input": _x(0)})
    assert list(empty) == list(full)
    for name, value in empty.items():
        assert value.shape == (0, *full[name].shape[1:]) and value.dtype == full[name].dtype


def test_ort_unknown_device_name_is_bad_input(tiny_onnx: Path) -> None:
    from slimdeploy.errors import BackendUnavailableError, BadInputError

    with pytest.raises(BadInputError, match="unknown device 'tpu'") as caught:
        OrtRunner(tiny_onnx, device="tpu").activate()
    assert not isinstance(caught.value, BackendUnavailableError)


@pytest.mark.parametrize("threads", [-1, 100_000])
def test_runners_refuse_absurd_thread_counts(tiny: TinyNet, tiny_onnx: Path, threads: int) -> None:
    from slimdeploy.errors import BadInputError

    with pytest.raises(BadInputError, match=r"--threads .* out of range"):
        OrtRunner(tiny_onnx, threads=threads)
    with pytest.raises(BadInputError, match=r"--threads .* out of range"):
        TorchRunner(tiny, META, ["logits"], threads=threads)
    from slimdeploy.engines.openvino_runner import OpenVinoRunner

    with pytest.raises(BadInputError, match=r"--threads .* out of range"):  # checked before openvino is needed
        OpenVinoRunner(tiny_onnx, threads=threads)


def test_torch_runner_keeps_torch_threads_unless_asked(tiny: TinyNet) -> None:
    """threads=0 (the default) leaves torch's intra-op thread count as the caller set it; a
    count given is applied on activation."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with TorchRunner(tiny, META, ["logits"]):
            assert torch.get_num_threads() == 2
        with TorchRunner(tiny, META, ["logits"], threads=1):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_ort_availability_follows_the_import(monkeypatch: pytest.MonkeyPatch) -> None:
    from slimdeploy.engines import ort_runner
    from slimdeploy.errors import BackendUnavailableError

    assert ort_runner.is_available() is True

    def missing(*_args: object) -> None:
        raise BackendUnavailableError("onnxruntime is not installed")

    monkeypatch.setattr(ort_runner, "optional_import", missing)
    assert ort_runner.is_available() is False


def test_ort_session_options_are_the_documented_ones(tiny_onnx: Path) -> None:
    """Defaults: ONNX Runtime picks the intra-op threads, one inter-op thread, full graph
    optimisation, spinning allowed; each option given is what the session gets."""
    import onnxruntime as ort

    def options(**kwargs: object) -> ort.SessionOptions:
        with OrtRunner(tiny_onnx, **kwargs) as runner:
            return runner.session.get_session_options()

    default = options()
    assert default.intra_op_num_threads == 0 and default.inter_op_num_threads == 1
    assert default.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(RuntimeError, match="does not have configuration"):  # not set: ONNX Runtime's default, spinning
        default.get_session_config_entry("session.intra_op.allow_spinning")
    chosen = options(threads=1, optimization=False, spinning=False)
    assert chosen.intra_op_num_threads == 1
    assert chosen.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert chosen.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_ort_metadata_of_thresholds_and_dynamic_axes(tmp_path: Path) -> None:
    """An input with a default initializer (a threshold) is optional and may be left out; a
    named dynamic axis keeps its name, an unnamed one reads "?"."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Greater", ["x", "t"], ["y"])], "thresholded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", None]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, ["batch", None])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "t")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with OrtRunner(model.SerializeToString()) as runner:
        meta = runner.input_metadata()
        assert meta["x"].shape == ("batch", "?") and not meta["x"].optional
        assert meta["t"].optional and meta["t"].shape == ()
        x = np.array([[0.2, 0.7]], np.float32)
        np.testing.assert_array_equal(runner.infer({"x": x})["y"], [[False, True]])
        np.testing.assert_array_equal(runner.infer({"x": x, "t": np.array(0.1, np.float32)})["y"], [[True, True]])


def _qdq(nodes: list, tensor: str, zero_point: str) -> str:
    """Append QuantizeLinear/DequantizeLinear of ``tensor`` to ``nodes``; return the DQ output."""
    from onnx import helper

    nodes.append(helper.make_node("QuantizeLinear", [tensor, "scale", zero_point], [f"{tensor}_q"]))
    nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", "scale", zero_point], [f"{tensor}_dq"]))
    return f"{tensor}_dq"


def _residual_graph(quantized: bool, identity_from_conv: bool = False):
    """x → conv_a → (Q/DQ) ┐
       x → relu or conv_b → (Q/DQ) ┴ Add → y: the residual pattern of a gated block."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Conv", ["x", "w"], ["conv_out"], pads=[1, 1, 1, 1])]
    if identity_from_conv:
        nodes.append(helper.make_node("Conv", ["x", "w"], ["identity"], pads=[1, 1, 1, 1]))
    else:
        nodes.append(helper.make_node("Relu", ["x"], ["identity"]))
    left, right = "conv_out", "identity"
    if quantized:
        left, right = _qdq(nodes, "conv_out", "zp_conv"), _qdq(nodes, "identity", "zp_identity")
        nodes.append(helper.make_node("GlobalAveragePool", [right], ["pooled"]))  # another consumer of the identity's DQ
    nodes.append(helper.make_node("Add", [left, right], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])]
    if quantized:
        outputs.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 2, 1, 1]))
    initializers = [
        numpy_helper.from_array(np.full((2, 2, 3, 3), 0.1, np.float32), "w"),
        numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
        numpy_helper.from_array(np.array(106, np.uint8), "zp_conv"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp_identity"),
    ]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_openvino_reads_a_quantized_residual_identity_before_rounding() -> None:
    """OpenVINO's fused u8 residual sum drifted on SkipNet's INT8 gated blocks; the runner feeds
    such an Add the identity before its Q/DQ, and leaves every other graph and consumer as is."""
    import onnx

    from slimdeploy.engines.openvino_runner import unround_residual_identities

    model = _residual_graph(quantized=True)
    assert unround_residual_identities(model) == 1
    add = next(node for node in model.graph.node if node.op_type == "Add")
    assert list(add.input) == ["conv_out_dq", "identity"]  # the convolution keeps its Q/DQ
    pool = next(node for node in model.graph.node if node.op_type == "GlobalAveragePool")
    assert list(pool.input) == ["identity_dq"]  # other readers keep the rounded tensor
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    import onnxruntime

    y = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    conv = onnxruntime.InferenceSession(_residual_graph(quantized=False).SerializeToString(),
                                        providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0] - np.maximum(x, 0)
    np.testing.assert_allclose(y - np.maximum(x, 0), conv, atol=0.05 / 2 + 1e-6)  # only the conv's rounding is left

    for untouched in (_residual_graph(quantized=False), _residual_graph(quantized=True, identity_from_conv=True)):
        before = untouched.SerializeToString()
        assert unround_residual_identities(untouched) == 0
        assert untouched.SerializeToString() == before
