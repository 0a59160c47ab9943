"""Fake ``cuda.bindings.runtime``: "device" memory is host memory from ctypes, held apart from
every other host memory so that the fake TensorRT can tell a device pointer from a host one.

What it enforces, as CUDA does:

- ``cudaMalloc`` is the only source of device pointers (``is_device``); a copy into or out of
  memory that was never allocated (or too small) fails.
- Work is queued on a stream and done only when the stream is synchronised
  (``cudaStreamSynchronize``; ``cudaFree`` and ``cudaStreamDestroy`` finish the outstanding work
  first, as their CUDA counterparts do): a host buffer read before then holds nothing yet.
- Every call returns ``(error, value...)`` as cuda-python does.

Streams and allocations are tracked (``STREAMS``, ``ALLOCATIONS``), so a leak shows."""

from __future__ import annotations

import ctypes
import enum
import itertools
from collections.abc import Callable


class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
    cudaSuccess = 0  # noqa: N815 (cuda-python's names)
    cudaErrorInvalidValue = 1  # noqa: N815
    cudaErrorInvalidResourceHandle = 400  # noqa: N815


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToDevice = 1  # noqa: N815
    cudaMemcpyDeviceToHost = 2  # noqa: N815


_ids = itertools.count(1)


class cudaStream_t:  # noqa: N801
    def __init__(self) -> None:
        self.handle = 0x5000 + next(_ids)
        self.destroyed = False
        self.pending: list[Callable[[], None]] = []  # work queued, done at synchronisation

    def __int__(self) -> int:
        return self.handle


ALLOCATIONS: dict[int, ctypes.Array] = {}
STREAMS: set[int] = set()  # handles of the streams created and not yet destroyed
_BY_HANDLE: dict[int, cudaStream_t] = {}


def is_device(pointer: int, count: int = 1) -> bool:
    """Whether ``count`` bytes from ``pointer`` lie inside one ``cudaMalloc`` allocation."""
    return any(base <= pointer and pointer + count <= base + len(buf) for base, buf in ALLOCATIONS.items())


def enqueue(handle: int, work: Callable[[], None]) -> bool:
    """Queue ``work`` on the live stream whose handle is ``handle`` (what the fake TensorRT's
    ``execute_async_v3`` does); False for an unknown or destroyed stream."""
    stream = _BY_HANDLE.get(int(handle))
    if stream is None or stream.destroyed:
        return False
    stream.pending.append(work)
    return True


def _finish(stream: cudaStream_t) -> None:
    work, stream.pending = stream.pending, []
    for step in work:
        step()


def cudaMalloc(size: int):  # noqa: N802
    if size <= 0:
        return (cudaError_t.cudaErrorInvalidValue, 0)
    buffer = ctypes.create_string_buffer(size)
    ALLOCATIONS[ctypes.addressof(buffer)] = buffer
    return (cudaError_t.cudaSuccess, ctypes.addressof(buffer))


def cudaFree(pointer: int):  # noqa: N802
    for stream in list(_BY_HANDLE.values()):  # cudaFree synchronises the device first
        _finish(stream)
    if ALLOCATIONS.pop(int(pointer), None) is None:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: cudaStream_t):  # noqa: N802
    device, host = (dst, src) if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else (src, dst)
    if not isinstance(stream, cudaStream_t) or stream.destroyed or not is_device(int(device), count):
        return (cudaError_t.cudaErrorInvalidValue,)
    if is_device(int(host)):  # the other side of a host/device copy is host memory
        return (cudaError_t.cudaErrorInvalidValue,)
    target, source = int(dst), int(src)
    stream.pending.append(lambda: ctypes.memmove(target, source, count))
    return (cudaError_t.cudaSuccess,)


def cudaStreamCreate():  # noqa: N802
    stream = cudaStream_t()
    STREAMS.add(stream.handle)
    _BY_HANDLE[stream.handle] = stream
    return (cudaError_t.cudaSuccess, stream)


def cudaStreamSynchronize(stream: cudaStream_t):  # noqa: N802
    if not isinstance(stream, cudaStream_t) or stream.destroyed:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    _finish(stream)
    return (cudaError_t.cudaSuccess,)


def cudaStreamDestroy(stream: cudaStream_t):  # noqa: N802
    _finish(stream)  # outstanding work completes before the stream's resources go
    stream.destroyed = True
    STREAMS.discard(stream.handle)
    _BY_HANDLE.pop(stream.handle, None)
    return (cudaError_t.cudaSuccess,)


def cudaGetErrorString(error: cudaError_t):  # noqa: N802
    return (cudaError_t.cudaSuccess, f"fake CUDA error {int(error)}".encode())
