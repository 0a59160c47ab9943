"""End to end on the official CondenseNet kit: export condenses the learned model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import UPSTREAM, assert_clean_error, require_fixture, run_cli

KIT = UPSTREAM / "condensenet_cifar10_small"


@pytest.fixture(scope="module")
def kit_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kit") / "inputs.npz"
    np.savez(path, input=torch.load(require_fixture(KIT) / "input.pt", weights_only=True).numpy())
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("flag", "reference"), [((), "logits_learned"), (("--condense-classifier",), "logits_converted")])
def test_learned_checkpoint_exports_condensed(tmp_path: Path, kit_data: Path, flag: tuple[str, ...], reference: str) -> None:
    out = tmp_path / "bundle"
    result = run_cli("export", str(KIT / "checkpoint.pth.tar"), "--data", str(kit_data), "--samples", "4",
                     "--batch-sizes", "1,4", "--out", str(out), *flag)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "condensenet" and manifest["model"]["deployed_arch"] == "condensenet_converted"
    assert manifest["model"]["transforms"] == ["condense" + ("+classifier" if flag else ""), "fold"]
    # Every dense layer folded: conv_2's BN into the 1x1 conv, the shuffle into the 3x3 weights.
    assert manifest["model"]["folds"]["bn_into_conv"] == 6 and manifest["model"]["folds"]["shuffle_into_weights"] == 6
    graph = onnx.load(out / "model.onnx").graph
    ops = [node.op_type for node in graph.node]
    assert "Gather" in ops and "Mul" not in ops  # index layers, no masked dense convolution
    # Shuffles and conv_2 BNs folded: one BN per layer (the gathered one) and norm_last remain.
    assert "Transpose" not in ops and ops.count("BatchNormalization") == 6 + 1
    assert sum(1 for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)) >= 6
    # inspect shows what was folded.
    shown = run_cli("inspect", str(out), "--json", "-")
    assert shown.returncode == 0 and json.loads(shown.stdout)["folds"]["bn_into_conv"] == 6
    # The bundle's graph reproduces the official outputs.
    x = np.load(kit_data)["input"]
    np.savez(tmp_path / "in.npz", input=x)
    assert run_cli("run", str(out), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz")).returncode == 0
    expected = torch.load(KIT / "ref_outputs.pt", weights_only=True)[reference].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["logits"], expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_converted_checkpoint_exports_folded_and_matches_official(tmp_path: Path, kit_data: Path) -> None:
    out = tmp_path / "converted"
    result = run_cli("export", str(KIT / "converted_checkpoint.pth.tar"), "--arch", "condensenet_converted",
                     "--data", str(kit_data), "--samples", "4", "--batch-sizes", "1,4", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["transforms"] == ["fold"] and manifest["model"]["folds"]["shuffle_into_weights"] == 6
    x = np.load(kit_data)["input"]
    np.savez(tmp_path / "in.npz", input=x)
    assert run_cli("run", str(out), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz")).returncode == 0
    expected = torch.load(KIT / "ref_outputs.pt", weights_only=True)["logits_converted"].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["logits"], expected, atol=1e-4, rtol=0)


def test_condense_classifier_refused_for_other_architectures(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    result = run_cli("export", str(zoo_resnet_checkpoint), "--condense-classifier", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "condensenet")


@pytest.mark.slow
def test_demo_condensenet_bundle_passes_check(tmp_path: Path) -> None:
    out = tmp_path / "condensenet"
    result = run_cli("export", "zoo:condensenet_digits", "--out", str(out), "--samples", "16")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["top1_agreement"] == 1.0 and report["task"]["accuracy_reference"] >= 0.95
    assert run_cli("check", str(out)).returncode == 0


@pytest.mark.slow
def test_zoo_int8_export_has_no_gather_or_batchnorm_between_convolutions(tmp_path: Path) -> None:
    """INT8 for ONNX Runtime: Gather + BN folded into 1x1 convolutions, so the quantized graph
    keeps one layout (no Transposes around float islands); FP32 keeps the Gathers."""
    out = tmp_path / "int8"
    result = run_cli("export", "zoo:condensenet_digits", "--out", str(out), "--precision", "int8", "--no-speed-check")
    assert result.returncode == 0, result.stdout + result.stderr
    folds = json.loads((out / "manifest.json").read_text())["model"]["folds"]
    assert folds["gather_into_conv"] == 12 and folds["bn_as_depthwise_conv"] == 1
    ops = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
    # Only the classifier's Gather (on [B, C] features) is left; the last pool is global.
    assert "BatchNormalization" not in ops and ops.count("Gather") == 1
    assert ops.count("GlobalAveragePool") == 1 and ops.count("AveragePool") == 2
    # The 2x2 transition pools stay FP32 (ONNX Runtime's QLinearAveragePool is far slower there):
    # no Q/DQ pair wraps them, their output is quantized again, and the manifest names them.
    graph = onnx.load(out / "model.onnx").graph
    producer = {output: node for node in graph.node for output in node.output}
    readers = {tensor: node for node in graph.node for tensor in node.input}
    pools = [node for node in graph.node if node.op_type == "AveragePool"]
    assert all(producer[pool.input[0]].op_type != "DequantizeLinear" or producer[producer[pool.input[0]].input[0]].op_type != "QuantizeLinear"
               for pool in pools)
    assert all(readers[pool.output[0]].op_type == "QuantizeLinear" for pool in pools)
    calibration = json.loads((out / "manifest.json").read_text())["calibration"]
    assert sorted(calibration["fp32_average_pools"]["model"]) == sorted(pool.name for pool in pools)
    check = run_cli("check", str(out))
    assert check.returncode == 0, check.stdout + check.stderr
    fp32 = tmp_path / "fp32"
    assert run_cli("export", "zoo:condensenet_digits", "--out", str(fp32), "--samples", "16", "--batch-sizes", "16").returncode == 0
    assert json.loads((fp32 / "manifest.json").read_text())["model"]["folds"]["gather_into_conv"] == 0
    assert [n.op_type for n in onnx.load(fp32 / "model.onnx").graph.node].count("Gather") == 13
