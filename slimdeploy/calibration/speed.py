"""Is the reduced-precision graph faster than FP32 on this CPU? Measured at export.

    check = speed_vs_fp32(fp32_graphs, int8_graphs, images, "int8", threads=0, source="digits:calib[:100]")
    check.info      # manifest calibration.speed_vs_fp32
    check.warning   # one line for the user when the reduced graph is slower, else None

A reduced precision is only worth shipping for ONNX Runtime's CPU provider if it is faster
there, and whether it is depends on the graph and the CPU (ONNX Runtime's INT8 kernels lose to
its FP32 NCHWc ones on small layers; FP16 has no fast CPU kernels at all). So the export times
both forms side by side on the calibration inputs, at batch 1 and 32 (``SPEED_BATCHES``, cut
to the inputs there are): the runners stay loaded and take turns in rounds after warm-up
(``bench.compare_runners``), and a time is the median over rounds of the mean call time. The
calls per turn are sized so that the whole comparison takes about ``BUDGET_S`` seconds. Where
the reduced graph is slower at a batch size, both are profiled there (ONNX Runtime's
profiler, ``engines.ort_profile``) and the layers the reduced graph spends most time on beyond
FP32 are named, in the manifest and in the warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from slimdeploy.engines.base import Runner
    from slimdeploy.exporters.forms import ExportedGraphs

SPEED_BATCHES = (1, 32)
# Seconds the side-by-side timing aims at, every batch size together (warm-up and profiling
# come on top; a model whose single call takes longer than a turn gets one call per turn).
BUDGET_S = 3.0
ROUNDS = 5
# Distinct feeds per batch size: models that decide per sample cost more or less per image.
FEEDS = {1: 8, 32: 3}
PROFILE_CALLS = 8
# Layers named in the warning (the manifest keeps more).
NAMED_LAYERS = 3
RECORDED_LAYERS = 10


@dataclass
class SpeedCheck:
    """What the comparison found: the manifest entry and the warning (None when the reduced
    graph is at least as fast at every batch size)."""

    info: dict[str, Any]
    warning: str | None


def speed_vs_fp32(fp32: ExportedGraphs, reduced: ExportedGraphs, images: np.ndarray, precision: str, *,
                  threads: int = 0, source: str = "", budget_s: float = BUDGET_S,
                  say: Callable[[str], None] | None = None) -> SpeedCheck:
    """Time ``reduced`` against ``fp32`` (ONNX Runtime, CPU) on ``images``; profile where it
    is slower.

    Args:
        fp32: the FP32 graphs.
        reduced: the same form in ``precision``.
        images: inputs [N, C, H, W] (the calibration images, or the parity samples).
        precision: ``int8`` or ``fp16`` (labels only).
        threads: ONNX Runtime intra-op threads; 0 lets it choose. Defaults to 0.
        source: where ``images`` come from, for the manifest. Defaults to "".
        budget_s: seconds the timing aims at. Defaults to ``BUDGET_S``.
        say: progress callable. Defaults to silence.
    """
    from slimdeploy.versions import package_version

    (say or (lambda _message: None))(f"timing the {precision} graphs against FP32 on this CPU")
    batches = sorted({min(batch, len(images)) for batch in SPEED_BATCHES})
    rows = []
    with fp32.runner(threads) as fp32_runner, reduced.runner(threads) as reduced_runner:
        runners = {"fp32": fp32_runner, precision: reduced_runner}
        for batch in batches:
            rows.append(_time_batch(runners, timing_feeds(images, batch), precision, budget_s / len(batches)))
    info: dict[str, Any] = {
        "precision": precision, "runtime": f"onnxruntime {package_version('onnxruntime')}", "device": "cpu",
        "threads": threads, "cores": os.cpu_count(), "inputs": source,
        "method": "both graphs loaded, taking turns in rounds after warm-up; median over rounds of the mean call time",
        "batches": rows,
        "slower": any(row["speedup"] < 1.0 for row in rows),
    }
    warning = None
    if info["slower"]:
        worst = min(rows, key=lambda row: row["speedup"])
        layers = profile_layers(fp32, reduced, timing_feeds(images, worst["batch"]), threads)
        info["profile"] = {"batch": worst["batch"], "calls": PROFILE_CALLS, "layers": layers[:RECORDED_LAYERS]}
        warning = speed_warning(precision, rows, layers, threads)
        info["warning"] = warning
    return SpeedCheck(info, warning)


def profile_layers(fp32: ExportedGraphs, reduced: ExportedGraphs, feeds: Sequence[dict[str, np.ndarray]],
                   threads: int) -> list[dict[str, Any]]:
    """Per layer, FP32 and reduced time per call (``PROFILE_CALLS`` profiled calls each), the
    layers the reduced graph spends most time on beyond FP32 first (``ort_profile.compare_layers``
    rows, with ``fp32_ms`` and ``reduced_ms``)."""
    from slimdeploy.engines.ort_profile import compare_layers, layer_times

    times = {}
    for label, graphs in (("fp32", fp32), ("reduced", reduced)):
        with graphs.runner(threads, profile=True) as runner:
            for i in range(PROFILE_CALLS + 1):  # + 1: each node's first run is left out
                runner.infer(feeds[i % len(feeds)], check_inputs=False)
            times[label] = layer_times(runner, graphs.graphs, PROFILE_CALLS + 1)
    return [
        {"layer": row["layer"], "fp32_ms": row["baseline_ms"], "reduced_ms": row["candidate_ms"], "extra_ms": row["extra_ms"],
         "fp32_ops": row["baseline_ops"], "reduced_ops": row["candidate_ops"]}
        for row in compare_layers(times["fp32"], times["reduced"])
    ]


def speed_warning(precision: str, rows: Sequence[dict[str, Any]], layers: Sequence[dict[str, Any]], threads: int) -> str:
    """The one-line warning for a reduced graph slower than FP32: at which batch sizes and by
    how much, and the layers that cost most beyond FP32 (``profile_layers`` rows)."""
    label = precision.upper()
    speeds = ", ".join(
        f"{row['speedup']:.2f}x FP32's speed at batch {row['batch']} ({row['reduced_ms']:.3g} ms, FP32 {row['fp32_ms']:.3g} ms)"
        for row in rows
    )
    costly = [layer for layer in layers if layer["extra_ms"] > 0][:NAMED_LAYERS] or list(layers[:NAMED_LAYERS])
    named = "; ".join(
        f"{layer['layer']} ({'/'.join(layer['reduced_ops']) or 'absent'} {layer['reduced_ms']:.3g} ms, "
        f"FP32 {'/'.join(layer['fp32_ops']) or 'absent'} {layer['fp32_ms']:.3g} ms)"
        for layer in costly
    )
    where = f"ONNX Runtime, {threads or 'default'} threads"
    return (
        f"{label} is slower than FP32 on this CPU ({where}): {speeds} | Note: the layers that cost most beyond FP32: "
        f"{named} (manifest calibration.speed_vs_fp32.profile) | Fix: deploy the FP32 bundle on this CPU, or compare "
        "both with 'slimdeploy bench' on the deployment CPU (INT8 pays only where its kernels beat FP32's)"
    )


def timing_feeds(images: np.ndarray, batch: int) -> list[dict[str, np.ndarray]]:
    """Up to ``FEEDS[batch]`` distinct feeds of ``batch`` rows of ``images``."""
    from slimdeploy.bench import image_feeds

    return image_feeds(images, batch, FEEDS.get(batch, 3))


def _time_batch(runners: dict[str, Runner], feeds: Sequence[dict[str, np.ndarray]], precision: str,
                budget_s: float) -> dict[str, Any]:
    """One batch size timed side by side within about ``budget_s`` seconds."""
    from slimdeploy.bench import time_within

    times, calls = time_within(runners, feeds, budget_s, rounds=ROUNDS)
    fp32_ms, reduced_ms = times["fp32"], times[precision]
    return {
        "batch": len(next(iter(feeds[0].values()))), "calls_per_round": calls, "rounds": ROUNDS,
        "fp32_ms": round(fp32_ms, 4), "reduced_ms": round(reduced_ms, 4),
        "speedup": round(fp32_ms / reduced_ms, 3) if reduced_ms > 0 else 0.0,
    }
