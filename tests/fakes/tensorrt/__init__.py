"""Fake ``tensorrt`` for tests (see tests/fakes/README.md): the Python API surface slimdeploy
uses, checked for documented use, with ONNX Runtime standing in for the engine.

A "serialised engine" is ``MAGIC``, a JSON header (profile, workspace, version) and the ONNX
bytes. The parser rejects ops that TensorRT does not support at all (a few from
docs/tensorrt-facts.md), reporting one error per node, so parser-error reporting can be tested.
"""

from __future__ import annotations

import ctypes
import enum
import json

import numpy as np
import onnx

__version__ = "10.3.0"
MAGIC = b"FAKETRT1\n"
UNSUPPORTED = {"Compress", "Unique", "DynamicQuantizeLinear", "QLinearConv"}


class Logger:
    WARNING = 2
    ERROR = 1

    def __init__(self, severity: int = WARNING) -> None:
        self.severity = severity


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5  # any bit position: callers must use the enum, not a number


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    TF32 = 7


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
              2: DataType.UINT8, 7: DataType.INT64}
_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
          DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


def nptype(dtype: DataType) -> type:
    return _NUMPY[dtype]


class ParserError:
    def __init__(self, node: str, op: str) -> None:
        self.node, self.op = node, op

    def __str__(self) -> str:
        return f"In node {self.node} (parseGraph): UNSUPPORTED_NODE: No importer registered for op: {self.op}"


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.strongly_typed = bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        self.onnx: bytes | None = None


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self.errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> ParserError:
        return self.errors[index]

    def parse_from_file(self, path: str) -> bool:
        model = onnx.load(path)
        self.errors = [ParserError(node.name or f"#{i}", node.op_type) for i, node in enumerate(model.graph.node)
                       if node.op_type in UNSUPPORTED]
        if not self.errors:
            self.network.onnx = model.SerializeToString()
        return not self.errors


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self.builds = int(data.split(b":")[1]) if data.startswith(b"fake-cache:") else 0

    def serialize(self) -> bytes:
        return b"fake-cache:%d" % self.builds


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, min: tuple, opt: tuple, max: tuple) -> None:
        if not all(a <= b <= c for a, b, c in zip(min, opt, max)) or not len(min) == len(opt) == len(max):
            raise ValueError(f"bad profile for {name}: {min} {opt} {max}")
        self.shapes[name] = [list(min), list(opt), list(max)]


class IBuilderConfig:
    def __init__(self) -> None:
        self.pools: dict[MemoryPoolType, int] = {}
        self.cache: ITimingCache | None = None
        self.profiles: list[IOptimizationProfile] = []
        self.flags = {BuilderFlag.TF32}

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = int(size)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self.flags.discard(flag)

    def create_timing_cache(self, data: bytes) -> ITimingCache:
        return ITimingCache(bytes(data))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
        if network.onnx is None or not network.strongly_typed or MemoryPoolType.WORKSPACE not in config.pools:
            return None
        model = onnx.load_from_string(network.onnx)
        runtime_inputs = _runtime_inputs(model)
        dynamic = [v.name for v in runtime_inputs if any(d < 0 for d in _dims(v))]
        profile = config.profiles[0].shapes if config.profiles else {}
        if dynamic and (len(config.profiles) != 1 or not set(dynamic) <= set(profile)):
            return None  # TensorRT needs a profile covering every dynamic input
        if not set(profile) <= {v.name for v in runtime_inputs}:
            return None  # a profile for something that is not a network input
        if config.cache is not None:
            config.cache.builds += 1
        header = {"version": __version__, "profile": profile, "tf32": BuilderFlag.TF32 in config.flags,
                  "workspace": config.pools[MemoryPoolType.WORKSPACE]}
        return MAGIC + json.dumps(header).encode() + b"\n" + network.onnx


def _runtime_inputs(model: onnx.ModelProto) -> list:
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
        data = bytes(data)
        if not data.startswith(MAGIC):
            return None
        header, _, model = data[len(MAGIC):].partition(b"\n")
        meta = json.loads(header)
        if meta["version"] != __version__:
            return None
        return ICudaEngine(meta, model)


class ICudaEngine:
    def __init__(self, meta: dict, model_bytes: bytes) -> None:
        import onnxruntime

        self.meta = meta
        model = onnx.load_from_string(model_bytes)
        self.io: list[tuple[str, TensorIOMode, DataType, list[int]]] = []
        for value in _runtime_inputs(model):
            self.io.append((value.name, TensorIOMode.INPUT, _FROM_ONNX[value.type.tensor_type.elem_type], _dims(value)))
        for value in model.graph.output:
            self.io.append((value.name, TensorIOMode.OUTPUT, _FROM_ONNX[value.type.tensor_type.elem_type], _dims(value)))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def _find(self, name: str) -> tuple:
        for entry in self.io:
            if entry[0] == name:
                return entry
        raise KeyError(name)

    def get_tensor_name(self, index: int) -> str:
        return self.io[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._find(name)[1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._find(name)[2]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._find(name)[3])

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        _, mode, _, dims = self.engine._find(name)
        if mode != TensorIOMode.INPUT or len(shape) != len(dims):
            return False
        if any(d >= 0 and d != s for d, s in zip(dims, shape)):
            return False
        low, _, high = self.engine.meta["profile"].get(name, [dims, dims, dims])
        if not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(int(s) for s in shape)
        return True

    def _batch(self) -> int:
        inputs = [entry for entry in self.engine.io if entry[1] == TensorIOMode.INPUT]
        missing = [entry[0] for entry in inputs if entry[0] not in self.shapes and any(d < 0 for d in entry[3])]
        if missing:
            raise RuntimeError(f"input shapes not set: {missing}")
        batches = {self.shapes[entry[0]][0] for entry in inputs if entry[0] in self.shapes and entry[3] and entry[3][0] < 0}
        return batches.pop() if batches else 1

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        _, mode, _, dims = self.engine._find(name)
        if mode == TensorIOMode.INPUT:
            return self.shapes.get(name, tuple(dims))
        batch = self._batch()
        return tuple(batch if d < 0 else d for d in dims)

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.engine._find(name)
        self.addresses[name] = int(pointer)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not isinstance(stream_handle, int):
            raise TypeError("stream_handle must be an int")
        feed = {}
        for name, mode, dtype, _dims in self.engine.io:
            if name not in self.addresses:
                raise RuntimeError(f"no address for '{name}'")
            if mode == TensorIOMode.INPUT:
                shape = self.get_tensor_shape(name)
                feed[name] = _read(self.addresses[name], shape, nptype(dtype))
        outputs = self.engine.session.run(None, feed)
        for (name, _mode, dtype, _), value in zip([e for e in self.engine.io if e[1] == TensorIOMode.OUTPUT], outputs):
            expected = self.get_tensor_shape(name)
            if tuple(value.shape) != expected:
                raise RuntimeError(f"output {name} has shape {value.shape}, context said {expected}")
            value = np.ascontiguousarray(value, dtype=nptype(dtype))
            if value.nbytes:
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


def _read(pointer: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    raw = (ctypes.c_char * count).from_address(pointer)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
