"""End to end on the demo S2D model: export in every early-exit form, check, run with other
thresholds, bench with a threshold sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_clean_error, folder_inputs, run_cli


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s2d")
    out = {}
    for form in ("staged", "if", "mask"):
        out[form] = root / form
        result = run_cli("export", "zoo:s2d_resnet20_digits", "--dynamic", form, "--out", str(out[form]))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "exit_stage at batch 16: agreement 100.00%" in result.stdout
    return out


@pytest.mark.slow
@pytest.mark.parametrize("form", ["staged", "if", "mask"])
def test_export_and_check(bundles: dict[str, Path], form: str) -> None:
    manifest = json.loads((bundles[form] / "manifest.json").read_text())
    assert manifest["dynamic"] == form and manifest["model"]["family"] == "early_exit"
    assert [o["name"] for o in manifest["outputs"]] == ["logits", "exit_stage", "exit_confidence"]
    thresholds = manifest["decisions"]["thresholds"]["exit_thresholds"]
    assert manifest["inputs"][1] == {"name": "exit_thresholds", "dtype": "float32", "shape": [3], "optional": True, "default": thresholds}
    assert manifest["exits"]["n_stages"] == 3 and set(manifest["exits"]["macs"]) == {"stage0", "stage1", "stage2"}
    if form == "staged":
        assert manifest["stages"] == ["stage0", "stage1", "stage2"]
    # The golden samples cover every exit stage.
    golden = np.load(bundles[form] / "golden.npz")
    assert set(golden["ref_exit_stage"].tolist()) == {0, 1, 2}
    result = run_cli("check", str(bundles[form]), "--batch-sizes", "1,8")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exit_stage at batch 8: agreement 100.00%" in result.stdout and "parity PASSED" in result.stdout


@pytest.mark.slow
def test_run_with_other_thresholds_and_bad_shape(bundles: dict[str, Path], tmp_path: Path) -> None:
    golden = np.load(bundles["staged"] / "golden.npz")
    feed = tmp_path / "feed.npz"
    np.savez(feed, input=golden["input"], exit_thresholds=np.array([1.5, 1.5, 0.0], np.float32))
    result = run_cli("run", str(bundles["staged"]), "--inputs", str(feed), "--out", str(tmp_path / "out.npz"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (np.load(tmp_path / "out.npz")["exit_stage"] == 2).all()
    np.savez(feed, input=golden["input"], exit_thresholds=np.array([0.5, 0.5], np.float32))
    result = run_cli("run", str(bundles["if"]), "--inputs", str(feed), "--out", str(tmp_path / "bad.npz"))
    assert_clean_error(result, 2, "exit_thresholds")
    # The thresholds as an option (over the file's), and float64 inputs cast with a note.
    np.savez(feed, input=golden["input"].astype(np.float64))
    result = run_cli("run", str(bundles["staged"]), "--inputs", str(feed), "--out", str(tmp_path / "opt.npz"),
                     "--exit-thresholds", "1.5,1.5,0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (np.load(tmp_path / "opt.npz")["exit_stage"] == 2).all()
    assert "note: cast 'input' from float64 to float32" in result.stderr
    wrong = run_cli("run", str(bundles["staged"]), "--inputs", str(feed), "--out", str(tmp_path / "no.npz"),
                    "--exit-thresholds", "0.5,0.5")
    assert_clean_error(wrong, 2, "--exit-thresholds takes 3 value(s)")


@pytest.mark.slow
def test_bench_sweep(bundles: dict[str, Path], tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    result = run_cli("bench", str(bundles["staged"]), "--no-torch", "--batch", "1,8", "--warmup", "1", "--iterations", "3",
                     "--sweep", "0.5,0.99,1.01", "--json", str(report_path), "--plot", str(tmp_path / "sweep.png"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    exits = report["exits"]
    assert sum(exits["exit_share_per_stage"]) == pytest.approx(1.0)
    assert exits["macs_ideal"] < exits["macs_mask"] == sum(exits["macs_per_stage"])
    sweep = report["sweep"]
    swept, (default,) = sweep[:-1], sweep[-1:]
    assert [p["thresholds"][0] for p in swept] == pytest.approx([0.5, 0.99, 1.01])
    assert swept[-1]["exit_share_per_stage"] == [0.0, 0.0, 1.0] and swept[-1]["macs_average"] == exits["macs_mask"]
    assert swept[0]["macs_average"] <= swept[1]["macs_average"] <= swept[2]["macs_average"]
    # Over the whole held-out split, not the 32 golden samples, with the bundle's own thresholds marked.
    manifest = json.loads((bundles["staged"] / "manifest.json").read_text())
    assert report["sweep_source"] == "digits:heldout" and {p["samples"] for p in sweep} == {500}
    assert default["default"] and default["thresholds"] == pytest.approx(manifest["decisions"]["thresholds"]["exit_thresholds"])
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # --data gives the sweep's inputs (and labels).
    golden = np.load(bundles["staged"] / "golden.npz")
    np.savez(tmp_path / "mine.npz", input=golden["input"][:20], labels=golden["labels"][:20])
    mine = run_cli("bench", str(bundles["staged"]), "--no-torch", "--batch", "1", "--warmup", "1", "--iterations", "2",
                   "--sweep", "0.9", "--data", str(tmp_path / "mine.npz"), "--json", "-")
    assert mine.returncode == 0, mine.stderr
    report = json.loads(mine.stdout)
    assert report["sweep_source"] == "mine.npz" and [p["samples"] for p in report["sweep"]] == [20, 20]
    gated = run_cli("bench", str(bundles["staged"]), "--plot", str(tmp_path / "x.png"))
    assert_clean_error(gated, 2, "--sweep")


@pytest.mark.slow
def test_bench_sweep_streamed_over_an_image_folder(bundles: dict[str, Path], digits_image_folder: Path, tmp_path: Path) -> None:
    """``bench --sweep --data FOLDER`` on two worker processes gives the sweep that the in-memory
    sweep gives over the same images (read here, independently, into one .npz)."""
    manifest = json.loads((bundles["staged"] / "manifest.json").read_text())
    prep = manifest["preprocessing"]
    inputs, labels = folder_inputs(digits_image_folder, tuple(prep["input_size"]), prep["mean"], prep["std"])
    np.savez(tmp_path / "all.npz", input=inputs, labels=labels)
    common = ["--no-torch", "--batch", "1", "--warmup", "1", "--iterations", "2", "--sweep", "0.5,0.9", "--json", "-"]
    memory = run_cli("bench", str(bundles["staged"]), *common, "--data", str(tmp_path / "all.npz"))
    streamed = run_cli("bench", str(bundles["staged"]), *common, "--data", str(digits_image_folder), "--workers", "2",
                       "--shard-size", "100")
    assert memory.returncode == 0 and streamed.returncode == 0, memory.stderr + streamed.stderr
    expected, got = json.loads(memory.stdout)["sweep"], json.loads(streamed.stdout)
    assert got["sweep_dataset"]["samples"] == len(labels) and got["sweep_dataset"]["mode"] == "processes"
    assert [p["label"] for p in got["sweep"]] == [p["label"] for p in expected] == ["0.5", "0.9", "default"]
    for want, have in zip(expected, got["sweep"]):
        assert have["samples"] == want["samples"] == len(labels)
        assert have["exit_share_per_stage"] == pytest.approx(want["exit_share_per_stage"], rel=1e-12)
        assert have["macs_average"] == pytest.approx(want["macs_average"], rel=1e-12)
        assert have["accuracy"] == pytest.approx(want["accuracy"], rel=1e-12)
