"""``benchmarks/runtime.py --quick`` runs end to end and writes every field it promises.

Smoke test only: the quick figures come from a handful of calls on a shared machine, so no
timing bound is asserted here (the figures live in benchmarks/results/runtime.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_runtime_benchmark_quick_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "runtime.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| model | batch |" in done.stdout
    result = json.loads(out.read_text())

    assert result["quick"] is True
    machine = result["machine"]
    for key in ("cpu_model", "cores", "date", "versions"):
        assert machine[key], key
    assert machine["versions"]["torch"] and machine["versions"]["onnxruntime"]
    settings = result["settings"]
    assert settings["threads"] >= 1 and settings["rounds"] >= 1
    assert settings["export_peak_rss_method"] and settings["export_wall_method"]
    assert set(result["targets"]) == {
        "ort_speedup_batch1", "ort_speedup_batch32", "export_seconds_resnet56",
    }

    names = [m["name"] for m in result["models"]]
    assert names == ["mobilenet_v1_digits", "spconv_resnet20_digits"]
    exports = [m["export"] for m in result["models"]] + [result["export_sized"]["export"]]
    for export in exports:
        for key in ("wall_seconds", "pipeline_seconds", "peak_rss_mb", "params"):
            assert export[key] > 0, key
        assert export["wall_seconds"] >= export["pipeline_seconds"]
    for model in result["models"]:
        assert [row["batch"] for row in model["latency"]] == [1, 32]
        for row in model["latency"]:
            per_round = settings["timed_calls_per_round"][str(row["batch"])]
            for runner in ("onnxruntime", "torch"):
                stats = row[runner]
                assert stats["calls"] == settings["rounds"] * per_round
                assert 0 < stats["p50_ms"] <= stats["p90_ms"]
                assert len(stats["round_p50_ms"]) == settings["rounds"]
            assert row["speedup_torch_over_ort_p50"] > 0
            assert row["max_abs_diff_logits"] < 1e-2  # both runners answered alike

    checks = result["checks"]
    assert len(checks) == 5  # two models x two batch sizes, and the export time
    assert all(isinstance(c["passed"], bool) and c["measured"] > 0 for c in checks)
    assert result["passed"] == all(c["passed"] for c in checks)
