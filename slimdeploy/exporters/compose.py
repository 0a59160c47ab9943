"""Build ONNX graphs by composing exported pieces with routing nodes (If, Loop, NonZero/Gather/
ScatterND, Where).

``GraphBuilder`` keeps node and value names unique; ``inline`` copies a piece's nodes and
weights in under a prefix, wiring its inputs to values of the graph being built. ``branch``
makes a child builder whose nodes become an ``If`` branch or a ``Loop`` body: its nodes may read
any value of the enclosing graphs, and the weights of inlined pieces stay in the outermost graph
(ONNX lets a subgraph read outer-scope initializers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Accumulates nodes and initializers for one graph (or one ``If`` branch).

    Args:
        parent: the enclosing builder when building a branch; names and weights are shared
            with it. Defaults to None (the main graph).
    """

    def __init__(self, parent: GraphBuilder | None = None) -> None:
        self.parent = parent
        self.root: GraphBuilder = parent.root if parent else self
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0

    # -- names --------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A value name unique in the whole model."""
        root = self.root
        root._counter += 1
        return f"{hint}_{root._counter}"

    # -- values -------------------------------------------------------------------------
    def constant(self, array: np.ndarray, hint: str = "const") -> str:
        """Add a constant (as an initializer of the main graph) and return its name."""
        name = self.fresh(hint)
        self.root.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, hint: str | None = None, **attrs: Any) -> list[str]:
        """Add a node; returns its output names (fresh ones unless given)."""
        if isinstance(outputs, int):
            outputs = [self.fresh(hint or op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=self.fresh(f"n_{op}"), **attrs))
        return list(outputs)

    def one(self, op: str, inputs: Sequence[str], hint: str | None = None, **attrs: Any) -> str:
        """Add a single-output node and return its output name."""
        return self.node(op, inputs, 1, hint=hint, **attrs)[0]

    # -- pieces -------------------------------------------------------------------------
    def inline(self, piece: onnx.ModelProto, inputs: Sequence[str], prefix: str) -> list[str]:
        """Copy ``piece``'s nodes in, reading ``inputs`` (outer names, in the piece's input
        order); returns the names of the piece's outputs in this graph."""
        graph = onnx.compose.add_prefix_graph(piece.graph, prefix, rename_inputs=True, rename_outputs=True)
        if len(inputs) != len(graph.input):
            raise ValueError(f"piece '{piece.graph.name}' takes {len(graph.input)} inputs, got {len(inputs)}")
        rename = {inner.name: outer for inner, outer in zip(graph.input, inputs)}
        for node in graph.node:
            node.input[:] = [rename.get(name, name) for name in node.input]
            self.nodes.append(node)
        self.root.initializers.extend(graph.initializer)
        return [rename.get(out.name, out.name) for out in graph.output]

    # -- control flow -------------------------------------------------------------------
    def branch(self) -> GraphBuilder:
        """A child builder for an ``If`` branch or a ``Loop`` body."""
        return GraphBuilder(parent=self)

    def if_node(
        self,
        condition: str,
        then_branch: GraphBuilder,
        then_outputs: Sequence[str],
        else_branch: GraphBuilder,
        else_outputs: Sequence[str],
        hint: str = "if",
        elem_types: Sequence[int] | None = None,
    ) -> list[str]:
        """An ``If`` on a 0-D bool ``condition``; each branch returns its named outputs.

        Branch outputs get their own names (TensorRT requires the two branches' output names
        to differ); Identity nodes copy values produced outside the branch. ``elem_types`` gives
        each output's ONNX element type. Defaults to FLOAT for all.
        """
        types = list(elem_types or [TensorProto.FLOAT] * len(then_outputs))
        graphs = []
        for label, builder, outs in (("then", then_branch, then_outputs), ("else", else_branch, else_outputs)):
            named = [builder.one("Identity", [value], hint=f"{hint}_{label}_out") for value in outs]
            graphs.append(helper.make_graph(
                builder.nodes, self.fresh(f"{hint}_{label}"), [],
                [helper.make_tensor_value_info(name, elem, None) for name, elem in zip(named, types)],
            ))
        return self.node("If", [condition], len(then_outputs), hint=hint, then_branch=graphs[0], else_branch=graphs[1])

    def loop_node(
        self,
        trip_count: str,
        body: GraphBuilder,
        body_inputs: Sequence[onnx.ValueInfoProto],
        body_outputs: Sequence[onnx.ValueInfoProto],
        initial: Sequence[str],
        hint: str = "loop",
    ) -> list[str]:
        """A ``Loop`` that runs ``body`` ``trip_count`` times (no condition input).

        ``body_inputs`` are the body's iteration number (0-D INT64), its condition (0-D BOOL) and
        one input per loop-carried value; ``body_outputs`` are the condition, the carried values'
        next values and the scan outputs, each named and typed. ``initial`` gives
        the carried values' first values. Returns the carried values' final values, then the scan
        outputs (each stacked along a new axis 0, one row per iteration).
        """
        carried = len(initial)
        if len(body_inputs) != 2 + carried or len(body_outputs) < 1 + carried:
            raise ValueError(f"a Loop body with {carried} carried values takes {2 + carried} inputs and gives at least {1 + carried} outputs")
        graph = helper.make_graph(body.nodes, self.fresh(f"{hint}_body"), list(body_inputs), list(body_outputs))
        return self.node("Loop", [trip_count, "", *initial], len(body_outputs) - 1, hint=hint, body=graph)

    # -- model --------------------------------------------------------------------------
    def build(
        self,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        opset_imports: Sequence[onnx.OperatorSetIdProto],
        defaults: dict[str, np.ndarray] | None = None,
        name: str = "slimdeploy",
    ) -> onnx.ModelProto:
        """Assemble the model. ``defaults`` become initializers named like graph inputs, which
        ONNX Runtime treats as overridable defaults (thresholds)."""
        initializers = list(self.initializers)
        for input_name, value in (defaults or {}).items():
            initializers.append(numpy_helper.from_array(np.asarray(value), input_name))
        graph = helper.make_graph(self.nodes, name, list(inputs), list(outputs), initializer=initializers)
        model = helper.make_model(graph, opset_imports=list(opset_imports), producer_name="slimdeploy")
        model.ir_version = min(model.ir_version, 10)
        return model


def rename_outputs(builder: GraphBuilder, values: Sequence[str], names: Sequence[str]) -> None:
    """Copy ``values`` to the final graph output ``names`` with Identity nodes."""
    for value, name in zip(values, names):
        builder.node("Identity", [value], [name])
