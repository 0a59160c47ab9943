"""Parity comparison: per-output results, collected failures, task agreement, reports."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from slimdeploy.engines import Runner, TensorMeta
from slimdeploy.parity import (
    DEFAULT_TOLERANCES,
    ParityReport,
    check_parity,
    compare_outputs,
    compare_values,
    task_agreement,
)


def test_values_within_tolerance_pass() -> None:
    ref = np.array([[1.0, -2.0, 3.0]], dtype=np.float64)
    result = compare_values("logits", ref, ref + 5e-5, atol=1e-4, rtol=0.0, batch_size=1)
    assert result and result.max_abs == pytest.approx(5e-5, rel=1e-3)
    assert result.mismatched == 0


def test_values_outside_tolerance_fail_with_counts() -> None:
    ref = np.zeros((2, 4), dtype=np.float32)
    cand = ref.copy()
    cand[1, 2] = 0.5
    result = compare_values("logits", ref, cand, atol=1e-4, rtol=1e-3, batch_size=2)
    assert not result
    assert result.mismatched == 1 and result.elements == 8
    assert "1/8 elements" in result.message and "batch 2" in result.message


def test_relative_tolerance_scales_with_reference() -> None:
    ref = np.array([1000.0], dtype=np.float32)
    assert compare_values("x", ref, ref + 0.5, atol=0.0, rtol=1e-3, batch_size=1)
    assert not compare_values("x", ref, ref + 1.5, atol=0.0, rtol=1e-3, batch_size=1)


def test_shape_mismatch_fails_before_values() -> None:
    result = compare_values("logits", np.zeros((2, 10)), np.zeros((2, 9)), 1e-4, 1e-3, 2)
    assert not result and "shape [2, 9]" in result.message


def test_all_failures_collected_names_first() -> None:
    reference = {"logits": np.zeros((1, 3)), "gates": np.zeros((1, 2))}
    candidate = {"logits": np.ones((1, 3))}
    results, failures = compare_outputs(reference, candidate, {"": (1e-4, 1e-3)}, batch_size=1)
    assert failures == ["outputs: candidate lacks ['gates'] (has ['logits'])"]
    assert len(results) == 1 and not results[0]


def test_per_output_tolerance_overrides_default() -> None:
    reference = {"logits": np.zeros((1, 3)), "feat": np.zeros((1, 3))}
    candidate = {"logits": np.full((1, 3), 0.01), "feat": np.full((1, 3), 0.01)}
    results, _ = compare_outputs(reference, candidate, {"": (1e-4, 0.0), "feat": (0.1, 0.0)}, 1)
    assert [bool(r) for r in results] == [False, True]


def test_task_agreement_and_accuracy() -> None:
    ref = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    cand = ref.copy()
    cand[3] = [0.3, 0.6, 0.1]  # top-1 flips to class 1; the reference's class 0 is still top-2
    task = task_agreement(ref, cand, labels=np.array([0, 1, 2, 1]))
    assert task.top1_agreement == 0.75
    assert task.top5_agreement == 1.0
    assert task.accuracy_reference == 0.75 and task.accuracy_candidate == 1.0


class ShiftRunner(Runner):
    """A fake candidate that adds a constant, and returns a different result at batch 1."""

    backend = "fake"

    def __init__(self, shift: float, shift_at_batch1: float) -> None:
        super().__init__()
        self.shift, self.shift_at_batch1 = shift, shift_at_batch1

    def input_metadata(self) -> dict[str, TensorMeta]:
        return {"input": TensorMeta("input", np.dtype(np.float32), ("batch", 3))}

    def output_names(self) -> list[str]:
        return ["logits"]

    def _activate(self) -> None:
        pass

    def _infer(self, feed: dict) -> dict:
        x = feed["input"]
        shift = self.shift_at_batch1 if len(x) == 1 else self.shift
        return {"logits": x + shift}


def test_check_parity_runs_every_batch_size_and_catches_batch1_only_bugs() -> None:
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    with ShiftRunner(0.0, 1.0) as runner:
        report = check_parity(runner, {"input": x}, {"logits": x}, [1, 4], "ref")
    assert not report
    assert [bool(r) for r in report.outputs] == [False, True]
    assert report.task is not None and report.task.samples == 6
    assert report.tolerances == {"": list(DEFAULT_TOLERANCES["fp32"][""])}
    with ShiftRunner(0.0, 0.0) as runner:
        assert check_parity(runner, {"input": x}, {"logits": x}, [1, 4], "ref")


def test_reports_json_and_junit(tmp_path: Path) -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    with ShiftRunner(0.5, 0.5) as runner:
        report = check_parity(runner, {"input": x}, {"logits": x}, [2], "ref")
    report.write_junit(tmp_path / "parity.xml")
    suite = ElementTree.parse(tmp_path / "parity.xml").getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "1"
    failing = [case for case in suite if case.find("failure") is not None]
    assert failing[0].get("name") == "logits[batch=2]"
    report.write_json(tmp_path / "parity.json")
    import json

    data = json.loads((tmp_path / "parity.json").read_text())
    assert data["passed"] is False and data["outputs"][0]["max_abs"] == pytest.approx(0.5)
    assert data["decisions"] == {}


def test_report_truthiness_needs_no_failures() -> None:
    report = ParityReport("a", "b", "fp32", [1], 1, {})
    assert report
    report.failures.append("outputs: missing")
    assert not report


class GateRunner(Runner):
    """A fake gated model: returns fixed candidate gates and logits derived from them."""

    backend = "fake"

    def __init__(self, gates: np.ndarray, probs: np.ndarray) -> None:
        super().__init__()
        self.gates, self.probs = gates, probs

    def input_metadata(self) -> dict[str, TensorMeta]:
        return {"input": TensorMeta("input", np.dtype(np.int64), ("batch",))}

    def output_names(self) -> list[str]:
        return ["logits", "gates", "gate_probs"]

    def _activate(self) -> None:
        pass

    def _infer(self, feed: dict) -> dict:
        rows = feed["input"]
        gates = self.gates[rows]
        return {"logits": gates.sum(axis=1, keepdims=True).astype(np.float32), "gates": gates,
                "gate_probs": self.probs[rows]}


def test_decisions_compared_exactly_with_margins() -> None:
    from slimdeploy.parity import DecisionSpec

    ref_gates = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.uint8)
    probs = np.array([[0.9, 0.1], [0.2, 0.5004], [0.7, 0.8], [0.1, 0.3]], dtype=np.float32)
    reference = {"logits": ref_gates.sum(axis=1, keepdims=True).astype(np.float32), "gates": ref_gates, "gate_probs": probs}
    spec = DecisionSpec("gates", "gate_probs", threshold=0.5)
    feed = {"input": np.arange(4)}

    # Sample 1 flips block 1, whose reference probability is 4e-4 from the threshold: reported
    # as near-threshold, not a defect; sample 1 is left out of the numeric comparison.
    near = ref_gates.copy()
    near[1, 1] = 0
    with GateRunner(near, probs) as runner:
        report = check_parity(runner, feed, reference, [1, 4], "ref", decisions=[spec])
    assert report.passed, report.failures
    result = report.decisions["gates"][0]
    assert result.near_threshold == 1 and result.defects == 0
    assert result.disagreements[0]["sample"] == 1 and result.disagreements[0]["margin"] == pytest.approx(4e-4, abs=1e-6)
    assert result.per_block_agreement == [1.0, 0.75]
    assert result.reference_open == [2, 2] and result.reference_closed == [2, 2]
    assert report.excluded_samples == {"1": 1, "4": 1}
    assert report.summary()["gates_agreement"] == 0.875

    # A flip far from the threshold is a defect, and the report fails.
    far = ref_gates.copy()
    far[0, 0] = 0
    with GateRunner(far, probs) as runner:
        report = check_parity(runner, feed, reference, [2], "ref", decisions=[spec])
    assert not report.passed
    assert report.decisions["gates"][0].defects == 1
    assert "gates: 1 decision(s) differ" in report.failures[0]
    data = report.to_dict()
    assert "rows_agree" not in data["decisions"]["gates"][0]


def test_empty_output_passes_with_nothing_counted() -> None:
    result = compare_values("logits", np.zeros((0, 3)), np.zeros((0, 3)), 1e-4, 1e-3, 4)
    assert result and result.message == ""
    assert (result.mismatched, result.elements, result.nonfinite_candidate, result.nonfinite_reference) == (0, 0, 0, 0)


def test_relative_error_is_against_the_reference() -> None:
    ref = np.array([[2.0, -4.0, 0.0]])
    result = compare_values("logits", ref, ref + np.array([[0.5, 0.5, 0.0]]), atol=1.0, rtol=0.0, batch_size=1)
    assert result and result.max_rel == pytest.approx(0.25) and result.max_abs == pytest.approx(0.5)


def test_missing_output_fails_the_check_and_is_listed_once() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    with ShiftRunner(0.0, 0.0) as runner:
        report = check_parity(runner, {"input": x}, {"logits": x, "features": x}, [1, 2, 4], "ref")
    assert not report
    missing = [f for f in report.failures if "lacks ['features']" in f]
    assert len(missing) == 1, report.failures


def test_junit_has_one_case_per_output_and_batch_and_one_for_top1(tmp_path: Path) -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    with ShiftRunner(0.0, 0.0) as runner:
        report = check_parity(runner, {"input": x}, {"logits": x}, [1, 2], "ref")
    report.write_junit(tmp_path / "parity.xml")
    suite = ElementTree.parse(tmp_path / "parity.xml").getroot()
    assert [case.get("name") for case in suite] == ["logits[batch=1]", "logits[batch=2]", "top1_agreement"]
    assert suite.get("tests") == "3" and suite.get("failures") == "0"


def test_exit_decisions_judged_at_the_decisive_stage() -> None:
    """Where two exit stages differ, the margin is the reference's confidence at the earlier of
    the two against that stage's threshold; closer than ``near_margin`` (strictly) is near the
    threshold, anything else a defect."""
    from slimdeploy.parity import DecisionSpec, compare_decisions

    thresholds = [0.75, 0.625, 0.0]
    confidence = np.array([
        [0.875, 0.5, 0.25],     # exits at 0 in both
        [0.5, 0.6875, 0.25],    # reference exits at 1 (0.0625 above 0.625), candidate at 2: a defect
        [0.25, 0.125, 0.875],   # exits at 2 in both
        [0.7502, 0.5, 0.25],    # reference at 0 (2e-4 above 0.75), candidate at 1: near
        [0.5, 0.6248, 0.25],    # reference at 2, candidate at 1 (2e-4 below 0.625 there): near
    ], dtype=np.float32)
    reference = {"exit_stage": np.array([0, 1, 2, 0, 2]), "exit_confidence": confidence}
    candidate = {"exit_stage": np.array([0, 2, 2, 1, 1])}
    spec = DecisionSpec("exit_stage", "exit_confidence", threshold=thresholds, kind="exit")
    result = compare_decisions(spec, reference, candidate, batch_size=5)
    assert not result and (result.defects, result.near_threshold) == (1, 2)
    assert "1 sample(s) exit at another stage" in result.message
    assert [(d["sample"], d["stage"], d["near_threshold"]) for d in result.disagreements] == [(1, 1, False), (3, 0, True), (4, 1, True)]
    assert result.disagreements[0]["margin"] == pytest.approx(0.0625)
    assert result.agreement == pytest.approx(0.4) and result.per_block_agreement == [0.5, 0.0, 0.5]
    assert result.reference_open == [2, 1, 2] and result.reference_closed == [3, 2, 0]
    assert result.rows_agree == [True, False, True, False, False]

    # A margin of exactly near_margin is not "closer than" it: a defect (0.875 - 0.75 = 0.125).
    exact = {"exit_stage": np.array([1, 1, 2, 0, 2])}
    wide = DecisionSpec("exit_stage", "exit_confidence", threshold=thresholds, kind="exit", near_margin=0.125)
    assert compare_decisions(wide, reference, exact, batch_size=5).defects == 1
    same = compare_decisions(spec, reference, {"exit_stage": reference["exit_stage"]}, batch_size=5)
    assert same and same.message == "" and same.agreement == 1.0 and same.defects == 0


def test_rows_labels_and_criteria_are_checked_before_running() -> None:
    from slimdeploy.errors import InputValidationError

    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    with ShiftRunner(0.0, 0.0) as runner:
        report = check_parity(runner, {"input": x}, {"logits": x}, [2], "ref", labels=x.argmax(axis=1),
                              batch_inputs=["input"], criteria={"top1_agreement": 1.0, "mismatch_fraction": 0.0})
        assert report and report.task.accuracy_reference == 1.0 and report.criteria["top1_agreement"] == 1.0
        bad = [
            ({"logits": x[:3]}, None, None),                      # a reference with other rows
            ({"logits": x}, np.arange(3), None),                  # labels with other rows
            ({"logits": x}, None, {"top1_agreement": 1.5}),       # a criterion above 1
            ({"logits": x}, None, {"top1_agreement": True}),      # a bool is not a fraction
            ({"logits": x}, None, {"top1_agreement": float("nan")}),
            ({"logits": x}, None, {"agreement": 0.5}),            # an unknown criterion
        ]
        for reference, labels, criteria in bad:
            with pytest.raises(InputValidationError):
                check_parity(runner, {"input": x}, reference, [2], "ref", labels=labels, criteria=criteria)


def test_mismatch_fraction_passes_few_mismatches_but_never_a_nan() -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    few = x.copy()
    few[0, 0] = 1.0  # 1 of 6 elements outside tolerance
    nan = x.copy()
    nan[0, 0] = np.nan  # a NaN in the reference: one element, yet never allowed
    for reference, passes in ((few, True), (nan, False)):
        with ShiftRunner(0.0, 0.0) as runner:  # returns its input: zeros
            report = check_parity(runner, {"input": x}, {"logits": reference}, [2], "ref",
                                  criteria={"mismatch_fraction": 0.2})
        assert bool(report) is passes, report.failures
        assert bool(report.outputs[0]) is passes and (report.outputs[0].message == "") is passes
