"""Staged execution of dynamic networks: one graph per piece, decisions and routing on the host.

``StagedExitRunner`` (early-exit networks, below) runs one graph per stage and drops the
samples that exited after each stage.

``StagedGatedRunner`` follows the plan a ``staged`` bundle records (``gating`` in the
manifest, see ``exporters.gated``): run the stem; for each gated block, run its gate on every
row, then the block only on the rows whose gate opened and the skip path only on the others
(the batch shrinks per block, so each sample saves what its gates skip); finally the head.
Every piece is a flat graph, so it runs on any runner (ONNX Runtime here, TensorRT engines on
a GPU).

With ``replay=True`` the runner takes the decisions as an input (``gates``, [B, n-1] uint8)
instead of making them: fed the reference's decisions, it separates numeric error from
decision flips.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from slimdeploy.engines.base import Runner, TensorMeta

DEFAULT_GATE_THRESHOLD = 0.5


class PieceController(Runner):
    """What the staged controllers share: one runner per piece (``piece_names``), made with
    ``make_runner`` and activated and released together."""

    backend = "staged"

    def __init__(self, make_runner: Callable[[str], Runner], name: str | None = None) -> None:
        super().__init__(name)
        self._make_runner = make_runner
        self.runners: dict[str, Runner] = {}

    def piece_names(self) -> list[str]:
        """The graphs this controller runs, by name, in the order a call runs them."""
        raise NotImplementedError

    def _activate(self) -> None:
        for name in self.piece_names():
            runner = self._make_runner(name)
            runner.activate()
            self.runners[name] = runner

    def _deactivate(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()
        self.runners = {}

    def _infer_empty(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The pieces answer a 0-row feed with empty outputs (Runner.infer), so the controller
        # runs as usual and its row counters stay true.
        return self._infer(feed)


class StagedGatedRunner(PieceController):
    """Runs a gated network piece by piece.

    Args:
        make_runner: callable returning the runner of a piece by name (``"stem"``, ``"gate0"``,
            ``"exec1"``, ``"skip6"``, ``"head"``...).
        plan: the manifest's ``gating`` entry: ``n_blocks``, ``state``, ``state_width``, ``skips``.
        input_meta: metadata of the image input ``input``.
        gate_threshold: default threshold when the feed has no ``gate_threshold``. Defaults to 0.5.
        replay: take decisions from the feed's ``gates`` instead of the gates. Defaults to False.
        name: label in reports. Defaults to ``"staged"``.
    """

    def __init__(
        self,
        make_runner: Callable[[str], Runner],
        plan: Mapping[str, Any],
        input_meta: TensorMeta,
        gate_threshold: float = DEFAULT_GATE_THRESHOLD,
        replay: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(make_runner, name)
        self.plan = dict(plan)
        self.n_blocks = int(plan["n_blocks"])
        self.state_names = list(plan["state"])
        self.state_width = int(plan["state_width"])
        self.skips = set(plan["skips"])
        self.input_meta = input_meta
        self.gate_threshold = gate_threshold
        self.replay = replay
        # Rows each block ran on, summed over calls: what the skipping saved.
        self.executed_rows = np.zeros(self.n_blocks, dtype=np.int64)
        self.total_rows = 0

    def piece_names(self) -> list[str]:
        names = ["stem"]
        for k in range(1, self.n_blocks):
            names += [f"gate{k - 1}", f"exec{k}"] + ([f"skip{k}"] if k in self.skips else [])
        return [*names, "head"]

    def input_metadata(self) -> dict[str, TensorMeta]:
        metadata = {"input": self.input_meta}
        if self.replay:
            metadata["gates"] = TensorMeta("gates", np.dtype(np.uint8), ("batch", self.n_blocks - 1))
        else:
            metadata["gate_threshold"] = TensorMeta("gate_threshold", np.dtype(np.float32), (), optional=True)
        return metadata

    def output_names(self) -> list[str]:
        return ["logits", "gates", "gate_probs"]

    def _run(self, piece: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Pieces come from our own export: skip re-validating every call on the hot path.
        return self.runners[piece].infer(feed, check_inputs=False)

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = feed["input"]
        batch = len(images)
        threshold = float(feed["gate_threshold"]) if "gate_threshold" in feed else self.gate_threshold
        x = self._run("stem", {"x": images})["y"]
        state = [np.zeros((batch, self.state_width), dtype=np.float32) for _ in self.state_names]
        gates = np.zeros((batch, self.n_blocks - 1), dtype=np.uint8)
        probs = np.zeros((batch, self.n_blocks - 1), dtype=np.float32)
        self.total_rows += batch
        self.executed_rows[0] += batch
        for k in range(1, self.n_blocks):
            out = self._run(f"gate{k - 1}", {"x": x, **dict(zip(self.state_names, state))})
            state = [out[f"{name}_next"] for name in self.state_names]
            probs[:, k - 1] = out["prob"]
            execute = feed["gates"][:, k - 1].astype(bool) if self.replay else out["prob"] > threshold
            gates[:, k - 1] = execute
            x = self._route(k, x, execute)
        logits = self._run("head", {"x": x})["logits"]
        return {"logits": logits, "gates": gates, "gate_probs": probs}

    def _route(self, k: int, x: np.ndarray, execute: np.ndarray) -> np.ndarray:
        """Block k on the rows that execute, its skip path on the others."""
        on = np.flatnonzero(execute)
        off = np.flatnonzero(~execute)
        self.executed_rows[k] += len(on)
        if len(x) == 0:  # an empty batch: the block's piece gives the empty output its shape
            return self._run(f"exec{k}", {"x": x})["y"]
        if k not in self.skips:
            if len(on) == 0:
                return x
            result = x.copy()
            if len(on) == len(x):
                return self._run(f"exec{k}", {"x": x})["y"]
            result[on] = self._run(f"exec{k}", {"x": np.ascontiguousarray(x[on])})["y"]
            return result
        parts = {}
        if len(on):
            parts["on"] = self._run(f"exec{k}", {"x": x if len(off) == 0 else np.ascontiguousarray(x[on])})["y"]
        if len(off):
            parts["off"] = self._run(f"skip{k}", {"x": x if len(on) == 0 else np.ascontiguousarray(x[off])})["y"]
        if len(parts) == 1:
            return next(iter(parts.values()))
        shape = parts["on"].shape[1:]
        result = np.empty((len(x), *shape), dtype=parts["on"].dtype)
        result[on], result[off] = parts["on"], parts["off"]
        return result


class StagedExitRunner(PieceController):
    """Runs an early-exit network stage by stage, dropping the samples that left.

    Follows the plan a ``staged`` early-exit bundle records (``exits`` in the manifest, see
    ``exporters.early_exit``): stage j's graph takes the image rows still in the batch (when it
    reads the image) and the earlier stages' features it reads, and returns ``logits``, ``confidence`` and the features
    later stages read. After each stage the controller compares the confidences with
    ``exit_thresholds`` and keeps only the rows that stay, so a sample that left costs nothing
    more.

    Args:
        make_runner: callable returning the runner of a stage graph by name (``"stage0"``...).
        plan: the manifest's ``exits`` entry: ``n_stages``, ``exit_rule``, ``thresholds``,
            ``needs``, ``provides``, ``reads_input``.
        input_meta: metadata of the image input ``input``.
        exit_thresholds: default thresholds when the feed has none. Defaults to the plan's.
        name: label in reports. Defaults to ``"staged"``.
    """

    def __init__(
        self,
        make_runner: Callable[[str], Runner],
        plan: Mapping[str, Any],
        input_meta: TensorMeta,
        exit_thresholds: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(make_runner, name)
        self.plan = dict(plan)
        self.n_stages = int(plan["n_stages"])
        self.entropy = plan["exit_rule"] == "entropy"
        self.needs = [list(names) for names in plan["needs"]]
        self.provides = [list(names) for names in plan["provides"]]
        self.reads_input = [bool(v) for v in plan.get("reads_input", [True] * self.n_stages)]
        self.input_meta = input_meta
        default = plan["thresholds"] if exit_thresholds is None else exit_thresholds
        self.exit_thresholds = np.asarray(default, dtype=np.float32).reshape(self.n_stages)
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the per-stage statistics: rows each stage ran on, times each stage ran, seconds
        in each stage's graph, and seconds in whole calls (the difference is the controller's
        overhead: thresholds, row selection, copies)."""
        self.stage_rows = np.zeros(self.n_stages, dtype=np.int64)
        self.stage_calls = np.zeros(self.n_stages, dtype=np.int64)
        self.stage_seconds = np.zeros(self.n_stages)
        self.calls_seconds = 0.0
        self.calls = 0

    def piece_names(self) -> list[str]:
        return [f"stage{stage}" for stage in range(self.n_stages)]

    def input_metadata(self) -> dict[str, TensorMeta]:
        return {
            "input": self.input_meta,
            "exit_thresholds": TensorMeta("exit_thresholds", np.dtype(np.float32), (self.n_stages,), optional=True),
        }

    def output_names(self) -> list[str]:
        return ["logits", "exit_stage", "exit_confidence"]

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        images = feed["input"]
        thresholds = np.asarray(feed["exit_thresholds"]) if "exit_thresholds" in feed else self.exit_thresholds
        batch = len(images)
        logits_out: np.ndarray | None = None
        stage_out = np.full(batch, self.n_stages - 1, dtype=np.int64)
        confidence_out = np.full((batch, self.n_stages), -1.0, dtype=np.float32)
        active = np.arange(batch)
        x, carried = images, {}
        for stage in range(self.n_stages):
            self.stage_rows[stage] += len(active)
            self.stage_calls[stage] += 1
            stage_started = time.perf_counter()
            # Pieces come from our own export: skip re-validating every call on the hot path.
            stage_feed = {n: carried[n] for n in self.needs[stage]}
            if self.reads_input[stage]:
                stage_feed["input"] = x
            out = self.runners[f"stage{stage}"].infer(stage_feed, check_inputs=False)
            self.stage_seconds[stage] += time.perf_counter() - stage_started
            confidence, logits = out["confidence"], out["logits"]
            if logits_out is None:
                logits_out = np.empty((batch, logits.shape[1]), dtype=logits.dtype)
            confidence_out[active, stage] = confidence
            last = stage == self.n_stages - 1
            if last:
                leave = np.ones(len(active), dtype=bool)
            else:
                leave = confidence <= thresholds[stage] if self.entropy else confidence >= thresholds[stage]
            logits_out[active[leave]] = logits[leave]
            stage_out[active[leave]] = stage
            if last or leave.all():
                break
            provided = {n: out[n] for n in self.provides[stage]}
            if leave.any():
                # Shrink the batch: only the rows that stay go on, with their carried features.
                stay = ~leave
                active, x = active[stay], np.ascontiguousarray(x[stay])
                carried = {n: np.ascontiguousarray(v[stay]) for n, v in carried.items()}
                provided = {n: np.ascontiguousarray(v[stay]) for n, v in provided.items()}
            carried.update(provided)
        self.calls += 1
        self.calls_seconds += time.perf_counter() - started
        return {"logits": logits_out, "exit_stage": stage_out, "exit_confidence": confidence_out}
