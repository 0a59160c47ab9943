"""Findings, the lint report, and the rule registry.

A rule is a function with a docstring that cites the fact it applies. Graph rules run on the
main graph and on every ``If``/``Loop``/``Scan`` body (``Scope``); model rules run once per
model on all its scopes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from slimdeploy.exporters.trt_lint.facts import Matrix
from slimdeploy.exporters.trt_lint.graph import Scope

ERROR = "error"
WARNING = "warning"


@dataclass
class Finding:
    """One problem TensorRT would have with a graph.

    Attributes:
        rule: rule id (e.g. ``"if-condition"``; docs/trt-lint.md lists them).
        severity: ``"error"`` (TensorRT refuses it, or computes something else) or
            ``"warning"`` (it builds, with a cost or a risk the message names).
        node: the node's path (``block1_if/then_branch/n_Relu_7``), or None for the model.
        message: what is wrong, with the fact behind it.
        fix: what to do about it.
        graph: which graph of a bundle (``model``, or a stage name). Defaults to "".
    """

    rule: str
    severity: str
    node: str | None
    message: str
    fix: str
    graph: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LintReport:
    """The lint of one ONNX file or one bundle (every graph of its manifest).

    Attributes:
        target: the file or bundle linted.
        trt_version: the TensorRT version linted for.
        findings: errors and warnings, in rule order per graph.
        matrix: the operator matrix applied (``"10.15"`` or ``"10.1"``). Defaults to "".
        graphs: the graphs linted (names). Defaults to [].
    """

    target: str
    trt_version: str
    findings: list[Finding] = field(default_factory=list)
    matrix: str = ""
    graphs: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def passed(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "trt_version": self.trt_version, "matrix": self.matrix,
            "graphs": list(self.graphs), "passed": self.passed, "errors": len(self.errors),
            "warnings": len(self.warnings), "findings": [f.to_dict() for f in self.findings],
        }


@dataclass
class Context:
    """What every rule may read besides the graph.

    Attributes:
        matrix: the operator matrix for the target version.
        version: the target version as given (``"10.15"``).
        model: the model linted.
    """

    matrix: Matrix
    version: str
    model: onnx.ModelProto

    @property
    def functions(self) -> dict[tuple[str, str], onnx.FunctionProto]:
        return {(f.domain, f.name): f for f in self.model.functions}

    @property
    def target(self) -> tuple[int, int]:
        return self.matrix.target


GraphRule = Callable[[Scope, Context], Iterable[Finding]]
ModelRule = Callable[[list[Scope], Context], Iterable[Finding]]
GRAPH_RULES: list[GraphRule] = []
MODEL_RULES: list[ModelRule] = []


def graph_rule(fn: GraphRule) -> GraphRule:
    """Register a rule run on every graph (main graph and subgraphs)."""
    GRAPH_RULES.append(fn)
    return fn


def model_rule(fn: ModelRule) -> ModelRule:
    """Register a rule run once per model."""
    MODEL_RULES.append(fn)
    return fn
