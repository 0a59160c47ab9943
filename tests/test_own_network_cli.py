"""End to end, on the command line: networks defined only in the tests (``tests/own_models.py``,
never registered) exported with ``--arch tests/own_models.py:FACTORY`` in every form, at FP16
and INT8, for TensorRT (linted), re-checked with ``check``, and benchmarked with their skip
rates / exit shares and predicted MACs; the bundle records the factory and imports it only
when ``check``/``bench`` are given ``--arch`` again.

The checkpoints are slimdeploy-format state_dicts of the test networks trained briefly on digits
with decisions balanced on the calibration split (``own_models.trained``, seconds). Each bundle
is exported once per module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slimdeploy.data import digits_inputs, digits_statistics
from slimdeploy.loading import Preprocessing, save_checkpoint
from tests import own_models
from tests.conftest import REPO, assert_one_line_error, run_cli
from tests.own_models import INPUT_SIZE, initialised, trained

pytestmark = pytest.mark.slow

NETWORKS = {
    "gated": ("gated_net", {}),
    "controlled": ("gated_net", {"controlled": True}),
    "trunk": ("trunk_exit_net", {}),
    "multi_input": ("multi_input_exit_net", {}),
}


def spec(network: str) -> str:
    return f"tests/own_models.py:{NETWORKS[network][0]}"


class Bundles:
    """Checkpoints of the test networks, and bundles exported from them on demand, once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[tuple[str, ...], Path] = {}
        mean, std = digits_statistics()
        for name, (factory, args) in NETWORKS.items():
            model = trained(initialised(getattr(own_models, factory)(**args)))
            save_checkpoint(root / f"{name}.pt", model, spec(name), args, Preprocessing(INPUT_SIZE, mean, std),
                            {"dataset": "digits"})

    def export(self, network: str, *options: str) -> Path:
        key = (network, *options)
        if key not in self.made:
            out = self.root / "_".join(part.strip("-") for part in key)
            # FP32 parity on 24 samples; reduced precision on its default 100 (it passes on rates).
            samples = [] if "--precision" in options else ["--samples", "24"]
            args = ["export", str(self.root / f"{network}.pt"), "--arch", spec(network), "--out", str(out),
                    *samples, "--batch-sizes", "1,8", *options]
            if NETWORKS[network][1]:
                args += ["--arch-args", json.dumps(NETWORKS[network][1])]
            result = run_cli(*args, cwd=REPO)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            self.made[key] = out
        return self.made[key]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    return Bundles(tmp_path_factory.mktemp("own_networks"))


