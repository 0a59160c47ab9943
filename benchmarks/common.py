"""What every benchmark script records about the machine it ran on."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

# The load check lives in the package (``slimdeploy bench`` flags noisy timings with it); the
# scripts import it from here with the rest of what they share.
from slimdeploy.machine import OtherLoad

__all__ = ["OtherLoad", "benchmark_arguments", "estimate_batchnorm", "machine_facts", "save_json", "write_results"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    """CPU, cores, platform, package versions, date and load: what frames the figures."""
    from slimdeploy.versions import versions

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "platform": platform.platform(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_at_start": list(os.getloadavg()),
    }


def benchmark_arguments(description: str, default_out: Path) -> argparse.ArgumentParser:
    """The options every side-by-side benchmark takes: ``--quick``, ``--out`` (default
    ``default_out``) and ``--threads`` (default 2, at least 1)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="few samples and rounds: a smoke test, not figures to quote")
    parser.add_argument("--out", type=Path, default=default_out, help=f"JSON results file (default {default_out.name} in benchmarks/results)")
    parser.add_argument("--threads", type=_positive, default=2, help="intra-op threads for every runner (default 2)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def save_json(result: dict[str, Any], out: Path) -> None:
    """Write ``result`` as indented JSON to ``out`` (its folder created)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def write_results(result: dict[str, Any], out: Path, table: str) -> None:
    """Write ``result`` as JSON to ``out``, then print ``table`` and each of ``result["checks"]``
    against its target."""
    save_json(result, out)
    print(table)
    for check in result["checks"]:
        print(f"{check['name']}: {check['value']:.2f} (target {check['target']}: {'met' if check['met'] else 'NOT met'})")


def estimate_batchnorm(model: Any, images: Any, forward: Any = None, batch_size: int = 64) -> None:
    """Re-estimate every BatchNorm's running statistics of a randomly initialised ``model`` on
    real ``images`` (a numpy [N, C, H, W] array; cumulative average), then put it in eval mode:
    activations then stay in range through deep stacks, as the upstream kit did for its
    checkpoints.

    Args:
        model: the torch module.
        images: the images, preprocessed.
        forward: ``forward(model, batch)`` (e.g. to run every gated block). Defaults to ``model(batch)``.
        batch_size: images per forward pass. Defaults to 64.
    """
    import torch

    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start:start + batch_size])
            if forward is None:
                model(batch)
            else:
                forward(model, batch)
    model.eval()


def sized_skipnet(arch: str, samples: int = 256) -> Any:
    """A CIFAR-layout SkipNet ``arch`` (10 classes) with random weights (seed 0) whose
    BatchNorm statistics are re-estimated on ``samples`` digits training images with every
    block running (threshold -1), so activations stay in range through deep stages; in eval
    mode. Inputs are digits at ``slimdeploy.data.digits_statistics``."""
    import torch

    from slimdeploy.data import digits_inputs, digits_statistics
    from slimdeploy.models import get_arch

    torch.manual_seed(0)
    model = get_arch(arch).build(num_classes=10)
    mean, std = digits_statistics()
    train, _ = digits_inputs("train", (3, 32, 32), mean, std, count=samples)
    estimate_batchnorm(model, train, forward=lambda module, batch: module(batch, -1.0))
    return model


def gated_feeds(x: Any, batch: int, count: int, threshold: float | None = None) -> list[dict[str, Any]]:
    """``count`` feeds of ``batch`` rows of ``x`` (with ``gate_threshold`` when given)."""
    import numpy as np

    extra = {} if threshold is None else {"gate_threshold": np.array(threshold, dtype=np.float32)}
    return [{"input": np.ascontiguousarray(x[i:i + batch]), **extra} for i in range(0, batch * count, batch)]


def gates_of(runner: Any, x: Any, threshold: float | None = None) -> Any:
    """The gate decisions an active gated runner makes on ``x`` (64 rows per call)."""
    import numpy as np

    extra = {} if threshold is None else {"gate_threshold": np.array(threshold, dtype=np.float32)}
    return np.concatenate([runner.infer({"input": x[i:i + 64], **extra})["gates"] for i in range(0, len(x), 64)])


def gated_speedups(runners: dict[str, Any], plan: dict[str, Any], x: Any, batch: int, count: int,
                   settings: dict[str, Any], threshold: float | None = None) -> dict[str, Any]:
    """Time active runners side by side (``compare_runners``) at one batch size; for each
    runner named after a gated form, the realised speed-up over the ``mask`` runner and the one
    its MACs predict for the decisions made (``gated_macs``)."""
    from slimdeploy.bench import compare_runners, gated_macs
    from slimdeploy.exporters.gated import FORMS

    used = x[: batch * count]
    gates = gates_of(runners["mask"], used, threshold)
    timed = compare_runners(runners, gated_feeds(x, batch, count, threshold), warmup=settings["warmup"], rounds=settings["rounds"])
    mask_macs = gated_macs(plan, gates, "mask", batch)
    rows = {}
    for name, result in timed.items():
        row = {"mean_ms": round(result.mean_ms, 4), "p50_ms": round(result.p50_ms, 4)}
        if name in FORMS:
            predicted = mask_macs / gated_macs(plan, gates, name, batch)
            realised = timed["mask"].mean_ms / result.mean_ms
            row.update(predicted=round(predicted, 3), realised=round(realised, 3),
                       realised_over_predicted=round(realised / predicted, 3))
        rows[name] = row
    return {"batch": batch, "samples": len(used), "skip_rate": round(float(1 - gates.mean()), 4), "forms": rows}
