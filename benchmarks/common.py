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
