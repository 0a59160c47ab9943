"""A read-only view of one ONNX graph (the main graph or an ``If``/``Loop`` body) for the
rules: value types and shapes after ``onnx.shape_inference``, constant values, producers and
consumers, and names that say where a node sits (``block1_if/then/n_Relu_7``).

Subgraphs see the values of the graphs around them (ONNX outer scope), so lookups of types
and constants walk up to the enclosing scopes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

Dim = int | str | None  # a static size, a symbolic name, or unknown


@dataclass
class Scope:
    """One graph and what the rules ask about its values.

    Attributes:
        graph: the graph.
        path: where it sits: ``""`` for the main graph, else ``"<node>/<attribute>"`` parts.
        parent: the enclosing scope, or None for the main graph.
        is_main: True for the model's main graph (its inputs and outputs are the network's).
    """

    graph: onnx.GraphProto
    path: str = ""
    parent: Scope | None = None
    is_main: bool = True
    types: dict[str, onnx.TypeProto] = field(default_factory=dict)
    constants: dict[str, np.ndarray | None] = field(default_factory=dict)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        graph = self.graph
        for info in (*graph.input, *graph.value_info, *graph.output):
            if info.type.HasField("tensor_type"):
                self.types.setdefault(info.name, info.type)
        inputs = {value.name for value in graph.input}
        for tensor in graph.initializer:
            self.types.setdefault(tensor.name, helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)))
            # An initializer named like a graph input is an overridable default, not a constant.
            if tensor.name not in inputs:
                self.constants[tensor.name] = _array(tensor)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producers[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                self.constants[node.output[0]] = _constant_value(node)

    # -- lookups that walk up to the enclosing graphs ------------------------------------
    def type_of(self, name: str) -> onnx.TypeProto | None:
        scope: Scope | None = self
        while scope is not None:
            if name in scope.types:
                return scope.types[name]
            scope = scope.parent
        return None

    def elem_type(self, name: str) -> int:
        """ONNX element type of ``name``; 0 when unknown."""
        value = self.type_of(name)
        return value.tensor_type.elem_type if value is not None and value.HasField("tensor_type") else 0

    def shape(self, name: str) -> list[Dim] | None:
        """Dimensions of ``name`` (int, symbolic name, or None per dim); None when the rank is unknown."""
        value = self.type_of(name)
        if value is None or not value.HasField("tensor_type") or not value.tensor_type.HasField("shape"):
            return None
        dims: list[Dim] = []
        for dim in value.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        return dims

    def is_constant(self, name: str) -> bool:
        """``name`` is an initializer or a Constant node's output (here or in an enclosing graph)."""
        scope: Scope | None = self
        while scope is not None:
            if name in scope.constants:
                return True
            if name in scope.producers or any(v.name == name for v in scope.graph.input):
                return False
            scope = scope.parent
        return False

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant ``name``; None when it is not constant or not readable."""
        scope: Scope | None = self
        while scope is not None:
            if name in scope.constants:
                return scope.constants[name]
            if name in scope.producers or any(v.name == name for v in scope.graph.input):
                return None
            scope = scope.parent
        return None

    # -- names ---------------------------------------------------------------------------
    def node_name(self, node: onnx.NodeProto) -> str:
        """The node's name (or op and first output when it has none), prefixed with the path."""
        own = node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"
        return f"{self.path}/{own}" if self.path else own

    @property
    def network_inputs(self) -> set[str]:
        return {value.name for value in self.graph.input} if self.is_main else set()

    @property
    def network_outputs(self) -> set[str]:
        return {value.name for value in self.graph.output} if self.is_main else set()

    def subgraphs(self) -> Iterator[tuple[onnx.NodeProto, str, Scope]]:
        """(node, attribute name, scope) of each graph attribute of this graph's nodes."""
        for node in self.graph.node:
            for attribute in node.attribute:
                graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
                for graph in graphs:
                    path = f"{self.node_name(node)}/{attribute.name}"
                    yield node, attribute.name, Scope(graph, path, parent=self, is_main=False)


def walk(scope: Scope) -> Iterator[Scope]:
    """``scope`` and every graph nested in it, depth first."""
    yield scope
    for _node, _attribute, child in scope.subgraphs():
        yield from walk(child)


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of the node's attribute ``name``, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def dim_text(dims: list[Dim] | None) -> str:
    return "unknown" if dims is None else "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _array(tensor: onnx.TensorProto) -> np.ndarray | None:
    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # external data not loaded, or a type numpy cannot hold
        return None


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return _array(attr.t)
        if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr))
    return None  # sparse_value or strings: constant, value not read
