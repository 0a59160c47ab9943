"""Parity, threshold sweeps and reference shards over a whole dataset.

    report = check_dataset("bundle/", "val/", DatasetOptions(execution=Execution(workers=2)))
    report.dataset.samples_per_second, report.outputs[0].percentiles

``check_dataset`` streams a source (``sources.py``) through the bundle and its reference and
returns the same ``ParityReport`` as ``parity.check_bundle``, judged by the same rules, with a
``dataset`` section (``DatasetSummary``: what was read and left out, exit shares or skip rates
and MACs per sample, how it ran). ``sweep_dataset`` gives ``bench``'s threshold sweep over a
source; ``write_references`` writes reference shards for checks where torch is not installed.
Each runs anywhere ``execute.run_shards`` runs: this process, local processes, or Ray.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slimdeploy.dataset.accumulate import PERCENTILE_NOTE, ParityAccumulator
from slimdeploy.dataset.arrays import ArrayFile
from slimdeploy.dataset.execute import Execution, Progress, ResultStore, run_shards
from slimdeploy.dataset.job import PARITY, REFERENCES, SWEEP, SweepAccumulator, compute_kind
from slimdeploy.dataset.sources import (
    ARRAYS,
    ON_BAD,
    REFERENCE_PREFIX,
    BadItem,
    DataSource,
    open_source,
)
from slimdeploy.errors import BackendUnavailableError, BadInputError, BundleError

DEFAULT_SHARD_SIZE = 1000
# Samples read and preprocessed at once inside a shard: what memory follows.
DEFAULT_CHUNK = 64


@dataclass(frozen=True)
class DatasetOptions:
    """How a dataset job reads and runs (the CLI's options, one object).

    Attributes:
        batch_sizes: candidate batch sizes. Defaults to the manifest's (parity) or (1,) (sweep).
        tolerances: per-output (atol, rtol), ``""`` the default. Defaults to the manifest's.
        device: ``cpu``, ``cuda`` or ``tensorrt``. Defaults to ``cpu``.
        threads: intra-op threads per worker (ONNX Runtime and the PyTorch reference); 0 means
            1, which keeps the figures the same in every mode (PyTorch's float results can
            change with its thread count). Defaults to 0.
        shard_size: samples per shard, the unit of work and of resumption. Defaults to 1,000
            (or the shard size the ``references`` were written with).
        chunk: samples read at once within a shard. Defaults to 64 (at least the largest batch).
        on_bad: ``fail`` (stop at the first bad input) or ``skip`` (leave it out, listed).
            Defaults to ``fail``.
        references: a folder of reference shards (``write_references``). Defaults to none.
        execution: where the shards run (``execute.Execution``). Defaults to this process.
    """

    batch_sizes: Sequence[int] | None = None
    tolerances: Mapping[str, tuple[float, float]] | None = None
    device: str = "cpu"
    threads: int = 0
    shard_size: int | None = None
    chunk: int = DEFAULT_CHUNK
    on_bad: str = "fail"
    references: str | None = None
    execution: Execution = field(default_factory=Execution)


@dataclass
class DatasetSummary:
    """The ``dataset`` section of a streamed report: what was read, what it cost, how it ran.
    ``comparable()`` leaves out how it ran (mode, workers, timings), which differs between runs
    that give the same figures."""

    source: str
    kind: str
    listed: int
    samples: int
    shards: int
    skipped: int
    skipped_items: list[dict[str, Any]]
    compute: dict[str, Any]
    note: str = PERCENTILE_NOTE
    mode: str = "in-process"
    workers: int = 1
    threads: int = 0
    resumed_shards: int = 0
    retried_shards: int = 0
    seconds: float = 0.0
    samples_per_second: float = 0.0

    RUN_FIELDS = ("mode", "workers", "threads", "resumed_shards", "retried_shards", "seconds", "samples_per_second")

    def comparable(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key not in self.RUN_FIELDS}


def comparable_report(report: Any) -> dict[str, Any]:
    """A streamed report's data without what depends on how it ran (timings, mode, workers):
    what single-process, local-process and Ray runs of one job must agree on exactly."""
    data = report.to_dict()
    data.pop("seconds", None)
    if report.dataset is not None:
        data["dataset"] = report.dataset.comparable()
    return data


def _checked(options: DatasetOptions) -> None:
    from slimdeploy.limits import check_batch_sizes, check_device, check_option, check_threads

    check_device(options.device)
    check_threads(options.threads)
    if options.batch_sizes is not None:
        check_batch_sizes(list(options.batch_sizes), "--batch-sizes")
    if options.shard_size is not None:
        check_option("shard_size", options.shard_size)
    check_option("chunk", options.chunk, "chunk")
    check_option("workers", options.execution.workers)
    check_option("retries", options.execution.retries)
    if options.on_bad not in ON_BAD:
        raise BadInputError(f"--on-bad-input {options.on_bad!r} | Note: expected one of {list(ON_BAD)} | Fix: pass --on-bad-input skip or fail")


def _threads(options: DatasetOptions) -> int:
    """Intra-op threads per worker: as given, else 1. One thread per worker by default keeps
    the figures the same in every mode (PyTorch's float results can change with its thread
    count) and lets workers, not threads, use the cores."""
    return options.threads or 1


def _bundle_digest(bundle: Any) -> str:
    """A digest of the bundle's manifest, which lists every file's digest: one bundle, one job."""
    return hashlib.sha256(json.dumps(bundle.manifest, sort_keys=True).encode()).hexdigest()


def _open(bundle: Any, data: str, options: DatasetOptions) -> tuple[DataSource, dict[str, Any] | None]:
    """The source, cut into the shards of the reference shards when there are some."""
    index = None
    shard_size = options.shard_size or DEFAULT_SHARD_SIZE
    if options.references:
        from slimdeploy.dataset.references import read_index

        index = read_index(Path(options.references), bundle)
        if options.shard_size not in (None, index["shard_size"]):
            raise BadInputError(f"--shard-size {options.shard_size} differs from the {index['shard_size']} the references in "
                                f"'{options.references}' were written with | Fix: leave out --shard-size")
        shard_size = index["shard_size"]
    source = open_source(data, shard_size, options.on_bad)
    if index is not None and index["shards"] != len(source.shards):
        raise BadInputError(f"the references in '{options.references}' cover {index['shards']} shard(s), the data "
                            f"'{data}' has {len(source.shards)} | Fix: write them for this data: slimdeploy reference "
                            "BUNDLE --data SOURCE --out DIR")
    return source, index


def _torch_reference_possible(bundle: Any) -> str:
    """"" when PyTorch references can be computed here, else why not."""
    from slimdeploy._optional import is_available

    if not is_available("torch"):
        return "torch is not installed here"
    if not bundle.manifest.get("reference_weights"):
        return f"bundle '{bundle.path}' carries no PyTorch reference weights (exported with --no-reference-weights)"
    return ""


def _check_reference_source(bundle: Any, source: DataSource, references: str | None) -> None:
    """Exit 3 (or 2) before any work when some samples would have no reference."""
    if references:
        return
    why = _torch_reference_possible(bundle)
    if not why:
        return
    lacking = source.kind != ARRAYS
    if not lacking:
        for file in sorted({shard.file for shard in source.shards}):
            with ArrayFile(file) as arrays:
                if not any(name.startswith(REFERENCE_PREFIX) for name in arrays.members):
                    lacking = True
                    break
    if lacking:
        raise BackendUnavailableError(
            f"no reference for '{source.text}': {why}, and the data holds no ref_<output> arrays | Fix: on a machine with "
            f"torch write reference shards once (slimdeploy reference {bundle.path} --data {source.text} --out REFS) and "
            "pass --references REFS here, or install torch: pip install torch==2.13.0 'slimdeploy[export]'"
        )


def _spec(task: str, bundle: Any, source: DataSource, options: DatasetOptions, **extra: Any) -> dict[str, Any]:
    """What every worker needs (plain data; the shards are sent one by one)."""
    listing = source.to_dict()
    listing["shards"] = []
    return {"task": task, "bundle": str(Path(bundle.path).absolute()), "device": options.device, "threads": _threads(options),
            "chunk": options.chunk, "on_bad": options.on_bad, "source": listing, **extra}


def _job_record(spec: Mapping[str, Any], bundle: Any, source: DataSource) -> dict[str, Any]:
    """What makes two runs the same job (resuming is allowed only then): the bundle, the data
    and every option that changes results; not where or how fast they run."""
    changing = {key: value for key, value in spec.items() if key not in ("threads", "source", "bundle")}
    return {"bundle": _bundle_digest(bundle), "source": source.fingerprint, "shard_size": source.shard_size, **changing}


def _summary(source: DataSource, samples: int, skipped: list[BadItem], skipped_count: int, compute: dict[str, Any],
             options: DatasetOptions, store: ResultStore, retried: int, seconds: float) -> DatasetSummary:
    return DatasetSummary(
        source=source.describe(), kind=source.kind, listed=source.samples, samples=samples, shards=len(source.shards),
        skipped=skipped_count, skipped_items=[asdict(item) for item in skipped], compute=compute,
        mode=options.execution.mode, workers=options.execution.workers, threads=_threads(options),
        resumed_shards=store.resumed, retried_shards=retried, seconds=seconds,
        samples_per_second=samples / seconds if seconds > 0 else 0.0,
    )


def check_dataset(bundle_path: str | Path, data: str, options: DatasetOptions | None = None,
                  progress: Progress | None = None) -> Any:
    """Parity of a bundle against its reference over the dataset ``data`` (module docstring).

    Returns a ``parity.ParityReport`` whose ``dataset`` is a ``DatasetSummary``. Raises
    ``BadInputError`` (exit 2) for bad options, data or references, and
    ``BackendUnavailableError`` (exit 3) when no reference can be had here.
    """
    from slimdeploy.bundle import bundle_runner, load_bundle
    from slimdeploy.parity import (
        DEFAULT_CRITERIA,
        DecisionSpec,
        _checked_criteria,
        _stored_tolerances,
    )
    from slimdeploy.tolerance import DEFAULT_TOLERANCES, check_tolerances, default_rule, given_rule

    options = options or DatasetOptions()
    _checked(options)
    given = check_tolerances(options.tolerances, "--atol/--rtol") if options.tolerances else None
    started = time.perf_counter()
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    precision = manifest.get("precision", "fp32")
    stored, stored_rule = _stored_tolerances(bundle)
    tolerances = given or stored or check_tolerances(DEFAULT_TOLERANCES[precision])
    rule = given_rule() if given else stored_rule or default_rule(DEFAULT_TOLERANCES[precision][""])
    stored_criteria = manifest.get("parity", {}).get("criteria")
    criteria = _checked_criteria(DEFAULT_CRITERIA.get(precision, {}) if stored_criteria is None else stored_criteria)
    batch_sizes = [int(b) for b in (options.batch_sizes or manifest["golden"]["batch_sizes"])]
    options = DatasetOptions(**{**vars(options), "chunk": max(options.chunk, max(batch_sizes))})
    source, _ = _open(bundle, data, options)
    _check_reference_source(bundle, source, options.references)
    spec = _spec(PARITY, bundle, source, options, batch_sizes=batch_sizes,
                 tolerances={name: list(value) for name, value in tolerances.items()},
                 references_dir=str(Path(options.references).absolute()) if options.references else None)
    store = ResultStore(options.execution.work_dir, _job_record(spec, bundle, source), options.execution.force)
    total = ParityAccumulator(batch_sizes, compute_kind=compute_kind(manifest))
    total.add_skipped(source.problems)

    def take(answer: dict[str, Any]) -> None:
        total.merge(ParityAccumulator.from_dict(answer["result"]))

    def accept(answer: dict[str, Any]) -> bool:
        return bool(answer.get("ok")) and ParityAccumulator.from_dict(answer["result"]).batch_sizes == batch_sizes

    retried = run_shards(spec, source.shards, options.execution, store, accept, take, progress)
    specs = [DecisionSpec(**item) for item in manifest.get("decisions", {}).get("outputs", [])]
    candidate = bundle_runner(bundle, device=options.device, threads=0).name  # not activated: its name only
    report = total.report(candidate, precision, tolerances, criteria, specs, rule.to_dict())
    seconds = time.perf_counter() - started
    assert total.compute is not None
    report.dataset = _summary(source, total.samples, total.skipped, total.skipped_count, total.compute.summary(),
                              options, store, retried, seconds)
    report.seconds = seconds
    return report


def sweep_dataset(bundle: Any, data: str, values: Sequence[float], options: DatasetOptions,
                  progress: Progress | None = None) -> tuple[list[Any], DatasetSummary]:
    """``bench``'s threshold sweep of an early-exit bundle over the dataset ``data``: one
    ``SweepPoint`` per value and for the bundle's own thresholds, at the first batch size.
    Latency is the mean call time in the workers (with several workers, calls shared the
    machine)."""
    _checked(options)
    if not bundle.manifest.get("exits"):
        raise BadInputError("--sweep applies to early-exit bundles (exit thresholds); this bundle has none | Fix: leave out --sweep")
    batch_size = int((options.batch_sizes or (1,))[0])
    started = time.perf_counter()
    options = DatasetOptions(**{**vars(options), "chunk": max(options.chunk, batch_size)})
    source, _ = _open(bundle, data, options)
    spec = _spec(SWEEP, bundle, source, options, batch_sizes=[batch_size], sweep=[float(v) for v in values])
    store = ResultStore(options.execution.work_dir, _job_record(spec, bundle, source), options.execution.force)
    points: dict[str, SweepAccumulator] = {}
    skipped: list[BadItem] = list(source.problems)

    def take(answer: dict[str, Any]) -> None:
        for data_point in answer["result"]["points"]:
            acc = SweepAccumulator(**data_point)
            points[acc.label].merge(acc) if acc.label in points else points.setdefault(acc.label, acc)
        skipped.extend(BadItem(**item) for item in answer["result"]["skipped"])

    def accept(answer: dict[str, Any]) -> bool:
        return bool(answer.get("ok")) and all(SweepAccumulator(**p) is not None for p in answer["result"]["points"])

    retried = run_shards(spec, source.shards, options.execution, store, accept, take, progress)
    order = [f"{float(v):g}" for v in values] + ["default"]
    swept = [points[label].point(batch_size) for label in order if label in points]
    samples = swept[0].samples if swept else 0
    skipped.sort(key=lambda item: (item.sample, item.path, item.row or 0))
    summary = _summary(source, samples, skipped[:100], len(skipped), {}, options, store, retried, time.perf_counter() - started)
    return swept, summary


def write_references(bundle_path: str | Path, data: str, out: str | Path, options: DatasetOptions | None = None,
                     progress: Progress | None = None) -> DatasetSummary:
    """Write reference shards of ``data`` for ``bundle_path`` into the folder ``out``
    (``references.py``; needs torch and the bundle's reference weights). ``out`` is also the
    work folder: run again, the same command continues from the shards written."""
    from slimdeploy.bundle import load_bundle
    from slimdeploy.dataset.references import INDEX, index_record

    options = options or DatasetOptions()
    _checked(options)
    bundle = load_bundle(bundle_path)
    why = _torch_reference_possible(bundle)
    if why:
        error = BundleError if "reference weights" in why else BackendUnavailableError
        raise error(f"slimdeploy reference computes PyTorch references, but {why} | Fix: run it where torch is installed "
                    "(pip install torch==2.13.0 'slimdeploy[export]') with a bundle exported with its reference weights")
    started = time.perf_counter()
    source, _ = _open(bundle, data, options)
    folder = Path(out).absolute()
    spec = _spec(REFERENCES, bundle, source, options, references_out=str(folder))
    execution = Execution(**{**vars(options.execution), "work_dir": str(folder)})
    store = ResultStore(str(folder), _job_record(spec, bundle, source), execution.force)
    samples, skipped = [0], list(source.problems)

    def take(answer: dict[str, Any]) -> None:
        samples[0] += int(answer["result"]["samples"])
        skipped.extend(BadItem(**item) for item in answer["result"]["skipped"])

    def accept(answer: dict[str, Any]) -> bool:
        from slimdeploy.dataset.references import shard_file

        return bool(answer.get("ok")) and shard_file(folder, int(answer["shard"])).is_file()

    retried = run_shards(spec, source.shards, execution, store, accept, take, progress)
    from slimdeploy.files import atomic_output

    with atomic_output(folder / INDEX) as tmp:
        tmp.write_text(json.dumps(index_record(bundle, source.shard_size, len(source.shards), source.text), indent=1) + "\n")
    skipped.sort(key=lambda item: (item.sample, item.path, item.row or 0))
    return _summary(source, samples[0], skipped[:100], len(skipped), {}, options, store, retried, time.perf_counter() - started)
