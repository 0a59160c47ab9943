"""The plain deploy recipe, and the contract every family's recipe follows.

A recipe is what a family of architectures contributes to a deployment, so that the export
pipeline stays generic (as Optimum keeps one ``OnnxConfig`` per architecture and one exporter):

- ``check_options``: refuse options that do not apply to the family, before any work;
- ``choose_form``: the dynamic forms it supports and the default per target;
- ``deploy``: the deploy transforms for a target and precision (condense, folds), which give the
  module that is exported and the one parity compares against; ``reference_module`` gives the
  latter again from a bundle's ``reference.pt``;
- ``count_macs``: how its MACs are counted;
- ``output_names``, ``decisions``, ``thresholds``: its outputs, decision specs and threshold
  inputs with their defaults;
- ``decision_bits``: what the held-out samples must cover (every decision seen both ways);
- ``export_graphs``: the graphs of a form (one graph, or one per piece) and their plan;
- ``io_specs`` and ``plan_fields``: what the manifest records about inputs, outputs and pieces.

``DeployRecipe`` itself is the plain recipe: a static model exported as it is, one graph, one
``logits`` output. Families override what differs (``recipes/gated.py``, ``early_exit.py``,
``condensenet.py``, ``spconv.py``); networks built with the decision protocol get
``recipes/discovered.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from slimdeploy.errors import BadInputError

if TYPE_CHECKING:
    from slimdeploy.engines.base import TensorMeta
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.flops import MacsReport
    from slimdeploy.loading import LoadedModel
    from slimdeploy.parity import DecisionSpec

Progress = Callable[[str], None]


@dataclass
class Deployment:
    """What a recipe's deploy transforms made of a loaded checkpoint.

    Attributes:
        module: the module that is exported.
        arch, args: its architecture and arguments (the manifest's ``deployed_arch``).
        reference: the module parity compares against (the loaded one, unless a transform
            changes the model's function on purpose, as ``--condense-classifier`` does).
        reference_arch, reference_args: its architecture and arguments (``reference.pt``).
        design: the module whose MACs are the model's as designed (folds may store some
            convolutions dense, which ``graph_macs`` then counts).
        transforms: names of the transforms applied, in order (manifest ``model.transforms``).
        folds: count of each fold (manifest ``model.folds``).
        stored_module: the module whose weights ``reference.pt`` stores, which
            ``reference_arch`` builds; None stores ``reference`` itself (a discovered network
            stores the user's model, not the adapter around it).
    """

    module: Any
    arch: str
    args: dict[str, Any]
    reference: Any
    reference_arch: str
    reference_args: dict[str, Any]
    design: Any
    transforms: list[str] = field(default_factory=list)
    folds: dict[str, int] = field(default_factory=dict)
    stored_module: Any = None

    @classmethod
    def as_loaded(cls, loaded: LoadedModel) -> Deployment:
        """The loaded model exported as it is."""
        return cls(loaded.module, loaded.arch, loaded.arch_args, loaded.module, loaded.arch, loaded.arch_args,
                   loaded.module)


class DeployRecipe:
    """The plain recipe: a static model exported as it is (see the module docstring).

    Class attributes:
        name: the recipe's name (the family it serves, or ``"plain"``).
        decision_kind: ``None`` (static), ``"gated"`` or ``"early_exit"``: the kind of
            decision the model makes per sample (the staged controller follows it).
        forms: the dynamic forms it can be exported in (empty for static models).
        default_forms: the default form per target.
        output_names: the graph outputs, in order.
    """

    name: ClassVar[str] = "plain"
    decision_kind: ClassVar[str | None] = None
    forms: ClassVar[tuple[str, ...]] = ()
    default_forms: ClassVar[Mapping[str, str]] = {}
    output_names: ClassVar[tuple[str, ...]] = ("logits",)

    def check_options(self, arch: str, options: ExportOptions) -> None:
        """Refuse options that do not apply to ``arch``, before any work."""
        if options.condense_classifier:
            raise BadInputError("--condense-classifier applies to the 'condensenet' (training form) architecture")

    def choose_form(self, dynamic: str | None, target: str) -> str | None:
        """The dynamic form: ``dynamic`` or the target's default; None for static models."""
        if not self.forms:
            if dynamic is not None:
                raise BadInputError(
                    f"--dynamic {dynamic} applies to models that make decisions (gates, exits); this "
                    "architecture is static | Fix: leave out --dynamic"
                )
            return None
        form = dynamic or self.default_forms[target]
        if form not in self.forms:
            what = "an early-exit" if self.decision_kind == "early_exit" else "a gated"
            raise BadInputError(f"unknown dynamic form '{form}' for {what} model | Note: expected one of {list(self.forms)}")
        if target == "trt":
            from slimdeploy.engines.trt_build import refuse_form

            refuse_form(form)
        return form

    def deploy(self, loaded: LoadedModel, options: ExportOptions, say: Progress) -> Deployment:
        """The deploy transforms for ``options.target`` and ``options.precision``. Plain: none."""
        return Deployment.as_loaded(loaded)

    def reference_module(self, loaded: LoadedModel) -> Any:
        """The module whose forward gives ``output_names`` for a checkpoint read back (a
        bundle's ``reference.pt``: ``check --data`` and ``bench``). Plain: the loaded module."""
        return loaded.module

    def count_macs(self, deployment: Deployment, input_size: tuple[int, ...]) -> tuple[MacsReport, int]:
        """MACs and parameters of the model as designed, and the MACs of the exported graph
        (more where a fold stores grouped convolutions dense)."""
        from slimdeploy.flops import count_macs

        macs = self.design_macs(deployment.design, input_size)
        graph_macs = count_macs(deployment.module, input_size).macs if deployment.folds else macs.macs
        return macs, graph_macs

    def design_macs(self, module: Any, input_size: tuple[int, ...]) -> MacsReport:
        """MACs per sample of ``module``'s forward (one sample of ``input_size``)."""
        from slimdeploy.flops import count_macs

        return count_macs(module, input_size)

    def thresholds(self, module: Any) -> dict[str, Any]:
        """Threshold inputs and their defaults (manifest ``decisions.thresholds``). Plain: none."""
        return {}

    def decisions(self, module: Any) -> list[DecisionSpec]:
        """The decision outputs parity judges (gates, exits). Plain: none."""
        return []

    def decision_bits(self, reference: Mapping[str, np.ndarray], module: Any) -> np.ndarray | None:
        """One row per sample, one 0/1 column per decision state that held-out samples should
        cover both ways; None when the model decides nothing (samples are taken in order)."""
        return None

    def export_graphs(self, module: Any, form: str | None, input_size: tuple[int, ...], spec: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The form's graphs by name (``model`` for single-graph forms) and, for deciding
        models, the plan of their pieces (how they connect, MACs per piece). Plain: one graph."""
        from slimdeploy import exporters
        from slimdeploy._optional import optional_import

        torch = optional_import("torch", "export a model")
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(exporters.onnx_export.EXAMPLE_BATCH, *input_size, generator=generator)
        return {"model": exporters.export_onnx(module, (example,), spec)}, None

    def io_specs(self, input_meta: TensorMeta, reference: Mapping[str, np.ndarray],
                 thresholds: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The manifest's ``inputs`` and ``outputs``: name, dtype and shape of each."""
        inputs = [{"name": input_meta.name, "dtype": np.dtype(input_meta.dtype).name, "shape": list(input_meta.shape)}]
        outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", int(reference["logits"].shape[1])]}]
        return inputs, outputs

    def plan_fields(self, plan: dict[str, Any] | None) -> dict[str, Any]:
        """The manifest's ``gating`` and ``exits`` (the staged controller and bench follow
        them). Plain: both empty."""
        return {"gating": {}, "exits": {}}


def pick_rows(bits: np.ndarray, count: int) -> np.ndarray:
    """``count`` row indices, chosen first so that every column of ``bits`` is seen as 0 and as
    1 where the rows allow (a greedy cover of the (column, state) pairs), then in order."""
    chosen: list[int] = []
    uncovered = {(column, state) for column in range(bits.shape[1]) for state in (0, 1)}
    seen = {(column, int(bits[row, column])) for row in range(len(bits)) for column in range(bits.shape[1])}
    uncovered &= seen
    while uncovered and len(chosen) < count:
        gains = [len(uncovered & {(c, int(bits[row, c])) for c in range(bits.shape[1])}) for row in range(len(bits))]
        best = int(np.argmax(gains))
        if gains[best] == 0:
            break
        chosen.append(best)
        uncovered -= {(c, int(bits[best, c])) for c in range(bits.shape[1])}
    rest = [row for row in range(len(bits)) if row not in chosen]
    return np.array(sorted(chosen + rest[: max(0, count - len(chosen))]), dtype=np.int64)
