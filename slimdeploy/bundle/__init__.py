"""The bundle: a directory holding everything needed to run and re-check an exported model.

    bundle/
      manifest.json   schema version, versions, architecture, inputs/outputs, precision,
                      decisions, stages, files (relative path → sha256), parity summary
      model.onnx      the graph (staged bundles: one file per stage)
      golden.npz      inputs and the PyTorch reference outputs, so ``check`` needs no torch
      report.json     the full parity report of the export
      reference.pt    the PyTorch weights (slimdeploy checkpoint format), used only where torch
                      is installed: ``check --data`` and ``bench``'s PyTorch column

A bundle is untrusted input wherever it was made: ``schema`` declares the manifest (pydantic
models), ``reader`` checks a bundle before anything uses it (``load_bundle``: schema, paths
inside, no links, digests), ``writer`` writes one without losing anything (``write_bundle``,
``update_bundle``: staged, validated, swapped into place; ``--force`` replaces only a bundle),
``runners`` runs one.
"""

from slimdeploy.bundle.reader import (
    GOLDEN,
    REFERENCE_WEIGHTS,
    REPORT,
    TENSORRT,
    Bundle,
    load_bundle,
    resolve_inside,
    sha256_file,
)
from slimdeploy.bundle.runners import bundle_runner, device_note, reference_runner, resolve_device
from slimdeploy.bundle.schema import MANIFEST, SCHEMA_VERSION, Manifest, validate_manifest
from slimdeploy.bundle.writer import (
    bundle_size_hint,
    ensure_writable,
    recover_interrupted_swap,
    update_bundle,
    write_bundle,
)

__all__ = [
    "GOLDEN", "MANIFEST", "REFERENCE_WEIGHTS", "REPORT", "SCHEMA_VERSION", "TENSORRT", "Bundle", "Manifest",
    "bundle_runner", "bundle_size_hint", "device_note", "ensure_writable", "load_bundle", "recover_interrupted_swap", "reference_runner",
    "resolve_device", "resolve_inside", "sha256_file", "update_bundle", "validate_manifest", "write_bundle",
]
