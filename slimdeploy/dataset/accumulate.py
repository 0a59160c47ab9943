"""A parity report that adds up batch by batch and merges across workers.

``ParityAccumulator`` holds, per batch size, what ``parity.check_parity`` computes over one
array, as counts and exact sums: per numeric output the elements, those outside tolerance, the
non-finite ones (and the first positions, by global sample index), the largest absolute and
relative errors, the exact sum of absolute errors and a sketch of their distribution
(``sketch.ErrorSketch``: percentiles within 1 %); per decision output the decisions, flips,
near-threshold flips, flips per block or stage, how often the reference opened and closed each
and the first disagreements; the samples left out of the numeric comparison; top-1/top-5
agreement and accuracy counts; exit or skip counts and total MACs. ``add`` takes one batch,
``merge`` another accumulator; both only add counts, take maxima and keep the first N items by
global index, so any grouping of the same batches gives the same accumulator (and the same
report), whichever worker ran them and in whatever order they came back. ``report`` turns it
into the ``ParityReport`` the CLI prints, with the verdict rules of ``check_parity``.

Per-batch figures come from ``parity.compare_decisions`` and ``parity.task_agreement``; their
rates are turned back into counts exactly (``round(rate * n)`` is exact for n below 2**50).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimdeploy.dataset.sketch import RELATIVE_ERROR, ErrorSketch, ExactSum
from slimdeploy.dataset.sources import BadItem
from slimdeploy.parity import (
    _DISAGREEMENTS_LISTED,
    _POSITIONS_LISTED,
    LOGITS,
    DecisionResult,
    DecisionSpec,
    OutputResult,
    ParityReport,
    TaskResult,
    _allow_mismatches,
    compare_decisions,
    task_agreement,
)
from slimdeploy.predicted import exit_macs_total, gated_macs_total

# How many bad inputs a report lists one by one (the count covers all of them).
SKIPPED_LISTED = 100


def _count(rate: float, total: int) -> int:
    """The count behind a rate over ``total`` (exact: see the module docstring)."""
    return round(rate * total)


@dataclass
class OutputAccumulator:
    """Numeric comparison of one output at one batch size, over every batch added."""

    name: str
    elements: int = 0
    finite: int = 0
    outside: int = 0
    nonfinite_candidate: int = 0
    nonfinite_reference: int = 0
    broken: int = 0
    positions: list[list[int]] = field(default_factory=list)
    max_abs: float = 0.0
    max_rel: float = 0.0
    sum_abs: ExactSum = field(default_factory=ExactSum)
    sketch: ErrorSketch = field(default_factory=ErrorSketch)
    # The first shape mismatch: (global sample index of its batch, message).
    shape_error: tuple[int, str] | None = None

    def add(self, reference: np.ndarray, candidate: np.ndarray, indices: np.ndarray, atol: float, rtol: float) -> None:
        """Compare one batch as ``parity.compare_values`` does; ``indices`` are the rows' global
        sample indices."""
        if reference.shape != candidate.shape:
            first = int(indices.min()) if len(indices) else 0
            message = f"{self.name}: shape {list(candidate.shape)} differs from the reference's {list(reference.shape)}"
            if self.shape_error is None or first < self.shape_error[0]:
                self.shape_error = (first, message)
            return
        ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
        if not ref.size:
            return
        ref_bad, cand_bad = ~np.isfinite(ref), ~np.isfinite(cand)
        broken = ref_bad | cand_bad
        finite = ~broken
        diff = np.abs(cand[finite] - ref[finite])
        self.elements += int(ref.size)
        self.finite += int(diff.size)
        self.outside += int((diff > atol + rtol * np.abs(ref[finite])).sum())
        self.nonfinite_candidate += int(cand_bad.sum())
        self.nonfinite_reference += int(ref_bad.sum())
        self.broken += int(broken.sum())
        if broken.any():
            found = [[int(indices[p[0]]), *(int(i) for i in p[1:])] for p in np.argwhere(broken)[:_POSITIONS_LISTED]]
            self.positions = sorted(self.positions + found)[:_POSITIONS_LISTED]
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float((diff / np.maximum(np.abs(ref[finite]), 1e-12)).max()))
            self.sum_abs.add(diff)
            self.sketch.add(diff)

    def merge(self, other: OutputAccumulator) -> None:
        for name in ("elements", "finite", "outside", "nonfinite_candidate", "nonfinite_reference", "broken"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.positions = sorted(self.positions + other.positions)[:_POSITIONS_LISTED]
        self.max_abs, self.max_rel = max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel)
        self.sum_abs.merge(other.sum_abs)
        self.sketch.merge(other.sketch)
        if other.shape_error is not None and (self.shape_error is None or other.shape_error[0] < self.shape_error[0]):
            self.shape_error = other.shape_error

    def result(self, batch_size: int, atol: float, rtol: float) -> OutputResult:
        """The ``OutputResult`` of everything added, with the messages ``compare_values`` gives."""
        if self.shape_error is not None:
            return OutputResult(self.name, batch_size, False, atol, rtol, message=self.shape_error[1])
        result = OutputResult(
            name=self.name, batch_size=batch_size, passed=not self.outside and not self.broken, atol=atol, rtol=rtol,
            max_abs=self.max_abs, mean_abs=self.sum_abs.value / self.finite if self.finite else 0.0,
            p99_abs=self.sketch.quantile(0.99), max_rel=self.max_rel, mismatched=self.outside + self.broken,
            elements=self.elements, nonfinite_candidate=self.nonfinite_candidate,
            nonfinite_reference=self.nonfinite_reference, nonfinite_positions=[list(p) for p in self.positions],
            percentiles=self.sketch.percentiles(),
        )
        if self.broken:
            where = ", ".join(f"{count} in the {side}" for side, count in
                              (("candidate", self.nonfinite_candidate), ("reference", self.nonfinite_reference)) if count)
            result.message = (
                f"{self.name}: non-finite values (NaN/inf) at batch {batch_size}: {where}; first at {self.positions[:3]} "
                "(sample, ...) | Note: NaN or inf never passes parity | Fix: check the checkpoint's weights and the inputs"
            )
        elif not result.passed:
            result.message = (
                f"{self.name}: {result.mismatched}/{result.elements} elements outside atol {atol:g} + rtol {rtol:g} at batch "
                f"{batch_size} (max abs {result.max_abs:.3g}, max rel {result.max_rel:.3g})"
            )
        return result

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in (
            "name", "elements", "finite", "outside", "nonfinite_candidate", "nonfinite_reference", "broken",
            "positions", "max_abs", "max_rel")}
        data.update(sum_abs=self.sum_abs.to_dict(), sketch=self.sketch.to_dict(),
                    shape_error=list(self.shape_error) if self.shape_error else None)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputAccumulator:
        counts = {name: int(data[name]) for name in (
            "elements", "finite", "outside", "nonfinite_candidate", "nonfinite_reference", "broken")}
        shape = data["shape_error"]
        return cls(str(data["name"]), **counts, positions=[[int(i) for i in p] for p in data["positions"]],
                   max_abs=float(data["max_abs"]), max_rel=float(data["max_rel"]),
                   sum_abs=ExactSum.from_dict(data["sum_abs"]), sketch=ErrorSketch.from_dict(data["sketch"]),
                   shape_error=(int(shape[0]), str(shape[1])) if shape else None)


@dataclass
class DecisionAccumulator:
    """Agreement of one decision output at one batch size, as counts (see ``DecisionResult``)."""

    name: str
    kind: str
    near_margin: float
    samples: int = 0
    decisions: int = 0
    near: int = 0
    defects: int = 0
    # Per block (gates) or per stage (exits): flips, and what they are counted among.
    differ_per_block: list[int] = field(default_factory=list)
    among_per_block: list[int] = field(default_factory=list)
    reference_open: list[int] = field(default_factory=list)
    reference_closed: list[int] = field(default_factory=list)
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    def add(self, result: DecisionResult, indices: np.ndarray) -> None:
        """Fold in one batch's ``compare_decisions`` result (its samples are ``indices``)."""
        among = result.reference_open if self.kind == "exit" else [result.samples] * len(result.per_block_agreement)
        differ = [_count(1.0 - rate, total) for rate, total in zip(result.per_block_agreement, among)]
        listed = [{**item, "sample": int(indices[item["sample"]])} for item in result.disagreements]
        self._fold(result.samples, result.decisions, result.near_threshold, result.defects, differ, among,
                   result.reference_open, result.reference_closed, listed)

    def merge(self, other: DecisionAccumulator) -> None:
        self._fold(other.samples, other.decisions, other.near, other.defects, other.differ_per_block, other.among_per_block,
                   other.reference_open, other.reference_closed, other.disagreements)

    def _fold(self, samples: int, decisions: int, near: int, defects: int, differ: Sequence[int], among: Sequence[int],
              opened: Sequence[int], closed: Sequence[int], listed: list[dict[str, Any]]) -> None:
        self.samples += samples
        self.decisions += decisions
        self.near += near
        self.defects += defects
        self.differ_per_block = _add_lists(self.differ_per_block, differ)
        self.among_per_block = _add_lists(self.among_per_block, among)
        self.reference_open = _add_lists(self.reference_open, opened)
        self.reference_closed = _add_lists(self.reference_closed, closed)
        where = "stage" if self.kind == "exit" else "block"
        self.disagreements = sorted(self.disagreements + listed, key=lambda d: (d["sample"], d.get(where, 0)))[:_DISAGREEMENTS_LISTED]

    def result(self, batch_size: int) -> DecisionResult:
        """The ``DecisionResult`` of everything added, with the message ``compare_decisions`` gives."""
        flips = self.near + self.defects
        if self.kind == "exit":
            message = (f"{self.name}: {self.defects} sample(s) exit at another stage than the reference at batch {batch_size} "
                       f"beyond the near-threshold margin {self.near_margin:g}")
        else:
            message = (f"{self.name}: {self.defects} decision(s) differ from the reference at batch {batch_size} beyond "
                       f"the near-threshold margin {self.near_margin:g}")
        return DecisionResult(
            message=message if self.defects else "", name=self.name, batch_size=batch_size, samples=self.samples,
            decisions=self.decisions, agreement=1.0 - flips / self.decisions if self.decisions else 1.0,
            per_block_agreement=[1.0 - d / n if n else 1.0 for d, n in zip(self.differ_per_block, self.among_per_block)],
            near_threshold=self.near, defects=self.defects, disagreements=list(self.disagreements),
            reference_open=list(self.reference_open), reference_closed=list(self.reference_closed), kind=self.kind,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionAccumulator:
        return cls(**{key: data[key] for key in (
            "name", "kind", "near_margin", "samples", "decisions", "near", "defects", "differ_per_block", "among_per_block",
            "reference_open", "reference_closed", "disagreements")})


def _add_lists(left: Sequence[int], right: Sequence[int]) -> list[int]:
    """Element-wise sum, the shorter padded with zeros (an empty list is the start)."""
    size = max(len(left), len(right))
    return [(left[i] if i < len(left) else 0) + (right[i] if i < len(right) else 0) for i in range(size)]


@dataclass
class TaskAccumulator:
    """Top-1/top-5 agreement and accuracy as counts (accuracy over the labelled samples)."""

    samples: int = 0
    top1: int = 0
    top5: int = 0
    labelled: int = 0
    reference_correct: int = 0
    candidate_correct: int = 0

    def add(self, reference_logits: np.ndarray, candidate_logits: np.ndarray, labels: np.ndarray | None) -> None:
        if not len(reference_logits):
            return
        task = task_agreement(reference_logits, candidate_logits, labels)
        self.samples += task.samples
        self.top1 += _count(task.top1_agreement, task.samples)
        self.top5 += _count(task.top5_agreement, task.samples)
        if labels is not None and task.accuracy_reference is not None and task.accuracy_candidate is not None:
            self.labelled += task.samples
            self.reference_correct += _count(task.accuracy_reference, task.samples)
            self.candidate_correct += _count(task.accuracy_candidate, task.samples)

    def merge(self, other: TaskAccumulator) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def result(self) -> TaskResult:
        task = TaskResult(self.samples, self.top1 / self.samples if self.samples else 0.0,
                          self.top5 / self.samples if self.samples else 0.0)
        if self.labelled:
            task.accuracy_reference = self.reference_correct / self.labelled
            task.accuracy_candidate = self.candidate_correct / self.labelled
        return task


@dataclass
class ComputeAccumulator:
    """What the candidate's decisions cost (at the largest batch size): samples per exit stage
    (and the reference's), or executions per gated block; total MACs as computing every block
    or stage (``mask``), as the decisions alone predict (``ideal``), and as the bundle's form
    computes them at each batch size (integers, so they add up exactly)."""

    kind: str
    samples: int = 0
    counts: list[int] = field(default_factory=list)
    reference_counts: list[int] = field(default_factory=list)
    macs: dict[str, int] = field(default_factory=dict)

    def add(self, plan: Mapping[str, Any], form: str, batch_sizes: Sequence[int], reference: Mapping[str, np.ndarray],
            candidate: Mapping[str, np.ndarray], static_macs: int) -> None:
        """Fold in one batch's decisions; each batch size's form cost is counted per call batch."""
        n = len(next(iter(candidate.values()))) if candidate else 0
        self.samples += n
        totals: dict[str, int] = {}
        if self.kind == "exit" and "exit_stage" in candidate:
            stage = np.asarray(candidate["exit_stage"]).astype(np.int64).reshape(-1)
            macs = [int(plan["macs"][f"stage{j}"]) for j in range(int(plan["n_stages"]))]
            self.counts = _add_lists(self.counts, [int((stage == j).sum()) for j in range(len(macs))])
            if "exit_stage" in reference:
                ref_stage = np.asarray(reference["exit_stage"]).astype(np.int64).reshape(-1)
                self.reference_counts = _add_lists(self.reference_counts, [int((ref_stage == j).sum()) for j in range(len(macs))])
            totals = {"mask": exit_macs_total(macs, stage, "mask", 1), "ideal": exit_macs_total(macs, stage, "ideal", 1)}
            for b in batch_sizes:
                totals[f"{form} at batch {b}"] = sum(exit_macs_total(macs, stage[i:i + b], form, b) for i in range(0, n, b))
        elif self.kind == "gate" and "gates" in candidate:
            gates = np.asarray(candidate["gates"]).reshape(n, -1)
            self.counts = _add_lists(self.counts, [int(v) for v in gates.astype(np.int64).sum(axis=0)])
            if "gates" in reference:
                ref_gates = np.asarray(reference["gates"]).astype(np.int64).reshape(n, -1)
                self.reference_counts = _add_lists(self.reference_counts, [int(v) for v in ref_gates.sum(axis=0)])
            totals = {"mask": gated_macs_total(dict(plan), gates, "mask", 1), "ideal": gated_macs_total(dict(plan), gates, "ideal", 1)}
            for b in batch_sizes:
                totals[f"{form} at batch {b}"] = sum(gated_macs_total(dict(plan), gates[i:i + b], form, b) for i in range(0, n, b))
        else:
            totals = {"model": static_macs * n}
        for key, value in totals.items():
            self.macs[key] = self.macs.get(key, 0) + int(value)

    def merge(self, other: ComputeAccumulator) -> None:
        self.samples += other.samples
        self.counts = _add_lists(self.counts, other.counts)
        self.reference_counts = _add_lists(self.reference_counts, other.reference_counts)
        for key, value in other.macs.items():
            self.macs[key] = self.macs.get(key, 0) + value

    def summary(self) -> dict[str, Any]:
        """Shares and MACs per sample, for the report."""
        n = self.samples or 1
        data: dict[str, Any] = {"kind": self.kind, "samples": self.samples,
                                "macs_per_sample": {key: value / n for key, value in self.macs.items()}}
        if self.kind == "exit":
            data["exit_share_per_stage"] = [c / n for c in self.counts]
            data["reference_exit_share_per_stage"] = [c / n for c in self.reference_counts]
        elif self.kind == "gate":
            data["skip_rate_per_block"] = [1 - c / n for c in self.counts]
            data["reference_skip_rate_per_block"] = [1 - c / n for c in self.reference_counts]
        return data


@dataclass
class ParityAccumulator:
    """Every figure of a streamed parity run (module docstring). ``specs`` and ``tolerances``
    are what each batch is judged with; they are not merged (every worker has the same)."""

    batch_sizes: list[int]
    compute_kind: str = "static"
    samples: int = 0
    shards: int = 0
    outputs: dict[int, dict[str, OutputAccumulator]] = field(default_factory=dict)
    decisions: dict[int, dict[str, DecisionAccumulator]] = field(default_factory=dict)
    excluded: dict[int, int] = field(default_factory=dict)
    missing: dict[int, list[str]] = field(default_factory=dict)
    task: TaskAccumulator = field(default_factory=TaskAccumulator)
    compute: ComputeAccumulator | None = None
    skipped: list[BadItem] = field(default_factory=list)
    skipped_count: int = 0
    references: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.compute is None:
            self.compute = ComputeAccumulator(self.compute_kind)

    def add_skipped(self, items: Sequence[BadItem]) -> None:
        """Count bad inputs left out, listing the first ``SKIPPED_LISTED`` by sample index."""
        self.skipped_count += len(items)
        self.skipped = sorted([*self.skipped, *items], key=lambda item: (item.sample, item.path, item.row or 0))[:SKIPPED_LISTED]

    def add_reference_source(self, source: str) -> None:
        if source not in self.references:
            self.references = sorted([*self.references, source])

    def add(
        self,
        reference: Mapping[str, np.ndarray],
        candidates: Mapping[int, Mapping[str, np.ndarray]],
        indices: np.ndarray,
        labels: np.ndarray | None,
        specs: Sequence[DecisionSpec],
        tolerances: Mapping[str, tuple[float, float]],
        compute: tuple[Mapping[str, Any], str, int] = ({}, "", 0),
    ) -> None:
        """Fold in one batch: ``reference`` outputs and, per batch size, the candidate's.

        Args:
            reference: reference outputs of the batch's samples.
            candidates: the candidate's outputs per batch size.
            indices: global sample indices of the rows.
            labels: class labels, or None.
            specs: decision outputs to compare exactly.
            tolerances: per-output (atol, rtol), ``""`` the default.
            compute: (plan, form, static MACs per sample) for the cost figures. Defaults to none.
        """
        from slimdeploy.parity import tolerance_for

        self.samples += len(indices)
        decision_names = {spec.name for spec in specs}
        numeric = [name for name in reference if name not in decision_names]
        for batch_size, candidate in candidates.items():
            rows = np.ones(len(indices), dtype=bool)
            missing = self.missing.setdefault(batch_size, [])
            for spec in specs:
                if spec.name not in candidate:
                    missing[:] = sorted({*missing, spec.name})
                    continue
                result = compare_decisions(spec, reference, candidate, batch_size)
                self.decisions.setdefault(batch_size, {}).setdefault(
                    spec.name, DecisionAccumulator(spec.name, spec.kind, spec.near_margin)).add(result, indices)
                rows &= np.asarray(result.rows_agree, dtype=bool)
            outputs = self.outputs.setdefault(batch_size, {})
            for name in numeric:
                if name not in candidate:
                    missing[:] = sorted({*missing, name})
                    continue
                outputs.setdefault(name, OutputAccumulator(name)).add(
                    np.asarray(reference[name])[rows], np.asarray(candidate[name])[rows], indices[rows],
                    *tolerance_for(tolerances, name))
            self.excluded[batch_size] = self.excluded.get(batch_size, 0) + int((~rows).sum())
        largest = candidates[max(candidates)]
        if LOGITS in reference and LOGITS in largest:
            self.task.add(np.asarray(reference[LOGITS]), np.asarray(largest[LOGITS]), labels)
        plan, form, static_macs = compute
        assert self.compute is not None
        self.compute.add(plan, form, sorted(candidates), reference, largest, static_macs)

    def merge(self, other: ParityAccumulator) -> None:
        """Add ``other`` (another worker's shards) into this one."""
        self.samples += other.samples
        self.shards += other.shards
        for batch_size, outputs in other.outputs.items():
            mine = self.outputs.setdefault(batch_size, {})
            for name, acc in outputs.items():
                mine[name].merge(acc) if name in mine else mine.setdefault(name, OutputAccumulator.from_dict(acc.to_dict()))
        for batch_size, decisions in other.decisions.items():
            mine_d = self.decisions.setdefault(batch_size, {})
            for name, dec in decisions.items():
                mine_d[name].merge(dec) if name in mine_d else mine_d.setdefault(name, DecisionAccumulator.from_dict(dec.to_dict()))
        for batch_size, count in other.excluded.items():
            self.excluded[batch_size] = self.excluded.get(batch_size, 0) + count
        for batch_size, names in other.missing.items():
            self.missing[batch_size] = sorted(set(self.missing.get(batch_size, [])) | set(names))
        self.task.merge(other.task)
        assert self.compute is not None and other.compute is not None
        self.compute.merge(other.compute)
        self.skipped_count += other.skipped_count - len(other.skipped)
        self.add_skipped(other.skipped)
        for source in other.references:
            self.add_reference_source(source)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON), what per-shard result files and workers' answers hold."""
        assert self.compute is not None
        return {
            "batch_sizes": self.batch_sizes, "compute_kind": self.compute_kind, "samples": self.samples, "shards": self.shards,
            "outputs": {str(b): {n: acc.to_dict() for n, acc in sorted(o.items())} for b, o in sorted(self.outputs.items())},
            "decisions": {str(b): {n: acc.to_dict() for n, acc in sorted(d.items())} for b, d in sorted(self.decisions.items())},
            "excluded": {str(b): c for b, c in sorted(self.excluded.items())},
            "missing": {str(b): sorted(m) for b, m in sorted(self.missing.items())},
            "task": vars(self.task), "compute": vars(self.compute), "skipped": [vars(item) for item in self.skipped],
            "skipped_count": self.skipped_count, "references": self.references,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParityAccumulator:
        compute = data["compute"]
        return cls(
            batch_sizes=[int(b) for b in data["batch_sizes"]], compute_kind=data["compute_kind"], samples=int(data["samples"]),
            shards=int(data["shards"]),
            outputs={int(b): {n: OutputAccumulator.from_dict(a) for n, a in o.items()} for b, o in data["outputs"].items()},
            decisions={int(b): {n: DecisionAccumulator.from_dict(a) for n, a in d.items()} for b, d in data["decisions"].items()},
            excluded={int(b): int(c) for b, c in data["excluded"].items()},
            missing={int(b): list(m) for b, m in data["missing"].items()},
            task=TaskAccumulator(**data["task"]),
            compute=ComputeAccumulator(compute["kind"], int(compute["samples"]), list(compute["counts"]),
                                       list(compute["reference_counts"]), dict(compute["macs"])),
            skipped=[BadItem(**item) for item in data["skipped"]], skipped_count=int(data["skipped_count"]),
            references=list(data["references"]),
        )

    def report(
        self,
        candidate: str,
        precision: str,
        tolerances: Mapping[str, tuple[float, float]],
        criteria: Mapping[str, float],
        specs: Sequence[DecisionSpec],
        tolerance_rule: Mapping[str, Any],
    ) -> ParityReport:
        """The ``ParityReport`` of everything added, judged as ``check_parity`` judges."""
        report = ParityReport(
            reference="+".join(self.references) or "none", candidate=candidate, precision=precision,
            batch_sizes=list(self.batch_sizes), samples=self.samples,
            tolerances={k: list(v) for k, v in tolerances.items()}, criteria=dict(criteria),
            tolerance_rule=dict(tolerance_rule),
        )
        if not self.samples:
            report.failures.append("no sample was checked (every input was left out as bad) | Fix: check the data")
            return report
        for batch_size in self.batch_sizes:
            missing = self.missing.get(batch_size, [])
            for spec in specs:
                acc = self.decisions.get(batch_size, {}).get(spec.name)
                if acc is None:
                    continue
                result = acc.result(batch_size)
                if "decision_agreement" in criteria:
                    result.min_agreement = criteria["decision_agreement"]
                    result.message = "" if result else (
                        f"{spec.name}: agreement {result.agreement:.2%} at batch {batch_size} is below {result.min_agreement:.0%}")
                report.decisions.setdefault(spec.name, []).append(result)
                if not result:
                    report.failures.append(result.message)
            from slimdeploy.parity import tolerance_for

            results = [acc.result(batch_size, *tolerance_for(tolerances, name))
                       for name, acc in sorted(self.outputs.get(batch_size, {}).items())]
            if "mismatch_fraction" in criteria:
                _allow_mismatches(results, criteria["mismatch_fraction"])
            failures = [f"outputs: candidate lacks {missing}"] if missing else []
            if self.excluded.get(batch_size):
                report.excluded_samples[str(batch_size)] = self.excluded[batch_size]
            report.outputs.extend(results)
            report.failures.extend(f for f in failures if f not in report.failures)
            report.failures.extend(r.message for r in results if not r)
        if self.task.samples:
            report.task = self.task.result()
            least = criteria.get("top1_agreement")
            if least is not None and report.task.top1_agreement < least:
                report.failures.append(f"top-1 agreement {report.task.top1_agreement:.2%} is below {least:.0%}")
        return report


PERCENTILE_NOTE = (f"percentiles of |candidate - reference| are nearest-rank, read from a log-bucket sketch within "
                   f"{RELATIVE_ERROR:.0%} (relative) of the exact value; counts, maxima and means are exact")
