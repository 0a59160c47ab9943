"""Build the runner that executes an exported form, from graph files or in-memory bytes.

Used both by ``export`` (graphs still in memory) and by ``bundle_runner`` (graphs on disk), so
a bundle runs exactly as it was checked at export. ``backend="tensorrt"`` runs TensorRT engines
(one per graph, built on the target by ``slimdeploy build``) in place of the ONNX graphs;
``backend="openvino"`` runs the same ONNX graphs on OpenVINO's CPU plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.engines.base import Runner, TensorMeta
from slimdeploy.engines.ort_runner import OrtRunner
from slimdeploy.engines.staged import StagedExitRunner, StagedGatedRunner


def make_runner(
    graphs: Mapping[str, str | Path | bytes],
    form: str | None,
    input_meta: TensorMeta,
    plan: Mapping[str, Any] | None = None,
    decision_defaults: Mapping[str, float] | None = None,
    device: str = "cpu",
    threads: int = 0,
    replay: bool = False,
    backend: str = "onnxruntime",
    batch_range: tuple[int, int] | None = None,
    profile: bool = False,
) -> Runner:
    """The runner of one exported form.

    Args:
        graphs: graph name → .onnx path or bytes (``"model"`` for single-graph forms).
        form: ``None`` (static), ``"mask"``, ``"if"``, ``"compact"``, ``"loop"`` or ``"staged"``.
        input_meta: the image input's metadata.
        plan: the gating plan (manifest ``gating``) or the early-exit plan (manifest ``exits``,
            ``kind`` ``"early_exit"``); needed for ``staged``.
        decision_defaults: default thresholds by input name (``gate_threshold``, ``exit_thresholds``).
        device: ONNX Runtime device. Defaults to ``"cpu"``.
        threads: intra-op threads per session; 0 lets ONNX Runtime choose. Defaults to 0.
        replay: staged gated networks only (``ValueError`` for early exits): take the gate
            decisions from the feed's ``gates``. Defaults to False.
        backend: ``"onnxruntime"``; ``"openvino"`` (the same ONNX graphs on OpenVINO's CPU
            plugin; ``device`` unused); or ``"tensorrt"`` when ``graphs`` are serialised engines
            (``device`` and ``threads`` are then unused). Defaults to ``"onnxruntime"``.
        batch_range: TensorRT only: the engines' (min, max) batch, for error messages.
            Defaults to unknown.
        profile: ONNX Runtime only: every session records its nodes' times
            (``OrtRunner.profile_events``; ``engines.ort_profile``). Defaults to False.
    """
    defaults = dict(decision_defaults or {})

    def piece(graph: str, **ort: Any) -> Runner:
        if backend == "tensorrt":
            from slimdeploy.engines.trt_runner import TrtRunner

            # Staged pieces take no thresholds (the host decides); single graphs may.
            return TrtRunner(graphs[graph], defaults={} if form == "staged" else _threshold_arrays(defaults),
                             batch_range=batch_range, name=graph if form == "staged" else None)
        if backend == "openvino":
            from slimdeploy.engines.openvino_runner import OpenVinoRunner

            return OpenVinoRunner(graphs[graph], threads=threads, name=ort.get("name"))
        return OrtRunner(graphs[graph], device=device, threads=threads, profile=profile, **ort)

    if form != "staged":
        return piece("model")
    if plan is None:
        raise ValueError("a staged form needs its plan")
    # Many sessions run in turn: spinning worker threads of one would steal the next's cores.
    def staged_piece(name: str) -> Runner:
        return piece(name, spinning=False, name=name)

    if plan.get("kind") == "early_exit":
        if replay:
            raise ValueError("replaying decisions applies to gated networks, not early exits")
        return StagedExitRunner(staged_piece, plan, input_meta, exit_thresholds=defaults.get("exit_thresholds"))
    return StagedGatedRunner(
        staged_piece,
        plan,
        input_meta,
        gate_threshold=defaults.get("gate_threshold", 0.5),
        replay=replay,
    )


def _threshold_arrays(defaults: Mapping[str, float]) -> dict[str, Any]:
    """Threshold defaults as the 0-D float32 arrays the graphs take."""
    return {name: np.asarray(value, dtype=np.float32) for name, value in defaults.items()}
