"""Decision-aware parity: compare a candidate runner's outputs with a reference.

Checks run in Optimum's order — output names, then shapes, then values — and every failure is
collected before the verdict (Polygraphy's comparator style). Each output gets an
``OutputResult`` that is truthy when it passes; a ``ParityReport`` is truthy when everything
passes. Values pass when every element satisfies ``|c - r| <= atol + rtol * |r|`` and every
value of both is finite: a NaN or infinity in the candidate or the reference fails the output
(the report gives the count and the first positions), so broken numbers never pass.

Tolerances are checked before use (``tolerance.check_tolerances``: finite, >= 0; a NaN
tolerance would pass anything), and so are the rows: inputs, references and labels must have
as many rows as each other, and the inputs must be finite.

Default tolerances by precision (per output, the ``""`` key is the default for all outputs):

    fp32  atol 1e-4  rtol 1e-3  (export measures PyTorch's own float32 noise per output and
          raises atol to 10x it: ``slimdeploy.tolerance``; the measured values are stored)
    fp16  atol 5e-2  rtol 1e-2  (FP16 keeps ~3 significant digits; 20-layer residual nets
          accumulate ~3e-2 on logits of magnitude 10: SPConv ResNet-20 demo, max 2.9e-2)
    int8  atol 0.25  rtol 0.1   (INT8 bundles are judged mainly by top-1 agreement)

Reduced precision rounds every value, so FP16 and INT8 bundles pass on agreement rates rather
than on every element and every decision (``DEFAULT_CRITERIA``, stored in the manifest):

    fp16  top-1 agreement >= 0.99, decision agreement >= 0.99, <= 1 % of elements outside tolerance
    int8  top-1 agreement >= 0.97, decision agreement >= 0.98, <= 10 % of elements outside tolerance

(FP32 has no criteria: every element within tolerance, every decision exact; only near-threshold
flips are tolerated, and reported.)

The report also carries task agreement (top-1/top-5 agreement with the reference, accuracy when
labels are given) and a ``decisions`` section that the dynamic families (gates, exits) fill.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

from slimdeploy.engines.base import Runner, batched
from slimdeploy.errors import BadInputError, BundleError, InputValidationError
from slimdeploy.files import atomic_output, write_json
from slimdeploy.tolerance import (
    DEFAULT_TOLERANCES,
    ToleranceRule,
    check_tolerances,
    default_rule,
    given_rule,
)

DEFAULT_CRITERIA: dict[str, dict[str, float]] = {
    "fp32": {},
    "fp16": {"top1_agreement": 0.99, "decision_agreement": 0.99, "mismatch_fraction": 0.01},
    "int8": {"top1_agreement": 0.97, "decision_agreement": 0.98, "mismatch_fraction": 0.1},
}
# Outputs holding class scores, used for top-k agreement and accuracy.
LOGITS = "logits"


def tolerance_for(tolerances: Mapping[str, tuple[float, float]], name: str) -> tuple[float, float]:
    """(atol, rtol) for output ``name``: its own entry or the ``""`` default."""
    return tuple(tolerances.get(name, tolerances[""]))  # type: ignore[return-value]


@dataclass
class OutputResult:
    """Numeric comparison of one output at one batch size. Truthy when it passes."""

    name: str
    batch_size: int
    passed: bool
    atol: float
    rtol: float
    max_abs: float = 0.0
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    max_rel: float = 0.0
    mismatched: int = 0
    elements: int = 0
    message: str = ""
    # NaN/inf values (each fails the output) and the first positions holding one.
    nonfinite_candidate: int = 0
    nonfinite_reference: int = 0
    nonfinite_positions: list[list[int]] = field(default_factory=list)
    # Streamed checks (``slimdeploy.dataset``): nearest-rank percentiles of |c - r| ("p50",
    # "p90", "p99", "p99.9") read from a sketch, within 1 %; empty for an in-memory check.
    percentiles: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed


@dataclass
class TaskResult:
    """Agreement of class predictions with the reference (and with labels when given)."""

    samples: int
    top1_agreement: float
    top5_agreement: float
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None


@dataclass
class ParityReport:
    """Everything a parity run found. Truthy when every output (and decision) passed."""

    reference: str
    candidate: str
    precision: str
    batch_sizes: list[int]
    samples: int
    tolerances: dict[str, list[float]]
    # Agreement rates that replace exactness for reduced precision (DEFAULT_CRITERIA).
    criteria: dict[str, float] = field(default_factory=dict)
    outputs: list[OutputResult] = field(default_factory=list)
    task: TaskResult | None = None
    # Decision agreement per decision output, one entry per batch size (gates, exits).
    decisions: dict[str, list[DecisionResult]] = field(default_factory=dict)
    # Samples left out of the numeric comparison because a decision differed, per batch size.
    excluded_samples: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # How the tolerances were chosen (measured FP32 noise, precision default, given).
    tolerance_rule: dict[str, Any] = field(default_factory=dict)
    # Streamed checks: the data read, left out and what it cost (``dataset.DatasetSummary``).
    dataset: Any = None

    @property
    def passed(self) -> bool:
        """No collected failure (names, criteria), every output passed, every decision agreed."""
        return not self.failures and all(self.outputs) and all(all(r) for r in self.decisions.values())

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """The full report as plain data, with ``passed`` (what report.json and ``--json`` hold)."""
        data = asdict(self)
        data["passed"] = self.passed
        for results in data["decisions"].values():
            for result in results:
                result.pop("rows_agree", None)
        return data

    def summary(self) -> dict[str, Any]:
        """The short form stored in the manifest."""
        worst: dict[str, float] = {}
        for result in self.outputs:
            worst[result.name] = max(worst.get(result.name, 0.0), result.max_abs)
        summary: dict[str, Any] = {
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "samples": self.samples,
            "batch_sizes": self.batch_sizes,
            "max_abs": worst,
            "failures": len(self.failures),
        }
        if self.tolerance_rule:
            summary["tolerance_rule"] = self.tolerance_rule
        if self.criteria:
            summary["criteria"] = self.criteria
        if self.task is not None:
            summary["top1_agreement"] = self.task.top1_agreement
        for name, results in self.decisions.items():
            summary[f"{name}_agreement"] = min(r.agreement for r in results)
            summary[f"{name}_near_threshold"] = max(r.near_threshold for r in results)
        return summary

    def write_json(self, path: str | Path) -> None:
        """Write ``to_dict()`` as JSON to ``path``, or to stdout for ``"-"``."""
        write_json(self.to_dict(), path)

    def write_junit(self, path: str | Path) -> None:
        """JUnit XML: one test case per decision output and batch size (``gates[batch=1]``), per
        output and batch size (``logits[batch=16]``), per other failure (missing outputs, an
        agreement criterion), and one for top-1 agreement."""
        cases: list[tuple[str, str | None]] = []
        for results in self.decisions.values():
            for decision in results:
                detail = None if decision else decision.message
                cases.append((f"{decision.name}[batch={decision.batch_size}]", detail))
        for result in self.outputs:
            detail = None if result.passed else result.message
            cases.append((f"{result.name}[batch={result.batch_size}]", detail))
        for failure in self.failures:
            if not any(failure == detail for _, detail in cases):
                cases.append((failure.split(":")[0], failure))
        if self.task is not None:
            cases.append(("top1_agreement", None))
        suite = ElementTree.Element(
            "testsuite",
            name=f"slimdeploy.parity.{self.candidate}",
            tests=str(len(cases)),
            failures=str(sum(1 for _, d in cases if d)),
            time=f"{self.seconds:.3f}",
        )
        for case_name, detail in cases:
            case = ElementTree.SubElement(suite, "testcase", classname="slimdeploy.parity", name=case_name)
            if detail:
                ElementTree.SubElement(case, "failure", message=detail[:200]).text = detail
        with atomic_output(path) as tmp:
            ElementTree.ElementTree(suite).write(str(tmp), encoding="utf-8", xml_declaration=True)


def compare_values(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    atol: float,
    rtol: float,
    batch_size: int,
) -> OutputResult:
    """Compare one output: shapes first, then finiteness (any NaN/inf in either fails), then
    elementwise tolerance (statistics over the finite elements)."""
    if reference.shape != candidate.shape:
        return OutputResult(
            name, batch_size, False, atol, rtol,
            message=f"{name}: shape {list(candidate.shape)} differs from the reference's {list(reference.shape)}",
        )
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    if ref.size == 0:
        return OutputResult(name, batch_size, True, atol, rtol)
    ref_bad, cand_bad = ~np.isfinite(ref), ~np.isfinite(cand)
    broken = ref_bad | cand_bad
    finite = ~broken
    diff = np.abs(cand[finite] - ref[finite])
    bad = diff > atol + rtol * np.abs(ref[finite])
    rel = diff / np.maximum(np.abs(ref[finite]), 1e-12)
    result = OutputResult(
        name=name,
        batch_size=batch_size,
        passed=not bool(bad.any()) and not bool(broken.any()),
        atol=atol,
        rtol=rtol,
        max_abs=float(diff.max(initial=0.0)),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        p99_abs=float(np.percentile(diff, 99)) if diff.size else 0.0,
        max_rel=float(rel.max(initial=0.0)),
        mismatched=int(bad.sum()) + int(broken.sum()),
        elements=int(ref.size),
        nonfinite_candidate=int(cand_bad.sum()),
        nonfinite_reference=int(ref_bad.sum()),
        nonfinite_positions=[[int(i) for i in position] for position in np.argwhere(broken)[:_POSITIONS_LISTED]],
    )
    if broken.any():
        where = ", ".join(
            f"{count} in the {side}" for side, count in
            (("candidate", result.nonfinite_candidate), ("reference", result.nonfinite_reference)) if count
        )
        result.message = (
            f"{name}: non-finite values (NaN/inf) at batch {batch_size}: {where}; first at "
            f"{result.nonfinite_positions[:3]} | Note: NaN or inf never passes parity | Fix: check the "
            "checkpoint's weights and the inputs"
        )
    elif not result.passed:
        result.message = (
            f"{name}: {result.mismatched}/{result.elements} elements outside atol {atol:g} + rtol {rtol:g} "
            f"at batch {batch_size} (max abs {result.max_abs:.3g}, max rel {result.max_rel:.3g})"
        )
    return result


# How many positions of non-finite values a result lists (the counts cover all of them).
_POSITIONS_LISTED = 10


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    tolerances: Mapping[str, tuple[float, float]],
    batch_size: int,
    names: Iterable[str] | None = None,
) -> tuple[list[OutputResult], list[str]]:
    """Compare every output by name; returns per-output results and name-level failures.

    ``names`` are the outputs to compare. Defaults to every output of ``reference``.
    """
    failures: list[str] = []
    wanted = list(names) if names is not None else list(reference)
    missing = [n for n in wanted if n not in candidate]
    if missing:
        failures.append(f"outputs: candidate lacks {missing} (has {sorted(candidate)})")
    results = [
        compare_values(n, np.asarray(reference[n]), np.asarray(candidate[n]), *tolerance_for(tolerances, n), batch_size)
        for n in wanted
        if n in candidate
    ]
    return results, failures


def task_agreement(
    reference_logits: np.ndarray,
    candidate_logits: np.ndarray,
    labels: np.ndarray | None = None,
) -> TaskResult:
    """Top-1 and top-5 agreement of the candidate with the reference's top-1 class, and the
    accuracy of both when ``labels`` are given (defaults to none)."""
    ref_top1 = reference_logits.argmax(axis=1)
    cand_top1 = candidate_logits.argmax(axis=1)
    k = min(5, candidate_logits.shape[1])
    cand_top5 = np.argsort(-candidate_logits, axis=1)[:, :k]
    task = TaskResult(
        samples=len(ref_top1),
        top1_agreement=float((ref_top1 == cand_top1).mean()),
        top5_agreement=float((cand_top5 == ref_top1[:, None]).any(axis=1).mean()),
    )
    if labels is not None:
        task.accuracy_reference = float((ref_top1 == labels).mean())
        task.accuracy_candidate = float((cand_top1 == labels).mean())
    return task


@dataclass(frozen=True)
class DecisionSpec:
    """A decision output and how to judge a disagreement.

    Attributes:
        name: the decision output (gates: ``"gates"``, [B, n] uint8, 1 = executed; exits:
            ``"exit_stage"``, [B] int64).
        probs: the output holding the value behind each decision (``"gate_probs"``; exits:
            ``"exit_confidence"``, [B, n_stages]).
        threshold: the threshold the decisions were made at: gates execute iff prob >
            threshold; exits take one threshold per stage.
        near_margin: a flip whose reference value lies closer than this to the threshold is
            reported as near-threshold, not as a defect. Defaults to 1e-3.
        kind: ``"gate"`` (independent bits) or ``"exit"`` (the first confident stage answers).
            Defaults to ``"gate"``.
        threshold_input: the graph input that carries the threshold (``"gate_threshold"``,
            ``"exit_thresholds"``); when a check's feed holds it, margins are taken against the
            fed value instead of ``threshold``. Defaults to "" (none).
    """

    name: str
    probs: str
    threshold: float | list[float]
    near_margin: float = 1e-3
    kind: str = "gate"
    threshold_input: str = ""

    def at(self, feed: Mapping[str, np.ndarray]) -> DecisionSpec:
        """This spec with the threshold the feed gives, if it gives one."""
        if self.threshold_input and self.threshold_input in feed:
            fed = np.asarray(feed[self.threshold_input], dtype=np.float64)
            return replace(self, threshold=fed.tolist())
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields as the manifest's ``decisions.outputs`` records them."""
        return asdict(self)


