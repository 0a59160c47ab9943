"""ONNX Runtime runner: CPU by default, CUDA when asked for and present.

    with OrtRunner("bundle/model.onnx", threads=2) as runner:
        logits = runner.infer({"input": x})["logits"]
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from slimdeploy._optional import optional_import
from slimdeploy.engines.base import Runner, TensorMeta
from slimdeploy.errors import BackendUnavailableError, BadInputError, BundleError, SlimDeployError
from slimdeploy.limits import check_threads

# ONNX Runtime's type strings → numpy dtypes, for the tensor types our graphs use.
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def is_available() -> bool:
    """True when onnxruntime imports."""
    try:
        optional_import("onnxruntime")
    except BackendUnavailableError:
        return False
    return True


class OrtRunner(Runner):
    """Runs an ONNX model with ONNX Runtime.

    Args:
        model: path of the .onnx file, or its serialised bytes.
        device: ``"cpu"`` or ``"cuda"``. Defaults to ``"cpu"``.
        threads: intra-op threads; 0 lets ONNX Runtime choose. Defaults to 0.
        optimization: enable ONNX Runtime's full graph optimisations. Defaults to True.
        spinning: let idle worker threads spin-wait for the next call (lower latency for one
            session called back to back). Staged bundles run many sessions in turn, where
            spinning threads of one session steal the cores of the next. Defaults to True.
        profile: record every node's time with ONNX Runtime's profiler (into a temporary
            folder, removed by ``profile_events`` or on release). Defaults to False.
        name: label in reports. Defaults to ``"onnxruntime"``.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        model: str | Path | bytes,
        device: str = "cpu",
        threads: int = 0,
        optimization: bool = True,
        spinning: bool = True,
        profile: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.model = model
        self.device = device
        self.threads = check_threads(threads)
        self.optimization = optimization
        self.spinning = spinning
        self.profile = profile
        self.session = None
        self._profile_dir: tempfile.TemporaryDirectory[str] | None = None

    def _activate(self) -> None:
        ort = optional_import("onnxruntime", "run ONNX models")
        provider = PROVIDERS.get(self.device)
        if provider is None:  # a typo, not a missing backend: bad input (exit 2)
            raise BadInputError(f"unknown device '{self.device}' | Note: expected one of {sorted(PROVIDERS)} | Fix: pass --device cpu")
        if provider not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"ONNX Runtime here has no {provider} (available: {ort.get_available_providers()}) "
                "| Fix: pip install onnxruntime-gpu on a CUDA machine, or use --device cpu"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Errors only: ORT warns about every threshold input that has a default initializer.
        options.log_severity_level = 3
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not self.optimization:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self.profile:
            # ONNX Runtime writes its trace to a file: into a folder of our own, never the cwd.
            self._profile_dir = tempfile.TemporaryDirectory(prefix="slimdeploy-profile-")
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(self._profile_dir.name) / "ort")
        source = self.model if isinstance(self.model, bytes) else str(self.model)
        try:
            self.session = ort.InferenceSession(source, options, providers=[provider])
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            self._deactivate()  # the profile folder, if one was made
            label = "the model bytes" if isinstance(self.model, bytes) else f"'{self.model}'"
            raise BundleError(f"ONNX Runtime cannot load {label}: {str(exc).strip()[:300]}") from exc

    def _deactivate(self) -> None:
        self.session = None
        if self._profile_dir is not None:
            self._profile_dir.cleanup()
            self._profile_dir = None

    def profile_events(self) -> list[dict]:
        """Stop profiling and return ONNX Runtime's trace events (``cat`` ``"Node"`` events
        carry each node's ``name``, ``dur`` in microseconds and ``args.op_name``); the trace
        file and its folder are removed. Once per runner made with ``profile=True``."""
        if self._profile_dir is None:
            raise SlimDeployError(f"runner '{self.name}' has no profile to hand out: make it with profile=True, "
                                  "and read its profile once")
        path = Path(self._session().end_profiling())
        try:
            return json.loads(path.read_text())
        finally:
            self._profile_dir.cleanup()
            self._profile_dir = None

    def input_metadata(self) -> dict[str, TensorMeta]:
        """Required inputs, then optional ones (inputs with a default initializer: thresholds)."""
        session = self._session()
        metadata = {
            arg.name: TensorMeta(arg.name, np.dtype(_ORT_DTYPES[arg.type]), _dims(arg.shape))
            for arg in session.get_inputs()
        }
        for arg in session.get_overridable_initializers():
            metadata[arg.name] = TensorMeta(arg.name, np.dtype(_ORT_DTYPES[arg.type]), _dims(arg.shape), optional=True)
        return metadata

    def output_metadata(self) -> dict[str, TensorMeta]:
        """Outputs by name with dtype and shape (dynamic dims as their names)."""
        return {
            arg.name: TensorMeta(arg.name, np.dtype(_ORT_DTYPES[arg.type]), _dims(arg.shape))
            for arg in self._session().get_outputs()
        }

    def output_names(self) -> list[str]:
        """The graph's output names, in graph order."""
        return [arg.name for arg in self._session().get_outputs()]

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names()
        values = self._session().run(names, dict(feed))
        return dict(zip(names, values))

    def _session(self):
        if self.session is None:
            raise BackendUnavailableError(f"runner '{self.name}' is not active")
        return self.session


def _dims(shape: Sequence[int | str | None]) -> tuple[int | str, ...]:
    return tuple(d if isinstance(d, int) else (d or "?") for d in shape)
