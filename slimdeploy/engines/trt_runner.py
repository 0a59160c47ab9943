"""TensorRT runner (TensorRT 10.3 to 11.x): a serialised engine behind the Runner contract.

    with TrtRunner("bundle/trt/model.engine") as runner:
        logits = runner.infer({"input": x})["logits"]

Activation deserialises the engine (or builds it, given a loader such as
``trt_build.EngineFromOnnx``) and creates one execution context. Each call sets the input
shapes (dynamic batch within the engine's optimisation profile), binds device buffers by tensor
name, runs ``execute_async_v3`` on a stream and copies the outputs back as numpy arrays.

Device buffers come from cuda-python (``cuda.bindings.runtime``; NVIDIA's own samples moved
there from pycuda) or, where cuda-python is missing, from torch CUDA tensors. Neither, nor
tensorrt, is imported before activation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy._optional import is_available as _module_available
from slimdeploy._optional import optional_import
from slimdeploy.engines.base import Runner, TensorMeta
from slimdeploy.errors import (
    BackendUnavailableError,
    BundleError,
    InputValidationError,
    SlimDeployError,
)

EngineSource = str | Path | bytes | Callable[[], bytes]
BUFFERS = ("auto", "cuda-python", "torch")


def is_available() -> bool:
    """True when tensorrt and a device-buffer provider (cuda-python or torch) can be imported.
    Checked without importing them; a missing GPU shows at activation."""
    from slimdeploy.engines.trt_build import is_available as build_available

    return build_available()


class TrtRunner(Runner):
    """Runs a serialised TensorRT engine.

    Args:
        engine: the engine file, its bytes, or a callable returning them (a lazy builder).
        defaults: values of inputs that may be left out (thresholds), by name. When the engine
            has no such input (the parser folded the default in), a fed value must equal it.
            Defaults to none.
        batch_range: (min, max) batch of the engine's profile, for the error message of a batch
            outside it. Defaults to unknown.
        buffers: ``"auto"`` (cuda-python, else torch), ``"cuda-python"`` or ``"torch"``.
            Defaults to ``"auto"``.
        name: label in reports. Defaults to ``"tensorrt"``.
    """

    backend = "tensorrt"

    def __init__(
        self,
        engine: EngineSource,
        defaults: Mapping[str, Any] | None = None,
        batch_range: tuple[int, int] | None = None,
        buffers: str = "auto",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if buffers not in BUFFERS:
            raise BadBuffersError(f"unknown buffers '{buffers}' | Note: expected one of {list(BUFFERS)}")
        self.source = engine
        self.defaults = {key: np.asarray(value) for key, value in (defaults or {}).items()}
        self.batch_range = batch_range
        self.buffers_kind = buffers
        self.engine: Any = None
        self.context: Any = None
        self.memory: _DeviceMemory | None = None
        self._inputs: dict[str, TensorMeta] = {}
        self._outputs: dict[str, TensorMeta] = {}
        self._trt: Any = None

    # -- lifecycle ----------------------------------------------------------------------------
    def _activate(self) -> None:
        from slimdeploy.engines.trt_build import import_tensorrt, trt_logger

        trt = import_tensorrt("run TensorRT engines")
        self._trt = trt
        data = self._engine_bytes()
        self.memory = _device_memory(self.buffers_kind)
        try:
            runtime = trt.Runtime(trt_logger(trt))
            engine = runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise BundleError(
                    f"TensorRT cannot deserialise the engine of '{self.name}': engines are tied to the TensorRT "
                    "version and GPU that built them | Fix: rebuild on this machine with slimdeploy build BUNDLE"
                )
            self.engine = engine
            self.context = engine.create_execution_context()
            self._runtime = runtime  # the runtime must outlive the engine it deserialised
            self._read_io()
        except BaseException:
            # activate() failed, so no deactivate() follows: free the stream and buffers here.
            self._deactivate()
            raise

    def _deactivate(self) -> None:
        if self.memory is not None:
            self.memory.release()
        self.context = None
        self.engine = None
        self._runtime = None
        self.memory = None

    def _engine_bytes(self) -> bytes:
        source = self.source
        if callable(source):
            return source()
        if isinstance(source, bytes):
            return source
        path = Path(source)
        if not path.is_file():
            raise BundleError(f"engine '{path}' does not exist | Fix: build it on this machine with slimdeploy build BUNDLE")
        return path.read_bytes()

    def _read_io(self) -> None:
        trt, engine = self._trt, self.engine
        self._inputs, self._outputs = {}, {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(_dim(axis, d) for axis, d in enumerate(engine.get_tensor_shape(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs[name] = TensorMeta(name, dtype, shape, optional=name in self.defaults)
            else:
                self._outputs[name] = TensorMeta(name, dtype, shape)

    # -- metadata -----------------------------------------------------------------------------
    def input_metadata(self) -> dict[str, TensorMeta]:
        """The engine's inputs; inputs with a default (thresholds) are optional, and a default the
        parser folded into the engine is listed too (an optional input of the default's shape)."""
        self._require_active()
        metadata = dict(self._inputs)
        for name, value in self.defaults.items():
            if name not in metadata:
                metadata[name] = TensorMeta(name, value.dtype, tuple(value.shape), optional=True)
        return metadata

    def output_metadata(self) -> dict[str, TensorMeta]:
        """The engine's outputs by name (dynamic dims as ``"batch"``/``"dimN"``)."""
        self._require_active()
        return dict(self._outputs)

    def output_names(self) -> list[str]:
        """The engine's output names, in the engine's I/O order."""
        self._require_active()
        return list(self._outputs)

    def _require_active(self) -> None:
        if self.engine is None:
            raise BackendUnavailableError(f"runner '{self.name}' is not active")

    # -- inference ----------------------------------------------------------------------------
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        context, memory = self.context, self.memory
        assert memory is not None  # set by _activate
        for name, value in feed.items():
            folded = name not in self._inputs and name in self.defaults
            if folded and not np.array_equal(np.asarray(value), self.defaults[name]):
                raise InputValidationError(
                    f"'{name}' is fixed at {self.defaults[name].tolist()} in this engine (TensorRT's parser folded "
                    "its default in) | Fix: use the staged form, whose decisions are made on the host"
                )
        for name, meta in self._inputs.items():
            # Not np.ascontiguousarray: it turns a 0-D threshold into shape [1].
            array = np.asarray(feed[name] if name in feed else self.defaults[name], dtype=meta.dtype)
            if not array.flags.c_contiguous:
                array = array.copy(order="C")
            if not context.set_input_shape(name, tuple(array.shape)):
                within = f" (this engine takes batch {self.batch_range[0]} to {self.batch_range[1]})" if self.batch_range else ""
                raise InputValidationError(
                    f"TensorRT refused shape {list(array.shape)} for '{name}'{within} | Fix: split the batch, or "
                    "rebuild with a wider range: slimdeploy build BUNDLE --min-batch/--max-batch"
                )
            context.set_tensor_address(name, memory.upload(name, array))
        shapes: dict[str, tuple[int, ...]] = {}
        for name, meta in self._outputs.items():
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise SlimDeployError(
                    f"output '{name}' has a data-dependent shape {list(shape)}, which needs an output allocator "
                    "| Fix: export with --dynamic staged"
                )
            shapes[name] = shape
            context.set_tensor_address(name, memory.allocate(name, shape, meta.dtype))
        if not context.execute_async_v3(memory.stream_handle()):
            raise SlimDeployError(f"TensorRT failed to enqueue '{self.name}' (its log above says why)")
        outputs = {name: memory.download(name, shapes[name], meta.dtype) for name, meta in self._outputs.items()}
        memory.synchronize()
        return outputs


class BadBuffersError(InputValidationError):
    """An unknown ``buffers`` choice."""


def _dim(axis: int, size: int) -> int | str:
    """A TensorRT dimension (-1 = dynamic) as runner metadata: axis 0 is the batch."""
    size = int(size)
    if size >= 0:
        return size
    return "batch" if axis == 0 else f"dim{axis}"


# -- device memory ---------------------------------------------------------------------------------
class _DeviceMemory:
    """Device buffers by tensor name (grown, never shrunk) and one CUDA stream.

    ``download`` may return arrays that are filled only after ``synchronize``.
    """

    def stream_handle(self) -> int:
        raise NotImplementedError

    def upload(self, name: str, array: np.ndarray) -> int:
        raise NotImplementedError

    def allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
        raise NotImplementedError

    def download(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        pass


def _device_memory(kind: str) -> _DeviceMemory:
    from slimdeploy.engines.trt_build import cuda_python_available

    if kind == "cuda-python" or (kind == "auto" and cuda_python_available()):
        return _CudaPythonMemory()
    if kind == "torch" or (kind == "auto" and _module_available("torch")):
        return _TorchMemory()
    raise BackendUnavailableError(
        "TensorRT needs device buffers from cuda-python (or torch with CUDA), and neither is installed "
        "| Fix: pip install 'slimdeploy[trt]'"
    )


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python 12.6+
    except ImportError:
        # Older cuda-python 12.x exposes the same runtime bindings as cuda.cudart.
        cudart = optional_import("cuda.cudart", "allocate TensorRT device buffers")
    return cudart


class _CudaPythonMemory(_DeviceMemory):
    """Buffers from ``cudaMalloc``; copies with ``cudaMemcpyAsync`` on one stream."""

    def __init__(self) -> None:
        self.cudart = _cudart()
        self.stream = self._call(self.cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # name → (pointer, capacity in bytes)
        self._pending: list[np.ndarray] = []

    def _call(self, result: Any) -> Any:
        """cuda-python returns (error, value...): raise on an error, return the value(s)."""
        error, *values = result if isinstance(result, tuple) else (result,)
        if error != self.cudart.cudaError_t.cudaSuccess:
            _, text = self.cudart.cudaGetErrorString(error)
            raise BackendUnavailableError(f"CUDA call failed: {text.decode() if isinstance(text, bytes) else text} | Fix: check the GPU and driver (nvidia-smi)")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def stream_handle(self) -> int:
        return int(self.stream)

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self.buffers.get(name, (0, 0))
        if capacity < max(nbytes, 1):
            if pointer:
                self._call(self.cudart.cudaFree(pointer))
            pointer = int(self._call(self.cudart.cudaMalloc(max(nbytes, 1))))
            self.buffers[name] = (pointer, max(nbytes, 1))
        return pointer

    def upload(self, name: str, array: np.ndarray) -> int:
        pointer = self._buffer(name, array.nbytes)
        if array.nbytes:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._call(self.cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, self.stream))
            self._pending.append(array)  # keep the host array alive until the stream is synchronised
        return pointer

    def allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
        return self._buffer(name, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)

    def download(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        host = np.empty(shape, dtype=dtype)
        if host.nbytes:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._call(self.cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name][0], host.nbytes, kind, self.stream))
        return host

    def synchronize(self) -> None:
        self._call(self.cudart.cudaStreamSynchronize(self.stream))
        self._pending = []

    def release(self) -> None:
        for pointer, _ in self.buffers.values():
            self.cudart.cudaFree(pointer)
        self.buffers = {}
        self.cudart.cudaStreamDestroy(self.stream)


class _TorchMemory(_DeviceMemory):
    """Buffers as torch CUDA tensors (``data_ptr()``), copies and the engine on one dedicated
    ``torch.cuda.Stream``: on the legacy default stream ``enqueueV3`` adds synchronisations."""

    def __init__(self) -> None:
        torch = optional_import("torch", "allocate TensorRT device buffers")
        if not torch.cuda.is_available():
            raise BackendUnavailableError("torch sees no CUDA GPU for TensorRT's buffers | Fix: run on the GPU machine, or pip install 'slimdeploy[trt]'")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.tensors: dict[str, Any] = {}

    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def upload(self, name: str, array: np.ndarray) -> int:
        with self.torch.cuda.stream(self.stream):
            tensor = self.torch.from_numpy(array).to("cuda")
        self.tensors[name] = tensor
        return int(tensor.data_ptr())

    def allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
        torch_dtype = self.torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        with self.torch.cuda.stream(self.stream):
            tensor = self.torch.empty(shape, dtype=torch_dtype, device="cuda")
        self.tensors[name] = tensor
        return int(tensor.data_ptr())

    def download(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        # .cpu() on our stream is ordered after the enqueued engine, and blocks.
        with self.torch.cuda.stream(self.stream):
            return self.tensors[name].cpu().numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def release(self) -> None:
        self.stream.synchronize()  # nothing may still use the buffers the caching allocator gets back
        self.tensors = {}
