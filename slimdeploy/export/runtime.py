"""Which CPU runtime a bundle runs on by default, chosen at export on this CPU.

    checked = choose_cpu_runtime(checked, held_out, options, say)
    checked.runtime   # manifest "runtime": {"default": "onnxruntime" | "openvino", "measured": ...}

ONNX Runtime is the default runtime. Where OpenVINO is installed (``slimdeploy[openvino]``), a
bundle for the ``ort`` target is also timed on it, side by side with ONNX Runtime on the parity
samples at batch 1 and 32 (the runners stay loaded and take turns in rounds, as the precision
speed check does: ``bench.time_within``). OpenVINO becomes the bundle's default only when it is
faster at every timed batch size by ``MARGIN`` and the bundle passes its parity check on it
(the same held-out samples, criteria and tolerances as the export's own check); otherwise
ONNX Runtime stays, and the manifest says why. ``run``, ``check`` and ``bench`` follow the
recorded default unless ``--device`` names one (``bundle.runners.resolve_device``).

Why measure rather than assume: ``benchmarks/openvino_vs_ort.py`` found OpenVINO faster on
static ResNet-class graphs (SPConv, CondenseNet; more so in INT8) and slower on tiny graphs,
on ``compact`` and on ``staged`` (a fixed cost per call and per new input shape), and the split
depends on the CPU. ``staged`` bundles are not timed: the controller calls many pieces with row
counts that change from call to call, which OpenVINO lost on in every measurement.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from slimdeploy.calibration.speed import BUDGET_S, ROUNDS, SPEED_BATCHES, timing_feeds
from slimdeploy.engines.openvino_runner import OPENVINO

if TYPE_CHECKING:
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.exporters.checked import CheckedGraphs
    from slimdeploy.held_out import HeldOut

ONNXRUNTIME = "onnxruntime"
# OpenVINO must be at least this much faster at every batch size to become the default: a
# smaller lead is within what two runs on a shared CPU differ by.
MARGIN = 1.1


def not_measured(reason: str) -> dict[str, Any]:
    """The manifest entry of a bundle whose runtime was not timed: ONNX Runtime, and why."""
    return {"default": ONNXRUNTIME, "measured": False, "reason": reason}


def choose_cpu_runtime(checked: CheckedGraphs, held_out: HeldOut, options: ExportOptions,
                       say: Callable[[str], None]) -> CheckedGraphs:
    """``checked`` with ``runtime`` set: the CPU runtime the bundle runs on by default."""
    # Looked up per call, where the tests replace it.
    from slimdeploy.engines.openvino_runner import is_available

    graphs = checked.exported
    if options.target != "ort":
        return replace(checked, runtime=not_measured("the TensorRT target: its graphs are checked on ONNX Runtime here"))
    if not options.speed_check:
        return replace(checked, runtime=not_measured("turned off (--no-speed-check)"))
    if not checked.report.passed:
        return replace(checked, runtime=not_measured("the bundle failed its parity check on ONNX Runtime"))
    if graphs.form == "staged":
        return replace(checked, runtime=not_measured(
            "staged bundles run on ONNX Runtime: OpenVINO's cost per call and per new input shape "
            "made every staged bundle slower (benchmarks/README.md, openvino_vs_ort.py)"))
    if not is_available():
        return replace(checked, runtime=not_measured(
            "OpenVINO is not installed here (pip install 'slimdeploy[openvino]' to time it at export)"))
    say("timing OpenVINO against ONNX Runtime on this CPU")
    rows = time_runtimes(checked, held_out, options.threads)
    info: dict[str, Any] = {
        "default": ONNXRUNTIME, "measured": True, "versions": _versions(), "threads": options.threads,
        "cores": os.cpu_count(), "inputs": f"parity samples ({held_out.source})", "margin": MARGIN,
        "method": "both runtimes loaded, taking turns in rounds after warm-up; median over rounds of the mean call time",
        "batches": rows,
    }
    if not all(row["speedup"] >= MARGIN for row in rows):
        info["reason"] = f"OpenVINO was not {MARGIN}x faster at every batch size"
        return replace(checked, runtime=info)
    say("checking parity on OpenVINO")
    report = held_out.check(graphs, options, "openvino", say, precision=options.precision, backend=OPENVINO)
    info["openvino_parity_passed"] = report.passed
    if not report.passed:
        first = report.failures[0] if report.failures else "an output or a decision outside the criteria"
        info["reason"] = f"OpenVINO was faster but failed the bundle's parity check: {first}"
        return replace(checked, runtime=info)
    info["default"] = OPENVINO
    info["reason"] = f"OpenVINO was at least {MARGIN}x faster at every batch size and passed parity"
    return replace(checked, runtime=info, notes=[*checked.notes, runtime_note(info)])


def time_runtimes(checked: CheckedGraphs, held_out: HeldOut, threads: int) -> list[dict[str, Any]]:
    """Per batch size of the precision speed check's (``calibration.speed``: batch 1 and 32,
    cut to the samples there are, the same feeds, budget and rounds): ONNX Runtime's and
    OpenVINO's mean call time side by side, and OpenVINO's speed-up."""
    from slimdeploy.bench import time_within

    graphs = checked.exported
    batches = sorted({min(batch, len(held_out.inputs)) for batch in SPEED_BATCHES})
    rows = []
    with graphs.runner(threads) as ort_runner, graphs.runner(threads, backend=OPENVINO) as openvino_runner:
        runners = {ONNXRUNTIME: ort_runner, OPENVINO: openvino_runner}
        for batch in batches:
            feeds = timing_feeds(held_out.inputs, batch)
            times, calls = time_within(runners, feeds, BUDGET_S / len(batches), rounds=ROUNDS)
            rows.append({
                "batch": batch, "calls_per_round": calls, "rounds": ROUNDS,
                "onnxruntime_ms": round(times[ONNXRUNTIME], 4), "openvino_ms": round(times[OPENVINO], 4),
                "speedup": round(times[ONNXRUNTIME] / times[OPENVINO], 3) if times[OPENVINO] > 0 else 0.0,
            })
    return rows


def runtime_note(info: dict[str, Any]) -> str:
    """The export's note when OpenVINO became the default."""
    speeds = ", ".join(f"{row['speedup']:.2f}x at batch {row['batch']}" for row in info["batches"])
    return (f"runs on OpenVINO by default: faster than ONNX Runtime on this CPU ({speeds}) and passed parity on it "
            "(manifest runtime; --device cpu runs ONNX Runtime)")


def _versions() -> dict[str, str | None]:
    from slimdeploy.versions import package_version

    return {ONNXRUNTIME: package_version(ONNXRUNTIME), OPENVINO: package_version(OPENVINO)}
