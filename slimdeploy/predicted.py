"""What decisions predict: the MACs per sample each deployed form computes for given gate
decisions or exit stages (``gated_macs``, ``exit_macs``, and integer totals that add up exactly
across batches and workers), and one point of an early-exit threshold sweep (``SweepPoint``).

Shared by ``bench`` and the dataset jobs (``slimdeploy.dataset``); imports nothing of either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class SweepPoint:
    """One threshold setting of a sweep: ``label`` is the uniform threshold (``"0.9"``), or
    ``"default"`` for the bundle's own thresholds (``default`` True); ``samples`` the inputs
    it was measured on."""

    thresholds: list[float]
    exit_share_per_stage: list[float]
    macs_average: float
    accuracy: float | None
    latency_ms: float
    batch_size: int
    label: str = ""
    default: bool = False
    samples: int = 0


def batches(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``rows`` in calls of ``batch_size`` consecutive rows, the last one shorter: how a
    benchmark or ``run --batch`` feeds a form (not ``np.array_split``'s equal shares)."""
    return [rows[start:start + batch_size] for start in range(0, len(rows), max(1, batch_size))]


def gated_macs(plan: dict[str, Any], gates: np.ndarray, form: str, batch_size: int) -> float:
    """Mean MACs per sample of a gated network for given decisions, as ``form`` computes them
    (``gated_macs_total`` over the number of samples)."""
    return float(gated_macs_total(plan, gates, form, batch_size) / max(len(gates), 1))


def gated_macs_total(plan: dict[str, Any], gates: np.ndarray, form: str, batch_size: int) -> int:
    """Total MACs of a gated network over all samples for given decisions, as ``form`` computes
    them: an integer, so totals of batches add up exactly.

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
    total = (int(macs["stem"]) + int(macs["head"]) + sum(int(macs[f"gate{k - 1}"]) for k in range(1, plan["n_blocks"]))) * n
    for k in range(1, plan["n_blocks"]):
        on = gates[:, k - 1].astype(bool)
        exec_macs, skip_macs = int(macs[f"exec{k}"]), int(macs.get(f"skip{k}", 0)) if k in skips else 0
        if form == "mask":
            total += (exec_macs + skip_macs) * n
        elif form in ("if", "loop"):
            batches_on = sum(len(chunk) for chunk in batches(on, batch_size) if chunk.any())
            total += exec_macs * batches_on + skip_macs * n
        elif form == "compact":
            total += exec_macs * int(on.sum()) + skip_macs * n
        else:  # staged, ideal
            total += exec_macs * int(on.sum()) + skip_macs * int((~on).sum())
    return int(total)


def exit_macs(macs_per_stage: Sequence[int], exit_stage: np.ndarray, form: str, batch_size: int) -> float:
    """Mean MACs per sample of an early-exit network for given exit stages, as ``form`` computes
    them: ``mask`` (every stage), ``if`` (a stage runs on the whole batch when any sample of it
    reaches the stage), ``staged`` or ``ideal`` (each sample up to its exit stage)."""
    n = len(exit_stage)
    if n == 0:
        return float(sum(macs_per_stage))
    return float(exit_macs_total(macs_per_stage, exit_stage, form, batch_size) / n)


def exit_macs_total(macs_per_stage: Sequence[int], exit_stage: np.ndarray, form: str, batch_size: int) -> int:
    """Total MACs over all samples of an early-exit network for given exit stages (``exit_macs``
    times the samples): an integer, so totals of batches add up exactly."""
    n, stages = len(exit_stage), len(macs_per_stage)
    if form == "mask":
        return int(sum(int(m) for m in macs_per_stage)) * n
    if form == "if":
        total = 0
        for chunk in batches(exit_stage, batch_size):
            if len(chunk):
                total += len(chunk) * sum(int(m) for m in macs_per_stage[: int(chunk.max()) + 1])
        return total
    cumulative = np.cumsum(np.asarray(macs_per_stage, dtype=np.int64))
    return int(cumulative[np.clip(exit_stage, 0, stages - 1)].sum()) if n else 0
