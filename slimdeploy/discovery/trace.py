"""A network's forward as a torch.fx graph, its gated blocks and exits in call order, and parts of
it run on their own (``Segment``).

``trace_network`` traces ``forward`` symbolically with ``GatedBlock`` and ``Exit`` as leaves
(their insides are the protocol's business, not the graph's); arguments after the image must
have defaults, which the trace keeps fixed. A forward that torch.fx cannot follow (control flow
on the data, a loop whose length depends on it) is refused with the module where tracing
stopped. Nodes that do not depend on the image (parameters read directly, constants) are
"constant": every part that needs one computes it again.

A ``Segment`` runs some nodes of the graph from given values, fetching modules and parameters
from the model at call time (so torch.export sees the model's own parameters); it is how the
pieces of a discovered network (stem, code between blocks, head, exit stages) compute.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import fx, nn

from slimdeploy.errors import ExportError
from slimdeploy.nn.decisions import record_decisions
from slimdeploy.nn.exit import Exit
from slimdeploy.nn.gated_block import GatedBlock

PROTOCOL_LEAVES = (GatedBlock, Exit)
# In-place operators torch.fx records as functions (``x += y``).
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior}
ModuleKind = TypeVar("ModuleKind", bound=nn.Module)


class _ProtocolTracer(fx.Tracer):
    """torch.fx tracer with the protocol's modules as leaves; remembers which module it was in."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, PROTOCOL_LEAVES) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.path.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.path.pop()  # left in place when tracing fails inside: the error names the module
        return result


