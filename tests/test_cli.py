"""End-to-end command-line tests on a real trained model: exit codes, files, messages.

Each bad input gets exit code 2 (bad input), 1 (a failed check) or 3 (missing backend), one
``error:`` line that says what to do, no traceback, and nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

from tests.conftest import assert_clean_error, run_cli


def _golden_input(bundle: Path, count: int = 3) -> np.ndarray:
    with np.load(bundle / "golden.npz") as golden:
        return golden["input"][:count]


@pytest.mark.slow
def test_export_writes_a_checked_bundle(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    out = tmp_path / "bundle"
    result = run_cli("export", str(zoo_resnet_checkpoint), "--out", str(out), "--samples", "12", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["golden.npz", "manifest.json", "model.onnx", "reference.pt", "report.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "spconv_resnet20_cifar"
    assert manifest["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert manifest["outputs"][0]["name"] == "logits"
    # 12 samples: the batch of 16 runs as one batch of 12, and is reported so.
    assert manifest["parity"]["passed"] is True and manifest["golden"]["batch_sizes"] == [1, 12]
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"]
    assert manifest["opset"] >= 18
    report = json.loads((out / "report.json").read_text())
    assert {r["batch_size"] for r in report["outputs"]} == {1, 12} and "16" not in result.stdout
    assert all(r["max_abs"] < 1e-4 for r in report["outputs"])
    assert report["task"]["top1_agreement"] == 1.0
    assert report["task"]["accuracy_reference"] > 0.9  # the trained model on held-out digits
    # progress is shown on stderr, each step with its duration
    assert re.search(r"^\s*\d+\.\ds exporting with torch\.export \(\d+(\.\d+)? s\)$", result.stderr, re.M), result.stderr
    # numbers read one way; the inputs the bundle expects, and where they came from
    assert "105,082 parameters, 15.2 M MACs" in result.stdout
    assert "inputs: 3x32x32, mean" in result.stdout and "(input size/mean/std from the checkpoint)" in result.stdout
    assert manifest["preprocessing"]["source"] == {"input_size": "checkpoint", "mean": "checkpoint", "std": "checkpoint"}
    assert json.loads((tmp_path / "r.json").read_text())["report"]["passed"] is True
    # the graph has a dynamic batch axis and the names of docs/design.md §8
    import onnx

    graph = onnx.load(out / "model.onnx").graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_check_passes_and_writes_reports(tmp_path: Path, exported_bundle: Path) -> None:
    junit = tmp_path / "parity.xml"
    result = run_cli("check", str(exported_bundle), "--junit", str(junit), "--json", str(tmp_path / "c.json"))
    assert result.returncode == 0, result.stderr
    assert "parity PASSED" in result.stdout
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) >= 2
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["passed"] and report["reference"] == "golden"


def test_check_json_to_stdout_is_pure_json(exported_bundle: Path) -> None:
    result = run_cli("check", str(exported_bundle), "--json", "-")
    assert result.returncode == 0
    assert json.loads(result.stdout)["passed"] is True


def test_check_fails_with_exit_1_on_wrong_reference(tmp_path: Path, exported_bundle: Path) -> None:
    with np.load(exported_bundle / "golden.npz") as golden:
        arrays = {key: golden[key] for key in golden.files}
    arrays["ref_logits"] = arrays["ref_logits"] + 0.01
    np.savez(tmp_path / "data.npz", **arrays)
    junit = tmp_path / "parity.xml"
    result = run_cli("check", str(exported_bundle), "--data", str(tmp_path / "data.npz"), "--junit", str(junit))
    assert result.returncode == 1, result.stderr
    assert "parity FAILED" in result.stdout and "Traceback" not in result.stderr
    assert ElementTree.parse(junit).getroot().get("failures") != "0"


def test_check_data_without_reference_uses_torch_weights(tmp_path: Path, exported_bundle: Path) -> None:
    np.savez(tmp_path / "fresh.npz", input=_golden_input(exported_bundle, 5) * 0.5)
    result = run_cli("check", str(exported_bundle), "--data", str(tmp_path / "fresh.npz"), "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["reference"] == "torch" and report["samples"] == 5


@pytest.mark.slow
def test_tolerance_zero_fails_export_but_keeps_bundle(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    out = tmp_path / "strict"
    result = run_cli("export", str(zoo_resnet_checkpoint), "--out", str(out), "--samples", "4",
                     "--batch-sizes", "1,4", "--atol", "0", "--rtol", "0", "--no-simplify")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "parity FAILED" in result.stdout
    assert (out / "manifest.json").is_file() and (out / "report.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["parity"]["passed"] is False


def test_run_writes_outputs(tmp_path: Path, exported_bundle: Path) -> None:
    x = _golden_input(exported_bundle, 3)
    np.savez(tmp_path / "in.npz", input=x)
    result = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz"), "--batch", "2")
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as out, np.load(exported_bundle / "golden.npz") as golden:
        np.testing.assert_allclose(out["logits"], golden["ref_logits"][:3], atol=1e-4, rtol=1e-3)


def test_run_wrong_shape_is_exit_2(tmp_path: Path, exported_bundle: Path) -> None:
    np.savez(tmp_path / "in.npz", input=np.zeros((2, 3, 28, 28), dtype=np.float32))
    result = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz"))
    assert_clean_error(result, 2, "axis 2 should be 32", "float32[batch, 3, 32, 32]")
    assert not (tmp_path / "out.npz").exists()


def test_run_wrong_dtype_and_name_are_exit_2(tmp_path: Path, exported_bundle: Path) -> None:
    # (float64 is cast to float32 with a note: tests/test_foreign_checkpoints.py; integers are not.)
    np.savez(tmp_path / "in.npz", input=np.zeros((2, 3, 32, 32), dtype=np.int64))
    result = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "o.npz"))
    assert_clean_error(result, 2, "dtype int64")
    np.savez(tmp_path / "in2.npz", image=np.zeros((2, 3, 32, 32), dtype=np.float32))
    result = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "in2.npz"), "--out", str(tmp_path / "o.npz"))
    assert_clean_error(result, 2, "missing input(s) ['input']")


def test_run_refuses_existing_output(tmp_path: Path, exported_bundle: Path) -> None:
    np.savez(tmp_path / "in.npz", input=_golden_input(exported_bundle, 1))
    (tmp_path / "out.npz").write_bytes(b"keep")
    result = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz"))
    assert_clean_error(result, 2, "already exists", "--force")
    assert (tmp_path / "out.npz").read_bytes() == b"keep"


def test_export_refuses_existing_directory(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = run_cli("export", str(zoo_resnet_checkpoint), "--out", str(out))
    assert_clean_error(result, 2, "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "cannot read"), (os.urandom(2048), "cannot read"), (b"PK\x03\x04 truncated zip", "truncated or corrupt")],
    ids=["empty", "random-bytes", "broken-zip"],
)
def test_export_bad_checkpoint_files(tmp_path: Path, content: bytes, fragment: str) -> None:
    ckpt = tmp_path / "bad.pt"
    ckpt.write_bytes(content)
    result = run_cli("export", str(ckpt), "--arch", "spconv_resnet20_cifar", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]  # nothing half-written


def test_export_truncated_checkpoint(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    data = zoo_resnet_checkpoint.read_bytes()
    ckpt = tmp_path / "cut.pt"
    ckpt.write_bytes(data[: len(data) // 3])
    result = run_cli("export", str(ckpt), "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "truncated or corrupt")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_export_unknown_and_wrong_arch(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    result = run_cli("export", str(zoo_resnet_checkpoint), "--arch", "resnet9000", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "unknown architecture 'resnet9000'")
    result = run_cli("export", str(zoo_resnet_checkpoint), "--arch", "spconv_resnet56_cifar", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "does not match architecture 'spconv_resnet56_cifar'", "missing", "more")
    assert not (tmp_path / "b").exists()


def test_export_foreign_state_dict_with_unexpected_keys(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    state = torch.load(zoo_resnet_checkpoint, weights_only=True)["state_dict"]
    state = {f"module.{k}": v for k, v in state.items()}
    state["module.head2.weight"] = torch.zeros(2)
    ckpt = tmp_path / "foreign.pth.tar"
    torch.save({"epoch": 1, "state_dict": state}, ckpt)
    result = run_cli("export", str(ckpt), "--arch", "spconv_resnet20_cifar", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "1 unexpected: head2.weight")


def test_export_pickled_module_needs_trust(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    from slimdeploy.loading import load_checkpoint

    ckpt = tmp_path / "whole.pt"
    torch.save(load_checkpoint(zoo_resnet_checkpoint).module, ckpt)
    result = run_cli("export", str(ckpt), "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "--trust-pickle")


def test_bad_arch_args_json(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    result = run_cli("export", str(zoo_resnet_checkpoint), "--arch-args", "{width: 2", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "--arch-args is not valid JSON")
    result = run_cli("export", str(zoo_resnet_checkpoint), "--arch-args", '{"depth": 3}', "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "unknown argument(s) ['depth']")


def test_check_tampered_bundle_is_exit_2(tmp_path: Path, exported_bundle: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(exported_bundle, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    assert_clean_error(run_cli("check", str(copy)), 2, "sha256")
    assert_clean_error(run_cli("check", str(tmp_path / "missing")), 2, "not a bundle directory")


def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    result = run_cli("check", str(tmp_path / "missing"), env={"SLIMDEPLOY_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_bench_reports_both_runners(exported_bundle: Path) -> None:
    result = run_cli("bench", str(exported_bundle), "--batch", "1,4", "--warmup", "2", "--iterations", "5", "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    keys = {(r["runner"], r["batch_size"]) for r in report["results"]}
    assert keys == {("onnxruntime", 1), ("onnxruntime", 4), ("torch", 1), ("torch", 4)}
    assert all(r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in report["results"])
    assert set(report["speedups"]) == {"onnxruntime_vs_torch_batch1", "onnxruntime_vs_torch_batch4"}


def test_bench_no_torch_says_why_torch_is_left_out(exported_bundle: Path) -> None:
    """--no-torch times ONNX Runtime alone, and the note gives that reason, not a missing torch."""
    result = run_cli("bench", str(exported_bundle), "--batch", "1", "--warmup", "1", "--iterations", "2", "--no-torch", "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {r["runner"] for r in report["results"]} == {"onnxruntime"} and report["speedups"] == {}
    assert "PyTorch reference not timed (not asked for)" in report["notes"]


@pytest.mark.slow
def test_inspect_bundle_and_checkpoint(exported_bundle: Path, zoo_resnet_checkpoint: Path) -> None:
    bundle_info = json.loads(run_cli("inspect", str(exported_bundle), "--json", "-").stdout)
    ckpt_info = json.loads(run_cli("inspect", str(zoo_resnet_checkpoint), "--json", "-").stdout)
    assert bundle_info["kind"] == "bundle" and ckpt_info["kind"] == "checkpoint"
    assert bundle_info["arch"] == ckpt_info["arch"] == "spconv_resnet20_cifar"
    assert bundle_info["params"] == ckpt_info["params"] == 105_082
    assert bundle_info["macs"] == ckpt_info["macs"] > 10_000_000
    assert ckpt_info["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]


def test_env_lists_backends_with_reasons() -> None:
    result = run_cli("env", "--json", "-")
    assert result.returncode == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["onnxruntime"]["available"] and rows["onnxruntime"]["version"]
    assert rows["torch"]["available"]
    if not rows["tensorrt"]["available"]:
        assert "slimdeploy[trt]" in rows["tensorrt"]["reason"]


def test_zoo_list_json_contract() -> None:
    result = run_cli("zoo", "list", "--json", "-")
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    from slimdeploy.models import list_models

    names = {row["name"] for row in rows}
    assert set(list_models()) <= names
    for row in rows:
        assert {"name", "arch", "checkpoint", "dataset", "accuracy"} <= set(row)
    shipped = [row for row in rows if row["checkpoint"]]
    assert {"spconv_resnet20_digits", "mobilenet_v1_digits"} <= {row["name"] for row in shipped}
    for row in shipped:
        assert Path(row["checkpoint"]).is_file() and row["dataset"] == "digits" and row["accuracy"] > 0.8


def test_usage_error_is_exit_2() -> None:
    result = run_cli("export")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_zoo_train_unknown_name_is_exit_2() -> None:
    result = run_cli("zoo", "train", "spconv_resnet20_digit")
    assert_clean_error(result, 2, "spconv_resnet20_digits")
