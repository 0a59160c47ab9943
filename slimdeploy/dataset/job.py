"""The work on one shard, as every worker does it (in this process, a local process, a Ray actor).

``ShardWorker(spec)`` loads the bundle once (verified, as untrusted as anywhere), then
``run(shard)`` reads the shard a chunk at a time (``sources.ShardReader``) and returns a plain,
JSON-ready answer: ``{"shard", "ok": True, "result"}``, or ``{"ok": False, "error", "exit_code",
"retry"}`` (a domain error such as a bad input is not retried: it would fail the same way).

Tasks (``spec["task"]``):

- ``parity``: the candidate at every batch size against the reference, folded into a
  ``ParityAccumulator``. The reference comes from the data's own ``ref_*`` arrays, else from
  reference shards (``--references``), else from the bundle's ``reference.pt`` in PyTorch,
  batch by batch (torch needed only then);
- ``references``: the PyTorch reference of each sample written to a reference shard
  (``references.py``), for checks on machines without torch;
- ``sweep``: an early-exit bundle at each threshold setting (``SweepAccumulator``).

Staged bundles run their controller here, inside the worker, like any other runner.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.dataset.accumulate import ParityAccumulator
from slimdeploy.dataset.sources import Batch, BundleFacts, DataSource, Shard, ShardReader
from slimdeploy.errors import SlimDeployError

PARITY, REFERENCES, SWEEP = "parity", "references", "sweep"


def compute_kind(manifest: Mapping[str, Any]) -> str:
    """``exit``, ``gate`` or ``static``: which cost figures a bundle's decisions give."""
    return "exit" if manifest.get("exits") else "gate" if manifest.get("gating") else "static"