@dataclass
class TracedNetwork:
    """A traced forward.

    Attributes:
        model: the traced module.
        graph: its forward as a torch.fx graph.
        image: the graph's input node (the image).
        scopes: module path each node was recorded in (``""`` for the model's own forward).
        data: nodes whose value depends on the image (the others are constants).
        mutations: per node, the earlier nodes that changed one of its inputs in place.
    """

    model: nn.Module
    graph: fx.Graph
    image: fx.Node
    scopes: dict[str, str]
    data: set[fx.Node] = field(default_factory=set)
    mutations: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.graph.nodes)

    @property
    def output(self) -> fx.Node:
        return next(node for node in reversed(self.nodes) if node.op == "output")

    def calls(self, kind: type) -> list[fx.Node]:
        """The ``call_module`` nodes of modules of ``kind``, in call order; a module called twice
        is refused."""
        found = [node for node in self.nodes if node.op == "call_module" and isinstance(self.model.get_submodule(node.target), kind)]
        seen: set[str] = set()
        for node in found:
            if node.target in seen:
                raise ExportError(
                    f"{kind.__name__} '{node.target}' runs more than once in {self.name}.forward | Note: each gated block "
                    "and exit decides once per forward, in a fixed order (a loop over it, or a shared instance, "
                    f"calls it again) | Fix: give every call its own {kind.__name__}")
            seen.add(node.target)
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                raise ExportError(
                    f"{kind.__name__} '{node.target}' is called with {len(node.args)} argument(s){' and keywords' if node.kwargs else ''} "
                    f"in {self.name}.forward | Note: it takes one tensor, the features it decides on | Fix: call it as "
                    f"self.{node.target}(x)")
        return found

    def protocol_calls(self, kind: type[ModuleKind]) -> tuple[list[fx.Node], list[str], list[ModuleKind]]:
        """The calls of modules of ``kind`` (``calls``), their module paths and the modules, in
        call order: where a discovered network starts."""
        nodes = self.calls(kind)
        paths = [str(node.target) for node in nodes]
        return nodes, paths, [self.model.get_submodule(path) for path in paths]

    @property
    def name(self) -> str:
        return type(self.model).__name__

    def where(self, node: fx.Node) -> str:
        """Where a node is computed, for messages: ``'features.3'`` or the model's own forward."""
        scope = self.scopes.get(node.name, "")
        if node.op == "call_module":
            scope = str(node.target)
        return f"'{scope}'" if scope else f"{self.name}.forward"

    def inputs_of(self, node: fx.Node) -> list[fx.Node]:
        """The nodes ``node`` reads, including in-place changes made to them before it."""
        return list(node.all_input_nodes) + self.mutations.get(node, [])

    def needed(self, targets: Iterable[fx.Node], given: Iterable[fx.Node] = ()) -> set[fx.Node]:
        """Every node that computing ``targets`` takes, stopping at ``given`` (and the image)."""
        stop = {*given, self.image}
        needed: set[fx.Node] = set()
        todo = [t for t in targets if t not in stop]
        while todo:
            node = todo.pop()
            if node in needed:
                continue
            needed.add(node)
            todo += [n for n in self.inputs_of(node) if n not in stop and n not in needed]
        return needed

    def segment(self, nodes: Iterable[fx.Node], inputs: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> Segment:
        """A segment computing ``outputs`` from ``inputs`` with ``nodes`` and the constants they
        need, in graph order."""
        chosen = set(nodes) | {n for n in self.needed(nodes, inputs) if n not in self.data}
        chosen -= set(inputs)
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        return Segment.of(sorted(chosen, key=order.__getitem__), list(inputs), list(outputs))

    def evaluate(self, x: torch.Tensor) -> dict[fx.Node, Any]:
        """Every node's value for the image ``x`` (eval mode, no gradients, decisions recorded)."""
        everything = [node for node in self.nodes if node.op not in ("placeholder", "output")] + [
            node for node in self.nodes if node.op == "placeholder" and node is not self.image]
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        ordered = sorted(everything, key=order.__getitem__)
        with torch.inference_mode(), record_decisions():
            return dict(zip(ordered, Segment.of(ordered, [self.image], ordered).run(self.model, x)))

    def users(self) -> dict[fx.Node, list[fx.Node]]:
        """Per node, the nodes that read it (``inputs_of``), in graph order."""
        found: dict[fx.Node, list[fx.Node]] = {node: [] for node in self.nodes}
        for node in self.nodes:
            for source in self.inputs_of(node):
                found[source].append(node)
        return found


@dataclass(frozen=True)
class _Slot:
    """Where a value lives while a segment runs: the ``index``-th entry of its values."""

    index: int


@dataclass(frozen=True)
class _Step:
    """One node of the graph as a segment runs it: ``op`` on ``target`` with arguments whose
    nodes became slots, its result stored in ``slot``."""

    op: str
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    slot: int


@dataclass
class Segment:
    """Some nodes of a traced forward, run from given values (see the module docstring).

    The nodes are compiled into steps when the segment is made: running one touches no
    torch.fx object (torch.export, tracing a piece, must not meet them).
    """

    steps: list[_Step]
    n_inputs: int
    outputs: list[int]
    names: list[str]

    @classmethod
    def of(cls, nodes: Sequence[fx.Node], inputs: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> Segment:
        """The segment running ``nodes`` (in order) from ``inputs`` and returning ``outputs``."""
        slot_of = {node: i for i, node in enumerate(inputs)}
        steps = []
        for node in nodes:
            slot_of[node] = len(slot_of)
            steps.append(_Step(node.op, node.target, _template(tuple(node.args), slot_of), _template(dict(node.kwargs), slot_of),
                               slot_of[node]))
        return cls(steps, len(inputs), [slot_of[node] for node in outputs], [node.name for node in nodes])

    def __bool__(self) -> bool:
        return bool(self.steps)

    def run(self, model: nn.Module, *values: Any) -> list[Any]:
        """The outputs' values for the inputs' ``values``."""
        env: list[Any] = [*values, *([None] * len(self.steps))]
        for step in self.steps:
            env[step.slot] = _run_step(model, step, env)
        return [env[slot] for slot in self.outputs]


def _template(value: Any, slot_of: dict[fx.Node, int]) -> Any:
    """A node's argument with every node in it replaced by its slot."""
    if isinstance(value, fx.Node):
        return _Slot(slot_of[value])
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_template(item, slot_of) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_template(item, slot_of) for item in value) if type(value) in (tuple, list) else \
            tuple(_template(item, slot_of) for item in value)
    if isinstance(value, dict):
        return {key: _template(item, slot_of) for key, item in value.items()}
    if isinstance(value, slice):
        return slice(_template(value.start, slot_of), _template(value.stop, slot_of), _template(value.step, slot_of))
    return value


def _bind(value: Any, env: list[Any]) -> Any:
    """A step's argument with every slot replaced by its value."""
    if isinstance(value, _Slot):
        return env[value.index]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_bind(item, env) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_bind(item, env) for item in value)
    if isinstance(value, dict):
        return {key: _bind(item, env) for key, item in value.items()}
    if isinstance(value, slice):
        return slice(_bind(value.start, env), _bind(value.stop, env), _bind(value.step, env))
    return value


