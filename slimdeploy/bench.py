"""Latency and throughput of a bundle, with the PyTorch reference side by side when torch is here.

For each batch size, the golden inputs are tiled to that batch, every runner is warmed up and
then timed call by call; the report gives p50/p90/p99 latency and throughput (images per second
at the median). Runners share the thread count, so ratios compare like with like. Absolute
times depend on the machine; the ratios are the figures to read.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy._optional import is_available
from slimdeploy.bundle import Bundle, bundle_runner, load_bundle, reference_runner
from slimdeploy.engines.base import Runner

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
class BenchReport:
    """All timings of one bench run, and the machine facts that frame them."""

    bundle: str
    threads: int
    results: list[LatencyResult] = field(default_factory=list)
    speedups: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2)
        if str(path) == "-":
            print(text)
        else:
            Path(path).write_text(text + "\n")


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


def tiled_feed(bundle: Bundle, batch_size: int) -> dict[str, np.ndarray]:
    """The golden inputs repeated or cut to ``batch_size`` rows."""
    golden = bundle.golden()
    feed = {}
    for name in bundle.input_names:
        array = golden[name]
        reps = -(-batch_size // len(array))
        feed[name] = np.ascontiguousarray(np.concatenate([array] * reps)[:batch_size])
    return feed


def bench_bundle(
    path: str | Path,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    warmup: int = DEFAULT_WARMUP,
    iterations: int = DEFAULT_ITERATIONS,
    threads: int = 0,
    torch_reference: bool | None = None,
    progress: Callable[[str], None] | None = None,
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
        progress: optional callable told each step.
    """
    say = progress or (lambda _message: None)
    threads = threads or os.cpu_count() or 1
    bundle = load_bundle(path)
    report = BenchReport(bundle=str(bundle.path), threads=threads)
    runners: list[Runner] = [bundle_runner(bundle, threads=threads)]
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
    for batch_size in batch_sizes:
        ort, ref = by_key.get(("onnxruntime", batch_size)), by_key.get(("torch", batch_size))
        if ort and ref:
            report.speedups[f"onnxruntime_vs_torch_batch{batch_size}"] = ref.p50_ms / ort.p50_ms
    return report
