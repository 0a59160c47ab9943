"""CPU-side TensorRT lint: what TensorRT's ONNX parser would refuse (or build with a cost),
found without TensorRT or a GPU.

    report = lint_path("bundle/")                 # every graph of the manifest, stages included
    report = lint_model("model.onnx", trt_version="10.3")
    report.passed, report.errors, report.warnings, report.to_dict()

Every rule is a function with a docstring citing the fact it applies; the facts are
``trt_ops.json`` (the onnx-tensorrt operator matrices of TensorRT 10.15 and 10.1 with parser
constraints) and docs/tensorrt-facts.md; docs/trt-lint.md lists the rules. Shapes and
types come from ``onnx.shape_inference``; ``If``/``Loop`` bodies and model-local functions are
linted like graphs. Needs only onnx (no torch, no tensorrt). Defaults: TensorRT 10.15, the
newest operator matrix read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from slimdeploy.errors import BadInputError
from slimdeploy.exporters.trt_lint import rules_control, rules_ops, rules_quant
from slimdeploy.exporters.trt_lint.core import (
    ERROR,
    GRAPH_RULES,
    MODEL_RULES,
    WARNING,
    Context,
    Finding,
    LintReport,
)
from slimdeploy.exporters.trt_lint.facts import DEFAULT_TRT_VERSION, matrix_for
from slimdeploy.exporters.trt_lint.graph import Scope, walk

__all__ = [
    "DEFAULT_TRT_VERSION", "ERROR", "WARNING", "Finding", "LintReport", "lint_graphs", "lint_model", "lint_path",
    "rule_ids",
]
_RULE_MODULES = (rules_ops, rules_control, rules_quant)  # importing them registers the rules


def rule_ids() -> list[str]:
    """Every rule function's name, in the order they run (model rules, then graph rules)."""
    return [fn.__name__ for fn in (*MODEL_RULES, *GRAPH_RULES)]


def _load(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"'{path}' does not exist or is not a file | Fix: pass an .onnx file or a bundle directory")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise BadInputError(f"cannot read '{path}' as an ONNX model ({exc}) | Fix: pass a valid .onnx file") from exc


