"""Reading a bundle as untrusted input: ``load_bundle`` and the ``Bundle`` it returns.

    bundle = load_bundle("b/")          # BundleError (exit 2) unless every check below passes
    bundle.file("model.onnx")           # a listed, verified file inside the bundle

Before anything uses a bundle: the directory holds no symbolic links and nothing but regular
files and directories; ``manifest.json`` is a regular file of at most 64 MiB holding a JSON
object that validates against the one schema (``schema.Manifest``); every file of ``files`` is
found through real directories inside the bundle (no ``..``, no absolute path, no link on the
way) and matches its sha256. Commands reach files only through ``Bundle.file``, which serves
only files listed (and so verified). The digests detect corruption and accidental edits; they
are not a signature: whoever can edit the files can edit the manifest too.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.bundle.schema import MANIFEST, Manifest, check_relative_path, validate_manifest
from slimdeploy.bundle.swap import recover_interrupted_swap
from slimdeploy.errors import BundleError

GOLDEN = "golden.npz"
REPORT = "report.json"
REFERENCE_WEIGHTS = "reference.pt"
# The ``device`` that runs a bundle's TensorRT engines instead of its ONNX graphs.
TENSORRT = "tensorrt"
# --device openvino: the bundle's ONNX graphs on OpenVINO's CPU plugin (engines.openvino_runner).
OPENVINO = "openvino"
MANIFEST_MAX_BYTES = 64 << 20
_REEXPORT = "Fix: re-export the bundle with slimdeploy export"


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of ``path`` if it is a regular file reached without following a
    link at its last component (FIFOs and devices are refused without blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BundleError(f"cannot open '{path}' ({exc.strerror}): it must be a regular file inside the bundle | {_REEXPORT}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"'{path}' is not a regular file | {_REEXPORT}")
    return fd


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a regular file, read in 1 MiB chunks (the digests in the manifest's ``files``)."""
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative`` after checking that ``relative`` stays inside ``root`` and that no
    component on the way is a symbolic link; the last must be a regular file."""
    try:
        check_relative_path(relative)
    except ValueError as exc:
        raise BundleError(f"bundle '{root}': {exc} | {_REEXPORT}") from None
    current = root
    info = None
    for part in relative.split("/"):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise BundleError(f"bundle '{root}' lacks '{relative}' listed in its manifest | {_REEXPORT}") from None
        except OSError as exc:
            raise BundleError(f"cannot read '{current}' ({exc.strerror}) | {_REEXPORT}") from None
        if stat.S_ISLNK(info.st_mode):
            raise BundleError(f"'{current}' is a symbolic link; a bundle holds no links | {_REEXPORT}")
    if info is None or not stat.S_ISREG(info.st_mode):
        raise BundleError(f"'{current}' is not a regular file | {_REEXPORT}")
    return current


def refuse_links(root: Path) -> None:
    """``BundleError`` when anything inside ``root`` is a symbolic link or neither a regular
    file nor a directory (a FIFO would hang a reader; a link may lead outside)."""
    for directory, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(directory) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"'{path}' is a symbolic link; a bundle holds no links | Fix: replace it with the file "
                                  "itself, or re-export the bundle")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise BundleError(f"'{path}' is not a regular file or directory | {_REEXPORT}")


def read_manifest(root: Path) -> Any:
    """The parsed JSON of ``root/manifest.json`` (a regular file of at most 64 MiB), unvalidated."""
    manifest_path = root / MANIFEST
    if not os.path.lexists(manifest_path):
        raise BundleError(f"'{root}' has no {MANIFEST}: not a slimdeploy bundle, or an incomplete one | {_REEXPORT}")
    with os.fdopen(open_regular(manifest_path), "rb") as handle:
        text = handle.read(MANIFEST_MAX_BYTES + 1)
    if len(text) > MANIFEST_MAX_BYTES:
        raise BundleError(f"'{manifest_path}' is larger than {MANIFEST_MAX_BYTES >> 20} MiB: not a slimdeploy manifest | {_REEXPORT}")
    try:
        return json.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BundleError(f"'{manifest_path}' is not valid JSON ({exc}) | {_REEXPORT}") from None
    except RecursionError:
        raise BundleError(f"'{manifest_path}' is nested too deeply to be a slimdeploy manifest | {_REEXPORT}") from None


@dataclass
class Bundle:
    """A bundle read from disk: the validated manifest (as JSON and as the typed ``spec``), its
    files verified against their sha256 when ``verified``."""

    path: Path
    manifest: dict[str, Any]
    spec: Manifest
    verified: bool = True

    def file(self, relative: str) -> Path:
        """Path of a file the manifest lists in ``files`` (so verified on load), found inside
        the bundle without following links; ``BundleError`` for any other name."""
        if relative not in self.spec.files:
            raise BundleError(f"bundle '{self.path}': '{relative}' is not listed in the manifest's files, so it is "
                              f"not read | {_REEXPORT}")
        return resolve_inside(self.path, relative)

    def has_file(self, relative: str) -> bool:
        """True when ``relative`` is listed in the manifest's ``files``."""
        return relative in self.spec.files

    @property
    def graphs(self) -> list[dict[str, Any]]:
        """The manifest's ``graphs``: ``{"name", "file"}`` per ONNX graph (one, or one per stage)."""
        return list(self.manifest["graphs"])

    def graph_path(self, name: str = "model") -> Path:
        """Path of one graph's .onnx file; ``BundleError`` when the bundle has no such graph.
        ``name`` defaults to ``"model"`` (the one graph of a single-graph bundle)."""
        for graph in self.graphs:
            if graph["name"] == name:
                return self.file(graph["file"])
        raise BundleError(f"bundle '{self.path}' has no graph '{name}' (has {[g['name'] for g in self.graphs]})")

    def golden(self) -> dict[str, np.ndarray]:
        """Golden inputs, reference outputs and (when present) labels."""
        path = self.file(self.spec.golden.file)
        try:
            data = np.load(path, allow_pickle=False)
            if not hasattr(data, "files"):
                raise ValueError("an .npy array, not an .npz archive")
            with data:
                arrays = {key: data[key] for key in data.files}
        except Exception as exc:  # BadZipFile, zlib.error, ValueError, OSError: a corrupt archive
            raise BundleError(f"cannot read the golden file '{path}' ({type(exc).__name__}: {exc}) | {_REEXPORT}") from None
        missing = [spec.name for spec in self.spec.inputs if not spec.optional and spec.name not in arrays]
        if missing:
            raise BundleError(f"the golden file '{path}' lacks the input array(s) {missing} (has {sorted(arrays)}) | {_REEXPORT}")
        return arrays

    @property
    def input_names(self) -> list[str]:
        """Graph input names from the manifest (``input``, then thresholds)."""
        return [spec.name for spec in self.spec.inputs]

    @property
    def output_names(self) -> list[str]:
        """Graph output names from the manifest (``logits``, then decision outputs)."""
        return [spec.name for spec in self.spec.outputs]

    @property
    def batch_inputs(self) -> list[str]:
        """Inputs whose axis 0 is the batch (thresholds are not)."""
        return [spec.name for spec in self.spec.inputs if spec.shape[:1] == ["batch"]]

    def input_meta(self, name: str) -> Any:
        """``TensorMeta`` of a graph input, from the manifest."""
        from slimdeploy.engines.base import TensorMeta

        for spec in self.spec.inputs:
            if spec.name == name:
                return TensorMeta(name, np.dtype(spec.dtype), tuple(spec.shape), optional=spec.optional)
        raise BundleError(f"bundle '{self.path}' has no input '{name}'")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle as untrusted input (see the module docstring for what is checked).

    Args:
        path: the bundle directory.
        verify: compare each listed file's sha256 with the manifest. Defaults to True.
    """
    root = Path(path)
    recover_interrupted_swap(root)
    if not root.is_dir():
        raise BundleError(f"'{root}' is not a bundle directory | Fix: pass the directory written by slimdeploy export")
    refuse_links(root)
    data = read_manifest(root)
    spec = validate_manifest(data, f"bundle '{root}'")
    if verify:
        for relative, digest in spec.files.items():
            file_path = resolve_inside(root, relative)
            if sha256_file(file_path) != digest:
                raise BundleError(
                    f"'{file_path}' differs from the sha256 in the manifest (altered or corrupt) | {_REEXPORT}"
                )
    return Bundle(root, data, spec, verified=verify)
