"""Calibration feeds of a staged bundle: what actually reaches each piece.

A gated block of a staged bundle runs only on the rows whose gate opened, and a downsampling
skip path only on the others, so each piece must be calibrated on its own traffic, not on a
full batch. ``piece_feeds`` runs the staged controller (``engines.staged``) on the FP32
pieces over the calibration images and records every feed each piece is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from slimdeploy.engines.base import Runner, TensorMeta


class RecordingRunner(Runner):
    """Wraps a runner and keeps a copy of every feed it is given."""

    backend = "recording"

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.feeds: list[dict[str, np.ndarray]] = []

    def input_metadata(self) -> dict[str, TensorMeta]:
        return self.inner.input_metadata()

    def output_names(self) -> list[str]:
        return self.inner.output_names()

    def _activate(self) -> None:
        self.inner.activate()

    def _deactivate(self) -> None:
        self.inner.deactivate()

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({name: np.array(value) for name, value in feed.items()})
        return self.inner.infer(feed, check_inputs=False)


def piece_feeds(
    graphs: Mapping[str, bytes],
    plan: Mapping[str, Any],
    input_meta: TensorMeta,
    images: np.ndarray,
    gate_threshold: float = 0.5,
    batch_size: int = 32,
    threads: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Per piece, the rows it was fed while the staged controller ran ``images`` (each input
    concatenated over the calls); a piece no row reached gets no entry.

    Args:
        graphs: piece name → serialized FP32 ONNX graph.
        plan: the gating plan (manifest ``gating``) or the early-exit plan (``exits``).
        input_meta: metadata of the image input.
        images: calibration inputs [N, C, H, W].
        gate_threshold: threshold the gates decide at. Defaults to 0.5.
        batch_size: rows per controller call. Defaults to 32.
        threads: ONNX Runtime intra-op threads; 0 lets it choose. Defaults to 0.
    """
    from slimdeploy.engines.ort_runner import OrtRunner
    from slimdeploy.engines.staged import StagedExitRunner, StagedGatedRunner
    from slimdeploy.parity import run_batches

    recorders: dict[str, RecordingRunner] = {}

    def make(name: str) -> Runner:
        recorders[name] = RecordingRunner(OrtRunner(graphs[name], threads=threads, spinning=False, name=name))
        return recorders[name]

    # Early exits: the controller drops the rows that left, so later stages see only the rest
    # (at the plan's default thresholds).
    controller = (StagedExitRunner(make, plan, input_meta) if plan.get("kind") == "early_exit"
                  else StagedGatedRunner(make, plan, input_meta, gate_threshold=gate_threshold))
    with controller as runner:
        run_batches(runner, {"input": images}, batch_size)
    feeds = {}
    for name, recorder in recorders.items():
        calls = [feed for feed in recorder.feeds if len(next(iter(feed.values())))]
        if calls:
            feeds[name] = {key: np.concatenate([feed[key] for feed in calls]) for key in calls[0]}
    return feeds
