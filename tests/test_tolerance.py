"""The measured FP32 tolerance: correct exports pass at any logit scale, a perturbed graph fails.

The trained SPConv ResNet-20 demo with its classifier scaled up (logits ~1000) and down
(logits ~0.1) stands in for the large ImageNet models that benchmarks/tolerance.py measures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from slimdeploy.bundle import sha256_file
from slimdeploy.parity import DEFAULT_TOLERANCES, compare_values
from slimdeploy.tolerance import NOISE_FACTOR, RULE_GIVEN, RULE_MEASURED, measured_tolerances
from tests.conftest import assert_clean_error, run_cli

SCALES = {"large": 100.0, "small": 0.01}


@pytest.fixture(scope="module")
def scaled_bundles(tmp_path_factory: pytest.TempPathFactory, zoo_resnet_checkpoint: Path) -> dict[str, Path]:
    from slimdeploy.export import export

    root = tmp_path_factory.mktemp("scaled")
    bundles = {}
    for label, factor in SCALES.items():
        checkpoint = torch.load(zoo_resnet_checkpoint, weights_only=True)
        for key in ("fc.weight", "fc.bias"):
            checkpoint["state_dict"][key] = checkpoint["state_dict"][key] * factor
        path = root / f"{label}.pt"
        torch.save(checkpoint, path)
        bundles[label] = root / label
        export(path, bundles[label], samples=16, batch_sizes=(1, 8), reference_weights=False)
    return bundles


@pytest.mark.parametrize("label", sorted(SCALES))
@pytest.mark.slow
def test_correct_exports_pass_at_large_and_small_logit_scales(scaled_bundles: dict[str, Path], label: str) -> None:
    bundle = scaled_bundles[label]
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = json.loads((bundle / "report.json").read_text())
    assert report["passed"], report["failures"]
    rule = manifest["parity"]["tolerance_rule"]
    assert rule["rule"] == RULE_MEASURED and rule["factor"] == NOISE_FACTOR
    noise = rule["noise"]["logits"]
    atol, rtol = manifest["tolerances"]["logits"]
    assert atol == pytest.approx(max(1e-4, NOISE_FACTOR * noise)) and rtol == 1e-3
    assert all(output["atol"] == atol for output in report["outputs"])  # the report shows what was applied
    with np.load(bundle / "golden.npz") as golden:
        scale = float(np.abs(golden["ref_logits"]).max())
    if label == "large":
        assert scale > 500 and atol > 1e-4  # the noise grew with the logits, and so did the tolerance
    else:
        assert scale < 1 and atol == 1e-4
    result = run_cli("check", str(bundle))  # the stored tolerances apply without re-measuring
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tolerance: stored in the bundle: per output atol = max(0.0001, 10 x max|ref32 - ref64|)" in result.stdout


@pytest.mark.parametrize("label", sorted(SCALES))
@pytest.mark.parametrize("factor", [1.01, 1.02])
@pytest.mark.slow
def test_a_one_percent_change_of_one_convolution_fails(tmp_path: Path, scaled_bundles: dict[str, Path], label: str, factor: float) -> None:
    """A hostile or broken bundle: one Conv's weights scaled, digests updated to match."""
    bundle = tmp_path / "bundle"
    shutil.copytree(scaled_bundles[label], bundle)
    graph = onnx.load(str(bundle / "model.onnx"))
    initializers = {init.name: init for init in graph.graph.initializer}
    convs = [node.input[1] for node in graph.graph.node if node.op_type == "Conv" and node.input[1] in initializers]
    name = convs[len(convs) // 2]  # a convolution in the middle of the network
    weights = numpy_helper.to_array(initializers[name])
    initializers[name].CopyFrom(numpy_helper.from_array((weights * factor).astype(weights.dtype), name))
    onnx.save(graph, str(bundle / "model.onnx"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(bundle / "model.onnx")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("check", str(bundle), "--json", str(tmp_path / "r.json"))
    assert_clean_error(result, 1, "parity failed")
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["passed"] and any(not o["passed"] for o in report["outputs"] if o["name"] == "logits")


def test_given_tolerances_are_used_as_given(scaled_bundles: dict[str, Path], tmp_path: Path) -> None:
    result = run_cli("check", str(scaled_bundles["large"]), "--atol", "1e-9", "--rtol", "0", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 1  # no scaling: 1e-9 is too tight for logits of ~1000
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tolerances"] == {"": [1e-9, 0.0]} and report["tolerance_rule"]["rule"] == RULE_GIVEN
    assert all(o["atol"] == 1e-9 for o in report["outputs"])


def test_measured_tolerance_rule() -> None:
    reference = {"logits": np.array([[50.0, -60.0]]), "probs": np.array([[0.5, 0.5]])}
    base = DEFAULT_TOLERANCES["fp32"][""]
    tolerances, rule = measured_tolerances({"logits": 2e-4, "probs": 1e-9}, reference, base)
    assert tolerances == {"": base, "logits": (2e-3, base[1]), "probs": base}
    assert rule.capped == []
    # A model far noisier than float32 should be is capped at 1 % of its output's scale.
    tolerances, rule = measured_tolerances({"logits": 10.0}, reference, base)
    assert tolerances["logits"] == (0.6, base[1]) and rule.capped == ["logits"]


def test_float64_noise_is_measured_on_the_reference(zoo_resnet_checkpoint: Path) -> None:
    from slimdeploy.data import digits_inputs
    from slimdeploy.loading import load_checkpoint
    from slimdeploy.tolerance import float64_noise

    loaded = load_checkpoint(zoo_resnet_checkpoint)
    prep = loaded.preprocessing
    inputs, _ = digits_inputs("heldout", prep.input_size, prep.mean, prep.std, count=8)
    with torch.inference_mode():
        reference = loaded.module(torch.from_numpy(inputs)).numpy()
    noise, excluded = float64_noise(loaded.module, {"input": inputs}, {"logits": reference}, ["logits"])
    assert excluded == 0
    assert 0 < noise["logits"] < 1e-4  # float32 rounding: small but not zero
    with torch.inference_mode():
        exact = loaded.module.double()(torch.from_numpy(inputs).double()).numpy()
    assert noise["logits"] == pytest.approx(float(np.abs(exact - reference).max()))
    assert compare_values("logits", exact, reference, NOISE_FACTOR * noise["logits"], 0.0, 8).passed