def _infer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """The model with inferred shapes; on failure the model as it is and the reason."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True), None
    except Exception as exc:
        return model, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def lint_model(model: onnx.ModelProto | str | Path, trt_version: str | None = None, *, name: str = "model") -> LintReport:
    """Lint one ONNX model for TensorRT.

    Args:
        model: the model, or the path of an .onnx file.
        trt_version: TensorRT version to lint for (10.3 to 11.x). Defaults to
            ``DEFAULT_TRT_VERSION`` (10.15, the newest operator matrix read).
        name: the graph's name in findings (a bundle's graph or stage name). Defaults to "model".

    Raises:
        BadInputError: the file is missing or not ONNX, or the version is outside 10.3 to 11.x.
    """
    version = trt_version or DEFAULT_TRT_VERSION
    matrix = matrix_for(version)
    target = str(model) if isinstance(model, (str, Path)) else name
    proto = _load(model) if isinstance(model, (str, Path)) else model
    inferred, failure = _infer(proto)
    ctx = Context(matrix, version, inferred)
    main = Scope(inferred.graph)
    scopes = list(walk(main))
    for function in inferred.functions:  # model-local functions: their bodies, untyped
        body = helper.make_graph(list(function.node), function.name, [], [])
        scopes.extend(walk(Scope(body, f"function {function.domain}::{function.name}", parent=None, is_main=False)))
    findings: list[Finding] = []
    if failure:
        findings.append(Finding("shape-inference", WARNING, None,
                                f"onnx shape inference failed ({failure}); rules that need shapes or types skipped what they could not see",
                                "run onnx.checker.check_model(model, full_check=True) and fix what it reports"))
    for model_rule in MODEL_RULES:
        findings.extend(model_rule(scopes, ctx))
    for scope in scopes:
        for graph_rule in GRAPH_RULES:
            findings.extend(graph_rule(scope, ctx))
    for finding in findings:
        finding.graph = name
    return LintReport(target, version, findings, matrix=matrix.name, graphs=[name])


def lint_path(path: str | Path, trt_version: str | None = None) -> LintReport:
    """Lint an .onnx file, or every graph a bundle's manifest lists (staged bundles: every stage).

    Args:
        path: an .onnx file or a bundle directory.
        trt_version: TensorRT version to lint for. Defaults to ``DEFAULT_TRT_VERSION``.

    Raises:
        BadInputError: missing or unreadable file, not a bundle, or a bad version.
    """
    path = Path(path)
    version = trt_version or DEFAULT_TRT_VERSION
    if not path.is_dir():
        report = lint_model(path, version, name=path.stem)
        report.target = str(path)
        return report
    from slimdeploy.bundle import load_bundle

    bundle = load_bundle(path)
    graphs = bundle.graphs
    if not graphs:
        raise BadInputError(f"bundle '{path}' lists no graphs in its manifest | Fix: re-export it")
    report = LintReport(str(path), version, matrix=matrix_for(version).name)
    for graph in graphs:
        single = lint_model(bundle.file(graph["file"]), version, name=graph["name"])
        report.findings.extend(single.findings)
        report.graphs.append(graph["name"])
    # The version warning concerns the target, not a graph: once per bundle, not once per stage.
    version_notes = [f for f in report.findings if f.rule == "trt-version"]
    if version_notes:
        version_notes[0].graph = ""
        report.findings = [f for f in report.findings if f.rule != "trt-version" or f is version_notes[0]]
    _fix_for_target(report, bundle.manifest, path)
    return report


# Rules an ONNX Runtime INT8 bundle breaks by design: its U8S8 form (unsigned activations,
# zero points not 0, INT32 biases) is what ONNX Runtime's kernels want, not TensorRT's S8S8.
ORT_INT8_RULES = frozenset({"qdq-zero-point", "qdq-type", "qdq-scale", "int8-outside-qdq", "uint8-tensor"})


def _fix_for_target(report: LintReport, manifest: Mapping[str, Any], path: Path) -> None:
    """Fixes that fit what the bundle is: an ONNX Runtime INT8 bundle is not repaired by hand
    but re-exported in TensorRT's form (its calibration ranges reused); a note says so."""
    if manifest.get("target") != "ort" or not report.findings:
        return
    source = (manifest.get("model") or {}).get("source") or "CHECKPOINT"
    if manifest.get("precision") == "int8":
        reexport = (f"re-export with --target trt, TensorRT's INT8 form (S8S8), reusing this bundle's calibration "
                    f"ranges: slimdeploy export {source} --precision int8 --target trt --calib {path}/calibration.json")
        for finding in report.findings:
            if finding.rule in ORT_INT8_RULES:
                finding.fix = reexport
        report.notes.append(f"'{path}' is an ONNX Runtime INT8 bundle (--target ort: U8S8, what ONNX Runtime's kernels "
                            "run fast); TensorRT parses only symmetric signed INT8, so its quantization findings are "
                            "expected: re-export it with --target trt rather than edit the graph")
    else:
        report.notes.append(f"'{path}' was exported for ONNX Runtime (--target ort) | Fix: for TensorRT, re-export "
                            f"with --target trt (slimdeploy export {source} --target trt), which also lints every graph")


def lint_graphs(graphs: Mapping[str, onnx.ModelProto]) -> dict[str, Any]:
    """The lint of every graph of an export, as the manifest's ``trt.lint`` records it:
    ``{"ran", "passed", "graphs": {name: report}}`` (the CLI exits 1 when it did not pass)."""
    reports = {name: lint_model(graph, name=name) for name, graph in graphs.items()}
    return {
        "ran": True,
        "passed": all(report.passed for report in reports.values()),
        "graphs": {name: report.to_dict() for name, report in reports.items()},
    }
