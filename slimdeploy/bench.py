"""Latency and throughput of a bundle, with the PyTorch reference side by side when torch is here.

For each batch size, the golden inputs are tiled to that batch, every runner is warmed up and
then timed call by call; the report gives p50/p90/p99 latency and throughput (images per second
at the median). Runners share the thread count, so ratios compare like with like. Absolute
times depend on the machine; the ratios are the figures to read.
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
from slimdeploy.files import write_json

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
class BenchReport:
    """All timings of one bench run, and the machine facts that frame them."""

    bundle: str
    threads: int
    results: list[LatencyResult] = field(default_factory=list)
    speedups: dict[str, float] = field(default_factory=dict)
    decisions: DecisionStats | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | Path) -> None:
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


def gated_macs(plan: dict[str, Any], gates: np.ndarray, form: str, batch_size: int) -> float:
    """Mean MACs per sample of a gated network for given decisions, as ``form`` computes them.

    Args:
        plan: the manifest's ``gating`` (``n_blocks``, ``skips``, ``macs`` per piece).
        gates: decisions [N, n_blocks - 1] (1 = executed), N a multiple of ``batch_size`` or not.
        form: ``mask`` (every block and skip path), ``if`` (a block runs on the whole batch when
            any sample needs it), ``compact`` (block on executing rows, skip path on all rows),
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
        elif form == "if":
            batches_on = sum(len(chunk) for chunk in np.array_split(on, max(1, -(-n // batch_size))) if chunk.any())
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
        progress: optional callable told each step.
        device: where the bundle (and the baseline) run: ``"cpu"``/``"cuda"`` (ONNX Runtime) or
            ``"tensorrt"`` (the engines ``slimdeploy build`` made). Defaults to ``"cpu"``.
    """
    say = progress or (lambda _message: None)
    threads = threads or os.cpu_count() or 1
    bundle = load_bundle(path)
    report = BenchReport(bundle=str(bundle.path), threads=threads)
    backend = "tensorrt" if device == "tensorrt" else "onnxruntime"
    runners: list[Runner] = [bundle_runner(bundle, device=device, threads=threads)]
    runners[0].name = bundle.manifest.get("dynamic") or backend
    if baseline is not None:
        other = load_bundle(baseline)
        base_runner = bundle_runner(other, device=device, threads=threads)
        base_runner.name = f"baseline:{other.manifest.get('dynamic') or backend}"
        runners.append(base_runner)
    want_torch = torch_reference if torch_reference is not None else (
        is_available("torch") and bool(bundle.manifest.get("reference_weights"))
    )
    if want_torch:
        runners.append(reference_runner(bundle, threads=threads))
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
    return report
