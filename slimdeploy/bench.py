"""Latency and throughput of a bundle, with the PyTorch reference side by side when torch is here.

For each batch size, the golden inputs are tiled to that batch, every runner is warmed up and
then timed call by call; the report gives p50/p90/p99 latency and throughput (images per second
at the median). Runners share the thread count, so ratios compare like with like. Absolute
times depend on the machine; the ratios are the figures to read.

Early-exit bundles also get ``ExitStats`` (the share of samples leaving at each stage, average
MACs per sample from the per-stage MACs in the plan) and, with ``sweep``, a threshold sweep:
accuracy vs average MACs vs measured latency per threshold setting (``sweep_exits``), written
as JSON and drawn as a PNG (``plot_sweep``; needs matplotlib).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy._optional import is_available
from slimdeploy.bundle import Bundle, bundle_runner, load_bundle, reference_runner
from slimdeploy.engines.base import Runner
from slimdeploy.errors import BackendUnavailableError, BadInputError
from slimdeploy.files import atomic_output, write_json
from slimdeploy.limits import (
    check_batch_memory,
    check_batch_sizes,
    check_device,
    check_option,
    check_threads,
)

DEFAULT_BATCH_SIZES = (1, 32)
DEFAULT_WARMUP = 10
DEFAULT_ITERATIONS = 50


@dataclass
class LatencyResult:
    """Timing of one runner at one batch size (milliseconds per call)."""

    runner: str
    batch_size: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # images per second at the median latency


@dataclass
class DecisionStats:
    """What a gated bundle decided on the benchmark inputs, and the compute it predicts.

    MACs are per sample (Conv and Linear layers, gate cost included). ``predicted_speedup`` is
    the ``mask`` form's MACs over this form's at that batch size: what skipping should buy.
    """

    form: str
    samples: int
    skip_rate_per_block: list[float]
    skip_rate: float
    macs_mask: float
    macs_ideal: float
    macs_form: dict[str, float]
    predicted_speedup: dict[str, float]


@dataclass
class ExitStats:
    """Where an early-exit bundle's samples left, and the compute that predicts.

    MACs are per sample (Conv and Linear layers). ``macs_mask`` runs every stage;
    ``macs_ideal`` runs each sample up to its exit stage (what ``staged`` computes);
    ``macs_form`` is what this bundle's form computes at each batch size (``if`` runs a stage on
    the whole batch when any sample reaches it). ``predicted_speedup`` is mask over form.
    """

    form: str
    samples: int
    thresholds: list[float]
    exit_share_per_stage: list[float]
    macs_per_stage: list[int]
    macs_mask: float
    macs_ideal: float
    macs_form: dict[str, float]
    predicted_speedup: dict[str, float]
    accuracy: float | None = None


@dataclass
class SweepPoint:
    """One threshold setting of a sweep."""

    thresholds: list[float]
    exit_share_per_stage: list[float]
    macs_average: float
    accuracy: float | None
    latency_ms: float
    batch_size: int


@dataclass
class BenchReport:
    """All timings of one bench run, and the machine facts that frame them."""

    bundle: str
    threads: int
    results: list[LatencyResult] = field(default_factory=list)
    speedups: dict[str, float] = field(default_factory=dict)
    decisions: DecisionStats | None = None
    exits: ExitStats | None = None
    sweep: list[SweepPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what ``bench --json`` writes)."""
        return asdict(self)

    def write_json(self, path: str | Path) -> None:
        """Write ``to_dict()`` as JSON to ``path``, or to stdout for ``"-"``."""
        write_json(self.to_dict(), path)


def time_runner(
    runner: Runner,
    feed: dict[str, np.ndarray],
    warmup: int,
    iterations: int,
) -> LatencyResult:
    """Time ``iterations`` calls of an active runner after ``warmup`` untimed ones."""
    for _ in range(warmup):
        runner.infer(feed, check_inputs=False)
    times = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        runner.infer(feed, check_inputs=False)
        times[i] = time.perf_counter() - start
    batch = len(next(iter(feed.values())))
    p50 = float(np.percentile(times, 50))
    return LatencyResult(
        runner=runner.name,
        batch_size=batch,
        iterations=iterations,
        p50_ms=p50 * 1e3,
        p90_ms=float(np.percentile(times, 90)) * 1e3,
        p99_ms=float(np.percentile(times, 99)) * 1e3,
        mean_ms=float(times.mean()) * 1e3,
        throughput=batch / p50,
    )


