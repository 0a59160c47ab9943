"""``benchmarks/openvino_vs_ort.py --quick`` runs end to end and writes the fields it promises (the
CondenseNet-86 part left out for time: ``--no-large``). Smoke test only: no timing bound is
asserted. Skips, saying why, without ``slimdeploy[openvino]``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimdeploy.engines.openvino_runner import is_available
from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.skipif(not is_available(), reason="openvino is not installed (pip install 'slimdeploy[openvino]')")
def test_openvino_benchmark_quick_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "ov.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "openvino_vs_ort.py"), "--quick", "--models", "mobilenet_v1_digits", "--no-large",
         "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| model | precision | form | OpenVINO check" in done.stdout
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["settings"]["openvino"] and "large" not in result
    assert [(row["model"], row["precision"]) for row in result["demo"]] == [("mobilenet_v1_digits", "fp32"), ("mobilenet_v1_digits", "int8")]
    for row in result["demo"]:
        # The same bundle on both runtimes: OpenVINO passes the bundle's own check and agrees with ONNX Runtime.
        assert row["export_parity_passed"] and row["openvino_check_passed"], row["openvino_check_failures"]
        assert row["same_top1"] >= 0.95 and row["max_abs_logits_openvino_vs_onnxruntime"] < 1.0
        assert [t["batch"] for t in row["timings"]] == [1, 32]
        # The export's choice of default runtime is recorded, measured, and follows its own rows.
        choice = row["runtime_choice"]
        assert choice["measured"] is True and row["default_runtime"] == choice["default"] in ("onnxruntime", "openvino")
        assert (choice["default"] == "openvino") == (all(b["speedup"] >= choice["margin"] for b in choice["batches"])
                                                      and choice.get("openvino_parity_passed", False))
        for timing in row["timings"]:
            assert timing["onnxruntime"] > 0 and timing["openvino"] > 0
            assert timing["openvino_speedup_over_onnxruntime"] == pytest.approx(timing["onnxruntime"] / timing["openvino"], rel=2e-2)  # times are rounded to 4 decimals of a ms
    assert isinstance(result["machine"]["noisy"], bool)
