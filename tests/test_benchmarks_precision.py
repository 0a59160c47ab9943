"""``benchmarks/precision.py --quick`` runs end to end and writes the fields it promises.

Smoke test only: no timing bound is asserted (quick figures on a shared machine are noise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_precision_benchmark_quick_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "precision.py"), "--quick", "--models", "mobilenet_v1_digits", "s2d_resnet20_digits",
         "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| model | FP32 p50 ms" in done.stdout
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["machine"]["versions"]["onnxruntime"]
    model, early_exit = result["models"]
    assert model["name"] == "mobilenet_v1_digits" and model["int8_parity_passed"] is True
    agreement = model["agreement"]
    assert agreement["samples"] == 64
    for form in ("int8_ort", "int8_trt_form"):
        assert 0.9 <= agreement[form]["top1_agreement"] <= 1.0, form
        assert 0.0 <= agreement[form]["accuracy"] <= 1.0
    assert [row["batch"] for row in model["latency"]] == [1, 32]
    for row in model["latency"]:
        assert row["fp32"]["p50_ms"] > 0 and row["int8"]["p50_ms"] > 0 and row["speedup_int8_over_fp32_p50"] > 0
    # The early-exit model (staged bundles) reports exit agreement for both INT8 forms.
    assert early_exit["name"] == "s2d_resnet20_digits" and early_exit["dynamic"] == "staged"
    for form in ("int8_ort", "int8_trt_form"):
        assert 0.9 <= early_exit["agreement"][form]["exit_agreement"] <= 1.0, form
    checks = {c["check"] for c in result["checks"]}
    # Speed targets only on the ResNet-class models.
    assert checks == {"mobilenet_v1_digits top1_agreement", "s2d_resnet20_digits int8_speedup_batch32",
                      "s2d_resnet20_digits top1_agreement", "s2d_resnet20_digits exit_agreement"}
