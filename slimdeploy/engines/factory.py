"""Build the runner that executes an exported form, from graph files or in-memory bytes.

Used both by ``export`` (graphs still in memory) and by ``bundle_runner`` (graphs on disk), so
a bundle runs exactly as it was checked at export.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
) -> Runner:
    """The runner of one exported form.

    Args:
        graphs: graph name → .onnx path or bytes (``"model"`` for single-graph forms).
        form: ``None`` (static), ``"mask"``, ``"if"``, ``"compact"`` or ``"staged"``.
        input_meta: the image input's metadata.
        plan: the gating plan (manifest ``gating``) or the early-exit plan (manifest ``exits``,
            ``kind`` ``"early_exit"``); needed for ``staged``.
        decision_defaults: default thresholds by input name (``gate_threshold``, ``exit_thresholds``).
        device: ONNX Runtime device. Defaults to ``"cpu"``.
        threads: intra-op threads per session; 0 lets ONNX Runtime choose. Defaults to 0.
        replay: staged only: take decisions from the feed. Defaults to False.
    """
    if form != "staged":
        return OrtRunner(graphs["model"], device=device, threads=threads)
    if plan is None:
        raise ValueError("a staged form needs its plan")
    defaults = dict(decision_defaults or {})

    def piece(name: str) -> Runner:
        # Many sessions run in turn: spinning worker threads of one would steal the next's cores.
        return OrtRunner(graphs[name], device=device, threads=threads, spinning=False, name=name)

    if plan.get("kind") == "early_exit":
        if replay:
            raise ValueError("replaying decisions applies to gated networks, not early exits")
        return StagedExitRunner(piece, plan, input_meta, exit_thresholds=defaults.get("exit_thresholds"))
    return StagedGatedRunner(
        piece,
        plan,
        input_meta,
        gate_threshold=defaults.get("gate_threshold", 0.5),
        replay=replay,
    )