def manifest_of(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


# Every form of every test network is compared with the network in process
# (tests/test_discovery.py); on the command line, one bundle per network and decision kind.
@pytest.mark.parametrize(("network", "form"), [
    ("gated", "mask"), ("gated", "compact"), ("gated", "staged"), ("controlled", "staged"),
    ("trunk", "staged"), ("multi_input", "staged"),
])
def test_every_form_exports_and_checks(bundles: Bundles, network: str, form: str) -> None:
    bundle = bundles.export(network, "--dynamic", form)
    manifest = manifest_of(bundle)
    model = manifest["model"]
    assert (model["family"], model["factory"], model["dynamic"], model["transforms"]) == ("custom", spec(network), True, ["discover"])
    assert manifest["dynamic"] == form and manifest["parity"]["passed"] and manifest["reference_weights"]
    plan = manifest["gating"] or manifest["exits"]
    expected_modules = {"gated": ["block1", "block2", "block3"], "controlled": ["block1", "block2", "block3"],
                        "trunk": ["exit1", "exit2", "classifier"], "multi_input": ["exit0", "exit1"]}[network]
    assert plan["modules"] == expected_modules
    # Decisions went both ways (every gate, for the feed-forward one) or every exit answered,
    # among the golden samples.
    with np.load(bundle / "golden.npz") as golden:
        if manifest["gating"]:
            gates = golden["ref_gates"]
            assert gates.min() == 0 and gates.max() == 1
            if network == "gated":
                assert (gates.min(axis=0) == 0).all() and (gates.max(axis=0) == 1).all()
        else:
            assert set(golden["ref_exit_stage"]) == set(range(len(expected_modules)))
    result = run_cli("check", str(bundle), cwd=REPO)
    assert result.returncode == 0 and "parity PASSED" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize(("network", "form", "precision"), [
    ("gated", "compact", "int8"), ("controlled", "staged", "fp16"), ("trunk", "staged", "fp16"),
])
def test_reduced_precision(bundles: Bundles, network: str, form: str, precision: str) -> None:
    # The speed check (tested in test_precision_speed.py) runs on the dynamic forms here, once
    # each: the compact graph and the staged controller.
    speed = [] if network in ("gated", "controlled") else ["--no-speed-check"]
    bundle = bundles.export(network, "--dynamic", form, "--precision", precision, *speed)
    manifest = manifest_of(bundle)
    assert manifest["precision"] == precision and manifest["parity"]["passed"]
    assert manifest["calibration"]["decisions_fp32"]  # gate and exit heads stay FP32
    if precision == "int8":
        graphs = [bundle / graph["file"] for graph in manifest["graphs"]]
        import onnx

        ops = {node.op_type for path in graphs for node in onnx.load(path).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


@pytest.mark.parametrize("network", ["controlled", "trunk"])
def test_tensorrt_bundles_are_linted(bundles: Bundles, network: str) -> None:
    bundle = bundles.export(network, "--target", "trt", "--prepare-only")
    manifest = manifest_of(bundle)
    assert manifest["dynamic"] == "staged" and manifest["trt"]["lint"]["passed"]
    assert (bundle / "build.sh").is_file()
    result = run_cli("lint", str(bundle), cwd=REPO)
    assert result.returncode == 0 and "lint PASSED" in result.stdout


def test_bench_reports_skip_rates_and_predicted_speedup(bundles: Bundles, tmp_path: Path) -> None:
    staged, mask = bundles.export("gated", "--dynamic", "staged"), bundles.export("gated", "--dynamic", "mask")
    report_file = tmp_path / "bench.json"
    result = run_cli("bench", str(staged), "--baseline", str(mask), "--batch", "1,8", "--iterations", "3", "--warmup", "1",
                     "--threads", "1", "--json", str(report_file), cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads(report_file.read_text())
    stats = report["decisions"]
    with np.load(staged / "golden.npz") as golden:
        expected = 1 - golden["ref_gates"].mean(axis=0)
    np.testing.assert_allclose(stats["skip_rate_per_block"], expected, atol=1e-6)
    plan = manifest_of(staged)["gating"]
    macs = plan["macs"]
    assert stats["macs_mask"] == pytest.approx(sum(macs.values()))  # every block and skip path
    assert stats["macs_ideal"] < stats["macs_mask"] and stats["predicted_speedup"]["1"] > 1
    assert {"vs_baseline_mask_batch1", "vs_baseline_mask_batch8"} <= set(report["speedups"])
    # The model is the user's code: not imported (no PyTorch column) unless named again.
    assert "torch" not in {r["runner"] for r in report["results"]}
    assert any(f"--arch {spec('gated')}" in note for note in report["notes"])
    named = run_cli("bench", str(staged), "--batch", "1", "--iterations", "2", "--warmup", "1", "--threads", "1",
                    "--arch", spec("gated"), "--json", "-", cwd=REPO)
    assert named.returncode == 0, named.stderr
    assert "torch" in {r["runner"] for r in json.loads(named.stdout)["results"]}


def test_bench_reports_exit_shares(bundles: Bundles, tmp_path: Path) -> None:
    bundle = bundles.export("trunk", "--dynamic", "staged")
    result = run_cli("bench", str(bundle), "--batch", "1", "--iterations", "2", "--warmup", "1", "--threads", "1",
                     "--json", "-", cwd=REPO)
    assert result.returncode == 0, result.stderr
    exits = json.loads(result.stdout)["exits"]
    with np.load(bundle / "golden.npz") as golden:
        stages = golden["ref_exit_stage"]
    np.testing.assert_allclose(exits["exit_share_per_stage"], [np.mean(stages == j) for j in range(3)])
    plan = manifest_of(bundle)["exits"]
    assert exits["macs_per_stage"] == [plan["macs"][f"stage{j}"] for j in range(3)]
    assert exits["macs_ideal"] < exits["macs_mask"]


def test_check_with_new_data_needs_the_factory_named(bundles: Bundles, tmp_path: Path) -> None:
    bundle = bundles.export("gated", "--dynamic", "compact")
    mean, std = digits_statistics()
    data = tmp_path / "inputs.npz"
    np.savez(data, input=digits_inputs("train", INPUT_SIZE, mean, std, count=12)[0])
    refused = run_cli("check", str(bundle), "--data", str(data), cwd=REPO)
    assert_one_line_error(refused, 2, "built by user code", f"--arch {spec('gated')}")
    named = run_cli("check", str(bundle), "--data", str(data), "--arch", spec("gated"), cwd=REPO)
    assert named.returncode == 0 and "parity PASSED" in named.stdout, named.stdout[-2000:] + named.stderr[-2000:]
