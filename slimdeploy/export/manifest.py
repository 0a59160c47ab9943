"""Export stage 6: what the bundle holds, from the values the earlier stages made.

``bundle_contents`` returns the files (graphs, golden inputs and references, the parity report,
the calibration ranges, the PyTorch reference weights, the TensorRT build files) and the
manifest that describes them; ``bundle.write_bundle`` writes both atomically.
"""

from __future__ import annotations

import io
import json
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimdeploy.bundle import GOLDEN, REFERENCE_WEIGHTS, REPORT
from slimdeploy.calibration.stage import CALIBRATION_FILE
from slimdeploy.loading import is_factory_spec
from slimdeploy.versions import versions

if TYPE_CHECKING:
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.exporters.checked import CheckedGraphs
    from slimdeploy.held_out import HeldOut
    from slimdeploy.models import ArchInfo
    from slimdeploy.transforms.deploy import DeployedModel

MODEL_FILE = "model.onnx"
STAGES_DIR = "stages"


def graph_file(name: str) -> str:
    """The bundle-relative file of a graph: ``model.onnx``, or ``stages/NAME.onnx`` for a piece."""
    return MODEL_FILE if name == "model" else f"{STAGES_DIR}/{name}.onnx"


def bundle_contents(out: Path, deployed: DeployedModel, held_out: HeldOut, checked: CheckedGraphs,
                    options: ExportOptions, arch_info: ArchInfo | None, model_id: dict[str, str], notes: list[str],
                    started: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bundle's files (relative path → bytes or arrays) and its manifest.

    Args:
        out: the bundle directory (its name goes into the TensorRT build lines).
        deployed, held_out, checked: the earlier stages' values.
        options: the export options.
        arch_info: the architecture's registry entry, None for a module of an unregistered class.
        model_id: the checkpoint's architecture and ``weights_sha256`` (``loading.weights_digest``).
        notes: every note of the export, in order.
        started: ``time.perf_counter()`` when the export started (manifest ``export.seconds_total``).
    """
    loaded, deployment, exported = deployed.loaded, deployed.deployment, checked.exported
    golden: dict[str, np.ndarray] = {"input": held_out.inputs, **{f"ref_{k}": v for k, v in held_out.reference.items()}}
    if held_out.labels is not None:
        golden["labels"] = held_out.labels
    graph_files = {name: graph_file(name) for name in exported.graphs}
    inputs_spec, outputs_spec = deployed.recipe.io_specs(deployed.input_meta, held_out.reference, deployed.thresholds)
    report = checked.report
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "model": {
            "arch": loaded.arch,
            "arch_args": loaded.arch_args,
            "deployed_arch": deployment.arch,
            "transforms": deployment.transforms,
            "folds": deployment.folds,
            "family": arch_info.family if arch_info else "custom",
            "dynamic": deployed.recipe.decision_kind is not None,
            # The user's code that builds the model (--arch module:factory), None for a
            # registered architecture: check --data and bench need it named again to run it.
            "factory": loaded.arch if is_factory_spec(loaded.arch) else None,
            "source": Path(loaded.source).name,
            "params": deployed.macs.params,
            "macs": deployed.macs.macs,
            # Identifies the checkpoint (bench refuses a --baseline of other weights).
            "weights_sha256": model_id["weights_sha256"],
            "graph_macs": deployed.graph_macs,
            "meta": loaded.meta,
        },
        # What the inputs must be, and where each part came from (checkpoint, default, option).
        "preprocessing": {**loaded.preprocessing.to_dict(), "source": dict(loaded.preprocessing_source)},
        "target": options.target,
        "dynamic": exported.form,
        "precision": options.precision,
        # Reduced precision: how it was made (calibration source, size, method, synthetic or
        # not, decision heads kept FP32) and its agreement with the FP32 graphs.
        "calibration": checked.calibration,
        # The CPU runtime `run`, `check` and `bench` use by default, and the timing that chose it.
        "runtime": checked.runtime,
        "opset": exported.opset,
        "inputs": inputs_spec,
        "outputs": outputs_spec,
        "graphs": [{"name": name, "file": file} for name, file in graph_files.items()],
        "decisions": {
            "outputs": [d.to_dict() for d in deployed.decisions],
            "thresholds": dict(deployed.thresholds),
        },
        # Gated models: how the pieces connect and what each costs (the staged controller
        # follows it; bench predicts MACs from it). Early-exit models: the stage pieces, what
        # each carries to the next, MACs per stage.
        **deployed.recipe.plan_fields(exported.plan),
        "stages": list(exported.graphs) if exported.form == "staged" else [],
        "golden": {
            "file": GOLDEN, "samples": len(held_out.inputs), "batch_sizes": list(report.batch_sizes),
            "source": held_out.source, "labels": held_out.labels is not None, "reference": "torch",
        },
        "tolerances": report.tolerances,
        "parity": report.summary(),
        "export": {
            "seconds_total": None,  # filled below, just before the bundle is written
            "seconds_torch_export": round(exported.seconds, 3),
            "simplify": checked.simplify,
            "peak_rss_mb": None,
            "notes": notes,
        },
    }
    files: dict[str, Any] = {
        **{graph_files[name]: graph.SerializeToString() for name, graph in exported.graphs.items()},
        GOLDEN: golden,
        REPORT: (json.dumps(report.to_dict(), indent=2) + "\n").encode(),
    }
    if checked.record is not None:
        files[CALIBRATION_FILE] = checked.record
    if options.reference_weights and (arch_info is not None or is_factory_spec(loaded.arch)):
        # The PyTorch weights ride along (weights_only format) so that, where torch is
        # installed, `check --data` can compute fresh references and `bench` can time PyTorch
        # (a model built by the user's code: when they name that code again).
        from slimdeploy.loading import save_checkpoint

        buffer = io.BytesIO()
        stored = deployment.reference if deployment.stored_module is None else deployment.stored_module
        save_checkpoint(buffer, stored, deployment.reference_arch, deployment.reference_args,
                        loaded.preprocessing, loaded.meta)
        files[REFERENCE_WEIGHTS] = buffer.getvalue()
        manifest["reference_weights"] = REFERENCE_WEIGHTS
    else:
        manifest["reference_weights"] = None
    if options.target == "trt":
        manifest["trt"], trt_files = _trt_build(out, checked, graph_files, options)
        files.update(trt_files)
    manifest["export"]["seconds_total"] = round(time.perf_counter() - started, 3)
    manifest["export"]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return files, manifest


def _trt_build(out: Path, checked: CheckedGraphs, graph_files: dict[str, str], options: ExportOptions) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest's ``trt`` (how to build the engines on the target, and the TensorRT lint of
    every graph) and the build files (``BUILD.md``, ``build.sh``)."""
    from slimdeploy.engines import trt_build
    from slimdeploy.exporters.trt_lint import lint_graphs

    graphs, form = checked.graphs, checked.exported.form
    plan = trt_build.build_plan({name: (graph_files[name], graph) for name, graph in graphs.items()},
                                options.build_spec or trt_build.BuildSpec(), form, bundle_name=out.name)
    plan["lint"] = lint_graphs(graphs)
    files = {trt_build.BUILD_README: trt_build.build_readme(plan, form).encode(),
             trt_build.BUILD_SCRIPT: trt_build.build_script(plan).encode()}
    return plan, files
