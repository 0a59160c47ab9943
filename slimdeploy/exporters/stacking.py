"""Stack the weights of pieces that compute the same thing with different weights, so that one
graph computes any of them: the body of the gated ``loop`` form (``exporters.gated``).

    stack = stack_pieces([graphs["exec2"], graphs["exec3"], graphs["exec4"]])  # None if they differ
    stack.template  # exec2's graph; each weight that differs between the pieces is an extra input
    stack.stacked   # those weights, one array each, stacked along a new axis 0 (one row per piece)
    stack.shared    # how many weights are the same in every piece and stay in the template once

A ``Loop`` body then feeds input ``j`` of the template with ``Gather(stacked[j], iteration)``.

Why the body is made from the exported pieces, and not from a second export of one block with
its weights as inputs (``torch.func.functional_call`` over a weight dictionary):

- It is the same computation as every other form. The template is the very graph that ``mask``,
  ``if``, ``compact`` and ``staged`` inline, with only the source of its weights changed, so a
  difference between ``loop`` and ``if`` can only come from routing. A weight-parametrised export
  is another torch.export (seconds to minutes) giving another graph: the exporter folds a
  BatchNorm into its convolution only when both are constants, so the body would compute
  conv → BatchNormalization where the pieces compute one folded Conv.
- Identical structure is checked, not assumed: node by node (operator, attributes, how inputs
  are wired) and weight by weight (type and shape). Pieces that differ (another block type, an
  exporter that folded something differently in one block) give ``None``, and the caller keeps
  those blocks out of the loop; the form stays correct for any network and is small where
  blocks repeat.
- Weights equal in every piece (the recurrent gate's shared LSTM and projection, shape
  constants) are found by value and kept once, unstacked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass
class StackedPieces:
    """Pieces of one structure with their differing weights stacked.

    Attributes:
        template: the first piece's graph; its differing weights are removed from the
            initializers and appended to its inputs, in the order of ``stacked``.
        stacked: per differing weight, the pieces' values stacked along a new axis 0.
        shared: number of weights equal in every piece (kept in ``template`` as initializers).
    """

    template: onnx.ModelProto
    stacked: list[np.ndarray]
    shared: int


def stack_pieces(pieces: Sequence[onnx.ModelProto]) -> StackedPieces | None:
    """Stack the differing weights of ``pieces``, or None when their graphs differ in structure
    (see the module docstring). Pieces must be self-contained graphs (no outer-scope names)."""
    if not pieces:
        raise ValueError("stack_pieces needs at least one piece")
    signatures = [_signature(piece) for piece in pieces]
    structure, first_weights = signatures[0]
    if any(other != structure for other, _ in signatures[1:]):
        return None
    differing: list[tuple[str, np.ndarray]] = []
    shared = 0
    for position, weight in enumerate(first_weights):
        values = [numpy_helper.to_array(weights[position]) for _, weights in signatures]
        if all(np.array_equal(values[0], value) for value in values[1:]):
            shared += 1
        else:
            differing.append((weight.name, np.stack(values)))
    return StackedPieces(_with_weights_as_inputs(pieces[0], [name for name, _ in differing]),
                         [array for _, array in differing], shared)


def same_structure(first: onnx.ModelProto, second: onnx.ModelProto) -> bool:
    """Whether two pieces compute the same thing up to their weights' values (``stack_pieces``
    would stack them)."""
    return _signature(first)[0] == _signature(second)[0]


def _signature(piece: onnx.ModelProto) -> tuple[tuple[Any, ...], list[onnx.TensorProto]]:
    """A piece's structure with value names replaced by their roles (graph input j, weight j in
    order of first use, output j of node n), and its weights in that order."""
    graph = piece.graph
    initializers = {init.name: init for init in graph.initializer}
    roles = {value.name: f"input{j}" for j, value in enumerate(graph.input)}
    weights: list[onnx.TensorProto] = []
    nodes = []
    for n, node in enumerate(graph.node):
        wiring = []
        for name in node.input:
            if name and name not in roles:
                if name not in initializers:
                    raise ValueError(f"piece '{graph.name}' reads '{name}', which it does not define")
                roles[name] = f"weight{len(weights)}"
                weights.append(initializers[name])
            wiring.append(roles.get(name, ""))
        roles.update({out: f"node{n}.{j}" for j, out in enumerate(node.output) if out})
        # Attributes compared by value (a Constant's tensor included); their order does not matter.
        attributes = tuple(sorted(attribute.SerializeToString(deterministic=True) for attribute in node.attribute))
        nodes.append((node.domain, node.op_type, tuple(wiring), len(node.output), attributes))
    inputs = tuple(value.type.SerializeToString(deterministic=True) for value in graph.input)
    outputs = tuple((roles.get(value.name, ""), value.type.SerializeToString(deterministic=True)) for value in graph.output)
    kinds = tuple((weight.data_type, tuple(weight.dims)) for weight in weights)
    return (tuple(nodes), inputs, outputs, kinds), weights


def _with_weights_as_inputs(piece: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``piece`` whose initializers ``names`` are graph inputs instead (appended)."""
    template = onnx.ModelProto()
    template.CopyFrom(piece)
    graph = template.graph
    by_name = {init.name: init for init in graph.initializer}
    kept = [init for init in graph.initializer if init.name not in set(names)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(
        helper.make_tensor_value_info(name, by_name[name].data_type, list(by_name[name].dims)) for name in names
    )
    return template
