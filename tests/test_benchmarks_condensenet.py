"""``benchmarks/condensenet.py --quick`` runs end to end and writes every field it promises.

Smoke test only: the quick figures come from a handful of calls on a shared machine, so no
timing bound is asserted here (the figures live in benchmarks/results/condensenet.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_condensenet_benchmark_quick_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "condensenet.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| model | batch |" in done.stdout
    result = json.loads(out.read_text())

    assert result["benchmark"] == "condensenet"
    assert result["settings"]["quick"] is True and result["settings"]["threads"] >= 1
    for key in ("cpu_model", "cores", "date", "versions", "load_average_at_start"):
        assert result["machine"][key] is not None, key
    assert isinstance(result["machine"]["noisy"], bool)
    assert result["demo"]["model"] and result["demo"]["note"]
    assert result["large"]["config"]["stages"] == [14, 14, 14]
    assert result["large"]["config"]["growth"] == [8, 16, 32]
    for part in ("demo", "large"):
        section = result[part]
        for form in ("masked_dense", "condensed"):
            facts = section["forms"][form]
            for key in ("onnx_initializer_elements", "torch_params", "macs", "onnx_conv_nodes"):
                assert facts[key] > 0, (part, form, key)
        # Condensing removes weights and MACs; the classifier is exact, so logits agree.
        assert section["forms"]["condensed"]["macs"] < section["forms"]["masked_dense"]["macs"]
        assert section["forms"]["condensed"]["onnx_initializer_elements"] < section["forms"]["masked_dense"]["onnx_initializer_elements"]
        assert section["macs_ratio"] > 1
        assert section["agreement"]["max_abs_diff_logits_condensed_vs_masked_dense"] < 1e-3
        assert section["agreement"]["same_predictions"] is True
        assert [row["batch"] for row in section["timings"]] == [1, 32]
        for row in section["timings"]:
            for form in ("masked_dense", "condensed"):
                assert row[form]["mean_ms"] > 0 and row[form]["p50_ms"] > 0
            assert row["realised_speedup"] > 0 and row["predicted_speedup_macs"] > 1
            assert row["other_processes_cpu_cores"] >= 0
    assert len(result["checks"]) == 4
    for check in result["checks"]:
        assert check["target"] == ">= 2.0" and isinstance(check["met"], bool) and check["value"] > 0
