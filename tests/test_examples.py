"""The worked examples (``examples/``, the README's "Deploy your own dynamic network"): each
trains briefly with ``examples/train.py`` (one epoch here), exports through its own factory in
its baseline (mask) and deployed form with parity at batch 1 and 8, passes ``check``, and ``bench`` reports its decisions
and predicted MACs. Slow: training and four exports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

# The baseline and the deployed form of each; every form of the protocol is compared with the
# network in process in tests/test_discovery.py.
EXAMPLES = {
    "gated_mobilenet_v2": ("mask", "compact"),
    "early_exit_resnet": ("mask", "staged"),
}


@pytest.fixture(scope="module", params=sorted(EXAMPLES))
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    import subprocess

    name = request.param
    checkpoint = tmp_path_factory.mktemp("examples") / f"{name}.pt"
    result = subprocess.run([sys.executable, "examples/train.py", name, "--epochs", "1", "--out", str(checkpoint)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--arch examples/{name}.py:{name}" in result.stdout and "held-out accuracy" in result.stdout
    return name, checkpoint


def test_every_form_exports_checks_and_benches(trained: tuple[str, Path], tmp_path: Path) -> None:
    name, checkpoint = trained
    spec = f"examples/{name}.py:{name}"
    for form in EXAMPLES[name]:
        out = tmp_path / form
        result = run_cli("export", str(checkpoint), "--arch", spec, "--dynamic", form, "--out", str(out),
                         "--samples", "16", "--batch-sizes", "1,8", cwd=REPO)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["model"]["factory"] == spec and manifest["parity"]["passed"]
        plan = manifest["gating"] or manifest["exits"]
        assert plan["modules"], plan  # the gated blocks or exits discovered, by module path
        checked = run_cli("check", str(out), cwd=REPO)
        assert checked.returncode == 0 and "parity PASSED" in checked.stdout
    report = run_cli("bench", str(tmp_path / EXAMPLES[name][-1]), "--baseline", str(tmp_path / "mask"), "--batch", "1",
                     "--iterations", "2", "--warmup", "1", "--threads", "1", "--json", "-", cwd=REPO)
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    stats = data["decisions"] or data["exits"]
    assert stats["macs_mask"] > 0 and stats["predicted_speedup"]["1"] > 0
    assert "vs_baseline_mask_batch1" in data["speedups"]
