"""Where ONNX Runtime's CPU time goes, layer by layer (its built-in profiler).

    with graphs.runner(threads, profile=True) as runner:   # or make_runner(..., profile=True)
        for feed in feeds:
            runner.infer(feed)
        layers = layer_times(runner, graphs.graphs, calls=len(feeds))

ONNX Runtime fuses and renames nodes as it optimises: the Q/DQ pairs around a Conv become one
``QLinearConv`` named after the Conv plus ``_token_N``, and its blocked-layout (NCHWc)
convolutions are named after the tensor they write plus ``_nchwc``. A profiled node is traced
back to the node or tensor of the graph slimdeploy wrote, and from there to the weight it
applies: the layer is the weight's name without ``.weight`` (``features.3.dw_conv``), prefixed
by the piece in a staged form (``exec3:conv1``), where each piece names its weights on its own.
Nodes that apply no weight keep the name of the written graph's node they come from (pooling,
additions: the same name in every precision), and the nodes ONNX Runtime adds (layout
Transposes, reorders, Quantize/DequantizeLinear at the graph's edges) are grouped by operator
type. Imports no torch.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from slimdeploy.engines.base import Runner

# Operator types (before and after ONNX Runtime's fusions) that apply a weight: a profiled
# node of one of these types is a layer even when ONNX Runtime fused an activation into it.
WEIGHTED_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
    "QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "NhwcFusedConv", "LSTM", "GRU", "RNN",
})
# How many producers back a fused node's name is followed to find the weight it applies
# (a Conv+BN+ReLU+Add fusion is named after the tensor the ReLU writes).
_MAX_HOPS = 3
_WEIGHT_SUFFIXES = ("_DequantizeLinear_Output", "_quantized", ".weight", "_weight")


@dataclass(frozen=True)
class LayerTime:
    """Time of one layer (or one group of weightless nodes) per call of the runner.

    Attributes:
        layer: the weight's name without ``.weight`` (``piece:name`` in staged forms); for nodes
            that apply no weight, the written graph's node name, or the operator type of nodes
            ONNX Runtime added (grouped).
        ms: milliseconds per call of the runner (warm-up excluded).
        ops: the operator types ONNX Runtime ran for it, sorted.
    """

    layer: str
    ms: float
    ops: tuple[str, ...]


class LayerNamer:
    """Names the layer a profiled node of ``graph`` computes (see the module docstring)."""

    def __init__(self, graph: onnx.ModelProto) -> None:
        self.nodes: dict[str, onnx.NodeProto] = {}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.weights: set[str] = set()
        for subgraph in _graphs(graph.graph):
            self.weights.update(init.name for init in subgraph.initializer if len(init.dims) >= 2)
            for node in subgraph.node:
                self.nodes[node.name] = node
                for output in node.output:
                    self.producers[output] = node

    def label(self, profiled: str, op_type: str) -> tuple[str, bool]:
        """What the profiled node named ``profiled`` (``_kernel_time`` stripped) computes, and
        whether that is a layer: the layer of a weighted node, else the written graph's node it
        comes from (``node_mean``: the same name in both precisions), else ``op_type`` (nodes
        ONNX Runtime added: layout Transposes, reorders, Q/DQ at the graph's edges)."""
        layer = self.layer(profiled, op_type)
        if layer is not None:
            return layer, True
        node = self._original(profiled)
        return (node.name if node is not None and node.name else op_type), False

    def layer(self, profiled: str, op_type: str) -> str | None:
        """The layer of the profiled node named ``profiled`` (``_kernel_time`` stripped), or
        None when it applies no weight or cannot be traced."""
        if op_type not in WEIGHTED_OPS:
            return None
        node = self._original(profiled)
        frontier = [node] if node is not None else []
        for _ in range(_MAX_HOPS + 1):
            upstream = []
            for candidate in frontier:
                weight = self._weight(candidate)
                if weight is not None:
                    return _layer_name(weight)
                upstream += [self.producers[name] for name in candidate.input if name in self.producers]
            frontier = upstream
        return None

    def _original(self, profiled: str) -> onnx.NodeProto | None:
        """The node of the written graph a profiled node comes from: by node name, or by the
        tensor a fused node is named after."""
        untokened = re.sub(r"(_token_\d+)+$", "", profiled)
        for name in (profiled, untokened, re.sub(r"_nchwc$", "", untokened)):
            if name in self.nodes:
                return self.nodes[name]
            if name in self.producers:
                return self.producers[name]
        return None

    def _weight(self, node: onnx.NodeProto) -> str | None:
        """The weight ``node`` reads, directly or through a DequantizeLinear."""
        for name in node.input:
            if name in self.weights:
                return name
            producer = self.producers.get(name)
            if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in self.weights:
                return producer.input[0]
        return None


def layer_times(runner: Runner, graphs: Mapping[str, onnx.ModelProto], calls: int) -> dict[str, LayerTime]:
    """Per layer, the time a profiled runner spent per call over its ``calls`` calls (each
    node's median run, its first run, a warm-up, left out), largest first.

    Args:
        runner: an active runner made with ``profile=True``: one ONNX Runtime session, or a
            staged controller whose pieces each have one.
        graphs: graph name → the ONNX graph it runs (``model`` for single graphs).
        calls: how many times ``runner.infer`` was called.
    """
    sessions = getattr(runner, "runners", None) or {"model": runner}
    staged = len(sessions) > 1 or "model" not in sessions
    spent: dict[str, float] = defaultdict(float)
    ops: dict[str, set[str]] = defaultdict(set)
    for piece, session in sessions.items():
        namer = LayerNamer(graphs[piece])
        durations: dict[str, list[float]] = defaultdict(list)
        op_of: dict[str, str] = {}
        for event in session.profile_events():
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                node = event["name"][: -len("_kernel_time")]
                durations[node].append(float(event["dur"]))
                op_of[node] = event.get("args", {}).get("op_name", "?")
        for node, times in durations.items():
            # Median time of a run after the first (robust to a run the machine descheduled),
            # times how often the node ran per call.
            per_call_us = float(np.median(times[1:] or times)) * len(times) / max(calls, 1)
            label, _ = namer.label(node, op_of[node])
            label = f"{piece}:{label}" if staged and label != op_of[node] else label
            spent[label] += per_call_us / 1000
            ops[label].add(op_of[node])
    ordered = sorted(spent.items(), key=lambda item: -item[1])
    return {label: LayerTime(label, ms, tuple(sorted(ops[label]))) for label, ms in ordered}


def compare_layers(baseline: Mapping[str, LayerTime], candidate: Mapping[str, LayerTime]) -> list[dict[str, Any]]:
    """Layers of two runs of one model side by side, the ones ``candidate`` spends most time
    on beyond ``baseline`` first: ``layer``, ``baseline_ms``, ``candidate_ms``, ``extra_ms`` and
    the operator types of each (a layer absent from one run has 0 ms there)."""
    rows = []
    for label in dict.fromkeys([*candidate, *baseline]):
        base, cand = baseline.get(label), candidate.get(label)
        base_ms, cand_ms = (base.ms if base else 0.0), (cand.ms if cand else 0.0)
        rows.append({
            "layer": label, "baseline_ms": round(base_ms, 4), "candidate_ms": round(cand_ms, 4),
            "extra_ms": round(cand_ms - base_ms, 4),
            "baseline_ops": list(base.ops) if base else [], "candidate_ops": list(cand.ops) if cand else [],
        })
    return sorted(rows, key=lambda row: (-row["extra_ms"], -row["candidate_ms"]))


def _layer_name(weight: str) -> str:
    for suffix in _WEIGHT_SUFFIXES:
        if weight.endswith(suffix):
            weight = weight[: -len(suffix)]
    return weight


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it (``If`` branches, ``Loop`` bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graphs(subgraph)
