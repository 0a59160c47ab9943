"""Bundles: atomic writes, refusal to overwrite, sha256 verification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slimdeploy.bundle import MANIFEST, SCHEMA_VERSION, load_bundle, sha256_file, write_bundle
from slimdeploy.errors import BundleError, OutputExistsError

FILES = {"model.onnx": b"graph bytes", "golden.npz": {"input": np.arange(6, dtype=np.float32)}}
MANIFEST_FIELDS = {"graphs": [{"name": "model", "file": "model.onnx"}], "inputs": [], "outputs": []}


def test_write_then_load(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "b", FILES, dict(MANIFEST_FIELDS))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert set(manifest["files"]) == {"model.onnx", "golden.npz"}
    assert manifest["files"]["model.onnx"] == sha256_file(out / "model.onnx")
    bundle = load_bundle(out)
    np.testing.assert_array_equal(bundle.golden()["input"], np.arange(6, dtype=np.float32))
    assert bundle.graph_path("model").read_bytes() == b"graph bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging directory left behind


def test_existing_directory_refused_and_untouched(tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        write_bundle(out, FILES, dict(MANIFEST_FIELDS))
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "b"
    write_bundle(out, {"model.onnx": b"old"}, dict(MANIFEST_FIELDS))
    write_bundle(out, {"model.onnx": b"new"}, dict(MANIFEST_FIELDS), force=True)
    assert (out / "model.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failure_mid_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    write_bundle(out, {"model.onnx": b"old"}, dict(MANIFEST_FIELDS))

    class Boom(dict):
        # Fails after the first file, while the staging directory is being filled.
        def items(self):
            yield "model.onnx", b"new"
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_bundle(out, Boom(), dict(MANIFEST_FIELDS), force=True)
    assert (out / "model.onnx").read_bytes() == b"old"  # the old bundle survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with pytest.raises(RuntimeError):
        write_bundle(tmp_path / "fresh", Boom(), dict(MANIFEST_FIELDS))
    assert not (tmp_path / "fresh").exists()


def test_tampered_file_detected(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "b", FILES, dict(MANIFEST_FIELDS))
    (out / "model.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(out)


def test_missing_file_and_missing_manifest(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "b", FILES, dict(MANIFEST_FIELDS))
    (out / "golden.npz").unlink()
    with pytest.raises(BundleError, match=r"lacks 'golden\.npz'"):
        load_bundle(out)
    (out / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_bundle(out)
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "nowhere")


def test_other_schema_version_refused(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "b", FILES, dict(MANIFEST_FIELDS))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["schema_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema 99"):
        load_bundle(out)