@dataclass
class DecisionResult:
    """Agreement of one decision output at one batch size."""

    name: str
    batch_size: int
    samples: int
    decisions: int
    agreement: float
    per_block_agreement: list[float]
    near_threshold: int
    defects: int
    disagreements: list[dict[str, Any]]
    # How often the reference opened/closed each block: every gate should be seen both ways.
    reference_open: list[int]
    reference_closed: list[int]
    message: str = ""
    rows_agree: list[bool] = field(repr=False, default_factory=list)
    # Reduced precision: pass on this agreement rate instead of on zero defects.
    min_agreement: float | None = None
    kind: str = "gate"  # "exit": per_block_* and reference_open/closed are per stage

    def __bool__(self) -> bool:
        if self.min_agreement is not None:
            return self.agreement >= self.min_agreement
        return self.defects == 0


# How many disagreements a report lists one by one (the counts cover all of them).
_DISAGREEMENTS_LISTED = 50


def compare_decisions(
    spec: DecisionSpec,
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    batch_size: int,
) -> DecisionResult:
    """Compare decisions exactly; each flip carries the reference's margin to the threshold."""
    if spec.kind == "exit":
        return _compare_exits(spec, reference, candidate, batch_size)
    ref = np.asarray(reference[spec.name]).astype(np.int64).reshape(len(reference[spec.name]), -1)
    cand = np.asarray(candidate[spec.name]).astype(np.int64).reshape(ref.shape)
    probs = np.asarray(reference[spec.probs], dtype=np.float64).reshape(ref.shape)
    differ = ref != cand
    margins = np.abs(probs - spec.threshold)
    near = differ & (margins < spec.near_margin)
    listed = []
    for sample, block in zip(*np.nonzero(differ)):
        if len(listed) == _DISAGREEMENTS_LISTED:
            break
        listed.append({
            "sample": int(sample), "block": int(block), "reference": int(ref[sample, block]),
            "candidate": int(cand[sample, block]), "reference_prob": float(probs[sample, block]),
            "margin": float(margins[sample, block]), "near_threshold": bool(near[sample, block]),
        })
    defects = int((differ & ~near).sum())
    return DecisionResult(
        message="" if not defects else (
            f"{spec.name}: {defects} decision(s) differ from the reference at batch {batch_size} "
            f"beyond the near-threshold margin {spec.near_margin:g}"
        ),
        name=spec.name,
        batch_size=batch_size,
        samples=ref.shape[0],
        decisions=int(ref.size),
        agreement=float(1.0 - differ.mean()) if ref.size else 1.0,
        per_block_agreement=[float(v) for v in 1.0 - differ.mean(axis=0)] if ref.size else [],
        near_threshold=int(near.sum()),
        defects=defects,
        disagreements=listed,
        reference_open=[int(v) for v in ref.sum(axis=0)],
        reference_closed=[int(v) for v in (1 - ref).sum(axis=0)],
        rows_agree=[bool(v) for v in ~differ.any(axis=1)],
    )