def compare_runners(
    runners: Mapping[str, Runner],
    feeds: Sequence[dict[str, np.ndarray]],
    warmup: int = DEFAULT_WARMUP,
    rounds: int = 5,
    calls_per_round: int | None = None,
    settle_s: float = 0.05,
) -> dict[str, LatencyResult]:
    """Time active runners side by side, taking turns in rounds (order reversed every other
    round) so that machine noise falls on all of them alike.

    Each round times ``calls_per_round`` calls per runner, cycling through ``feeds`` (several
    feeds at batch 1 let per-sample decisions vary). ``mean_ms`` is the median over rounds of
    each round's mean call time: with feeds whose cost differs, the mean is what throughput
    follows; p50/p90/p99 are over all timed calls.

    Args:
        runners: active runners by label.
        feeds: one or more feeds, all of the same batch size.
        warmup: untimed calls per runner before the first round. Defaults to 10.
        rounds: timed rounds. Defaults to 5.
        calls_per_round: calls per runner per round. Defaults to ``len(feeds)``.
        settle_s: pause before each turn, so the previous runner's worker threads stop spinning
            (ONNX Runtime's and torch's thread pools spin briefly after a call). Defaults to 0.05.
    """
    calls = calls_per_round or len(feeds)
    for runner in runners.values():
        for i in range(warmup):
            runner.infer(feeds[i % len(feeds)], check_inputs=False)
    times: dict[str, list[float]] = {name: [] for name in runners}
    round_means: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else order[::-1]:
            runner, spent = runners[name], []
            time.sleep(settle_s)
            for i in range(calls):
                feed = feeds[i % len(feeds)]
                start = time.perf_counter()
                runner.infer(feed, check_inputs=False)
                spent.append(time.perf_counter() - start)
            times[name].extend(spent)
            round_means[name].append(float(np.mean(spent)))
    batch = len(next(iter(feeds[0].values())))
    results = {}
    for name, values in times.items():
        array = np.asarray(values)
        p50 = float(np.percentile(array, 50))
        results[name] = LatencyResult(
            runner=name, batch_size=batch, iterations=len(array), p50_ms=p50 * 1e3,
            p90_ms=float(np.percentile(array, 90)) * 1e3, p99_ms=float(np.percentile(array, 99)) * 1e3,
            mean_ms=float(np.median(round_means[name])) * 1e3, throughput=batch / p50,
        )
    return results