def _run_step(model: nn.Module, step: _Step, env: list[Any]) -> Any:
    args, kwargs = _bind(step.args, env), _bind(step.kwargs, env)
    if step.op == "call_module":
        return model.get_submodule(step.target)(*args, **kwargs)
    if step.op == "call_function":
        return step.target(*args, **kwargs)
    if step.op == "call_method":
        return getattr(args[0], step.target)(*args[1:], **kwargs)
    if step.op == "get_attr":
        value: Any = model
        for part in str(step.target).split("."):
            value = getattr(value, part)
        return value
    if step.op == "placeholder":  # an argument after the image, fixed at its default
        return args[0] if args else None
    raise ExportError(f"cannot run a torch.fx node of kind '{step.op}'")


def trace_network(model: nn.Module) -> TracedNetwork:
    """Trace ``model.forward`` (see the module docstring); refuse what cannot be traced."""
    name = type(model).__name__
    parameters = list(inspect.signature(model.forward).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p for p in parameters if p.kind in positional]
    if not named:
        raise ExportError(f"{name}.forward takes no image argument | Fix: define forward(self, x)")
    required = [p.name for p in named[1:] if p.default is inspect.Parameter.empty]
    if required:
        raise ExportError(f"{name}.forward takes {required} besides the image | Note: a deployed network takes the image "
                          "alone | Fix: give those arguments defaults")
    fixed = {p.name: p.default for p in named[1:]}
    tracer = _ProtocolTracer()
    try:
        graph = tracer.trace(model, concrete_args=fixed or None)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, NameError, RuntimeError...
        where = f" in '{tracer.path[-1]}'" if tracer.path and tracer.path[-1] else ""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(
            f"cannot trace {name}.forward with torch.fx{where}: {reason} | Note: slimdeploy finds the gated "
            "blocks and exits in the order forward calls them, which needs that order fixed: control flow on "
            "the data, or a gated block in a loop whose length depends on the data, cannot be deployed | Fix: "
            "make the calls independent of the input values (decisions belong in GatedBlock gates and Exit "
            "rules), or move the data-dependent code inside a GatedBlock's body") from exc
    images = [node for node in graph.nodes if node.op == "placeholder"]
    traced = TracedNetwork(model, graph, images[0], dict((key, scope[0]) for key, scope in tracer.node_name_to_scope.items()))
    for node in graph.nodes:
        if node is traced.image or any(n in traced.data for n in node.all_input_nodes):
            traced.data.add(node)
    traced.mutations = _mutation_edges(graph, model)
    return traced


def _mutation_edges(graph: fx.Graph, model: nn.Module) -> dict[fx.Node, list[fx.Node]]:
    """For every node that reads a value an earlier node changed in place, that earlier node: so
    that a part which reads the value also runs the change."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    edges: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if not _in_place(node, model) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        changed = node.args[0]
        for user in changed.users:
            if user is not node and order[user] > order[node]:
                edges.setdefault(user, []).append(node)
    return edges


def _in_place(node: fx.Node, model: nn.Module) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("__")
    if node.op == "call_function":
        return node.target in _INPLACE_OPERATORS or getattr(node.target, "__name__", "").endswith("_")
    if node.op == "call_module":
        return getattr(model.get_submodule(str(node.target)), "inplace", False) is True
    return False


def protocol_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's ``GatedBlock`` and ``Exit`` modules by path; one inside another is refused."""
    found = {path: module for path, module in model.named_modules() if isinstance(module, PROTOCOL_LEAVES)}
    for path, module in found.items():
        inner = [f"{path}.{sub}" for sub, m in module.named_modules() if sub and isinstance(m, PROTOCOL_LEAVES)]
        if inner:
            raise ExportError(
                f"{type(module).__name__} '{path}' holds {type(found.get(inner[0], module)).__name__} '{inner[0]}' | Note: a "
                "gated block's parts and an exit's head run whole, so a decision inside them cannot be deployed | "
                "Fix: place the inner block beside the outer one, in the model's forward")
    return found
