"""Fake ``cuda.bindings.runtime``: "device" memory is host memory from ctypes, copies are
memmoves, streams do nothing but are tracked (so leaks show). Every call returns
``(error, value...)`` as cuda-python does, and copies into or out of memory that was never
allocated fail."""

from __future__ import annotations

import ctypes
import enum
import itertools


class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
    cudaSuccess = 0  # noqa: N815 (cuda-python's names)
    cudaErrorInvalidValue = 1  # noqa: N815


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToDevice = 1  # noqa: N815
    cudaMemcpyDeviceToHost = 2  # noqa: N815


_ids = itertools.count(1)


class cudaStream_t:  # noqa: N801
    def __init__(self) -> None:
        self.handle = 0x5000 + next(_ids)
        self.destroyed = False

    def __int__(self) -> int:
        return self.handle


ALLOCATIONS: dict[int, ctypes.Array] = {}
STREAMS: set[int] = set()  # handles of the streams created and not yet destroyed


def _inside(pointer: int, count: int) -> bool:
    return any(base <= pointer and pointer + count <= base + len(buf) for base, buf in ALLOCATIONS.items())


def cudaMalloc(size: int):  # noqa: N802
    if size <= 0:
        return (cudaError_t.cudaErrorInvalidValue, 0)
    buffer = ctypes.create_string_buffer(size)
    ALLOCATIONS[ctypes.addressof(buffer)] = buffer
    return (cudaError_t.cudaSuccess, ctypes.addressof(buffer))


def cudaFree(pointer: int):  # noqa: N802
    if ALLOCATIONS.pop(int(pointer), None) is None:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: cudaStream_t):  # noqa: N802
    device = dst if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else src
    if not isinstance(stream, cudaStream_t) or stream.destroyed or not _inside(int(device), count):
        return (cudaError_t.cudaErrorInvalidValue,)
    ctypes.memmove(int(dst), int(src), count)
    return (cudaError_t.cudaSuccess,)


def cudaStreamCreate():  # noqa: N802
    stream = cudaStream_t()
    STREAMS.add(stream.handle)
    return (cudaError_t.cudaSuccess, stream)


def cudaStreamSynchronize(stream: cudaStream_t):  # noqa: N802
    return (cudaError_t.cudaSuccess,)


def cudaStreamDestroy(stream: cudaStream_t):  # noqa: N802
    stream.destroyed = True
    STREAMS.discard(stream.handle)
    return (cudaError_t.cudaSuccess,)


def cudaGetErrorString(error: cudaError_t):  # noqa: N802
    return (cudaError_t.cudaSuccess, f"fake CUDA error {int(error)}".encode())
