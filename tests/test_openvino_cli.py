"""``--device openvino`` for ``check``, ``run`` and ``bench``: the bundle's ONNX graphs on
OpenVINO's CPU plugin, staged bundles through the same controller. Needs ``slimdeploy[openvino]``
(the tests that run it skip cleanly, saying why, without it); without it the commands exit 3
with the install command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_clean_error, run_cli

from slimdeploy.engines.openvino_runner import is_available

needs_openvino = pytest.mark.skipif(not is_available(), reason="openvino is not installed (pip install 'slimdeploy[openvino]')")


@needs_openvino
def test_check_run_and_bench_on_openvino(exported_bundle: Path, tmp_path: Path) -> None:
    check = run_cli("check", str(exported_bundle), "--device", "openvino", "--json", "-")
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["passed"] is True
    golden = np.load(exported_bundle / "golden.npz")
    inputs, out = tmp_path / "in.npy", tmp_path / "out.npz"
    np.save(inputs, golden["input"][:5])
    result = run_cli("run", str(exported_bundle), "--inputs", str(inputs), "--out", str(out), "--device", "openvino")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(out)["logits"], golden["ref_logits"][:5], atol=1e-3, rtol=1e-3)
    bench = run_cli("bench", str(exported_bundle), "--device", "openvino", "--batch", "1", "--warmup", "1",
                    "--iterations", "2", "--no-torch", "--json", "-")
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    assert [r["batch_size"] for r in report["results"]] == [1] and report["results"][0]["p50_ms"] > 0


@needs_openvino
@pytest.mark.slow
def test_staged_early_exit_bundle_runs_on_openvino_through_the_controller(tmp_path: Path) -> None:
    bundle = tmp_path / "s2d"
    export = run_cli("export", "zoo:s2d_resnet20_digits", "--out", str(bundle), "--dynamic", "staged",
                     "--samples", "32", "--batch-sizes", "1,8")
    assert export.returncode == 0, export.stdout + export.stderr
    check = run_cli("check", str(bundle), "--device", "openvino", "--json", "-")
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report["passed"] is True and report["decisions"], report.keys()


def test_without_openvino_the_device_is_exit_3_with_the_install_command(exported_bundle: Path, tmp_path: Path) -> None:
    hidden = tmp_path / "hidden" / "openvino"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("not installed here")\n')
    env = {"PYTHONPATH": os.pathsep.join([str(hidden.parent), str(REPO)])}
    result = run_cli("check", str(exported_bundle), "--device", "openvino", env=env)
    assert_clean_error(result, 3, "openvino is needed", "pip install 'slimdeploy[openvino]'")


def test_unknown_device_names_openvino_among_the_choices(exported_bundle: Path) -> None:
    result = run_cli("check", str(exported_bundle), "--device", "openvno")
    assert_clean_error(result, 2, "unknown device 'openvno'", "'openvino'")


def test_env_lists_openvino() -> None:
    result = run_cli("env", "--json", "-")
    assert result.returncode == 0, result.stderr
    row = next(row for row in json.loads(result.stdout) if row["name"] == "openvino")
    assert row["available"] is is_available() and "--device openvino" in row["purpose"]
    if not row["available"]:
        assert "slimdeploy[openvino]" in row["reason"]
    else:
        assert row["version"]


@needs_openvino
@pytest.mark.slow
def test_int8_compact_skipnet_passes_check_on_openvino(tmp_path: Path) -> None:
    """The bundle whose gates OpenVINO's fused residual sum used to flip (issue 16): with the
    runner reading residual identities before rounding, its gates agree as the criteria ask."""
    bundle = tmp_path / "skipnet-int8"
    export = run_cli("export", "zoo:skipnet38_digits", "--out", str(bundle), "--dynamic", "compact",
                     "--precision", "int8", "--calib", "digits", "--no-speed-check")
    assert export.returncode == 0, export.stdout + export.stderr
    check = run_cli("check", str(bundle), "--device", "openvino", "--json", "-")
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report["passed"] is True
    gates = report["decisions"]["gates"]
    assert gates and all(row["agreement"] >= 0.98 for row in gates), [row["agreement"] for row in gates]
