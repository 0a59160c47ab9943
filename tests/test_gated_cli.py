"""End to end on an official SkipNet checkpoint: export --dynamic, check, run, bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import UPSTREAM, assert_clean_error, require_fixture, run_cli

KIT = UPSTREAM / "skipnet_cifar10_rnn_gate_38"


@pytest.fixture(scope="module")
def kit_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kit") / "inputs.npz"
    np.savez(path, input=torch.load(require_fixture(KIT) / "input.pt", weights_only=True).numpy())
    return path


@pytest.fixture(scope="module")
def staged_bundle(tmp_path_factory: pytest.TempPathFactory, kit_data: Path) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "rnn38_staged"
    result = run_cli("export", str(KIT / "checkpoint.pth.tar"), "--dynamic", "staged", "--data", str(kit_data),
                     "--samples", "8", "--batch-sizes", "1,8", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gates at batch 8: agreement 100.00%" in result.stdout
    return out


@pytest.mark.slow
def test_staged_bundle_layout_and_decisions(staged_bundle: Path) -> None:
    manifest = json.loads((staged_bundle / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "cifar10_rnn_gate_38" and manifest["dynamic"] == "staged"
    assert [o["name"] for o in manifest["outputs"]] == ["logits", "gates", "gate_probs"]
    assert manifest["inputs"][1] == {"name": "gate_threshold", "dtype": "float32", "shape": [], "optional": True, "default": 0.5}
    assert manifest["decisions"]["outputs"][0]["name"] == "gates"
    assert manifest["gating"]["n_blocks"] == 18 and manifest["gating"]["state"] == ["h", "c"]
    assert len(manifest["stages"]) == 1 + 17 * 2 + 2 + 1  # stem, gate+exec per block, 2 skips, head
    assert all((staged_bundle / "stages" / f"{name}.onnx").is_file() for name in manifest["stages"])
    reference = torch.load(KIT / "ref_outputs.pt", weights_only=True)
    with np.load(staged_bundle / "golden.npz") as golden:
        np.testing.assert_array_equal(golden["ref_gates"].T, reference["executed"].numpy().astype(np.uint8))
    report = json.loads((staged_bundle / "report.json").read_text())
    gates = report["decisions"]["gates"]
    assert [g["batch_size"] for g in gates] == [1, 8] and all(g["agreement"] == 1.0 for g in gates)


@pytest.mark.slow
def test_check_run_and_threshold_of_staged_bundle(tmp_path: Path, staged_bundle: Path, kit_data: Path) -> None:
    result = run_cli("check", str(staged_bundle), "--json", "-")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["decisions"]["gates"][0]["defects"] == 0

    x = np.load(kit_data)["input"]
    for threshold, name in ((0.5, "default"), (0.9, "strict")):
        feed = {"input": x} if name == "default" else {"input": x, "gate_threshold": np.array(threshold, np.float32)}
        np.savez(tmp_path / f"{name}.npz", **feed)
        result = run_cli("run", str(staged_bundle), "--inputs", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / f"{name}_out.npz"), "--batch", "3")
        assert result.returncode == 0, result.stderr
    default, strict = np.load(tmp_path / "default_out.npz"), np.load(tmp_path / "strict_out.npz")
    reference = torch.load(KIT / "ref_outputs.pt", weights_only=True)
    np.testing.assert_array_equal(default["gates"].T, reference["executed"].numpy().astype(np.uint8))
    assert strict["gates"].sum() < default["gates"].sum()  # a stricter threshold skips more
    # --gate-threshold is the same threshold as an option.
    result = run_cli("run", str(staged_bundle), "--inputs", str(tmp_path / "default.npz"), "--out",
                     str(tmp_path / "option_out.npz"), "--gate-threshold", "0.9")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "option_out.npz")["gates"], strict["gates"])


@pytest.mark.slow
def test_bench_reports_skip_rates_and_predicted_macs(staged_bundle: Path) -> None:
    result = run_cli("bench", str(staged_bundle), "--batch", "1,8", "--warmup", "1", "--iterations", "3", "--no-torch", "--json", "-")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["decisions"]
    executed = torch.load(KIT / "ref_outputs.pt", weights_only=True)["executed"].numpy()
    np.testing.assert_allclose(stats["skip_rate_per_block"], 1 - executed.mean(axis=1), atol=1e-6)
    assert stats["macs_mask"] > stats["macs_ideal"] > 0
    assert stats["predicted_speedup"]["8"] == pytest.approx(stats["macs_mask"] / stats["macs_ideal"])


@pytest.mark.slow
def test_loop_bundle_reproduces_the_kit_and_lints_clean(tmp_path: Path, kit_data: Path) -> None:
    """--dynamic loop on the official-kit checkpoint: exact decisions at batch 1 and 8, check,
    lint (the documented warnings only) and bench (MACs accounted as for if)."""
    import onnx

    out = tmp_path / "rnn38_loop"
    result = run_cli("export", str(KIT / "checkpoint.pth.tar"), "--dynamic", "loop", "--data", str(kit_data),
                     "--samples", "8", "--batch-sizes", "1,8", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gates at batch 8: agreement 100.00%" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dynamic"] == "loop" and [g["name"] for g in manifest["graphs"]] == ["model"]
    model = onnx.load(str(out / "model.onnx"))
    assert [n.op_type for n in model.graph.node].count("Loop") == 3  # one per stage
    report = json.loads((out / "report.json").read_text())
    assert all(g["agreement"] == 1.0 for g in report["decisions"]["gates"])
    reference = torch.load(KIT / "ref_outputs.pt", weights_only=True)
    with np.load(out / "golden.npz") as golden:
        np.testing.assert_array_equal(golden["ref_gates"].T, reference["executed"].numpy().astype(np.uint8))

    assert run_cli("check", str(out)).returncode == 0
    x = np.load(kit_data)["input"]
    np.savez(tmp_path / "in.npz", input=x)
    result = run_cli("run", str(out), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz"), "--batch", "1")
    assert result.returncode == 0, result.stderr
    outputs = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(outputs["gates"].T, reference["executed"].numpy().astype(np.uint8))
    np.testing.assert_allclose(outputs["logits"], reference["logits"].numpy(), atol=1e-4, rtol=0)

    result = run_cli("lint", str(out), "--json", "-")
    assert result.returncode == 0, result.stderr
    lint = json.loads(result.stdout)
    assert lint["errors"] == 0 and {f["rule"] for f in lint["findings"]} == {"if-form", "loop-form"}

    from slimdeploy.bench import gated_macs

    result = run_cli("bench", str(out), "--batch", "1,8", "--warmup", "1", "--iterations", "2", "--no-torch", "--json", "-")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["decisions"]
    assert stats["form"] == "loop"
    gates = reference["executed"].numpy().T
    for batch in (1, 8):
        assert stats["macs_form"][str(batch)] == pytest.approx(gated_macs(manifest["gating"], gates, "if", batch))
    assert stats["macs_form"]["1"] < stats["macs_mask"]


def test_dynamic_option_refused_for_static_models(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    result = run_cli("export", str(zoo_resnet_checkpoint), "--dynamic", "if", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "static")


@pytest.mark.needs_fixture(KIT)
def test_unknown_dynamic_form(tmp_path: Path) -> None:
    result = run_cli("export", str(KIT / "checkpoint.pth.tar"), "--dynamic", "scan", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "unknown dynamic form 'scan'", "'loop'")


@pytest.mark.slow
def test_trained_demo_skipnet_bundle_passes_check(tmp_path: Path) -> None:
    """The shipped SkipNet, default form on ONNX Runtime (compact), on held-out digits."""
    out = tmp_path / "skipnet38"
    result = run_cli("export", "zoo:skipnet38_digits", "--out", str(out), "--samples", "24")
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dynamic"] == "compact"
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["accuracy_reference"] >= 0.95
    gates = report["decisions"]["gates"][0]
    assert gates["agreement"] == 1.0
    # The samples were picked so that gates the data shows both ways are seen both ways.
    assert sum(1 for o, c in zip(gates["reference_open"], gates["reference_closed"]) if o and c) >= 3
    result = run_cli("check", str(out), "--json", "-")
    assert result.returncode == 0 and json.loads(result.stdout)["passed"]
