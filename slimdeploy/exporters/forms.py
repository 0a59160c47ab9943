"""Export stage 3: the deployable model becomes ONNX graphs in its dynamic form.

``export_graphs`` runs torch.export through the family recipe (one graph for static models and
the composed forms; one graph per piece for ``staged``) and the full ``onnx.checker``.
``ExportedGraphs`` carries the graphs with what runs them (form, plan, thresholds), so every
later stage (parity, simplification, reduced precision) builds its runner the same way and a
bundle runs exactly as it was checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimdeploy.engines.base import Runner, TensorMeta
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.transforms.deploy import DeployedModel


@dataclass(frozen=True)
class ExportedGraphs:
    """ONNX graphs of one form and what runs them.

    Attributes:
        graphs: graph name → ``onnx.ModelProto`` (``model``, or one per piece for ``staged``).
        form: the dynamic form (None for static models).
        plan: how the pieces connect and what each costs (gated and early-exit models), as the
            manifest's ``gating`` / ``exits`` record it; None for static models.
        input_meta: the image input.
        thresholds: threshold inputs and their defaults.
        opset: the ONNX opset.
        seconds: how long torch.export took.
    """

    graphs: dict[str, Any]
    form: str | None
    plan: dict[str, Any] | None
    input_meta: TensorMeta
    thresholds: Mapping[str, Any]
    opset: int
    seconds: float = 0.0

    def runner(self, threads: int = 0, profile: bool = False, backend: str = "onnxruntime") -> Runner:
        """A runner over the in-memory graphs (the staged controller for ``staged``), with
        ``threads`` intra-op threads (0: the runtime's choice); with ``profile``, its sessions
        record their nodes' times (``engines.ort_profile``). ``backend``: ``"onnxruntime"``
        (the default) or ``"openvino"``."""
        from slimdeploy.engines.factory import make_runner

        sources = {name: graph.SerializeToString() for name, graph in self.graphs.items()}
        return make_runner(sources, self.form, self.input_meta, plan=self.plan,
                           decision_defaults=dict(self.thresholds), threads=threads, profile=profile, backend=backend)

    def with_graphs(self, graphs: dict[str, Any]) -> ExportedGraphs:
        """The same form with other graphs (simplified, reduced precision)."""
        return replace(self, graphs=graphs)


def export_graphs(deployed: DeployedModel, options: ExportOptions, say: Callable[[str], None]) -> ExportedGraphs:
    """torch.export the deployed module in its form, then check every graph with the full
    onnx.checker."""
    from slimdeploy.exporters.onnx_export import DEFAULT_OPSET, ExportSpec, check_onnx

    form = deployed.form
    say(f"exporting with torch.export{f' ({form} form)' if form else ''}")
    started = time.perf_counter()
    spec = ExportSpec(output_names=deployed.output_names, opset=options.opset or DEFAULT_OPSET)
    graphs, plan = deployed.recipe.export_graphs(deployed.deployment.module, form, deployed.input_size, spec)
    seconds = time.perf_counter() - started
    for graph in graphs.values():
        check_onnx(graph)
    return ExportedGraphs(graphs, form, plan, deployed.input_meta, deployed.thresholds, spec.opset, seconds)
