"""Findings, the lint report, and the rule registry.

A rule is a function with a docstring that cites the fact it applies. Graph rules run on the
main graph and on every ``If``/``Loop``/``Scan`` body (``Scope``); model rules run once per
model on all its scopes.
"""

from __future__ import annotations

import re
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
        notes: what the findings mean for this target (an ONNX Runtime bundle linted for
            TensorRT). Defaults to [].
    """

    target: str
    trt_version: str
    findings: list[Finding] = field(default_factory=list)
    matrix: str = ""
    graphs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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

    def groups(self) -> list[FindingGroup]:
        """The findings grouped (``group_findings``): what a person reads first."""
        return group_findings(self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "trt_version": self.trt_version, "matrix": self.matrix,
            "graphs": list(self.graphs), "passed": self.passed, "errors": len(self.errors),
            "warnings": len(self.warnings), "notes": list(self.notes),
            "groups": [group.to_dict() for group in self.groups()],
            "findings": [f.to_dict() for f in self.findings],
        }


# What differs between findings of the same kind: the names of tensors and nodes (quoted), and
# counts and values. Masked, the messages of one kind read the same.
_QUOTED = re.compile(r"'[^']*'")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass
class FindingGroup:
    """Findings that say the same thing about different nodes: one rule, severity and fix, and
    the same message but for names and numbers.

    Attributes:
        severity, rule, fix: shared by every finding of the group.
        count: how many findings.
        graphs: the graphs they are in, in order of first appearance.
        first: the first finding (its message and node stand for the group).
    """

    severity: str
    rule: str
    fix: str
    count: int
    graphs: list[str]
    first: Finding

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "rule": self.rule, "count": self.count, "graphs": list(self.graphs),
                "message": self.first.message, "node": self.first.node, "fix": self.fix}


def group_findings(findings: Iterable[Finding]) -> list[FindingGroup]:
    """Identical findings (same severity, rule, fix, and message once names and numbers are
    masked) as one group with a count; errors first, then in order of first appearance."""
    groups: dict[tuple[str, str, str, str], FindingGroup] = {}
    for finding in findings:
        key = (finding.severity, finding.rule, finding.fix, _NUMBER.sub("#", _QUOTED.sub("'…'", finding.message)))
        group = groups.get(key)
        if group is None:
            groups[key] = FindingGroup(finding.severity, finding.rule, finding.fix, 1, [finding.graph], finding)
            continue
        group.count += 1
        if finding.graph not in group.graphs:
            group.graphs.append(finding.graph)
    return sorted(groups.values(), key=lambda group: group.severity != ERROR)


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
