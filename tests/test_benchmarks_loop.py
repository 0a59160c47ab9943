"""``benchmarks/loop.py --quick`` runs end to end and writes every field it promises.

Smoke test only: the quick figures come from a handful of calls on a shared machine, so no
timing bound is asserted here (the figures live in benchmarks/results/loop.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_loop_benchmark_quick_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "l.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "loop.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| form | nodes (main graph / with subgraphs) |" in done.stdout
    result = json.loads(out.read_text())
    assert result["benchmark"] == "loop" and result["quick"] is True
    assert result["machine"]["cpu_model"] and result["settings"]["threads"] >= 1
    assert result["settings"]["arch"] == "cifar10_rnn_gate_38" and result["n_gated"] == 17
    exported = result["export"]
    assert set(exported) == {"if", "loop"} and all(row["passed"] for row in exported.values())
    # The recurrent SkipNet-38: one Loop per stage over its 5 blocks after the first; the two
    # downsampling blocks stay If-routed outside (2 If each, and 2 per Loop body), against 2 If
    # per gated block in the if form.
    assert (exported["loop"]["loop_nodes"], exported["loop"]["if_nodes"]) == (3, 2 * 2 + 3 * 2)
    assert (exported["if"]["loop_nodes"], exported["if"]["if_nodes"]) == (0, 2 * 17)
    assert exported["loop"]["nodes_main_graph"] < exported["if"]["nodes_main_graph"]
    for row in exported.values():
        assert row["file_bytes"] > 0 and row["seconds_total"] >= row["seconds_torch_export"] > 0
        assert row["nodes_with_subgraphs"] > row["nodes_main_graph"]
    composed = result["composition"]
    assert composed["pieces_seconds"] > 0
    assert all(composed[form]["compose_seconds"] > 0 for form in ("mask", "if", "loop"))
    levels = result["levels"]
    assert [level["skip_target"] for level in levels] == [0.25, 0.5, 0.75]
    for level in levels:
        for batch in ("batch1", "batch32"):
            section = level[batch]
            assert set(section["forms"]) == {"mask", "if", "loop"}
            assert section["forms"]["mask"]["predicted"] == 1.0
            # loop is accounted as if: a block runs on the whole batch when any sample needs it.
            assert section["forms"]["loop"]["predicted"] == section["forms"]["if"]["predicted"]
            assert all(row["mean_ms"] > 0 and row["realised"] > 0 for row in section["forms"].values())
            assert section["loop_over_if_time"] > 0 and section["other_processes_cpu_cores"] >= 0
    assert isinstance(result["machine"]["noisy"], bool) and result["checks"] == []
