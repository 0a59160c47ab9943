"""The bundle: a directory holding everything needed to run and re-check an exported model.

    bundle/
      manifest.json   schema version, versions, architecture, inputs/outputs, precision,
                      decisions, stages, files (relative path → sha256), parity summary
      model.onnx      the graph (staged bundles: one file per stage)
      golden.npz      inputs and the PyTorch reference outputs, so ``check`` needs no torch
      report.json     the full parity report of the export
      reference.pt    the PyTorch weights (slimdeploy checkpoint format), used only where torch
                      is installed: ``check --data`` and ``bench``'s PyTorch column

A bundle is written into a temporary sibling directory and renamed into place only when
complete, so a crash never leaves a half-written bundle under the requested name. An existing
directory is refused unless ``force`` is given; with ``force`` it is replaced only after the
new bundle is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.errors import BundleError, OutputExistsError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
REPORT = "report.json"
REFERENCE_WEIGHTS = "reference.pt"
# The ``device`` that runs a bundle's TensorRT engines instead of its ONNX graphs.
TENSORRT = "tensorrt"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (the digests in the manifest's ``files``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_writable(out_dir: str | Path, force: bool) -> Path:
    """Fail early (before any work) when ``out_dir`` exists and ``force`` is off."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise OutputExistsError(
            f"output directory '{out}' already exists | Fix: choose another --out, or pass --force to replace it"
        )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"'{out}' exists and is not a directory | Fix: choose another --out")
    return out


def write_bundle(
    out_dir: str | Path,
    files: Mapping[str, bytes | Path | Mapping[str, np.ndarray]],
    manifest: dict[str, Any],
    force: bool = False,
) -> Path:
    """Write ``files`` and ``manifest`` atomically into ``out_dir``.

    Args:
        out_dir: the bundle directory to create.
        files: relative path → bytes, a file to copy, or a dict of arrays (saved as .npz).
        manifest: manifest fields; ``schema_version`` and ``files`` (sha256 of each) are added.
        force: replace an existing ``out_dir``. Defaults to False.

    Returns:
        The bundle path.
    """
    out = ensure_writable(out_dir, force).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _staging(out) as staging:
        digests: dict[str, str] = {}
        for relative, content in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            elif isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                with open(target, "wb") as handle:
                    np.savez_compressed(handle, **content)
            digests[relative] = sha256_file(target)
        full = {"schema_version": SCHEMA_VERSION, **manifest, "files": digests}
        (staging / MANIFEST).write_text(json.dumps(full, indent=2, default=_json_default) + "\n")
    return out


def update_bundle(
    bundle_dir: str | Path,
    files: Mapping[str, bytes],
    manifest: dict[str, Any],
) -> Path:
    """Add or replace files of an existing bundle and rewrite its manifest, atomically: the
    bundle is copied to a temporary sibling, changed there, and swapped into place (as
    ``write_bundle`` does), so a crash leaves the old bundle intact.

    Args:
        bundle_dir: the bundle directory.
        files: relative path → new content.
        manifest: the full new manifest; its ``files`` digests are updated for ``files``.

    Returns:
        The bundle path.
    """
    out = Path(bundle_dir).resolve()
    with _staging(out, copy_from=out) as staging:
        digests = dict(manifest.get("files", {}))
        for relative, content in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            digests[relative] = sha256_file(target)
        full = {**manifest, "files": digests}
        (staging / MANIFEST).write_text(json.dumps(full, indent=2, default=_json_default) + "\n")
    return out


