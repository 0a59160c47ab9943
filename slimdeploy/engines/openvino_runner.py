"""OpenVINO runner: a bundle's ONNX graphs on OpenVINO's CPU plugin (``pip install
'slimdeploy[openvino]'``), a second CPU runtime beside ONNX Runtime.

    with OpenVinoRunner("bundle/model.onnx", threads=2) as runner:
        logits = runner.infer({"input": x})["logits"]

The same ONNX graph ONNX Runtime runs: OpenVINO's ONNX front end reads it (Q/DQ INT8 graphs
become OpenVINO's own low-precision layers, ``If`` and ``Loop`` its control flow). Two things
differ from ONNX Runtime and are handled here:

- Graph inputs backed by an initializer (``gate_threshold``, ``exit_thresholds``) would be read
  as constants: the initializers are taken out before reading, so they stay inputs, and a feed
  that leaves them out gets the stored default.
- The CPU plugin may compute in bf16 or fp16 where the CPU has them (its default "inference
  precision" hint): the hint is f32, so parity holds to float32 noise as with ONNX Runtime.
- In an INT8 (Q/DQ) graph, a residual ``Add`` of a quantized convolution and a quantized
  identity is fused by the CPU plugin into one u8 convolution with a sum; on SkipNet's gated
  blocks its result drifted by up to ~30 quantization steps from the Q/DQ semantics ONNX
  Runtime follows, enough to flip gates (``benchmarks/README.md``, OpenVINO section). The
  identity input of such an ``Add`` is read before its QuantizeLinear
  (``unround_residual_identities``), one rounding fewer than the bundle's graph, which keeps
  OpenVINO within the INT8 parity criteria.

Output arrays are copied out of OpenVINO's buffers, which the next call reuses. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slimdeploy._optional import optional_import
from slimdeploy.engines.base import Dim, Runner, TensorMeta
from slimdeploy.errors import BackendUnavailableError, BundleError
from slimdeploy.exporters.rewrite import graph_links
from slimdeploy.limits import check_threads

OPENVINO = "openvino"


def is_available() -> bool:
    """True when openvino imports."""
    try:
        optional_import(OPENVINO)
    except BackendUnavailableError:
        return False
    return True


class OpenVinoRunner(Runner):
    """Runs an ONNX model with OpenVINO on the CPU.

    Args:
        model: path of the .onnx file, or its serialised bytes.
        threads: inference threads; 0 lets OpenVINO choose. Defaults to 0.
        name: label in reports. Defaults to ``"openvino"``.
    """

    backend = OPENVINO

    def __init__(self, model: str | Path | bytes, threads: int = 0, name: str | None = None) -> None:
        super().__init__(name)
        self.model = model
        self.threads = check_threads(threads)
        self.compiled: Any = None
        self.request: Any = None
        self.defaults: dict[str, np.ndarray] = {}
        self._inputs: dict[str, TensorMeta] = {}
        self._outputs: dict[str, TensorMeta] = {}

    def _activate(self) -> None:
        ov = optional_import(OPENVINO, "run bundles with OpenVINO (--device openvino)")
        label = "the model bytes" if isinstance(self.model, bytes) else f"'{self.model}'"
        try:
            graph = onnx.load_from_string(self.model) if isinstance(self.model, bytes) else onnx.load(str(self.model))
        except Exception as exc:  # protobuf's DecodeError, OSError
            raise BundleError(f"cannot read {label} as ONNX: {str(exc).strip()[:300]}") from exc
        self.defaults = _take_input_defaults(graph)
        unround_residual_identities(graph)
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            core = ov.Core()
            model = core.read_model(graph.SerializeToString(), ov.Tensor(np.empty(0, dtype=np.uint8)))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with its own text
            raise BundleError(f"OpenVINO cannot load {label}: {str(exc).strip()[:300]}") from exc
        self.request = self.compiled.create_infer_request()
        # Names and dims as the ONNX graph declares them (as the ONNX Runtime runner reports
        # them), dtypes as OpenVINO runs them; required inputs first, then optional ones.
        inputs = {value.name: value for value in graph.graph.input}
        ports = {_port_name(port, inputs): port for port in self.compiled.inputs}
        self._inputs = {
            name: TensorMeta(name, _dtype(ports[name]), _onnx_dims(inputs[name]), optional=name in self.defaults)
            for name in sorted(ports, key=lambda name: (name in self.defaults, list(inputs).index(name)))
        }
        outputs = {value.name: value for value in graph.graph.output}
        ports = {_port_name(port, outputs): port for port in self.compiled.outputs}
        self._outputs = {name: TensorMeta(name, _dtype(ports[name]), _onnx_dims(outputs[name])) for name in outputs if name in ports}

    def _deactivate(self) -> None:
        self.request = None
        self.compiled = None

    def input_metadata(self) -> dict[str, TensorMeta]:
        """Required inputs, then optional ones (inputs with a stored default: thresholds)."""
        self._require_active()
        return dict(self._inputs)

    def output_metadata(self) -> dict[str, TensorMeta]:
        """Outputs by name with dtype and shape (dynamic dims as their names)."""
        self._require_active()
        return dict(self._outputs)

    def output_names(self) -> list[str]:
        """The graph's output names, in graph order."""
        self._require_active()
        return list(self._outputs)

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # order="C": a contiguous copy where needed (np.ascontiguousarray would make a 0-D threshold 1-D).
        inputs = {name: np.asarray(feed[name], order="C") if name in feed else self.defaults[name] for name in self._inputs}
        results = self.request.infer(inputs)
        by_name = {_port_name(port, self._outputs): value for port, value in results.items()}
        # Copies: OpenVINO hands out views of buffers the next call overwrites.
        return {name: np.array(by_name[name], dtype=meta.dtype) for name, meta in self._outputs.items()}

    def _require_active(self) -> None:
        if self.compiled is None:
            raise BackendUnavailableError(f"runner '{self.name}' is not active")


