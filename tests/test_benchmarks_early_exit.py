"""``benchmarks/early_exit.py --quick`` runs end to end and writes every field it promises.

Smoke test only: the quick figures come from a handful of calls on a shared machine, so no
timing bound is asserted here (the figures live in benchmarks/results/early_exit.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_early_exit_benchmark_quick_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "early_exit.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| comparison | predicted | realised |" in done.stdout
    result = json.loads(out.read_text())
    assert result["benchmark"] == "early_exit" and result["quick"] is True
    assert result["machine"]["cpu_model"] and result["settings"]["threads"] >= 1
    macs = result["macs_per_stage"]
    assert len(macs) == 3 and all(m > 0 for m in macs)
    for batch in ("batch1", "batch32"):
        section = result[batch]
        assert sum(section["exit_share_per_stage"]) == pytest.approx(1.0)
        assert set(section["forms"]) == {"mask", "if", "staged"}
        assert section["forms"]["mask"]["predicted"] == 1.0
        for row in section["forms"].values():
            assert row["mean_ms"] > 0 and row["realised"] > 0
    # Staged computes each sample up to its exit only: more than 1x predicted once any exits early.
    assert result["batch32"]["forms"]["staged"]["predicted"] > 1.0
    overhead = result["controller_overhead"]
    assert [row["batch"] for row in overhead] == [1, 32]
    for row in overhead:
        assert row["stage_runs_per_stage"][0] == row["calls"] and 0 <= row["overhead_share_of_call"] < 1
    sweep = result["sweep"]
    assert [round(p["thresholds"][0], 3) for p in sweep][:2] == [0.0, 0.5]
    assert sweep[-1]["exit_share_per_stage"] == [0.0, 0.0, 1.0] and sweep[-1]["macs_average"] == sum(macs)
    assert all(p["accuracy"] is not None and p["latency_ms"] > 0 for p in sweep)
    assert len(result["checks"]) == 2 and all(isinstance(c["met"], bool) for c in result["checks"])
    assert result["plot"].endswith(".png") and Path(result["plot"]).is_file()