@dataclass
class SweepAccumulator:
    """One threshold setting of a streamed sweep: exits per stage, correct answers among the
    labelled samples, total MACs as the decisions predict (each sample up to its exit), and
    the time the calls took."""

    label: str
    thresholds: list[float]
    default: bool = False
    samples: int = 0
    counts: list[int] = field(default_factory=list)
    labelled: int = 0
    correct: int = 0
    macs: int = 0
    seconds: float = 0.0
    calls: int = 0

    def merge(self, other: SweepAccumulator) -> None:
        from slimdeploy.dataset.accumulate import _add_lists

        self.samples += other.samples
        self.counts = _add_lists(self.counts, other.counts)
        for name in ("labelled", "correct", "macs", "seconds", "calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def point(self, batch_size: int) -> Any:
        """The ``bench.SweepPoint`` of everything added."""
        from slimdeploy.predicted import SweepPoint

        n = self.samples or 1
        return SweepPoint(
            thresholds=list(self.thresholds), exit_share_per_stage=[c / n for c in self.counts],
            macs_average=self.macs / n, accuracy=self.correct / self.labelled if self.labelled else None,
            latency_ms=self.seconds / self.calls * 1e3 if self.calls else 0.0, batch_size=batch_size, label=self.label,
            default=self.default, samples=self.samples,
        )


def sweep_settings(values: list[float], default: list[float], n_stages: int) -> list[tuple[str, np.ndarray]]:
    """(label, thresholds) per setting: each value for every stage but the last, then the
    bundle's own thresholds (as ``bench.sweep_exits`` sweeps)."""
    settings = []
    for value in values:
        thresholds = np.full(n_stages, value, dtype=np.float32)
        thresholds[-1] = 0.0
        settings.append((f"{value:g}", thresholds))
    settings.append(("default", np.asarray(default, dtype=np.float32).reshape(n_stages)))
    return settings


class ShardWorker:
    """Holds a loaded bundle and its runners; ``run`` does one shard (module docstring)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        from slimdeploy.bundle import load_bundle

        self.spec = dict(spec)
        self.bundle = load_bundle(spec["bundle"])
        self.facts = BundleFacts.of(self.bundle)
        self.source = DataSource.from_dict(spec["source"])
        self._candidate: Any = None
        self._reference: Any = None

    def candidate(self) -> Any:
        """The bundle's runner (its graphs, or its staged controller), made once."""
        if self._candidate is None:
            from slimdeploy.bundle import bundle_runner

            self._candidate = bundle_runner(self.bundle, device=self.spec["device"], threads=self.spec["threads"]).activate()
        return self._candidate

    def reference(self) -> Any:
        """The PyTorch reference runner over the bundle's ``reference.pt``, made once."""
        if self._reference is None:
            from slimdeploy.bundle import reference_runner

            self._reference = reference_runner(self.bundle, threads=self.spec["threads"]).activate()
        return self._reference

    def close(self) -> None:
        for runner in (self._candidate, self._reference):
            if runner is not None:
                runner.deactivate()
        self._candidate = self._reference = None

    def run(self, shard_data: Mapping[str, Any]) -> dict[str, Any]:
        """The answer for one shard (module docstring); never raises."""
        shard = Shard.from_dict(dict(shard_data))
        try:
            task = self.spec["task"]
            result = (self._parity(shard) if task == PARITY else self._references(shard) if task == REFERENCES
                      else self._sweep(shard))
            return {"shard": shard.index, "ok": True, "result": result}
        except SlimDeployError as exc:
            return {"shard": shard.index, "ok": False, "error": str(exc), "exit_code": exc.exit_code, "retry": False}
        except Exception as exc:  # a crash: retried, in case it was the machine and not the data
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return {"shard": shard.index, "ok": False, "error": f"shard {shard.index}: {detail}", "exit_code": 2, "retry": True}

    def _reader(self) -> ShardReader:
        return ShardReader(self.source, self.facts, int(self.spec["chunk"]), self.spec["on_bad"])

    def _references_for(self, batch: Batch, stored: Any) -> tuple[dict[str, np.ndarray], str]:
        """The reference outputs of a batch, and where they came from."""
        if batch.references is not None:
            return batch.references, "stored"
        if stored is not None:
            return stored.take(batch), "reference shards"
        from slimdeploy.parity import run_batches

        return run_batches(self.reference(), {"input": batch.inputs}, max(len(batch), 1)), "torch"

    def _parity(self, shard: Shard) -> dict[str, Any]:
        from slimdeploy.dataset.references import StoredReferences
        from slimdeploy.parity import DecisionSpec, run_batches

        manifest = self.bundle.manifest
        batch_sizes = [int(b) for b in self.spec["batch_sizes"]]
        specs = [DecisionSpec(**spec) for spec in manifest.get("decisions", {}).get("outputs", [])]
        tolerances = {name: tuple(value) for name, value in self.spec["tolerances"].items()}
        kind = compute_kind(manifest)
        plan = manifest.get("exits") or manifest.get("gating") or {}
        compute = (plan, manifest.get("dynamic") or "", int(manifest["model"].get("macs") or 0))
        acc = ParityAccumulator(batch_sizes, compute_kind=kind, shards=1)
        folder = self.spec.get("references_dir")
        stored = StoredReferences(Path(folder), shard, self.facts) if folder else None
        with self._reader() as reader:
            for batch in reader.batches(shard):
                acc.add_skipped(batch.skipped)
                if not len(batch):
                    continue
                reference, origin = self._references_for(batch, stored)
                runner = self.candidate()
                candidates = {b: run_batches(runner, {"input": batch.inputs}, b) for b in batch_sizes}
                acc.add(reference, candidates, batch.indices, batch.labels, specs, tolerances, compute)
                acc.add_reference_source(origin)
        if stored is not None:
            stored.finish()
        return acc.to_dict()

    def _references(self, shard: Shard) -> dict[str, Any]:
        from slimdeploy.dataset.references import ReferenceWriter

        writer = ReferenceWriter(Path(self.spec["references_out"]), shard)
        skipped = []
        with self._reader() as reader:
            for batch in reader.batches(shard):
                skipped.extend(vars(item) for item in batch.skipped)
                if len(batch):
                    from slimdeploy.parity import run_batches

                    writer.add(batch, run_batches(self.reference(), {"input": batch.inputs}, len(batch)))
        return {"samples": writer.write(), "skipped": skipped}

    def _sweep(self, shard: Shard) -> dict[str, Any]:
        from slimdeploy.predicted import exit_macs_total

        plan = self.bundle.manifest["exits"]
        macs = [int(plan["macs"][f"stage{j}"]) for j in range(int(plan["n_stages"]))]
        default = self.bundle.manifest["decisions"]["thresholds"]["exit_thresholds"]
        settings = sweep_settings([float(v) for v in self.spec["sweep"]], default, len(macs))
        accumulators = {label: SweepAccumulator(label, [float(t) for t in thresholds], default=label == "default")
                        for label, thresholds in settings}
        batch_size = int(self.spec["batch_sizes"][0])
        runner = self.candidate()
        skipped = []
        with self._reader() as reader:
            for batch in reader.batches(shard):
                skipped.extend(vars(item) for item in batch.skipped)
                for label, thresholds in settings:
                    acc = accumulators[label]
                    for start in range(0, len(batch), batch_size):
                        feed = {"input": batch.inputs[start:start + batch_size], "exit_thresholds": thresholds}
                        began = time.perf_counter()
                        outputs = runner.infer(feed, check_inputs=start == 0)
                        acc.seconds += time.perf_counter() - began
                        acc.calls += 1
                        stage = np.asarray(outputs["exit_stage"]).astype(np.int64).reshape(-1)
                        acc.samples += len(stage)
                        acc.counts = [a + b for a, b in zip(acc.counts or [0] * len(macs), [int((stage == j).sum()) for j in range(len(macs))])]
                        acc.macs += exit_macs_total(macs, stage, "ideal", 1)
                        if batch.labels is not None:
                            labels = batch.labels[start:start + batch_size]
                            acc.labelled += len(labels)
                            acc.correct += int((np.asarray(outputs["logits"]).argmax(1) == labels).sum())
        return {"points": [vars(acc) for acc in accumulators.values()], "skipped": skipped}