def _compare_exits(
    spec: DecisionSpec,
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    batch_size: int,
) -> DecisionResult:
    """Compare exit stages per sample. Where they differ, the decisive stage is the earlier of
    the two (one exited there, the other did not); the margin is the reference's confidence
    there against that stage's threshold (the reference always reached it).

    ``per_block_agreement`` holds per stage the agreement among samples whose reference exits
    there; ``reference_open`` counts reference exits per stage and ``reference_closed`` the
    samples that reached a stage and went on.
    """
    ref = np.asarray(reference[spec.name]).astype(np.int64).reshape(-1)
    cand = np.asarray(candidate[spec.name]).astype(np.int64).reshape(ref.shape)
    confidence = np.asarray(reference[spec.probs], dtype=np.float64).reshape(len(ref), -1)
    thresholds = np.asarray(spec.threshold, dtype=np.float64).reshape(-1)
    n_stages = confidence.shape[1]
    differ = ref != cand
    decisive = np.minimum(ref, cand).clip(0, n_stages - 1)
    margins = np.abs(confidence[np.arange(len(ref)), decisive] - thresholds[decisive]) if len(ref) else np.zeros(0)
    near = differ & (margins < spec.near_margin)
    listed = [
        {"sample": int(i), "stage": int(decisive[i]), "reference": int(ref[i]), "candidate": int(cand[i]),
         "reference_confidence": float(confidence[i, decisive[i]]), "margin": float(margins[i]),
         "near_threshold": bool(near[i])}
        for i in np.flatnonzero(differ)[:_DISAGREEMENTS_LISTED]
    ]
    defects = int((differ & ~near).sum())
    per_stage = [float(1.0 - differ[ref == j].mean()) if (ref == j).any() else 1.0 for j in range(n_stages)]
    return DecisionResult(
        message="" if not defects else (
            f"{spec.name}: {defects} sample(s) exit at another stage than the reference at batch "
            f"{batch_size} beyond the near-threshold margin {spec.near_margin:g}"
        ),
        name=spec.name,
        batch_size=batch_size,
        samples=len(ref),
        decisions=len(ref),
        agreement=float(1.0 - differ.mean()) if len(ref) else 1.0,
        per_block_agreement=per_stage,
        near_threshold=int(near.sum()),
        defects=defects,
        disagreements=listed,
        reference_open=[int((ref == j).sum()) for j in range(n_stages)],
        reference_closed=[int((ref > j).sum()) for j in range(n_stages)],
        rows_agree=[bool(v) for v in ~differ],
        kind="exit",
    )


