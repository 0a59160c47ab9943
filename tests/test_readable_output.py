"""Output people read (issue 17 part 3): ``zoo list`` grouped and never cut at 80 or 200
columns; ``lint`` grouped with counts, a one-screen summary and fixes that fit the bundle;
``inspect`` of ONNX files, bundle graphs and what kind of model a checkpoint holds; one number
format; the criterion that passed a reduced-precision output; batch sizes capped by the sample
count; third-party prints silenced; progress lines with durations and a live spinner.

The end-to-end checks of an ONNX Runtime INT8 bundle (lint fixes, no calibration prints) ride on
the INT8 export of tests/test_precision_export.py; the compact bundle's grouped lint on
tests/test_trt_lint.py's demo bundles."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper
from rich.console import Console

from slimdeploy.numbers import format_count, format_macs, format_seconds
from tests.conftest import assert_clean_error, run_cli

# -- zoo list -----------------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [80, 200])
def test_zoo_list_shows_checkpoints_first_then_families_and_cuts_no_name(columns: int) -> None:
    from slimdeploy.models import list_models
    from slimdeploy.models.registry import get_arch
    from slimdeploy.zoo import list_zoo

    result = run_cli("zoo", "list", env={"COLUMNS": str(columns)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "…" not in out and "..." not in out
    assert max(len(line) for line in out.splitlines()) <= columns
    checkpoints, _, architectures = out.partition("Architectures by family")
    assert architectures, out
    # Every shipped checkpoint, whole and ready to paste, before any architecture.
    for entry in list_zoo():
        assert re.search(rf"zoo:{entry.name}(?![\w])", checkpoints), entry.name
    # One paragraph per family, holding exactly that family's architectures, each name whole.
    listed: dict[str, set[str]] = {}
    family = None
    for line in architectures.splitlines()[1:]:
        heading = re.match(r"^  (\w+) \((\d+), [\w/-]+\)\s*$", line)
        if heading:
            family = heading.group(1)
            assert int(heading.group(2)) == len(list_models(family))
            listed[family] = set()
        elif line.strip():
            listed[family] |= {name.strip() for name in line.split(",") if name.strip()}
    families = {get_arch(name).family for name in list_models()}
    assert listed == {name: set(list_models(name)) for name in families}


# -- lint ----------------------------------------------------------------------------------------

def _uint8_chain(count: int) -> onnx.ModelProto:
    """A float input cast to UINT8 and back ``count`` times: ``count`` identical findings
    (a UINT8 tensor inside the network) on tensors with different names."""
    nodes, value = [], "x"
    for i in range(count):
        nodes.append(helper.make_node("Cast", [value], [f"u{i}"], to=TensorProto.UINT8, name=f"to_u8_{i}"))
        nodes.append(helper.make_node("Cast", [f"u{i}"], [f"f{i}"], to=TensorProto.FLOAT, name=f"to_f32_{i}"))
        value = f"f{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info(value, TensorProto.FLOAT, ["batch", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_lint_groups_identical_findings_with_counts(tmp_path: Path) -> None:
    from slimdeploy.exporters.trt_lint import lint_path

    path = tmp_path / "chain.onnx"
    onnx.save(_uint8_chain(6), str(path))
    report = lint_path(path)
    assert len(report.errors) == 6
    (group,) = report.groups()
    assert (group.rule, group.count, group.first.node) == ("uint8-tensor", 6, report.errors[0].node)

    summary = run_cli("lint", str(path), env={"COLUMNS": "80"})
    assert summary.returncode == 1
    lines = summary.stdout.splitlines()
    assert len(lines) < 15, summary.stdout  # one screen, however many findings
    assert sum("uint8-tensor" in line for line in lines) == 1 and "uint8-tensor x6" in summary.stdout
    assert "fix 1:" in summary.stdout and "--verbose" in summary.stdout
    verbose = run_cli("lint", str(path), "--verbose")
    for finding in report.errors:
        assert finding.node in verbose.stdout
    data = report.to_dict()  # what --json writes
    assert len(data["findings"]) == 6 and [g["count"] for g in data["groups"]] == [6]


# -- inspect -------------------------------------------------------------------------------------

def test_inspect_reads_onnx_files(exported_bundle: Path, tmp_path: Path) -> None:
    graph = onnx.load(exported_bundle / "model.onnx")
    result = run_cli("inspect", str(exported_bundle / "model.onnx"))
    assert result.returncode == 0, result.stderr
    assert "PyTorch checkpoint" not in result.stdout + result.stderr
    assert "input: float32 ['batch', 3, 32, 32]" in result.stdout and "logits: float32 ['batch', 10]" in result.stdout
    assert f"{len(graph.graph.node):,}" in result.stdout and "FP32" in result.stdout
    info = json.loads(run_cli("inspect", str(exported_bundle / "model.onnx"), "--json", "-").stdout)
    assert info["kind"] == "onnx" and info["opset"] == 18 and info["nodes"] == len(graph.graph.node)
    ops = [node.op_type for node in graph.graph.node]
    assert info["op_types"]["Conv"] == ops.count("Conv")
    assert info["params"] == sum(int(np.prod(init.dims)) for init in graph.graph.initializer)

    (tmp_path / "junk.onnx").write_bytes(b"\x00 not a protobuf")
    assert_clean_error(run_cli("inspect", str(tmp_path / "junk.onnx")), 2, "as an ONNX model")
    fixed = run_cli("inspect", str(exported_bundle / "model.onnx"), "--input-size", "3,64,64")
    assert_clean_error(fixed, 2, "--input-size: options for a checkpoint")


def test_inspect_bundle_lists_its_graphs_with_readable_numbers(exported_bundle: Path) -> None:
    graph = onnx.load(exported_bundle / "model.onnx")
    info = json.loads(run_cli("inspect", str(exported_bundle), "--json", "-").stdout)
    assert info["model"] == "static (spconv family), fp32 for ONNX Runtime"
    (summary,) = info["graphs"]
    assert summary["name"] == "model" and summary["nodes"] == len(graph.graph.node) and summary["opset"] == 18
    assert [i["name"] for i in summary["inputs"]] == ["input"] and [o["name"] for o in summary["outputs"]] == ["logits"]
    text = run_cli("inspect", str(exported_bundle)).stdout
    assert f"{info['params']:,}" in text and format_macs(info["macs"]) in text
    assert str(info["params"]) not in text.replace(f"{info['params']:,}", "")  # never raw


@pytest.mark.parametrize(("name", "kind"), [("skipnet38_digits", "gated (skipnet family)"),
                                            ("s2d_resnet20_digits", "early-exit (early_exit family)"),
                                            ("spconv_resnet20_digits", "static (spconv family)")])
def test_inspect_says_what_kind_of_model_a_checkpoint_holds(name: str, kind: str) -> None:
    from slimdeploy.describe import inspect_checkpoint
    from slimdeploy.zoo import zoo_checkpoint_path

    assert inspect_checkpoint(zoo_checkpoint_path(name))["model"] == kind


# -- numbers -------------------------------------------------------------------------------------

def test_numbers_read_one_way() -> None:
    assert format_count(105082) == "105,082"
    assert format_macs(15188608) == "15.2 M" and format_macs(640_000) == "640 k" and format_macs(1.8e9) == "1.8 G"
    assert format_macs(999) == "999" and format_macs(15188608, 2) == "15.19 M"
    assert format_seconds(0.421) == "0.42 s" and format_seconds(8.14) == "8.1 s" and format_seconds(125) == "2 min 5 s"


@given(st.integers(min_value=0, max_value=10**15))
def test_formatted_numbers_read_back(value: int) -> None:
    assert int(format_count(value).replace(",", "")) == value
    number, _, unit = format_macs(value).partition(" ")
    scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit]
    assert abs(float(number.replace(",", "")) * scale - value) <= 0.05 * max(value, 1)


# -- parity: the criterion that decided, and batch sizes capped by the samples ------------------

def test_reduced_precision_table_names_the_criterion_and_batches_are_capped(exported_bundle: Path, capsys,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from slimdeploy import cli
    from slimdeploy.cli import _print_parity
    from slimdeploy.engines import OrtRunner
    from slimdeploy.parity import check_parity

    with np.load(exported_bundle / "golden.npz") as golden:
        feed, reference = {"input": golden["input"][:8]}, {"logits": golden["ref_logits"][:8]}
    with OrtRunner(exported_bundle / "model.onnx") as runner:
        # Tolerances far below the float32 differences: every element is outside, and the
        # criterion (up to 100 % of elements outside) is what passes the output.
        report = check_parity(runner, feed, reference, (1, 16), "torch", precision="int8", tolerances={"": (1e-12, 0.0)},
                              criteria={"top1_agreement": 0.97, "mismatch_fraction": 1.0})
    assert report.passed and report.batch_sizes == [1, 8]
    assert {result.batch_size for result in report.outputs} == {1, 8}
    monkeypatch.setattr(cli, "out_console", Console(width=200, highlight=False))  # no cell wrapped
    _print_parity(report, None)
    out = capsys.readouterr().out
    outside = 100 * report.outputs[0].mismatched / report.outputs[0].elements
    assert f"pass ({outside:.1f} % outside, within the 100 % mismatch criterion)" in out
    assert "top-1 agreement 100.0% (criterion >= 97 %)" in out
    assert "parity PASSED on the int8 criteria: top-1 agreement >= 97 %, <= 100 % of elements outside tolerance" in out


def test_check_with_fewer_samples_than_a_batch_reports_the_batch_it_ran(exported_bundle: Path, tmp_path: Path) -> None:
    with np.load(exported_bundle / "golden.npz") as golden:
        np.savez(tmp_path / "eight.npz", input=golden["input"][:8], ref_logits=golden["ref_logits"][:8])
    result = run_cli("check", str(exported_bundle), "--data", str(tmp_path / "eight.npz"), "--batch-sizes", "1,16")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split("│")[2].strip() for line in result.stdout.splitlines() if line.startswith("│ logits")]
    assert rows == ["1", "8"]
    # Progress: one line per step with its duration.
    steps = [line for line in result.stderr.splitlines() if "parity at batch" in line]
    assert steps and all(re.search(r"^\s*\d+\.\ds parity at batch \d+ \(\d+(\.\d+)? s\)$", line) for line in steps), result.stderr


def test_unseen_decisions_are_a_warning_naming_the_fix(capsys) -> None:
    from slimdeploy.cli import _print_parity
    from slimdeploy.parity import DecisionSpec, ParityReport, compare_decisions

    # Block 1 always open, block 2 seen both ways, block 3 always closed.
    gates = np.array([[1, 0, 0], [1, 1, 0]], dtype=np.uint8)
    reference = {"gates": gates, "gate_probs": np.where(gates, 0.9, 0.1).astype(np.float32)}
    result = compare_decisions(DecisionSpec("gates", "gate_probs", 0.5), reference, reference, 1)
    report = ParityReport("torch", "onnxruntime", "fp32", [1], 2, {"": [1e-4, 1e-3]}, decisions={"gates": [result]})
    _print_parity(report, "-")  # the warning goes to stderr even when stdout carries JSON
    err = capsys.readouterr().err
    assert "warning: gates: gated block(s) [1, 3] (2 of 3) were never seen both open and closed in these 2 samples" in err
    assert "Fix: pass --data with in-domain images" in err


# -- third-party prints and warnings, progress ----------------------------------------------------

def test_the_quantizer_tools_print_and_warn_nothing(exported_bundle: Path, capfd) -> None:
    from slimdeploy.calibration.ranges import collect_ranges, quiet_quantizer

    with np.load(exported_bundle / "golden.npz") as golden:
        images = golden["input"][:8]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # ONNX Runtime's histogram calibrator prints "Collecting tensor data and making histogram ...".
        ranges = collect_ranges(onnx.load(exported_bundle / "model.onnx"), [{"input": images}], method="Percentile")
        with quiet_quantizer():
            print("chatter")
            np.divide(np.zeros(2), np.zeros(2))  # "invalid value encountered in divide"
    out, err = capfd.readouterr()
    assert ranges and out == "" and err == "" and not caught


def test_int8_biases_on_a_zero_scale_stay_zero() -> None:
    from slimdeploy.calibration.bias_correction import _int32_steps

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value encountered in divide"
        steps = _int32_steps(np.array([0.0, 1.0, 0.26]), np.array([0.0, 0.0, 0.1]))
    np.testing.assert_array_equal(steps, [0.0, 0.0, 3.0])


def test_progress_lines_carry_durations_and_a_spinner_runs_in_a_terminal() -> None:
    from slimdeploy.cli import StepPrinter

    log = io.StringIO()
    with StepPrinter(console=Console(file=log, force_terminal=False, width=120)) as say:
        say("loading checkpoint")
        say("exporting with torch.export")
    lines = log.getvalue().splitlines()
    assert [re.sub(r"\d+(\.\d+)?", "#", line).strip() for line in lines] == [
        "#s loading checkpoint (# s)", "#s exporting with torch.export (# s)"]

    terminal = io.StringIO()
    printer = StepPrinter(console=Console(file=terminal, force_terminal=True, width=120))
    with printer as say:
        say("exporting with torch.export")
        assert printer._status is not None  # the spinner runs while the step does
    assert printer._status is None and "exporting with torch.export (0 s)" in terminal.getvalue()
    quiet = io.StringIO()
    with StepPrinter(quiet=True, console=Console(file=quiet, force_terminal=True)) as say:
        say("anything")
    assert quiet.getvalue() == ""
