"""The export pipeline: checkpoint → deployable model → ONNX graphs → checked graphs →
reduced-precision graphs → parity-checked bundle.

    result = export("model.pt", "bundle/")   # a checkpoint that names its architecture
    result.report.passed  # parity of the bundled graph against the PyTorch model

Each stage is a function in the folder of its stage, with a typed value between stages:

    load_checkpoint      loading.py               → LoadedModel
    deploy_model         transforms/deploy.py     → DeployedModel   (the family recipe's transforms)
    held_out_samples     held_out.py              → HeldOut         (parity inputs, PyTorch reference)
    export_graphs        exporters/forms.py       → ExportedGraphs  (torch.export, onnx.checker)
    check_and_simplify   exporters/checked.py     → CheckedGraphs   (parity, onnxslim, parity again)
    reduce_precision     calibration/stage.py     → CheckedGraphs   (FP16 / INT8, parity, vs FP32)
    choose_cpu_runtime   export/runtime.py        → CheckedGraphs   (the default CPU runtime, timed)
    bundle_contents      export/manifest.py       → files and manifest, written atomically

What is special about a family (transforms, forms, outputs, decisions, sample cover, MACs,
manifest fields) is its deploy recipe (``slimdeploy.recipes``); this module names none. A
network of no registered family that is built with the decision protocol (``slimdeploy.nn``:
``GatedBlock``, ``Exit``) gets the recipe that discovers its decisions. The
options travel as one frozen ``ExportOptions``. A bundle whose parity fails is still written, so
it can be inspected; the caller decides the exit code (the CLI exits 1). The ONNX of a TensorRT
bundle is checked in ONNX Runtime exactly as for ``ort``; its engines are built on the target.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slimdeploy.export.options import ExportOptions
from slimdeploy.loading import weights_digest
from slimdeploy.parity import ParityReport

__all__ = ["ExportOptions", "ExportResult", "export", "weights_digest"]

Progress = Callable[[str], None]


@dataclass
class ExportResult:
    """What ``export`` produced: the bundle path, its manifest, the final parity report, notes
    and warnings (a reduced precision slower than FP32 on this CPU)."""

    bundle: Path
    manifest: dict[str, Any]
    report: ParityReport
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report.passed

    @property
    def lint_passed(self) -> bool:
        """False only when the TensorRT lint ran and found errors (``trt`` target)."""
        lint = (self.manifest.get("trt") or {}).get("lint") or {}
        return lint.get("passed") is not False


def export(checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None, *,
           progress: Progress | None = None, **changes: Any) -> ExportResult:
    """Export a checkpoint to a parity-checked bundle.

    Args:
        checkpoint: checkpoint file (slimdeploy format, foreign state_dict, or pickled module
            with ``trust_pickle``).
        out: bundle directory to create.
        options: the export options (``ExportOptions``, which documents each and its default).
            Defaults to ``ExportOptions()``.
        progress: callable told the name of each step. Defaults to silence.
        changes: option fields by name, applied over ``options`` (``export(c, o, precision="int8")``).
    """
    from slimdeploy._optional import optional_import
    from slimdeploy.bundle import bundle_size_hint, ensure_writable, write_bundle

    options = ExportOptions.of(options, **changes)
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    out = ensure_writable(out, options.force, bundle_size_hint(checkpoint))  # fail before any work
    optional_import("torch", "export a model")
    # The stages import torch (transforms, exporters): only once it is known to be there.
    from slimdeploy.calibration import check_precision
    from slimdeploy.calibration.stage import read_calibration, reduce_precision
    from slimdeploy.export.manifest import bundle_contents
    from slimdeploy.export.runtime import choose_cpu_runtime
    from slimdeploy.exporters.checked import check_and_simplify
    from slimdeploy.exporters.forms import export_graphs
    from slimdeploy.held_out import REFERENCE_BATCH, held_out_samples
    from slimdeploy.limits import check_model_fits
    from slimdeploy.loading import choose_preprocessing, load_checkpoint
    from slimdeploy.models import find_arch
    from slimdeploy.recipes import recipe_for
    from slimdeploy.transforms.deploy import deploy_model

    say("loading checkpoint")
    loaded = load_checkpoint(checkpoint, arch=options.arch, arch_args=options.arch_args, trust_pickle=options.trust_pickle)
    if loaded.estimate is not None:  # the reference runs REFERENCE_BATCH rows at a time
        check_model_fits(loaded.estimate, loaded.arch, batch=max(REFERENCE_BATCH, *options.batch_sizes))
    # --input-size/--mean/--std over what the checkpoint records (or the defaults), noted.
    choice = choose_preprocessing(loaded, options.input_size, options.mean, options.std,
                                  batch=max(REFERENCE_BATCH, *options.batch_sizes))
    loaded = replace(loaded, preprocessing=choice.preprocessing, preprocessing_source=choice.sources,
                     notes=[*loaded.notes, *choice.notes])
    info = find_arch(loaded.arch)
    recipe = recipe_for(info.family if info else None, loaded.module)
    form = recipe.choose_form(options.dynamic, options.target)
    check_precision(options.precision, form)  # refuse int8 for 'if' and 'loop' before the long work
    recipe.check_options(loaded.arch, options)
    # Calibration data (or stored ranges) is read and checked now, before the long work.
    model_id = {"arch": loaded.arch, "weights_sha256": weights_digest(loaded.module)}
    calibration = read_calibration(options.calib, options.calib_size, loaded.preprocessing, loaded.meta,
                                   model_id) if options.precision == "int8" else None

    deployed = deploy_model(loaded, recipe, form, options, say)
    held_out = held_out_samples(deployed, options, say)
    exported = export_graphs(deployed, options, say)
    checked = check_and_simplify(exported, held_out, options, say)
    if options.precision != "fp32":
        checked = reduce_precision(checked, held_out, calibration, model_id, options, say)
    checked = choose_cpu_runtime(checked, held_out, options, say)

    say("writing the bundle")
    notes = [*loaded.notes, *_target_notes(form, options), *held_out.notes, *checked.notes]
    files, manifest = bundle_contents(out, deployed, held_out, checked, options, info, model_id, notes, started)
    return ExportResult(write_bundle(out, files, manifest, force=options.force), manifest, checked.report, notes,
                        checked.warnings)


def _target_notes(form: str | None, options: ExportOptions) -> list[str]:
    """What the target says about the chosen form (TensorRT: the ``if`` and ``loop`` forms' caveats)."""
    if options.target != "trt":
        return []
    from slimdeploy.engines.trt_build import FORM_WARNINGS

    return [FORM_WARNINGS[form]] if form in FORM_WARNINGS else []