def _take_input_defaults(graph: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Remove the initializers that give graph inputs a default (so OpenVINO keeps them as
    inputs) and return those defaults by input name."""
    inputs = {value.name for value in graph.graph.input}
    defaults = {}
    for initializer in list(graph.graph.initializer):
        if initializer.name in inputs:
            defaults[initializer.name] = numpy_helper.to_array(initializer)
            graph.graph.initializer.remove(initializer)
    return defaults


def unround_residual_identities(graph: onnx.ModelProto) -> int:
    """Feed each residual ``Add`` of a Q/DQ graph its identity input before rounding; returns
    how many inputs were rewired.

    The pattern: ``Add(DequantizeLinear(QuantizeLinear(conv_out)), DequantizeLinear(
    QuantizeLinear(identity)))`` where ``identity`` is not a convolution's output. OpenVINO's
    CPU plugin fuses the convolution, its Q/DQ and the Add into one low-precision convolution
    with a sum, and that fusion drifts from the Q/DQ semantics (see the module docstring);
    reading ``identity`` itself (FP32) leaves a plain float sum. Other consumers of the
    identity's DequantizeLinear keep it. An FP32 graph has no such pattern and is unchanged.
    """
    producer, _ = graph_links(graph.graph)

    def quantized_source(tensor: str) -> str | None:
        """The float tensor behind ``tensor`` when it is DequantizeLinear(QuantizeLinear(x))."""
        dequantize = producer.get(tensor)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return None
        quantize = producer.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            return None
        return quantize.input[0]

    def from_conv(tensor: str) -> bool:
        node = producer.get(tensor)
        return node is not None and node.op_type in ("Conv", "ConvInteger")

    rewired = 0
    for node in graph.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        sources = [quantized_source(tensor) for tensor in node.input]
        if None in sources or not any(from_conv(source) for source in sources):
            continue
        for index, source in enumerate(sources):
            if not from_conv(source):
                node.input[index] = source
                rewired += 1
    return rewired


def _port_name(port: Any, known: Mapping[str, Any] | set[str]) -> str:
    """The ONNX name of an OpenVINO port (a port may carry several names)."""
    names = port.get_names()
    return next((name for name in names if name in known), port.get_any_name())


def _dtype(port: Any) -> np.dtype:
    return np.dtype(port.get_element_type().to_dtype())


def _onnx_dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    """Dims as the ONNX graph declares them: sizes, or the names of dynamic axes."""
    return tuple(
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
        for dim in value.type.tensor_type.shape.dim
    )
