"""The bundle's default CPU runtime (issue 16, part 3): chosen at export where OpenVINO is
installed (faster at every timed batch size by ``MARGIN`` and passing the bundle's parity on
it), and followed by ``run``/``check``/``bench --device auto``.

The choice's rules are tested with the timing and the OpenVINO parity check replaced by fixed
results, so they run (and can fail) without OpenVINO; no timing bound is asserted anywhere. The
real timing and the OpenVINO side run where ``slimdeploy[openvino]`` is installed and skip,
saying why, where it is not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import REPO, run_cli

from slimdeploy.engines.base import TensorMeta
from slimdeploy.engines.openvino_runner import is_available
from slimdeploy.export import ExportOptions, runtime
from slimdeploy.exporters.checked import CheckedGraphs
from slimdeploy.exporters.forms import ExportedGraphs
from slimdeploy.parity import ParityReport

needs_openvino = pytest.mark.skipif(not is_available(), reason="openvino is not installed (pip install 'slimdeploy[openvino]')")


def _checked(bundle: Path, form: str | None = None, passed: bool = True) -> CheckedGraphs:
    meta = TensorMeta("input", np.dtype(np.float32), ("batch", 3, 32, 32))
    graphs = ExportedGraphs({"model": onnx.load(bundle / "model.onnx")}, form, None, meta, {}, 18)
    report = ParityReport("torch", "onnxruntime", "fp32", [1], 8, {}, failures=[] if passed else ["logits: broken"])
    return CheckedGraphs(graphs, report, {"applied": False})


class _HeldOut:
    """The parity samples, and a parity check on OpenVINO that reports ``passes``."""

    def __init__(self, passes: bool) -> None:
        self.inputs = np.zeros((40, 3, 32, 32), np.float32)
        self.source = "test"
        self.passes = passes
        self.checked_on: list[str] = []

    def check(self, graphs: Any, options: Any, label: str, say: Any, precision: str = "fp32", backend: str = "onnxruntime") -> ParityReport:
        self.checked_on.append(backend)
        return ParityReport("torch", backend, precision, [1], 8, {}, failures=[] if self.passes else ["gates: agreement 90% is below 98%"])


def _timed(speedups: dict[int, float]):
    def time_runtimes(checked: Any, held_out: Any, threads: int) -> list[dict[str, Any]]:
        return [{"batch": batch, "calls_per_round": 1, "rounds": 1, "onnxruntime_ms": 1.0,
                 "openvino_ms": 1.0 / speedup, "speedup": speedup} for batch, speedup in sorted(speedups.items())]
    return time_runtimes


def test_without_timing_onnx_runtime_stays_and_the_manifest_says_why(exported_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "time_runtimes", _timed({1: 9.0, 32: 9.0}))  # would choose OpenVINO if timed
    held_out = _HeldOut(passes=True)
    cases = [
        (_checked(exported_bundle), ExportOptions(target="trt"), "the TensorRT target"),
        (_checked(exported_bundle), ExportOptions(speed_check=False), "turned off (--no-speed-check)"),
        (_checked(exported_bundle, passed=False), ExportOptions(), "failed its parity check on ONNX Runtime"),
        (_checked(exported_bundle, form="staged"), ExportOptions(), "staged bundles run on ONNX Runtime"),
    ]
    for checked, options, reason in cases:
        info = runtime.choose_cpu_runtime(checked, held_out, options, lambda _m: None).runtime
        assert info["default"] == "onnxruntime" and info["measured"] is False and reason in info["reason"], info
    monkeypatch.setattr("slimdeploy.engines.openvino_runner.is_available", lambda: False)
    info = runtime.choose_cpu_runtime(_checked(exported_bundle), held_out, ExportOptions(), lambda _m: None).runtime
    assert info == {"default": "onnxruntime", "measured": False,
                    "reason": "OpenVINO is not installed here (pip install 'slimdeploy[openvino]' to time it at export)"}
    assert held_out.checked_on == []


@pytest.mark.parametrize(("speedups", "passes", "default", "reason"), [
    ({1: 1.5, 32: 2.0}, True, "openvino", "at least 1.1x faster at every batch size and passed parity"),
    ({1: 0.6, 32: 2.0}, True, "onnxruntime", "not 1.1x faster at every batch size"),
    ({1: 1.05, 32: 1.3}, True, "onnxruntime", "not 1.1x faster at every batch size"),
    ({1: 1.5, 32: 2.0}, False, "onnxruntime", "faster but failed the bundle's parity check: gates: agreement 90%"),
])
def test_openvino_becomes_the_default_only_when_faster_everywhere_and_passing_parity(
        exported_bundle: Path, monkeypatch: pytest.MonkeyPatch, speedups: dict[int, float], passes: bool, default: str,
        reason: str) -> None:
    monkeypatch.setattr(runtime, "time_runtimes", _timed(speedups))
    monkeypatch.setattr("slimdeploy.engines.openvino_runner.is_available", lambda: True)
    held_out = _HeldOut(passes)
    checked = runtime.choose_cpu_runtime(_checked(exported_bundle), held_out, ExportOptions(), lambda _m: None)
    info = checked.runtime
    assert info["default"] == default and info["measured"] is True and reason in info["reason"], info
    assert [row["speedup"] for row in info["batches"]] == [speedups[1], speedups[32]]
    # Parity on OpenVINO is checked only where its speed would make it the default.
    assert held_out.checked_on == (["openvino"] if all(s >= runtime.MARGIN for s in speedups.values()) else [])
    assert any("runs on OpenVINO by default" in note for note in checked.notes) is (default == "openvino")


def _preferring_openvino(bundle: Path, tmp_path: Path) -> Path:
    """A copy of ``bundle`` whose manifest records OpenVINO as its default runtime."""
    copy = tmp_path / "prefers-openvino"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["runtime"] = {"default": "openvino", "measured": True, "reason": "test"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _hidden_openvino(tmp_path: Path) -> dict[str, str]:
    hidden = tmp_path / "hidden" / "openvino"
    hidden.mkdir(parents=True, exist_ok=True)
    (hidden / "__init__.py").write_text('raise ImportError("not installed here")\n')
    return {"PYTHONPATH": os.pathsep.join([str(hidden.parent), str(REPO)])}


def test_auto_falls_back_to_onnx_runtime_where_openvino_is_missing_and_says_so(exported_bundle: Path, tmp_path: Path) -> None:
    bundle = _preferring_openvino(exported_bundle, tmp_path)
    result = run_cli("check", str(bundle), "--json", str(tmp_path / "report.json"), env=_hidden_openvino(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "runs fastest on OpenVINO" in result.stderr and "pip install 'slimdeploy[openvino]'" in result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["candidate"] == "onnxruntime"
    # A bundle without a recorded preference, and an explicit --device, say nothing.
    for args in ((str(exported_bundle),), (str(bundle), "--device", "cpu")):
        quiet = run_cli("check", *args, env=_hidden_openvino(tmp_path))
        assert quiet.returncode == 0 and "OpenVINO" not in quiet.stderr, quiet.stderr


def test_a_manifest_naming_an_unknown_runtime_is_refused(exported_bundle: Path, tmp_path: Path) -> None:
    bundle = _preferring_openvino(exported_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["runtime"]["default"] = "tensorflow"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("check", str(bundle))
    assert result.returncode != 0 and "runtime" in result.stderr and "Traceback" not in result.stderr, result.stderr


@needs_openvino
def test_auto_runs_a_bundle_that_prefers_openvino_on_openvino(exported_bundle: Path, tmp_path: Path) -> None:
    bundle = _preferring_openvino(exported_bundle, tmp_path)
    result = run_cli("check", str(bundle), "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "running on OpenVINO, this bundle's default CPU runtime" in result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["candidate"] == "openvino"
    explicit = run_cli("check", str(bundle), "--device", "cpu", "--json", "-")
    assert json.loads(explicit.stdout)["candidate"] == "onnxruntime"


@needs_openvino
@pytest.mark.slow
def test_export_times_openvino_and_records_a_consistent_choice(tmp_path: Path) -> None:
    """Whatever this CPU measures, the recorded default follows the rule from the recorded rows."""
    bundle = tmp_path / "mobilenet"
    result = run_cli("export", "zoo:mobilenet_v1_digits", "--out", str(bundle), "--samples", "40", "--batch-sizes", "1,8")
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads((bundle / "manifest.json").read_text())["runtime"]
    assert info["measured"] is True and [row["batch"] for row in info["batches"]] == [1, 32]
    for row in info["batches"]:
        assert row["onnxruntime_ms"] > 0 and row["openvino_ms"] > 0
        assert row["speedup"] == pytest.approx(row["onnxruntime_ms"] / row["openvino_ms"], rel=2e-3)
    faster = all(row["speedup"] >= runtime.MARGIN for row in info["batches"])
    assert info["default"] == ("openvino" if faster and info.get("openvino_parity_passed") else "onnxruntime")
