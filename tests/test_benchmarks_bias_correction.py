"""``benchmarks/bias_correction.py --quick`` runs end to end and writes the fields it promises.

Smoke test: the figures of a quick run (one model, 64 images) are not asserted beyond what any
correct run gives (agreements are shares, the error is positive, the ratio is their quotient)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_bias_correction_benchmark_quick_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bias_correction.py"), "--quick", "--models", "mobilenet_v1_digits",
         "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| mobilenet_v1_digits |" in done.stdout
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["settings"]["threads"] == 2 and result["machine"]["date"]
    (model,) = result["models"]
    assert model["name"] == "mobilenet_v1_digits"
    corrected, uncorrected = model["corrected"], model["uncorrected"]
    assert corrected["parity_samples"]["layers_corrected"] > 0 and uncorrected["parity_samples"]["layers_corrected"] is None
    for row in (corrected["heldout"], uncorrected["heldout"]):
        assert row["samples"] == 64 and row["mean_abs_logits_vs_torch"] > 0
        assert 0.9 <= row["top1_agreement"] <= 1.0
    assert model["mean_abs_logits_ratio_uncorrected_over_corrected"] == pytest.approx(
        uncorrected["heldout"]["mean_abs_logits_vs_torch"] / corrected["heldout"]["mean_abs_logits_vs_torch"])