def tiled_feed(bundle: Bundle, batch_size: int) -> dict[str, np.ndarray]:
    """The golden inputs repeated or cut to ``batch_size`` rows."""
    golden = bundle.golden()
    feed = {}
    for name in bundle.batch_inputs:
        array = golden[name]
        reps = -(-batch_size // len(array))
        feed[name] = np.ascontiguousarray(np.concatenate([array] * reps)[:batch_size])
    return feed


def _batches(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``rows`` in calls of ``batch_size`` consecutive rows, the last one shorter: how a
    benchmark or ``run --batch`` feeds a form (not ``np.array_split``'s equal shares)."""
    return [rows[start:start + batch_size] for start in range(0, len(rows), max(1, batch_size))]


def gated_macs(plan: dict[str, Any], gates: np.ndarray, form: str, batch_size: int) -> float:
    """Mean MACs per sample of a gated network for given decisions, as ``form`` computes them.

    Args:
        plan: the manifest's ``gating`` (``n_blocks``, ``skips``, ``macs`` per piece).
        gates: decisions [N, n_blocks - 1] (1 = executed), N a multiple of ``batch_size`` or not.
        form: ``mask`` (every block and skip path), ``if`` and ``loop`` (a block runs on the
            whole batch when any sample needs it), ``compact`` (block on executing rows, skip path on all rows),
            ``staged`` (block on executing rows, skip path on the others) or ``ideal`` (the same
            as staged: what the decisions themselves predict).
        batch_size: rows per call, which matters for ``if``.
    """
    macs, skips = plan["macs"], set(plan["skips"])
    n = len(gates)
    total = (macs["stem"] + macs["head"] + sum(macs[f"gate{k - 1}"] for k in range(1, plan["n_blocks"]))) * n
    for k in range(1, plan["n_blocks"]):
        on = gates[:, k - 1].astype(bool)
        exec_macs, skip_macs = macs[f"exec{k}"], macs.get(f"skip{k}", 0) if k in skips else 0
        if form == "mask":
            total += (exec_macs + skip_macs) * n
        elif form in ("if", "loop"):
            batches_on = sum(len(chunk) for chunk in _batches(on, batch_size) if chunk.any())
            total += exec_macs * batches_on + skip_macs * n
        elif form == "compact":
            total += exec_macs * on.sum() + skip_macs * n
        else:  # staged, ideal
            total += exec_macs * on.sum() + skip_macs * (~on).sum()
    return float(total / max(n, 1))


def decision_stats(bundle: Bundle, gates: np.ndarray, batch_sizes: Sequence[int]) -> DecisionStats:
    """Skip rates and predicted MACs of a gated bundle for the decisions it made."""
    plan, form = bundle.manifest["gating"], bundle.manifest["dynamic"]
    mask = gated_macs(plan, gates, "mask", 1)
    by_batch = {str(b): gated_macs(plan, gates, form, b) for b in batch_sizes}
    return DecisionStats(
        form=form,
        samples=len(gates),
        skip_rate_per_block=[float(v) for v in 1 - gates.mean(axis=0)],
        skip_rate=float(1 - gates.mean()),
        macs_mask=mask,
        macs_ideal=gated_macs(plan, gates, "ideal", 1),
        macs_form=by_batch,
        predicted_speedup={b: mask / v for b, v in by_batch.items()},
    )


def exit_macs(macs_per_stage: Sequence[int], exit_stage: np.ndarray, form: str, batch_size: int) -> float:
    """Mean MACs per sample of an early-exit network for given exit stages, as ``form`` computes
    them: ``mask`` (every stage), ``if`` (a stage runs on the whole batch when any sample of it
    reaches the stage), ``staged`` or ``ideal`` (each sample up to its exit stage)."""
    n, stages = len(exit_stage), len(macs_per_stage)
    if form == "mask" or n == 0:
        return float(sum(macs_per_stage))
    if form == "if":
        total = 0.0
        for chunk in _batches(exit_stage, batch_size):
            total += len(chunk) * sum(macs_per_stage[: int(chunk.max()) + 1])
        return total / n
    cumulative = np.cumsum(macs_per_stage)
    return float(cumulative[np.clip(exit_stage, 0, stages - 1)].mean())


def exit_stats(bundle: Bundle, outputs: Mapping[str, np.ndarray], batch_sizes: Sequence[int], labels: np.ndarray | None = None) -> ExitStats:
    """Exit shares and predicted MACs of an early-exit bundle for the exits it took."""
    plan, form = bundle.manifest["exits"], bundle.manifest["dynamic"]
    macs = [int(plan["macs"][f"stage{j}"]) for j in range(plan["n_stages"])]
    stage = np.asarray(outputs["exit_stage"])
    mask = exit_macs(macs, stage, "mask", 1)
    by_batch = {str(b): exit_macs(macs, stage, form, b) for b in batch_sizes}
    return ExitStats(
        form=form,
        samples=len(stage),
        thresholds=[float(t) for t in bundle.manifest["decisions"]["thresholds"]["exit_thresholds"]],
        exit_share_per_stage=[float((stage == j).mean()) for j in range(len(macs))],
        macs_per_stage=macs,
        macs_mask=mask,
        macs_ideal=exit_macs(macs, stage, "ideal", 1),
        macs_form=by_batch,
        predicted_speedup={b: mask / v for b, v in by_batch.items()},
        accuracy=float((outputs["logits"].argmax(1) == labels).mean()) if labels is not None else None,
    )


def sweep_exits(
    runner: Runner,
    images: np.ndarray,
    labels: np.ndarray | None,
    macs_per_stage: Sequence[int],
    values: Sequence[float],
    batch_size: int = 1,
    warmup: int = 3,
    iterations: int | None = None,
) -> list[SweepPoint]:
    """Accuracy, average MACs and latency of an active early-exit runner at each threshold in
    ``values`` (every stage but the last gets it).

    Latency is the mean call time over ``iterations`` calls cycling through ``images`` in
    batches of ``batch_size`` (exits differ per sample, so the mean is what throughput follows).
    Average MACs are what the decisions predict for ``staged`` (each sample up to its exit).

    Args:
        runner: an active runner taking ``input`` and ``exit_thresholds``.
        images: inputs [N, C, H, W].
        labels: classes [N] for accuracy, or None.
        macs_per_stage: MACs per sample of each stage (the plan's ``macs``).
        values: thresholds to try.
        batch_size: rows per call. Defaults to 1.
        warmup: untimed calls per setting. Defaults to 3.
        iterations: timed calls per setting. Defaults to one pass over ``images``.
    """
    n_stages = len(macs_per_stage)
    points = []
    for value in values:
        thresholds = np.full(n_stages, value, dtype=np.float32)
        thresholds[-1] = 0.0
        feeds = [{"input": images[i:i + batch_size], "exit_thresholds": thresholds} for i in range(0, len(images), batch_size)]
        outputs = [runner.infer(feed) for feed in feeds]
        stage = np.concatenate([o["exit_stage"] for o in outputs])
        logits = np.concatenate([o["logits"] for o in outputs])
        for i in range(warmup):
            runner.infer(feeds[i % len(feeds)], check_inputs=False)
        calls = iterations or len(feeds)
        started = time.perf_counter()
        for i in range(calls):
            runner.infer(feeds[i % len(feeds)], check_inputs=False)
        points.append(SweepPoint(
            thresholds=[float(t) for t in thresholds],
            exit_share_per_stage=[float((stage == j).mean()) for j in range(n_stages)],
            macs_average=exit_macs(macs_per_stage, stage, "ideal", 1),
            accuracy=float((logits.argmax(1) == labels).mean()) if labels is not None else None,
            latency_ms=(time.perf_counter() - started) / calls * 1e3,
            batch_size=batch_size,
        ))
    return points


def plot_sweep(points: Sequence[SweepPoint], path: str | Path, title: str = "early-exit threshold sweep") -> Path:
    """Draw a sweep (accuracy against average MACs, and against latency) as a PNG.

    Raises ``BackendUnavailableError`` when matplotlib is not installed.
    """
    from slimdeploy._optional import optional_import

    matplotlib = optional_import("matplotlib", "draw the threshold sweep")
    matplotlib.use("Agg")
    pyplot = optional_import("matplotlib.pyplot", "draw the threshold sweep")
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 4))
    accuracy = [p.accuracy if p.accuracy is not None else float("nan") for p in points]
    for axis, xs, label in ((left, [p.macs_average / 1e6 for p in points], "average MMACs per sample"),
                            (right, [p.latency_ms for p in points], f"latency ms (batch {points[0].batch_size})")):
        axis.plot(xs, accuracy, marker="o")
        for x, y, p in zip(xs, accuracy, points):
            axis.annotate(f"{p.thresholds[0]:.3g}", (x, y), fontsize=7)
        axis.set_xlabel(label)
        axis.set_ylabel("accuracy")
        axis.grid(True, alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    out = Path(path)
    with atomic_output(out) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    pyplot.close(figure)
    return out


DEFAULT_SWEEP = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.01)


def check_same_model(bundle: Bundle, baseline: Bundle) -> None:
    """``BadInputError`` when ``baseline`` holds another model than ``bundle``: other weights
    (``model.weights_sha256``, recorded at export) or, for bundles without that digest, another
    architecture, arguments or parameter count. A speed-up over another model means nothing."""
    ours, theirs = bundle.manifest.get("model") or {}, baseline.manifest.get("model") or {}
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        raise BadInputError(f"'{baseline.path}' or '{bundle.path}' records no model | Fix: re-export them")
    digests = ours.get("weights_sha256"), theirs.get("weights_sha256")
    if all(digests):
        same = digests[0] == digests[1]
        what = f"weights {str(digests[1])[:12]} vs {str(digests[0])[:12]}"
    else:
        keys = ("arch", "arch_args", "params")
        same = all(ours.get(key) == theirs.get(key) for key in keys)
        what = f"{theirs.get('arch')} {theirs.get('arch_args')} vs {ours.get('arch')} {ours.get('arch_args')}"
    if not same:
        raise BadInputError(
            f"--baseline '{baseline.path}' holds another model than '{bundle.path}' ({what}) | Note: a baseline "
            "is the same checkpoint in another form or precision | Fix: export the baseline from the same checkpoint"
        )


def bench_bundle(
    path: str | Path,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    warmup: int = DEFAULT_WARMUP,
    iterations: int = DEFAULT_ITERATIONS,
    threads: int = 0,
    torch_reference: bool | None = None,
    baseline: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    sweep: Sequence[float] | None = None,
) -> BenchReport:
    """Benchmark a bundle on ONNX Runtime and, when possible, PyTorch eager.

    Args:
        path: bundle directory.
        batch_sizes: batch sizes to time. Defaults to (1, 32).
        warmup: untimed calls first. Defaults to 10.
        iterations: timed calls. Defaults to 50.
        threads: intra-op threads for every runner; 0 means one per CPU core. Defaults to 0.
        torch_reference: also time PyTorch; None means when torch and the bundle's reference
            weights are present. Defaults to None.
        baseline: another bundle of the same model (e.g. its ``mask`` form) timed side by side;
            the report gives this bundle's speed-up over it. Defaults to none.
        progress: optional callable told each step. Defaults to silence.
        device: where the bundle (and the baseline) run: ``"cpu"``/``"cuda"`` (ONNX Runtime) or
            ``"tensorrt"`` (the engines ``slimdeploy build`` made). Defaults to ``"cpu"``.
        sweep: early-exit bundles: thresholds to sweep (``sweep_exits``, at the first batch
            size; max-softmax values, or entropies for the entropy rule). Defaults to none.
    """
    say = progress or (lambda _message: None)
    check_device(device)
    check_threads(threads)
    check_batch_sizes(list(batch_sizes), "--batch")
    check_option("warmup", warmup)
    check_option("iterations", iterations)
    if sweep is not None and not all(np.isfinite(float(value)) for value in sweep):
        raise BadInputError(f"--sweep thresholds must be finite numbers, got {list(sweep)} | Fix: e.g. --sweep 0.5,0.9,0.99")
    threads = threads or os.cpu_count() or 1
    bundle = load_bundle(path)
    if sweep and not bundle.manifest.get("exits"):
        raise BadInputError("--sweep applies to early-exit bundles (exit thresholds); this bundle has none | Fix: leave out --sweep")
    golden_input = bundle.golden()["input"]
    check_batch_memory(batch_sizes, golden_input[:1].nbytes)
    report = BenchReport(bundle=str(bundle.path), threads=threads)
    backend = "tensorrt" if device == "tensorrt" else "onnxruntime"
    runners: list[Runner] = [bundle_runner(bundle, device=device, threads=threads)]
    runners[0].name = bundle.manifest.get("dynamic") or backend
    if baseline is not None:
        other = load_bundle(baseline)
        check_same_model(bundle, other)
        base_runner = bundle_runner(other, device=device, threads=threads)
        base_runner.name = f"baseline:{other.manifest.get('dynamic') or backend}"
        runners.append(base_runner)
    want_torch = torch_reference if torch_reference is not None else (
        is_available("torch") and bool(bundle.manifest.get("reference_weights"))
    )
    if want_torch:
        try:
            runners.append(reference_runner(bundle, threads=threads))
        except BackendUnavailableError as exc:
            if torch_reference:  # asked for explicitly: say why it cannot be
                raise
            # torch is installed but does not import (a broken install): time the bundle alone.
            report.notes.append(f"PyTorch reference not timed (torch is installed but cannot be imported: {str(exc).split(' | ')[0]})")
    elif torch_reference is False:
        report.notes.append("PyTorch reference not timed (not asked for)")
    else:
        report.notes.append("PyTorch reference not timed (torch not installed or no reference weights in the bundle)")
    for runner in runners:
        with runner:
            for batch_size in batch_sizes:
                say(f"{runner.name} at batch {batch_size}")
                report.results.append(time_runner(runner, tiled_feed(bundle, batch_size), warmup, iterations))
    by_key = {(r.runner, r.batch_size): r for r in report.results}
    main = runners[0].name
    for batch_size in batch_sizes:
        ours = by_key.get((main, batch_size))
        for other in runners[1:]:
            theirs = by_key.get((other.name, batch_size))
            if ours and theirs:
                label = f"{backend}_vs_torch" if other.name == "torch" else f"vs_{other.name.replace(':', '_')}"
                report.speedups[f"{label}_batch{batch_size}"] = theirs.p50_ms / ours.p50_ms
    if bundle.manifest.get("gating"):
        with bundle_runner(bundle, threads=threads) as runner:
            golden = bundle.golden()
            gates = runner.infer({"input": golden["input"]})["gates"]
        report.decisions = decision_stats(bundle, gates, batch_sizes)
    if bundle.manifest.get("exits"):
        golden = bundle.golden()
        with bundle_runner(bundle, threads=threads) as runner:
            outputs = runner.infer({"input": golden["input"]})
            report.exits = exit_stats(bundle, outputs, batch_sizes, golden.get("labels"))
            report.notes.append(f"exit shares and accuracy are over the {len(golden['input'])} golden inputs")
            if sweep:
                say(f"threshold sweep over {len(sweep)} settings")
                plan = bundle.manifest["exits"]
                macs = [int(plan["macs"][f"stage{j}"]) for j in range(plan["n_stages"])]
                report.sweep = sweep_exits(runner, golden["input"], golden.get("labels"), macs, sweep, batch_size=batch_sizes[0])
    return report
