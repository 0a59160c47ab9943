"""Rows of .npy and .npz files read a range at a time, so memory follows the rows asked for.

    with ArrayFile("shard-000.npz") as arrays:
        arrays.members              # {"input": ArrayInfo(shape, dtype), "labels": ..., "ref_logits": ...}
        arrays.read("input", 0, 64) # rows 0..63, a fresh C-ordered array

An .npy file is memory-mapped and its array is named ``input``; an .npz member is streamed from
the archive (stored or deflated) after its header, so a 30 GB archive is never read whole. The
file is untrusted: headers are parsed by NumPy's own format reader without unpickling, object
and Fortran-ordered arrays are refused, a member whose declared size does not match its shape
is refused, and every failure is a ``BadInputError`` naming the file and how to save it.
"""

from __future__ import annotations

import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from slimdeploy.errors import BadInputError

ARRAY_SUFFIXES = (".npz", ".npy")
# The name an .npy file's one array goes by (the layout ``check --data`` already reads).
NPY_NAME = "input"
_SAVE_HINT = "Fix: save it with numpy.savez(path, input=x, labels=y) (C-ordered numeric arrays)"


@dataclass(frozen=True)
class ArrayInfo:
    """Shape and dtype of one array, read from its header."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def rows(self) -> int:
        """Length of the first axis (0 for a 0-D array)."""
        return self.shape[0] if self.shape else 0

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def open_regular_file(path: Path) -> IO[bytes]:
    """``path`` opened for reading when it is a regular file (a FIFO or a device would block or
    never end: refused without blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadInputError(f"cannot open '{path}' ({exc.strerror}) | Fix: check the path and its permissions") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInputError(f"'{path}' is not a regular file | Fix: point --data at files, not devices or pipes")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_header(handle: IO[bytes], where: str) -> ArrayInfo:
    """The shape and dtype of the .npy stream at ``handle``, left at the first data byte."""
    try:
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(handle)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise BadInputError(f"cannot read the array header of {where} ({exc}) | {_SAVE_HINT}") from None
    if dtype.hasobject:
        raise BadInputError(f"{where} holds Python objects (dtype {dtype}), which are never unpickled | {_SAVE_HINT}")
    if fortran and len(shape) > 1:
        raise BadInputError(f"{where} is Fortran-ordered, which cannot be read a few rows at a time | Fix: save "
                            "numpy.ascontiguousarray(x)")
    return ArrayInfo(tuple(int(v) for v in shape), np.dtype(dtype))


class ArrayFile:
    """An .npy or .npz file whose arrays are read a range of rows at a time (see the module
    docstring). Use as a context manager; members are listed on opening."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.members: dict[str, ArrayInfo] = {}
        self._zip: zipfile.ZipFile | None = None
        self._handle: IO[bytes] | None = None
        self._map: np.ndarray | None = None
        self._streams: dict[str, tuple[IO[bytes], int, int]] = {}  # name -> (stream, data start, next row)
        self._open()

    def _open(self) -> None:
        self._handle = open_regular_file(self.path)
        where = f"'{self.path}'"
        if self.path.suffix.lower() == ".npy":
            info = _read_header(self._handle, where)
            self._check_size(info, os.fstat(self._handle.fileno()).st_size - self._handle.tell(), where)
            self.members[NPY_NAME] = info
            if info.rows and info.row_bytes:
                self._map = np.memmap(self._handle, dtype=info.dtype, mode="r", offset=self._handle.tell(), shape=info.shape)
            return
        try:
            self._zip = zipfile.ZipFile(self._handle)
            entries = [entry for entry in self._zip.infolist() if entry.filename.endswith(".npy")]
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            self.close()
            raise BadInputError(f"cannot read '{self.path}' as .npz ({exc}) | {_SAVE_HINT}") from None
        for entry in entries:
            name = entry.filename[: -len(".npy")]
            member = f"array '{name}' of '{self.path}'"
            try:
                with self._zip.open(entry) as stream:
                    info = _read_header(stream, member)
                    self._check_size(info, entry.file_size - stream.tell(), member)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                self.close()
                raise BadInputError(f"cannot read {member} ({exc}) | {_SAVE_HINT}") from None
            except BadInputError:
                self.close()
                raise
            self.members[name] = info

    @staticmethod
    def _check_size(info: ArrayInfo, data_bytes: int, where: str) -> None:
        expected = int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
        if expected != data_bytes:
            raise BadInputError(f"{where} declares shape {list(info.shape)} of {info.dtype} ({expected} bytes) but holds "
                                f"{data_bytes} bytes: truncated or altered | {_SAVE_HINT}")

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` (exclusive, clipped to the array) of array ``name``, as a
        new C-ordered array; a 0-D array is returned whole."""
        info = self.members[name]
        if not info.shape:
            return self._read_whole(name)
        start, stop = max(0, start), min(stop, info.rows)
        count = max(0, stop - start)
        if self._map is not None:
            return np.array(self._map[start:stop])
        if self._zip is None or count == 0 or info.row_bytes == 0:
            return np.zeros((count, *info.shape[1:]), dtype=info.dtype)
        stream, data_start, next_row = self._stream(name)
        try:
            if next_row != start:  # ranges are read in order: a seek is rare
                stream.seek(data_start + start * info.row_bytes)
            data = stream.read(count * info.row_bytes)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise BadInputError(f"cannot read rows {start}..{stop} of array '{name}' of '{self.path}' ({exc}) | {_SAVE_HINT}") from None
        if len(data) != count * info.row_bytes:
            raise BadInputError(f"array '{name}' of '{self.path}' ends before row {stop}: truncated | {_SAVE_HINT}")
        self._streams[name] = (stream, data_start, stop)
        return np.frombuffer(data, dtype=info.dtype).reshape(count, *info.shape[1:]).copy()

    def _stream(self, name: str) -> tuple[IO[bytes], int, int]:
        if name not in self._streams:
            assert self._zip is not None
            stream = self._zip.open(f"{name}.npy")
            _read_header(stream, f"array '{name}' of '{self.path}'")
            self._streams[name] = (stream, stream.tell(), 0)
        return self._streams[name]

    def _read_whole(self, name: str) -> np.ndarray:
        if self._zip is None:
            assert self._handle is not None
            self._handle.seek(0)
            return np.load(self._handle, allow_pickle=False)
        with self._zip.open(f"{name}.npy") as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)

    def close(self) -> None:
        """Release the file (and the archive's member streams)."""
        for stream, _, _ in self._streams.values():
            stream.close()
        self._streams = {}
        self._map = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ArrayFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