@contextmanager
def _staging(out: Path, copy_from: Path | None = None) -> Iterator[Path]:
    """A temporary sibling of ``out`` (a copy of ``copy_from`` when given) that replaces ``out``
    when the block completes, and is removed if anything in it fails: a bundle is never seen
    half-written."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes the directory private (0700); a bundle gets the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        if copy_from is not None:
            shutil.copytree(copy_from, staging, dirs_exist_ok=True)
        yield staging
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging directory to ``out``, moving an old one aside first so it
    is deleted only once the new bundle is in place."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class Bundle:
    """A bundle read from disk, with its files verified against the manifest's sha256."""

    path: Path
    manifest: dict[str, Any]

    def file(self, relative: str) -> Path:
        """Absolute path of a bundle-relative file name (as the manifest writes them)."""
        return self.path / relative

    @property
    def graphs(self) -> list[dict[str, Any]]:
        """The manifest's ``graphs``: ``{"name", "file"}`` per ONNX graph (one, or one per stage)."""
        return list(self.manifest.get("graphs", []))

    def graph_path(self, name: str = "model") -> Path:
        """Path of one graph's .onnx file; ``BundleError`` when the bundle has no such graph.
        ``name`` defaults to ``"model"`` (the one graph of a single-graph bundle)."""
        for graph in self.graphs:
            if graph["name"] == name:
                return self.file(graph["file"])
        raise BundleError(f"bundle '{self.path}' has no graph '{name}' (has {[g['name'] for g in self.graphs]})")

    def golden(self) -> dict[str, np.ndarray]:
        """Golden inputs, reference outputs and (when present) labels."""
        with np.load(self.file(GOLDEN)) as data:
            return {key: data[key] for key in data.files}

    @property
    def input_names(self) -> list[str]:
        """Graph input names from the manifest (``input``, then thresholds)."""
        return [spec["name"] for spec in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        """Graph output names from the manifest (``logits``, then decision outputs)."""
        return [spec["name"] for spec in self.manifest["outputs"]]

    @property
    def batch_inputs(self) -> list[str]:
        """Inputs whose axis 0 is the batch (thresholds are not)."""
        return [spec["name"] for spec in self.manifest["inputs"] if spec["shape"][:1] == ["batch"]]

    def input_meta(self, name: str) -> Any:
        """``TensorMeta`` of a graph input, from the manifest."""
        from slimdeploy.engines.base import TensorMeta

        for spec in self.manifest["inputs"]:
            if spec["name"] == name:
                return TensorMeta(name, np.dtype(spec["dtype"]), tuple(spec["shape"]), optional=bool(spec.get("optional")))
        raise BundleError(f"bundle '{self.path}' has no input '{name}'")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and check that every listed file is present and unaltered.

    Args:
        path: the bundle directory.
        verify: compare each file's sha256 with the manifest. Defaults to True.
    """
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"'{root}' is not a bundle directory | Fix: pass the directory written by slimdeploy export")
    if not manifest_path.is_file():
        raise BundleError(f"'{root}' has no {MANIFEST}: not a slimdeploy bundle, or an incomplete one | Fix: re-export it")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"'{manifest_path}' is not valid JSON ({exc}) | Fix: re-export the bundle") from exc
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"'{root}' has manifest schema {version}, this slimdeploy reads {SCHEMA_VERSION} | Fix: re-export with this version"
        )
    if verify:
        for relative, digest in manifest.get("files", {}).items():
            file_path = root / relative
            if not file_path.is_file():
                raise BundleError(f"bundle '{root}' lacks '{relative}' listed in its manifest | Fix: re-export it")
            if sha256_file(file_path) != digest:
                raise BundleError(
                    f"'{file_path}' differs from the sha256 in the manifest (altered or corrupt) | Fix: re-export the bundle"
                )
    return Bundle(root, manifest)


def bundle_runner(bundle: Bundle, device: str = "cpu", threads: int = 0, replay: bool = False) -> Any:
    """The runner that executes this bundle: ONNX Runtime on its graph, or the staged
    controller over one ONNX Runtime session per piece; with ``device="tensorrt"``, the same
    over the TensorRT engines that ``slimdeploy build`` recorded in the manifest.

    Args:
        bundle: a loaded bundle.
        device: ``"cpu"`` or ``"cuda"`` (ONNX Runtime), or ``"tensorrt"``. Defaults to ``"cpu"``.
        threads: intra-op threads; 0 lets ONNX Runtime choose. Defaults to 0.
        replay: staged bundles only: take gate decisions from the feed. Defaults to False.
    """
    from slimdeploy.engines.factory import make_runner

    manifest = bundle.manifest
    graphs: dict[str, Path] = {graph["name"]: bundle.file(graph["file"]) for graph in bundle.graphs}
    backend, batch_range = "onnxruntime", None
    if device == TENSORRT:
        from slimdeploy.engines.trt_build import engine_batch_range

        build = manifest.get("trt") or {}
        engines = build.get("engines")
        if not engines:
            raise BundleError(
                f"bundle '{bundle.path}' has no TensorRT engines | Fix: build them on this machine with "
                f"slimdeploy build {bundle.path}"
            )
        graphs = {name: bundle.file(file) for name, file in engines.items()}
        backend = TENSORRT
        batch_range = engine_batch_range(build)
    return make_runner(
        graphs,
        manifest.get("dynamic"),
        bundle.input_meta("input"),
        plan=manifest.get("gating") or manifest.get("exits") or None,
        decision_defaults=manifest.get("decisions", {}).get("thresholds"),
        device=device,
        threads=threads,
        replay=replay,
        backend=backend,
        batch_range=batch_range,
    )


def reference_runner(bundle: Bundle, threads: int = 0) -> Any:
    """A ``TorchRunner`` over the bundle's ``reference.pt`` (needs torch); raises
    ``BundleError`` when the bundle carries no reference weights."""
    from slimdeploy.engines.torch_runner import TorchRunner
    from slimdeploy.loading import load_checkpoint

    relative = bundle.manifest.get("reference_weights")
    if not relative:
        raise BundleError(
            f"bundle '{bundle.path}' carries no PyTorch reference weights | Fix: re-export without "
            "--no-reference-weights"
        )
    loaded = load_checkpoint(bundle.file(relative))
    inputs = {spec["name"]: bundle.input_meta(spec["name"]) for spec in bundle.manifest["inputs"]}
    return TorchRunner(loaded.module, inputs, bundle.output_names, threads=threads, name="torch")
