"""Which nodes make decisions (gate and exit heads): the part of a graph kept FP32 by default.

A decision that flips under reduced precision changes the answer, so INT8 and FP16 leave the
nodes that compute gates and exits in FP32 unless asked (``--quantize-decisions``). The scope is
data, not code, so new decision heads (exits, issue 5) only add a pattern or an output:

- ``patterns``: fnmatch patterns of the prefix that the exporters give a head's nodes
  (``gate0/...`` in a composed graph) and of the piece names of a staged bundle (``gate0``);
- ``outputs``: decision outputs (``gates``, ``gate_probs``, ``exit_stage``): nodes whose results
  flow only into them (the Greater/Cast/Concat that report the decisions) are decision nodes too.

From the matched heads the scope grows forward through nodes that read nothing but decision
values (thresholds and constants aside): the comparison with the threshold, the casts, the row
indices of a compacted block. A node that also reads features (the ``Gather`` of the executed
rows) is not a decision node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import onnx

DEFAULT_PATTERNS = ("gate*", "exit*")
# Heads whose first pooling is quantized (``entry_pools``): gates only. An exit's confidence
# sits near a threshold close to 1, where one more rounding of its features flips exits.
POOLED_PATTERNS = ("gate*",)
DEFAULT_OUTPUTS = ("gates", "gate_probs", "exit_stage", "exit_probs", "exit_confidence", "confidence")
# An early-exit stage decides from its own logits (max softmax or entropy against a threshold
# near 1, where one INT8 step of the logits moves the confidence past it): where a graph has a
# confidence output, the classifier producing ``logits`` belongs to the exit head too.
CONFIDENCE_OUTPUTS = ("exit_confidence", "confidence")
EXIT_LOGITS = "logits"


@dataclass(frozen=True)
class DecisionScope:
    """Patterns and outputs that name the decision part of a model.

    Attributes:
        patterns: fnmatch patterns of head prefixes / staged piece names. Defaults to gate and
            exit heads.
        outputs: decision output names. Defaults to ``gates``, ``gate_probs``, ``exit_stage``,
            ``exit_probs``, ``exit_confidence``, ``confidence`` (with a confidence output, the
            ``logits`` classifier counts as part of the exit head).
        pooled: patterns of the heads that read their first pooling's INT8 output
            (``entry_pools``). Defaults to gate heads.
    """

    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    pooled: tuple[str, ...] = POOLED_PATTERNS

    def is_decision_piece(self, piece: str) -> bool:
        """True for a staged piece that is a decision head (``gate3``, ``exit1``)."""
        return any(fnmatchcase(piece, pattern) for pattern in self.patterns)

    def nodes(self, model: onnx.ModelProto) -> list[str]:
        """Names of the decision nodes of ``model``'s main graph, in graph order."""
        return decision_nodes(model, self.patterns, self.outputs)


    def entry_pools(self, model: onnx.ModelProto) -> list[str]:
        """Names of the pooling nodes a decision head starts with (the gate's average pool over
        the block's feature map), in graph order: see ``entry_pools``."""
        return entry_pools(model, self.pooled)


NO_DECISIONS = DecisionScope((), (), ())
# Whole-map poolings a gate head starts with (the INT8 rewrite makes them GlobalAveragePool).
POOLS = ("AveragePool", "GlobalAveragePool", "ReduceMean")


def entry_pools(model: onnx.ModelProto, patterns: Sequence[str] = POOLED_PATTERNS) -> list[str]:
    """Head nodes that pool a feature map computed outside the head: what a gate reads first.

    In the ONNX Runtime INT8 form these are quantized (``QLinearGlobalAveragePool`` on the
    INT8 map) and the FP32 head reads their rounded, pooled output: one small tensor
    dequantized instead of the whole feature map (and the layout changes around it), at the
    cost of one rounding of the pooled values."""
    nodes = list(model.graph.node)
    heads = [node for node in nodes if any(fnmatchcase(node.name, f"{pattern}/*") for pattern in patterns)]
    head_outputs = {out for node in heads for out in node.output}
    return [node.name for node in heads if node.op_type in POOLS and node.input and node.input[0] not in head_outputs]


def decision_nodes(model: onnx.ModelProto, patterns: Sequence[str] = DEFAULT_PATTERNS, outputs: Iterable[str] = DEFAULT_OUTPUTS) -> list[str]:
    """Decision nodes of ``model``: head nodes named ``<pattern>/...``, what reads only their
    results, and what flows only into the decision ``outputs``."""
    graph = model.graph
    nodes = list(graph.node)
    constant = {init.name for init in graph.initializer} | {inp.name for inp in graph.input if inp.name != graph.input[0].name}
    constant |= {out for node in nodes if node.op_type == "Constant" for out in node.output}
    heads = {node.name for node in nodes if any(fnmatchcase(node.name, f"{pattern}/*") for pattern in patterns)}
    decided: set[str] = set()  # values computed by decision nodes
    chosen: set[str] = set()
    # Forward: graph order is topological, so one pass sees producers before consumers.
    for node in nodes:
        values = [name for name in node.input if name and name not in constant]
        if node.name in heads or (values and all(name in decided for name in values)):
            chosen.add(node.name)
            decided.update(node.output)
    # Backward: nodes every consumer of which is a decision node or a decision output.
    consumers: dict[str, list[str]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    graph_outputs = {out.name for out in graph.output}
    wanted = set(outputs) & graph_outputs
    # Through the exit's logits only the classifier joins (``classifier_nodes``), never the
    # backbone behind it: in the last stage of an early-exit network, or a mask graph, every
    # feature flows only into the logits.
    backbone: set[str] = set()
    if wanted & set(CONFIDENCE_OUTPUTS) and EXIT_LOGITS in graph_outputs:
        wanted.add(EXIT_LOGITS)
        backbone = _ancestors(nodes, classifier_nodes(nodes, EXIT_LOGITS))
    if wanted:
        for node in reversed(nodes):
            if node.name in chosen or not node.output or node.name in backbone:
                continue
            feeds_only_decisions = all(
                (out in wanted) or (out not in graph_outputs and consumers.get(out) and all(c in chosen for c in consumers[out]))
                for out in node.output
            )
            if feeds_only_decisions:
                chosen.add(node.name)
    return [node.name for node in nodes if node.name in chosen]


CLASSIFIER_OPS = ("Gemm", "MatMul", "Conv")


def classifier_nodes(nodes: Sequence[onnx.NodeProto], output: str) -> set[str]:
    """The classifier that computes ``output``: the nodes from it back to the feature pooling
    (``POOLS``, included), or to the layer before the classifier's weighted layer."""
    producers = {out: node for node in nodes for out in node.output}
    found: set[str] = set()
    stack: list[tuple[str, bool]] = [(output, False)]  # (tensor, a weighted layer already met)
    while stack:
        name, weighted = stack.pop()
        node = producers.get(name)
        if node is None or node.name in found or (weighted and node.op_type in CLASSIFIER_OPS):
            continue
        found.add(node.name)
        if node.op_type not in POOLS:
            stack.extend((name, weighted or node.op_type in CLASSIFIER_OPS) for name in node.input if name)
    return found


def _ancestors(nodes: Sequence[onnx.NodeProto], names: set[str]) -> set[str]:
    """The nodes that ``names`` depend on, ``names`` excluded."""
    producers = {out: node for node in nodes for out in node.output}
    by_name = {node.name: node for node in nodes}
    found: set[str] = set()
    stack = [name for node_name in names for name in by_name[node_name].input if name]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in found or node.name in names:
            continue
        found.add(node.name)
        stack.extend(name for name in node.input if name)
    return found
