"""Real TensorRT engines on a GPU, one test per model family (issue 7 part 4).

Each test exports a shipped demo model for TensorRT (parity proven in ONNX Runtime), builds the
engines with ``slimdeploy build`` (``build_bundle``) and checks them against the golden
PyTorch outputs through ``TrtRunner``: FP32 tolerances (TF32 is off), every gate decision equal.
Skipped with the reason where TensorRT, a device-buffer provider or a GPU is missing; nothing
here imports tensorrt unless it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimdeploy.engines import trt_runner


def _skip_reason() -> str | None:
    from slimdeploy._optional import is_available

    if not is_available("tensorrt"):
        return "TensorRT is not installed: pip install 'slimdeploy[trt]' on a GPU machine, or use docker/trt.Dockerfile"
    if not trt_runner.is_available():
        return "neither cuda-python nor torch is installed for TensorRT's device buffers: pip install 'slimdeploy[trt]'"
    try:
        from cuda.bindings import runtime as cudart

        error, count = cudart.cudaGetDeviceCount()
        if int(error) != 0 or count < 1:
            return "no CUDA GPU visible to cuda-python"
    except ImportError:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
    return None


REASON = _skip_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.trt,
    pytest.mark.slow,
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]


def _export_build_check(tmp_path: Path, checkpoint: str, dynamic: str | None = None) -> dict:
    from slimdeploy.build import build_bundle
    from slimdeploy.export import export
    from slimdeploy.parity import check_bundle
    from slimdeploy.zoo import zoo_checkpoint_path

    out = tmp_path / checkpoint
    exported = export(zoo_checkpoint_path(checkpoint), out, target="trt", dynamic=dynamic, samples=32, batch_sizes=(1, 16))
    assert exported.passed, exported.report.failures
    built = build_bundle(out)
    assert built.report is not None and built.report.passed, built.report.failures if built.report else None
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["trt"]["engines"]) == {g["name"] for g in manifest["graphs"]}
    assert manifest["trt"]["built"]["parity"]["passed"] is True
    # A second check from the bundle alone, at batch sizes of its own (the profile allows 1..32).
    again = check_bundle(out, batch_sizes=(3, 32), device="tensorrt")
    assert again.passed, again.failures
    return manifest


def test_static_spconv_resnet20(tmp_path: Path) -> None:
    manifest = _export_build_check(tmp_path, "spconv_resnet20_digits")
    assert manifest["trt"]["engines"] == {"model": "trt/model.engine"}


def test_static_mobilenet(tmp_path: Path) -> None:
    _export_build_check(tmp_path, "mobilenet_v1_digits")


def test_condensenet(tmp_path: Path) -> None:
    manifest = _export_build_check(tmp_path, "condensenet_digits")
    assert manifest["model"]["deployed_arch"] == "condensenet_converted"  # the index Gather parses


def test_skipnet_staged(tmp_path: Path) -> None:
    manifest = _export_build_check(tmp_path, "skipnet38_digits")
    assert manifest["dynamic"] == "staged" and len(manifest["trt"]["engines"]) == len(manifest["stages"])
    decisions = manifest["trt"]["built"]["parity"]
    assert decisions["passed"]


def test_skipnet_if(tmp_path: Path) -> None:
    manifest = _export_build_check(tmp_path, "skipnet38_digits", dynamic="if")
    assert manifest["dynamic"] == "if" and manifest["trt"]["notes"]