def run_batches(
    runner: Runner,
    feed: Mapping[str, np.ndarray],
    batch_size: int,
    batch_inputs: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``feed`` through an active runner ``batch_size`` rows at a time; concatenate.

    ``batch_inputs`` are the arrays split by rows; the others (thresholds) go whole to every
    call. Defaults to every array.
    """
    pieces = [runner.infer(part) for part in batched(feed, batch_size, batch_inputs)]
    if not pieces:  # no rows: the runner answers with empty outputs of the right shapes
        return runner.infer(feed)
    return {name: np.concatenate([p[name] for p in pieces], axis=0) for name in pieces[0]}


def check_parity(
    runner: Runner,
    feed: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    batch_sizes: Sequence[int],
    reference_name: str,
    precision: str = "fp32",
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    labels: np.ndarray | None = None,
    decisions: Sequence[DecisionSpec] = (),
    batch_inputs: Sequence[str] | None = None,
    progress: Any = None,
    criteria: Mapping[str, float] | None = None,
    tolerance_rule: ToleranceRule | None = None,
) -> ParityReport:
    """Run ``runner`` on ``feed`` at each batch size and compare with ``reference``.

    Decision outputs are compared exactly first; numeric outputs are then compared only on the
    samples whose decisions all agree (a flipped gate legitimately changes the logits), and the
    report says how many samples that left out.

    Args:
        runner: an active candidate runner.
        feed: inputs for all samples (leading axis = sample).
        reference: reference outputs for the same samples.
        batch_sizes: batch sizes to run the candidate at (all samples each time).
        reference_name: what produced the reference (``"torch"``, ``"golden"``), for the report.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``, picks default tolerances. Defaults to fp32.
        tolerances: per-output (atol, rtol), ``""`` for the default. Defaults to the precision's.
        labels: ground-truth classes for accuracy. Defaults to none.
        decisions: decision outputs to compare exactly (gates, exits). Defaults to none.
        batch_inputs: inputs split into batches; others (thresholds) are fed whole. Defaults to
            every input.
        progress: optional callable ``(description: str) -> None`` told before each batch size.
            Defaults to silence.
        criteria: agreement rates that pass a reduced-precision candidate: ``top1_agreement``,
            ``decision_agreement``, ``mismatch_fraction`` (of elements outside tolerance).
            Defaults to the precision's (``DEFAULT_CRITERIA``; none for fp32).
        tolerance_rule: how ``tolerances`` were chosen, for the report. Defaults to "given"
            when ``tolerances`` are passed, else the precision's default.

    Raises ``InputValidationError`` (exit 2) for bad tolerances, non-finite inputs, or inputs,
    references and labels whose rows disagree.
    """
    if tolerance_rule is None:
        tolerance_rule = given_rule() if tolerances else default_rule(DEFAULT_TOLERANCES[precision][""])
    tolerances = check_tolerances(tolerances or DEFAULT_TOLERANCES[precision])
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise InputValidationError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    criteria = _checked_criteria(DEFAULT_CRITERIA.get(precision, {}) if criteria is None else criteria)
    started = time.perf_counter()
    samples = check_rows(feed, reference, labels, batch_inputs)
    batch_sizes = capped_batch_sizes(batch_sizes, samples)
    report = ParityReport(
        reference=reference_name,
        candidate=runner.name,
        precision=precision,
        batch_sizes=list(batch_sizes),
        samples=samples,
        tolerances={k: list(v) for k, v in tolerances.items()},
        criteria=criteria,
        tolerance_rule=tolerance_rule.to_dict(),
    )
    # Thresholds fed with the inputs (not split into batches) are the ones decisions were made at.
    decisions = [spec.at(feed) for spec in decisions]
    decision_names = {spec.name for spec in decisions}
    candidate_by_batch: dict[int, dict[str, np.ndarray]] = {}
    for batch_size in batch_sizes:
        if progress is not None:
            progress(f"parity at batch {batch_size}")
        candidate = run_batches(runner, feed, batch_size, batch_inputs)
        candidate_by_batch[batch_size] = candidate
        missing = [spec.name for spec in decisions if spec.name not in candidate]
        rows = np.ones(samples, dtype=bool)
        for spec in decisions:
            if spec.name in missing:
                continue
            result = compare_decisions(spec, reference, candidate, batch_size)
            if "decision_agreement" in criteria:
                result.min_agreement = criteria["decision_agreement"]
                result.message = "" if result else (
                    f"{spec.name}: agreement {result.agreement:.2%} at batch {batch_size} is below "
                    f"{result.min_agreement:.0%}"
                )
            report.decisions.setdefault(spec.name, []).append(result)
            rows &= np.asarray(result.rows_agree, dtype=bool)
            if not result:
                report.failures.append(result.message)
        numeric = [name for name in reference if name not in decision_names]
        results, failures = compare_outputs(
            {name: np.asarray(reference[name])[rows] for name in numeric},
            {name: np.asarray(value)[rows] for name, value in candidate.items() if name in numeric},
            tolerances,
            batch_size,
        )
        if missing:
            failures.append(f"outputs: candidate lacks {missing} (has {sorted(candidate)})")
        if "mismatch_fraction" in criteria:
            _allow_mismatches(results, criteria["mismatch_fraction"])
        if not rows.all():
            report.excluded_samples[str(batch_size)] = int((~rows).sum())
        report.outputs.extend(results)
        report.failures.extend(f for f in failures if f not in report.failures)
        report.failures.extend(r.message for r in results if not r)
    largest = candidate_by_batch[max(batch_sizes)]
    if LOGITS in reference and LOGITS in largest:
        report.task = task_agreement(np.asarray(reference[LOGITS]), largest[LOGITS], labels)
        least = criteria.get("top1_agreement")
        if least is not None and report.task.top1_agreement < least:
            report.failures.append(f"top-1 agreement {report.task.top1_agreement:.2%} is below {least:.0%}")
    report.seconds = time.perf_counter() - started
    return report


def capped_batch_sizes(batch_sizes: Sequence[int], samples: int) -> list[int]:
    """``batch_sizes`` capped at ``samples`` (a batch of 16 over 8 samples runs as one batch of
    8, and is reported so), each once, in the order given."""
    capped: list[int] = []
    for size in batch_sizes:
        size = min(int(size), max(samples, 1))
        if size not in capped:
            capped.append(size)
    return capped


def _checked_criteria(criteria: Mapping[str, Any]) -> dict[str, float]:
    """Agreement criteria as fractions in [0, 1] (a NaN criterion would pass anything);
    ``InputValidationError`` naming the first bad one."""
    known = set(DEFAULT_CRITERIA["int8"])
    checked = {}
    for name, value in dict(criteria).items():
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")
        if name not in known or not 0.0 <= number <= 1.0:
            raise InputValidationError(
                f"parity criterion {name!r} = {value!r} | Note: expected {sorted(known)}, each a fraction from 0 to 1 "
                "| Fix: re-export the bundle"
            )
        checked[name] = float(number)
    return checked


def check_rows(
    feed: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    batch_inputs: Sequence[str] | None = None,
    source: str = "parity",
) -> int:
    """The number of samples, after checking that the batch inputs, every reference output and
    the labels have that many rows, and that every input is finite; ``InputValidationError``
    (exit 2) otherwise.

    Args:
        feed: inputs by name; ``batch_inputs`` are split by rows, the others (thresholds) not.
        reference: reference outputs by name.
        labels: class labels, or None.
        batch_inputs: names of the row-wise inputs. Defaults to every input.
        source: where the arrays came from, for the message. Defaults to "parity".
    """
    names = list(feed) if batch_inputs is None else [n for n in batch_inputs if n in feed]
    if not names:
        raise InputValidationError(f"{source}: no input arrays (expected {list(batch_inputs or [])})")
    rows = {f"input '{n}'": np.shape(feed[n])[0] if np.ndim(feed[n]) else None for n in names}
    rows.update({f"reference '{n}'": np.shape(v)[0] if np.ndim(v) else None for n, v in reference.items()})
    if labels is not None:
        rows["labels"] = np.shape(labels)[0] if np.ndim(labels) else None
    counts = set(rows.values())
    if len(counts) != 1 or None in counts:
        listed = ", ".join(f"{k} {v}" for k, v in rows.items())
        raise InputValidationError(
            f"{source}: inputs, references and labels must have one row per sample, got {listed} | Fix: "
            "save arrays with the same number of rows"
        )
    samples = int(counts.pop())
    if samples == 0:
        raise InputValidationError(f"{source}: no samples (0 rows) | Fix: give at least one sample")
    for name, value in feed.items():
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            count = int((~np.isfinite(array)).sum())
            first = [int(i) for i in np.argwhere(~np.isfinite(array))[0]]
            raise InputValidationError(
                f"{source}: input '{name}' holds {count} non-finite value(s) (NaN/inf), first at {first} | "
                "Note: parity on such inputs proves nothing | Fix: give finite inputs"
            )
    if labels is not None and np.asarray(labels).dtype.kind not in "iu":
        raise InputValidationError(f"{source}: labels must be integers, got {np.asarray(labels).dtype} | Fix: save class indices")
    return samples


def _allow_mismatches(results: Sequence[OutputResult], fraction: float) -> None:
    """Reduced precision: an output passes when at most ``fraction`` of its elements lie
    outside tolerance (shapes must still match)."""
    for result in results:
        broken = result.nonfinite_candidate or result.nonfinite_reference
        if not result.passed and not broken and result.elements and result.mismatched <= fraction * result.elements:
            result.passed = True
            result.message = ""


def check_bundle(
    path: str | Path,
    data: str | Path | None = None,
    batch_sizes: Sequence[int] | None = None,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    device: str = "cpu",
    threads: int = 0,
    progress: Any = None,
    arch: str | None = None,
) -> ParityReport:
    """Re-check a bundle against its golden reference, or against ``data``. Needs no torch
    unless ``data`` holds inputs without reference outputs.

    Args:
        path: bundle directory.
        data: .npz with ``input`` and reference outputs as ``ref_<output>`` (the golden file's
            layout), optionally ``labels``. Without ``ref_*`` arrays the references are computed
            with the bundle's PyTorch weights (needs torch). Defaults to the bundle's golden file.
        batch_sizes: batch sizes to run at. Defaults to the manifest's.
        tolerances: per-output (atol, rtol), ``""`` the default. Defaults to the manifest's.
        device: ONNX Runtime device (``"cpu"``, ``"cuda"``), ``"openvino"`` (OpenVINO's CPU
            plugin), ``"tensorrt"`` for the engines ``slimdeploy build`` recorded, or ``"auto"``
            (the bundle's default CPU runtime). Defaults to ``"cpu"``.
        threads: intra-op threads. Defaults to 0 (ONNX Runtime's choice).
        progress: optional callable told each step. Defaults to silence.
        arch: for a model built by the user's code, the factory that builds it
            (``module.path:factory`` or ``file.py:factory``), which references computed from
            ``data`` need; the bundle's record of it is never imported on its own. Defaults to none.
    """
    from slimdeploy.bundle import bundle_runner, load_bundle, resolve_device
    from slimdeploy.limits import check_device, check_threads

    check_device(device)
    check_threads(threads)
    if batch_sizes is not None and (not batch_sizes or any(int(b) < 1 for b in batch_sizes)):
        raise InputValidationError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    given = check_tolerances(tolerances, "--atol/--rtol") if tolerances else None
    bundle = load_bundle(path)
    device = resolve_device(bundle, device)
    manifest = bundle.manifest
    stored, stored_rule = _stored_tolerances(bundle)
    arrays, reference_name = _check_arrays(bundle, data, threads, arch)
    feed = {name: arrays[name] for name in bundle.input_names if name in arrays}
    reference = {name[len("ref_"):]: value for name, value in arrays.items() if name.startswith("ref_")}
    labels = arrays.get("labels")
    stored_criteria = manifest.get("parity", {}).get("criteria")
    decisions = [DecisionSpec(**spec) for spec in manifest.get("decisions", {}).get("outputs", [])]
    with bundle_runner(bundle, device=device, threads=threads) as runner:
        return check_parity(
            runner,
            feed,
            reference,
            batch_sizes or manifest["golden"]["batch_sizes"],
            reference_name,
            precision=manifest.get("precision", "fp32"),
            tolerances=given or stored or None,
            labels=labels,
            decisions=decisions,
            batch_inputs=bundle.batch_inputs,
            progress=progress,
            criteria=stored_criteria,
            tolerance_rule=given_rule() if given else stored_rule,
        )


def _stored_tolerances(bundle: Any) -> tuple[dict[str, tuple[float, float]] | None, ToleranceRule | None]:
    """The tolerances a bundle's manifest stores (checked: a NaN stored there would pass
    anything) and the rule that chose them; (None, None) when it stores none."""
    stored = bundle.manifest.get("tolerances")
    if not stored:
        return None, None
    try:
        checked = check_tolerances(stored, f"manifest tolerances of '{bundle.path}'")
    except BadInputError as exc:  # the bundle, not an option, is wrong
        raise BundleError(f"{str(exc).split(' | Fix:')[0]} | Fix: re-export the bundle") from None
    rule = bundle.manifest.get("parity", {}).get("tolerance_rule")
    if isinstance(rule, Mapping) and isinstance(rule.get("description"), str):
        known = ToleranceRule(rule=str(rule.get("rule", "")), description=f"stored in the bundle: {rule['description']}")
    else:
        known = ToleranceRule(rule="stored", description="stored in the bundle")
    return checked, known


def _check_arrays(bundle: Any, data: str | Path | None, threads: int, arch: str | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Inputs, ``ref_*`` reference outputs and labels for a check, and where the reference came from."""
    from slimdeploy.bundle import reference_runner
    from slimdeploy.engines.base import check_feed
    from slimdeploy.errors import InputValidationError
    from slimdeploy.files import read_arrays

    if data is None:
        golden = bundle.golden()
        _refuse_nonfinite(golden, f"the golden file of '{bundle.path}'", "re-export the bundle")
        return golden, "golden"
    path = Path(data)
    arrays = read_arrays(path)
    _refuse_nonfinite(arrays, f"'{path}'", "give finite inputs and references")
    metadata = {spec["name"]: bundle.input_meta(spec["name"]) for spec in bundle.manifest["inputs"]}
    missing = [name for name, meta in metadata.items() if name not in arrays and not meta.optional]
    if missing:
        raise InputValidationError(
            f"'{path}' lacks input array(s) {missing} (has {sorted(arrays)}) | Fix: save them with "
            "np.savez(path, input=x, labels=y)"
        )
    feed = {name: arrays[name] for name in metadata if name in arrays}
    check_feed(feed, metadata)
    if any(name.startswith("ref_") for name in arrays):
        return arrays, path.name
    # No stored reference: compute it with the bundle's PyTorch weights (torch needed).
    with reference_runner(bundle, threads=threads, arch=arch) as runner:
        outputs = run_batches(runner, feed, 64, bundle.batch_inputs)
    arrays.update({f"ref_{name}": value for name, value in outputs.items()})
    return arrays, "torch"


def _refuse_nonfinite(arrays: Mapping[str, np.ndarray], source: str, fix: str) -> None:
    """``InputValidationError`` (exit 2) when an input or reference array holds NaN or inf:
    parity against such numbers proves nothing."""
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            count = int((~np.isfinite(array)).sum())
            raise InputValidationError(
                f"{source}: array '{name}' holds {count} non-finite value(s) (NaN/inf) | Note: parity "
                f"needs finite inputs and references | Fix: {fix}"
            )
