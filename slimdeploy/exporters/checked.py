"""Export stage 4: the exported graphs checked against PyTorch, then simplified and re-checked.

onnxslim's graph is kept when it passes parity (or when the exported graph failed too); if
simplification fails or breaks parity, the exported graph is kept and a note says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.exporters.forms import ExportedGraphs
    from slimdeploy.held_out import HeldOut
    from slimdeploy.parity import ParityReport


@dataclass
class CheckedGraphs:
    """Graphs with their parity report against PyTorch.

    Attributes:
        exported: the graphs (and what runs them).
        report: their parity report.
        simplify: what onnxslim did (manifest ``export.simplify``).
        notes: what the user should know (simplification kept out, calibration choices).
        warnings: what the user must not miss (a reduced precision slower than FP32), printed
            as warnings.
        calibration: reduced precision only: how it was made and its agreement with the FP32
            graphs (manifest ``calibration``). None for FP32.
        record: INT8 only: the calibration ranges (``calibration.json``), or None.
        runtime: the CPU runtime the bundle runs on by default and the timing that chose it
            (manifest ``runtime``, ``export.runtime.choose_cpu_runtime``). None until chosen.
    """

    exported: ExportedGraphs
    report: ParityReport
    simplify: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    record: bytes | None = None
    runtime: dict[str, Any] | None = None

    @property
    def graphs(self) -> dict[str, Any]:
        """Graph name → ``onnx.ModelProto``."""
        return self.exported.graphs


def check_and_simplify(exported: ExportedGraphs, held_out: HeldOut, options: ExportOptions,
                       say: Callable[[str], None]) -> CheckedGraphs:
    """Parity of the exported graphs; with ``options.simplify``, onnxslim, the full checker and
    parity again (see the module docstring for which graphs are kept)."""
    from slimdeploy.exporters.onnx_export import check_onnx
    from slimdeploy.exporters.simplify import simplify

    say("checking parity of the exported graph" + ("s" if len(exported.graphs) > 1 else ""))
    report = held_out.check(exported, options, "exported", say)
    if not options.simplify:
        return CheckedGraphs(exported, report, {"applied": False})
    say("simplifying with onnxslim")
    results = {name: simplify(graph) for name, graph in exported.graphs.items()}
    info: dict[str, Any] = {
        "applied": False,
        "nodes_before": sum(r.nodes_before for r in results.values()),
        "nodes_after": sum(r.nodes_after for r in results.values()),
    }
    errors = [f"{name}: {r.error}" for name, r in results.items() if r.error]
    if errors:
        return CheckedGraphs(exported, report, info, [f"onnxslim failed, kept the unsimplified graphs: {errors[0]}"])
    slimmed = exported.with_graphs({name: r.model for name, r in results.items()})
    for graph in slimmed.graphs.values():
        check_onnx(graph)
    say("re-checking parity after simplification")
    slim_report = held_out.check(slimmed, options, "simplified", say)
    if slim_report.passed or not report.passed:
        info["applied"] = True
        return CheckedGraphs(slimmed, slim_report, info)
    return CheckedGraphs(exported, report, info,
                         ["onnxslim's graph failed parity where the exported one passed; kept the exported graph"])
