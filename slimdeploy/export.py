"""The export pipeline: checkpoint → ONNX → simplified ONNX → parity-checked bundle.

    result = export("model.pt", "bundle/", arch="spconv_resnet20_cifar")
    result.report.passed  # parity of the bundled graph against the PyTorch model

Steps (DESIGN.md §2): load the checkpoint; pick held-out inputs (digits held-out split at the
model's input size, or ``data``); run the PyTorch reference; export with torch.export; run the
full onnx.checker; check parity; simplify with onnxslim, re-check the graph and parity (and
keep the unsimplified graph if simplification broke parity); with ``precision`` fp16 or int8,
convert the simplified graphs (``slimdeploy.calibration``: INT8 calibrated once, ranges kept in
``calibration.json``) and check them against PyTorch with the precision's tolerances and
agreement criteria, and against the FP32 graphs; for ``target="trt"``, lint the graphs for
TensorRT and record the engine build (``slimdeploy build DIR`` and the equivalent ``trtexec``
lines, ``BUILD.md``, ``build.sh``); write the bundle atomically. The ONNX of a TensorRT bundle
is checked in ONNX Runtime exactly as for ``ort``, so the bundle is proven before any engine
exists; the engines are built on the target. A bundle whose parity fails is still written, so
it can be inspected; the caller decides the exit code (the CLI exits 1).
"""

from __future__ import annotations

import hashlib
import io
import json
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.bundle import GOLDEN, REFERENCE_WEIGHTS, REPORT, ensure_writable, write_bundle
from slimdeploy.engines.base import TensorMeta, check_feed
from slimdeploy.errors import BadInputError, InputValidationError
from slimdeploy.files import read_arrays
from slimdeploy.limits import check_export_options, check_model_fits
from slimdeploy.parity import DecisionSpec, ParityReport, check_parity, check_rows, run_batches
from slimdeploy.tolerance import fp32_tolerances
from slimdeploy.versions import versions

CALIBRATION_FILE = "calibration.json"
# --calib-method auto: calibrate with each and keep the closest to FP32 (see _best_calibration).
AUTO_CALIB = "auto"
AUTO_METHODS = ("MinMax", "Percentile")

TARGETS = ("ort", "trt")
DEFAULT_SAMPLES = 32
# Reduced precision is judged on agreement rates, which need more samples than 32.
DEFAULT_SAMPLES_REDUCED = 100
DEFAULT_BATCH_SIZES = (1, 16)
MODEL_FILE = "model.onnx"
STAGES_DIR = "stages"
GATED_FORMS = ("mask", "if", "compact", "staged")
EXIT_FORMS = ("mask", "if", "staged")
# Default dynamic form per target and family. Gated: compact routes per sample inside one flat
# graph. Early exits: staged, the form that saves at every batch size (benchmarks/early_exit.py).
# TensorRT gets staged for both (one engine per piece, decisions on the host: tensorrt-facts.md
# "Control flow").
DEFAULT_FORMS = {"ort": "compact", "trt": "staged"}
DEFAULT_EXIT_FORMS = {"ort": "staged", "trt": "staged"}
GATED_OUTPUTS = ("logits", "gates", "gate_probs")
EXIT_OUTPUTS = ("logits", "exit_stage", "exit_confidence")
# Targets whose kernels run small grouped 3x3 convolutions slower than the dense equivalent
# (benchmarks/condensenet.py), so folding stores them dense: CondenseNet absorbs the shuffle,
# SPConv absorbs pwc into the 3x3 taps.
EXPAND_GROUPED_3X3 = ("ort",)
DEFAULT_GATE_THRESHOLD = 0.5
# Families whose models decide per sample, and the kind of decision they make.
DECISION_FAMILIES = {"skipnet": "gated", "early_exit": "early_exit"}

Progress = Callable[[str], None]


@dataclass
class ExportResult:
    """What ``export`` produced: the bundle path, its manifest and the final parity report."""

    bundle: Path
    manifest: dict[str, Any]
    report: ParityReport
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report.passed

    @property
    def lint_passed(self) -> bool:
        """False only when the TensorRT lint ran and found errors (``trt`` target)."""
        lint = (self.manifest.get("trt") or {}).get("lint") or {}
        return lint.get("passed") is not False


def load_data_file(path: str | Path, input_name: str = "input") -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs (and labels, when present) from an .npz (keys ``input``, optional ``labels``) or
    an .npy file holding the input array."""
    arrays = read_arrays(path, default_name=input_name)
    if input_name not in arrays:
        raise InputValidationError(
            f"'{path}' has no array '{input_name}' (has {sorted(arrays)}) | Fix: save the inputs "
            f"with np.savez(path, {input_name}=x, labels=y)"
        )
    return arrays[input_name], arrays.get("labels")


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    target: str = "ort",
    dynamic: str | None = None,
    condense_classifier: bool = False,
    fold: bool = True,
    trust_pickle: bool = False,
    force: bool = False,
    data: str | Path | None = None,
    samples: int | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    opset: int | None = None,
    simplify: bool = True,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    threads: int = 0,
    reference_weights: bool = True,
    build_spec: Any = None,
    precision: str = "fp32",
    calib: str | Path | None = None,
    calib_size: int | None = None,
    calib_method: str = AUTO_CALIB,
    quantize_decisions: bool = False,
    bias_correction: bool = True,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a checkpoint to a parity-checked bundle.

    Args:
        checkpoint: checkpoint file (slimdeploy format, foreign state_dict, or pickled module
            with ``trust_pickle``).
        out: bundle directory to create.
        arch: registered architecture; needed when the checkpoint does not name one.
        arch_args: constructor arguments overriding the checkpoint's and the inferred ones.
        target: ``"ort"`` (ONNX Runtime) or ``"trt"`` (TensorRT: the bundle also records how
            to build the engines on the target). Defaults to ``"ort"``.
        dynamic: form of a gated model (``mask``, ``if``, ``compact`` or ``staged``) or of an
            early-exit model (``mask``, ``if`` or ``staged``). Defaults to the target's
            (``ort``: ``compact`` for gated models, ``staged`` for early exits; ``trt``:
            ``staged``, and ``compact`` is refused); must be None for static models.
        condense_classifier: CondenseNet: also prune the classifier as the official converter
            does (lossy; parity is then against the condensed PyTorch model). Defaults to False:
            the classifier stays exact and parity is against the learned model.
        fold: fold what the constants allow before export (the manifest's ``model.folds``
            says what; parity is against the unfolded model). CondenseNet: BatchNorm, ReLU
            placement and the channel shuffle into the condensed convolutions
            (``transforms.fold``). CondenseNetV2: each sparse feature reactivation stored as one
            dense 1x1 convolution (``transforms.condense_v2.fold_sfr``). SPConv ResNets, INT8
            only: BatchNorm, pooling, the channel split and the attention into a form that is
            quantized end to end (``transforms.fold_spconv``). Defaults to True.
        trust_pickle: allow a pickled ``nn.Module`` checkpoint (runs code). Defaults to False.
        force: replace an existing ``out``. Defaults to False.
        data: .npz/.npy with parity inputs (and labels). Defaults to the digits held-out split.
        samples: how many held-out samples the parity check and golden file use. Defaults to 32
            (100 for fp16 and int8, which pass on agreement rates).
        batch_sizes: batch sizes the candidate is checked at. Defaults to (1, 16).
        opset: ONNX opset. Defaults to 18.
        simplify: simplify with onnxslim (and re-check). Defaults to True.
        tolerances: per-output (atol, rtol), ``""`` the default, used as given. Defaults to
            the precision's; for FP32 measured per output (``tolerance.fp32_tolerances``:
            atol max(1e-4, 10x PyTorch's float32 noise), rtol 1e-3), stored in the manifest.
        threads: ONNX Runtime intra-op threads for the check; 0 = ORT's choice. Defaults to 0.
        reference_weights: store the PyTorch weights in the bundle (``reference.pt``) for
            ``check --data`` and ``bench`` where torch is installed. Defaults to True.
        build_spec: ``trt`` only: a ``trt_build.BuildSpec`` (batch range, workspace). Defaults
            to ``BuildSpec()`` (batch 1/8/32, 1024 MiB).
        precision: ``fp32``, ``fp16`` or ``int8`` (QDQ in the target's form). Defaults to fp32.
        calib: INT8 calibration data: ``digits``, an image folder, an .npy/.npz of inputs,
            ``synthetic`` (random, flagged), or a ``calibration.json`` / bundle whose stored
            ranges are reused without recalibrating. Defaults to ``digits`` for models trained
            on digits; others must name their data.
        calib_size: calibration samples to use. Defaults to 100 (the digits calibration split).
        calib_method: ``auto``, ``MinMax``, ``Entropy`` or ``Percentile``. Defaults to ``auto``
            (MinMax and Percentile both tried, the one closer to FP32 on the calibration images kept).
        quantize_decisions: also reduce the precision of gate and exit heads. Defaults to False
            (decision heads stay FP32).
        bias_correction: INT8: shift each quantized Conv/Gemm's bias by its mean output error
            per channel against FP32 on the calibration images (``calibration.bias_correction``).
            Defaults to True.
        progress: callable told the name of each step. Defaults to silence.
    """
    from slimdeploy import exporters
    from slimdeploy._optional import optional_import
    from slimdeploy.calibration import CalibrationSet, agreement, apply_precision, check_precision
    from slimdeploy.calibration.ranges import DEFAULT_METHOD, check_method
    from slimdeploy.engines.factory import make_runner
    from slimdeploy.engines.torch_runner import TorchRunner
    from slimdeploy.flops import count_macs, count_macs_of
    from slimdeploy.loading import load_checkpoint, save_checkpoint

    say = progress or (lambda _message: None)
    if target not in TARGETS:
        raise BadInputError(f"unknown target '{target}' | Note: expected one of {list(TARGETS)}")
    check_precision(precision, None)
    if precision != "int8" and (calib is not None or calib_size is not None):
        raise BadInputError(f"--calib and --calib-size apply to --precision int8, not {precision} | Fix: leave them out, or pass --precision int8")
    if samples is None:
        samples = DEFAULT_SAMPLES if precision == "fp32" else DEFAULT_SAMPLES_REDUCED
    check_export_options(samples, batch_sizes, threads, calib_size, tolerances)
    out = ensure_writable(out, force)  # fail before any work
    started = time.perf_counter()
    torch = optional_import("torch", "export a model")
    notes: list[str] = []

    say("loading checkpoint")
    loaded = load_checkpoint(checkpoint, arch=arch, arch_args=arch_args, trust_pickle=trust_pickle)
    notes.extend(loaded.notes)
    if loaded.estimate is not None:  # the reference runs 64 rows at a time, parity max(batch_sizes)
        check_model_fits(loaded.estimate, loaded.arch, batch=max(64, *batch_sizes))
    info = _registered(loaded.arch)
    kind = DECISION_FAMILIES.get(info.family) if info else None
    gated, early_exit = kind == "gated", kind == "early_exit"
    form = _choose_form(dynamic, kind, target)
    check_precision(precision, form)  # refuse int8 for 'if' before the long work
    if calib_method != AUTO_CALIB:
        check_method(calib_method)
    if target == "trt":
        from slimdeploy.engines import trt_build

        build_spec = build_spec or trt_build.BuildSpec()
        if form == "if":
            notes.append(trt_build.IF_WARNING)
    prep = loaded.preprocessing
    # Calibration data (or stored ranges) is read and checked now, before the long work.
    model_id = {"arch": loaded.arch, "weights_sha256": weights_digest(loaded.module)} if precision == "int8" else None
    calibration = _calibration_source(calib, calib_size, prep, loaded.meta, model_id) if precision == "int8" else None
    # The module that is exported, and the one parity compares against (the same unless a
    # deploy transform changes the model).
    deploy_module, deploy_arch, deploy_args = loaded.module, loaded.arch, loaded.arch_args
    reference_module, reference_arch, reference_args = loaded.module, loaded.arch, loaded.arch_args
    transforms: list[str] = []
    folds: dict[str, int] = {}
    if loaded.arch == "condensenetv2" and condense_classifier:
        raise BadInputError("--condense-classifier: the official CondenseNetV2 converter keeps the classifier "
                            "(and fc) as they are | Fix: drop --condense-classifier")
    if loaded.arch in _CONDENSED_ARCH:
        say("condensing learned group convolutions")
        deploy_module, deploy_arch, deploy_args = _condense(loaded.arch, loaded.module, condense_classifier)
        transforms.append("condense" + ("+classifier" if condense_classifier else ""))
        if condense_classifier:
            # The official lossy classifier changes the logits by design: compare the graph
            # with the condensed PyTorch model instead of the learned one.
            reference_module, reference_arch, reference_args = deploy_module, deploy_arch, deploy_args
    elif condense_classifier:
        raise BadInputError("--condense-classifier applies to the 'condensenet' (training form) architecture")
    # MACs of the model as designed; folding may store convolutions dense (graph_macs).
    macs_module = deploy_module
    if deploy_arch == "condensenet_converted" and fold:
        say("folding BatchNorm and channel shuffles into the condensed convolutions")
        deploy_module, folds = _fold(deploy_module, target, precision)
        transforms.append("fold")
    elif info is not None and info.family == "spconv" and fold and precision == "int8":
        # Only INT8 gains: the folded forms run slower than ONNX Runtime's own FP32 fusions
        # of the original graph (more MACs; benchmarks/README.md), but they remove the float
        # islands that break a quantized graph apart.
        say("folding BatchNorm, pooling and attention into the SPConv layers")
        deploy_module, folds = _fold_spconv(deploy_module)
        transforms.append("fold")
    elif deploy_arch == "condensenetv2_converted" and fold:
        say("storing the sparse feature reactivations as dense 1x1 convolutions")
        deploy_module, folds = _fold_v2(deploy_module)
        transforms.append("fold")
    input_meta = TensorMeta("input", np.dtype(np.float32), ("batch", *prep.input_size))
    output_names = list(GATED_OUTPUTS) if gated else list(EXIT_OUTPUTS) if early_exit else ["logits"]
    exit_thresholds = [float(t) for t in getattr(deploy_module, "exit_thresholds", [])]
    decisions = (
        [DecisionSpec("gates", "gate_probs", DEFAULT_GATE_THRESHOLD, threshold_input="gate_threshold")] if gated
        else [DecisionSpec("exit_stage", "exit_confidence", exit_thresholds, kind="exit", threshold_input="exit_thresholds")] if early_exit
        else []
    )

    say("preparing held-out inputs and the PyTorch reference")
    pool, pool_labels, data_source = _parity_inputs(
        data, prep, None if kind else samples, input_meta, trained_on_digits=loaded.meta.get("dataset") == "digits"
    )
    with TorchRunner(reference_module, {"input": input_meta}, output_names) as reference_runner:
        pool_reference = run_batches(reference_runner, {"input": pool}, batch_size=64)
    # Gated models: pick samples so that every gate is seen both open and closed where the
    # data allows (a gate frozen at trace time is the typical silent failure).
    # Early exits: every exit stage is seen (one-hot exit stages as decision bits).
    if gated:
        rows = _covering_rows(pool_reference["gates"], samples)
    elif early_exit:
        rows = _covering_rows(np.eye(len(exit_thresholds), dtype=np.uint8)[pool_reference["exit_stage"]], samples)
    else:
        rows = np.arange(len(pool))
    inputs = pool[rows]
    labels = pool_labels[rows] if pool_labels is not None else None
    notes.extend(_few_samples_note(precision, len(inputs)))
    reference = {name: value[rows] for name, value in pool_reference.items()}
    feed = {"input": inputs}
    say("measuring PyTorch's float32 noise (the reference once more in float64)" if not tolerances else "checking tolerances")
    fp32_tolerances_used, fp32_rule = fp32_tolerances(tolerances, reference_module, feed, reference, output_names,
                                                      [d.name for d in decisions])
    if early_exit:
        # forward stops at the first confident stage; the model's cost is every stage's.
        macs = count_macs_of(deploy_module, deploy_module.forward_all, torch.zeros(1, *prep.input_size))
    else:
        macs = count_macs(macs_module, prep.input_size)
    graph_macs = count_macs(deploy_module, prep.input_size).macs if folds else macs.macs

    say(f"exporting with torch.export{f' ({form} form)' if form else ''}")
    export_started = time.perf_counter()
    spec = exporters.ExportSpec(output_names=output_names, opset=opset or exporters.onnx_export.DEFAULT_OPSET)
    graphs, plan = _export_graphs(deploy_module, form, kind, prep.input_size, spec, torch)
    export_seconds = time.perf_counter() - export_started
    for graph in graphs.values():
        exporters.check_onnx(graph)
    threshold_defaults: dict[str, Any] = (
        {"gate_threshold": DEFAULT_GATE_THRESHOLD} if gated
        else {"exit_thresholds": exit_thresholds} if early_exit
        else {}
    )

    def runner_of(candidate: dict[str, Any]) -> Any:
        sources = {name: graph.SerializeToString() for name, graph in candidate.items()}
        return make_runner(sources, form, input_meta, plan=plan, decision_defaults=threshold_defaults, threads=threads)

    def parity(candidate: dict[str, Any], label: str, precision: str = "fp32") -> ParityReport:
        fp32 = precision == "fp32"
        with runner_of(candidate) as runner:
            return check_parity(runner, feed, reference, batch_sizes, "torch", precision=precision,
                                tolerances=fp32_tolerances_used if fp32 else tolerances,
                                labels=labels, decisions=decisions, batch_inputs=["input"],
                                progress=lambda step: say(f"{label}: {step}"),
                                tolerance_rule=fp32_rule if fp32 else None)

    say("checking parity of the exported graph" + ("s" if len(graphs) > 1 else ""))
    report = parity(graphs, "exported")
    simplified_info: dict[str, Any] = {"applied": False}
    if simplify:
        say("simplifying with onnxslim")
        results = {name: exporters.simplify(graph) for name, graph in graphs.items()}
        simplified_info = {
            "applied": False,
            "nodes_before": sum(r.nodes_before for r in results.values()),
            "nodes_after": sum(r.nodes_after for r in results.values()),
        }
        errors = [f"{name}: {r.error}" for name, r in results.items() if r.error]
        if errors:
            notes.append(f"onnxslim failed, kept the unsimplified graphs: {errors[0]}")
        else:
            slimmed = {name: r.model for name, r in results.items()}
            for graph in slimmed.values():
                exporters.check_onnx(graph)
            say("re-checking parity after simplification")
            slim_report = parity(slimmed, "simplified")
            if slim_report.passed or not report.passed:
                graphs, report = slimmed, slim_report
                simplified_info["applied"] = True
            else:
                notes.append("onnxslim's graph failed parity where the exported one passed; kept the exported graph")

    calibration_info: dict[str, Any] | None = None
    record_bytes: bytes | None = None
    if precision != "fp32":

        def convert(method: str, op_types: Sequence[str] | None = None, stored: Any = None) -> Any:
            return apply_precision(
                graphs, precision, target=target, form=form, plan=plan, input_meta=input_meta,
                calibration=stored or calibration, method=method, op_types=op_types,
                quantize_decisions=quantize_decisions, gate_threshold=DEFAULT_GATE_THRESHOLD,
                bias_correction=bias_correction,
                correction_data=calibration if isinstance(calibration, CalibrationSet) else None, progress=say,
            )

        if calib_method == AUTO_CALIB and precision == "int8" and isinstance(calibration, CalibrationSet):
            converted = _best_calibration(convert, runner_of, graphs, calibration.inputs, target,
                                          [d.name for d in decisions], say)
        else:
            converted = convert(DEFAULT_METHOD if calib_method == AUTO_CALIB else calib_method)
        notes.extend(converted.notes)
        say(f"checking parity of the {precision} graph" + ("s" if len(graphs) > 1 else ""))
        fp32_report = report
        report = parity(converted.graphs, precision, precision)
        # Agreement with the FP32 graphs as well as with PyTorch: what the precision changed.
        say(f"comparing the {precision} graphs with the FP32 graphs")
        with runner_of(graphs) as fp32_runner, runner_of(converted.graphs) as reduced_runner:
            largest = max(batch_sizes)
            fp32_out = run_batches(fp32_runner, feed, largest, ["input"])
            reduced_out = run_batches(reduced_runner, feed, largest, ["input"])
        calibration_info = {**converted.info, "vs_fp32": agreement(fp32_out, reduced_out),
                            "fp32_parity_passed": fp32_report.passed}
        if converted.record is not None:
            # Which checkpoint the ranges belong to: reusing them for another one is refused.
            converted.record.data["model"] = model_id
            record_bytes = converted.record.to_bytes()
            calibration_info["ranges"] = CALIBRATION_FILE
        graphs = converted.graphs

    say("writing the bundle")
    golden: dict[str, np.ndarray] = {"input": inputs, **{f"ref_{k}": v for k, v in reference.items()}}
    if labels is not None:
        golden["labels"] = labels
    graph_files = {name: (MODEL_FILE if name == "model" else f"{STAGES_DIR}/{name}.onnx") for name in graphs}
    inputs_spec = [_spec_dict(input_meta)]
    outputs_spec = [{"name": "logits", "dtype": "float32", "shape": ["batch", int(reference["logits"].shape[1])]}]
    if gated:
        n_gated = int(reference["gates"].shape[1])
        inputs_spec.append({"name": "gate_threshold", "dtype": "float32", "shape": [], "optional": True,
                            "default": DEFAULT_GATE_THRESHOLD})
        outputs_spec += [{"name": "gates", "dtype": "uint8", "shape": ["batch", n_gated]},
                         {"name": "gate_probs", "dtype": "float32", "shape": ["batch", n_gated]}]
    if early_exit:
        n_stages = len(exit_thresholds)
        inputs_spec.append({"name": "exit_thresholds", "dtype": "float32", "shape": [n_stages], "optional": True,
                            "default": exit_thresholds})
        outputs_spec += [{"name": "exit_stage", "dtype": "int64", "shape": ["batch"]},
                         {"name": "exit_confidence", "dtype": "float32", "shape": ["batch", n_stages]}]
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "model": {
            "arch": loaded.arch,
            "arch_args": loaded.arch_args,
            "deployed_arch": deploy_arch,
            "transforms": transforms,
            "folds": folds,
            "family": info.family if info else "custom",
            "dynamic": bool(info.dynamic) if info else False,
            "source": Path(loaded.source).name,
            "params": macs.params,
            "macs": macs.macs,
            # Identifies the checkpoint (bench refuses a --baseline of other weights).
            "weights_sha256": model_id["weights_sha256"] if model_id else weights_digest(loaded.module),
            "graph_macs": graph_macs,
            "meta": loaded.meta,
        },
        "preprocessing": prep.to_dict(),
        "target": target,
        "dynamic": form,
        "precision": precision,
        # Reduced precision: how it was made (calibration source, size, method, synthetic or
        # not, decision heads kept FP32) and its agreement with the FP32 graphs.
        "calibration": calibration_info,
        "opset": spec.opset,
        "inputs": inputs_spec,
        "outputs": outputs_spec,
        "graphs": [{"name": name, "file": file} for name, file in graph_files.items()],
        "decisions": {
            "outputs": [d.to_dict() for d in decisions],
            "thresholds": threshold_defaults,
        },
        # Gated models: how the pieces connect and what each costs (the staged controller
        # follows it; bench predicts MACs from it). Staged bundles list their stage graphs.
        "gating": plan if gated else {},
        # Early-exit models: the stage pieces, what each carries to the next, MACs per stage.
        "exits": plan if early_exit else {},
        "stages": list(graphs) if form == "staged" else [],
        "golden": {
            "file": GOLDEN, "samples": len(inputs), "batch_sizes": list(batch_sizes),
            "source": data_source, "labels": labels is not None, "reference": "torch",
        },
        "tolerances": report.tolerances,
        "parity": report.summary(),
        "export": {
            "seconds_total": None,  # filled below, just before the bundle is written
            "seconds_torch_export": round(export_seconds, 3),
            "simplify": simplified_info,
            "peak_rss_mb": None,
            "notes": notes,
        },
    }
    files: dict[str, Any] = {
        **{graph_files[name]: graph.SerializeToString() for name, graph in graphs.items()},
        GOLDEN: golden,
        REPORT: (json.dumps(report.to_dict(), indent=2) + "\n").encode(),
    }
    if record_bytes is not None:
        files[CALIBRATION_FILE] = record_bytes
    if reference_weights and info is not None:
        # The PyTorch weights ride along (weights_only format) so that, where torch is
        # installed, `check --data` can compute fresh references and `bench` can time PyTorch.
        buffer = io.BytesIO()
        save_checkpoint(buffer, reference_module, reference_arch, reference_args, prep, loaded.meta)
        files[REFERENCE_WEIGHTS] = buffer.getvalue()
        manifest["reference_weights"] = REFERENCE_WEIGHTS
    else:
        manifest["reference_weights"] = None
    if target == "trt":
        say("recording the TensorRT build")
        plan = trt_build.build_plan({name: (graph_files[name], graph) for name, graph in graphs.items()},
                                    build_spec, form, bundle_name=out.name)
        plan["lint"] = _lint_for_trt(graphs)
        manifest["trt"] = plan
        files[trt_build.BUILD_README] = trt_build.build_readme(plan, form).encode()
        files[trt_build.BUILD_SCRIPT] = trt_build.build_script(plan).encode()
    manifest["export"]["seconds_total"] = round(time.perf_counter() - started, 3)
    manifest["export"]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    bundle_path = write_bundle(out, files, manifest, force=force)
    return ExportResult(bundle_path, manifest, report, notes)


def _lint_for_trt(graphs: Mapping[str, Any]) -> dict[str, Any]:
    """The TensorRT lint (``exporters.trt_lint``) of every graph, for the manifest's
    ``trt.lint``: ``{"ran", "passed", "graphs": {name: report}}``; the CLI exits 1 when it did
    not pass."""
    from slimdeploy.exporters import trt_lint

    reports = {name: trt_lint.lint_model(graph, name=name) for name, graph in graphs.items()}
    return {
        "ran": True,
        "passed": all(report.passed for report in reports.values()),
        "graphs": {name: report.to_dict() for name, report in reports.items()},
    }


# Training-form architectures that export condenses, and the deploy architecture of each.
_CONDENSED_ARCH = {"condensenet": "condensenet_converted", "condensenetv2": "condensenetv2_converted"}


def _condense(arch: str, module: Any, condense_classifier: bool) -> tuple[Any, str, dict[str, Any]]:
    """The deploy form of a training-form CondenseNet or CondenseNetV2, its architecture and
    arguments."""
    from slimdeploy.models.condensenet import infer_condensenet_args
    from slimdeploy.transforms import condense

    if arch == "condensenetv2":
        from slimdeploy.transforms.condense_v2 import condense_v2

        deployed_v2 = condense_v2(module)
        # The learned model's own config: it also holds hs_start_block, which no key shows.
        return deployed_v2, _CONDENSED_ARCH[arch], dict(deployed_v2.config)
    deployed = condense(module, condense_classifier=condense_classifier)
    return deployed, "condensenet_converted", infer_condensenet_args(deployed.state_dict())


def _best_calibration(convert: Callable[..., Any], runner_of: Callable[[dict[str, Any]], Any],
                      graphs: dict[str, Any], images: np.ndarray, target: str, decision_names: Sequence[str],
                      say: Progress) -> Any:
    """``--calib-method auto``: the INT8 conversion to keep, judged against the FP32 graphs on
    the calibration images themselves (never the held-out parity samples).

    Two Q/DQ placements: full (every operator the quantizer handles) and on the compute-heavy
    operators only (``calibration.CONV_OPS``: fewer rounding points, concatenated features keep
    their own scales; in the TensorRT form only their inputs, TensorRT's own placement).

    1. The target's first placement (ONNX Runtime: full; TensorRT: its own) with each of
       ``AUTO_METHODS``: no method wins everywhere (Percentile clips the outliers MinMax
       stretches every scale for, which helps the SPConv demo; on CondenseNet's concatenated
       features the clipping hurts and MinMax is closer). The one with the lowest mean
       |logits - FP32| is kept if it meets the INT8 criteria (top-1 and decision agreement
       with FP32, ``parity.DEFAULT_CRITERIA``).
    2. Otherwise the same ranges (no recalibration) with the other placement (the S2D demo's
       exit decisions flip with full placement in the ONNX Runtime form). The best of all
       candidates is kept: meeting the criteria first, then decision agreement, top-1
       agreement, closeness.
    """
    from slimdeploy.calibration import CONV_OPS
    from slimdeploy.parity import DEFAULT_CRITERIA

    criteria = DEFAULT_CRITERIA["int8"]
    with runner_of(graphs) as runner:
        expected = run_batches(runner, {"input": images}, 32, ["input"])

    def score(candidate: Any, label: str) -> dict[str, float]:
        with runner_of(candidate.graphs) as runner:
            got = run_batches(runner, {"input": images}, 32, ["input"])
        result = {
            "logits_error": float(np.abs(got["logits"] - expected["logits"]).mean()),
            "top1_agreement": float((got["logits"].argmax(1) == expected["logits"].argmax(1)).mean()),
            "decision_agreement": min([float((got[n] == expected[n]).mean()) for n in decision_names], default=1.0),
        }
        say(f"{label}: mean |logits - FP32| {result['logits_error']:.4f}, top-1 agreement "
            f"{result['top1_agreement']:.1%}, decision agreement {result['decision_agreement']:.1%} on the calibration images")
        return result

    def acceptable(result: dict[str, float]) -> bool:
        return result["top1_agreement"] >= criteria["top1_agreement"] and result["decision_agreement"] >= criteria["decision_agreement"]

    placements: list[Sequence[str] | None] = [CONV_OPS, None] if target == "trt" else [None, CONV_OPS]

    def label(method: str, op_types: Sequence[str] | None) -> str:
        return method if op_types is None else f"{method}, Q/DQ on {'/'.join(op_types)} only"

    scores: dict[str, dict[str, float]] = {}
    candidates: dict[str, Any] = {}
    for method in AUTO_METHODS:
        name = label(method, placements[0])
        candidates[name] = convert(method, placements[0])
        scores[name] = score(candidates[name], name)
    chosen = min(scores, key=lambda name: scores[name]["logits_error"])
    if not acceptable(scores[chosen]):
        for method in AUTO_METHODS:
            name = label(method, placements[1])
            candidates[name] = convert(method, placements[1], stored=candidates[label(method, placements[0])].record)
            scores[name] = score(candidates[name], name)
        # Decisions first: they are what a dynamic model is about; then top-1, then closeness.
        chosen = max(scores, key=lambda name: (acceptable(scores[name]), scores[name]["decision_agreement"],
                                               scores[name]["top1_agreement"], -scores[name]["logits_error"]))
    best = candidates[chosen]
    best.info["method_choice"] = {
        "rule": f"{'Q/DQ on the Conv/Gemm/MatMul inputs only (TensorRT placement)' if target == 'trt' else 'full Q/DQ placement'} "
                "with the lowest mean |logits - FP32| on the calibration images if it meets the INT8 agreement "
                f"criteria, else the best of all candidates incl. {'full placement' if target == 'trt' else 'Q/DQ on Conv/Gemm/MatMul only'} "
                "(criteria met, decision agreement, top-1 agreement, closeness)",
        "chosen": chosen, "candidates": scores,
    }
    return best


def _fold(module: Any, target: str, precision: str) -> tuple[Any, dict[str, int]]:
    """A folded copy of a condensed CondenseNet (the original stays the parity reference) and
    the count of each fold. The 3x3 convolutions are stored dense (shuffle folded in) for ONNX
    Runtime, whose CPU kernels run them faster that way; other targets keep them grouped in FP32
    and FP16. INT8 also turns the channel Gathers and the BNs before a ReLU into convolutions,
    so the quantized graph needs no layout Transposes; an INT8 graph is the same for every
    target, so that its stored calibration ranges carry over to the other target."""
    import copy

    from slimdeploy.transforms.fold import fold_condensed

    dense = target in EXPAND_GROUPED_3X3 or precision == "int8"
    folded, report = fold_condensed(copy.deepcopy(module), expand_3x3=dense,
                                    gather_into_conv=precision == "int8")
    return folded, report.to_dict()


def _fold_spconv(module: Any) -> tuple[Any, dict[str, int]]:
    """A folded copy of an SPConv ResNet (the original stays the parity reference) and the
    count of each fold: the dense form (no channel split, every convolution dense: more MACs,
    fewer and faster quantized ops). Used for INT8 only, the same graph for every target, so
    that its stored calibration ranges carry over to the other target."""
    import copy

    from slimdeploy.transforms.fold_spconv import fold_spconv

    folded, report = fold_spconv(copy.deepcopy(module), dense=True)
    return folded, report.to_dict()


def _fold_v2(module: Any) -> tuple[Any, dict[str, int]]:
    """A copy of a condensed CondenseNetV2 whose sparse feature reactivations are dense 1x1
    convolutions (``transforms.condense_v2.fold_sfr``: far fewer MACs than the official 0/1
    index matrix); the original stays the parity reference."""
    import copy

    from slimdeploy.transforms.condense_v2 import fold_sfr

    folded, count = fold_sfr(copy.deepcopy(module))
    return folded, {"sfr_index_into_dense_conv": count}


def _few_samples_note(precision: str, samples: int) -> list[str]:
    """A note when one flipped answer among ``samples`` parity samples already breaks the
    precision's top-1 agreement criterion (fewer than 34 samples for INT8's 97 %)."""
    from slimdeploy.parity import DEFAULT_CRITERIA

    floor = DEFAULT_CRITERIA.get(precision, {}).get("top1_agreement")
    if floor is None or samples * (1.0 - floor) >= 1.0:
        return []
    enough = int(np.floor(1.0 / (1.0 - floor))) + 1
    return [f"{samples} parity samples: one flipped answer ({100 / samples:.1f} %) already fails the {precision} "
            f"top-1 agreement criterion ({100 * floor:.0f} %) | Fix: pass --samples {enough} or more"]


def _registered(name: str) -> Any:
    """The registry entry of ``name``, or None for a pickled module of an unregistered class."""
    from slimdeploy.errors import ArchitectureError
    from slimdeploy.models.registry import get_arch

    try:
        return get_arch(name)
    except ArchitectureError:
        return None


def _spec_dict(meta: TensorMeta) -> dict[str, Any]:
    return {"name": meta.name, "dtype": np.dtype(meta.dtype).name, "shape": list(meta.shape)}


def _choose_form(dynamic: str | None, kind: str | None, target: str) -> str | None:
    """The dynamic form: None for static models; for deciding ones (``kind`` ``"gated"`` or
    ``"early_exit"``) ``dynamic`` or the target's default (``DEFAULT_FORMS``, ``DEFAULT_EXIT_FORMS``)."""
    if kind is None:
        if dynamic is not None:
            raise BadInputError(
                f"--dynamic {dynamic} applies to models that make decisions (gates, exits); this "
                "architecture is static | Fix: leave out --dynamic"
            )
        return None
    forms, defaults = (EXIT_FORMS, DEFAULT_EXIT_FORMS) if kind == "early_exit" else (GATED_FORMS, DEFAULT_FORMS)
    form = dynamic or defaults[target]
    if form not in forms:
        what = "an early-exit" if kind == "early_exit" else "a gated"
        raise BadInputError(f"unknown dynamic form '{form}' for {what} model | Note: expected one of {list(forms)}")
    if target == "trt":
        from slimdeploy.engines.trt_build import refuse_form

        refuse_form(form)
    return form


def _export_graphs(module: Any, form: str | None, kind: str | None, input_size: tuple[int, ...], spec: Any, torch: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The form's graphs by name (``model`` for single-graph forms) and, for gated and
    early-exit models, the plan of their pieces (how they connect, MACs per piece)."""
    from slimdeploy import exporters
    from slimdeploy.exporters import early_exit, gated

    if form is None:
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(exporters.onnx_export.EXAMPLE_BATCH, *input_size, generator=generator)
        return {"model": exporters.export_onnx(module, (example,), spec)}, None
    if kind == "early_exit":
        pieces, plan = early_exit.exit_pieces(module, input_size, opset=spec.opset)
        composed = early_exit.compose_form
    else:
        pieces, plan = gated.gated_pieces(module, input_size, opset=spec.opset)
        composed = gated.compose_form
    if form == "staged":
        return pieces, plan.to_dict()
    return {"model": composed(form, pieces, plan, input_size)}, plan.to_dict()


def _covering_rows(gates: np.ndarray, count: int) -> np.ndarray:
    """``count`` row indices, chosen first so that every gate is seen open and closed (greedy
    cover of the (block, state) pairs the rows show), then in order."""
    chosen: list[int] = []
    uncovered = {(block, state) for block in range(gates.shape[1]) for state in (0, 1)}
    seen = {(block, int(gates[row, block])) for row in range(len(gates)) for block in range(gates.shape[1])}
    uncovered &= seen
    while uncovered and len(chosen) < count:
        gains = [len(uncovered & {(b, int(gates[row, b])) for b in range(gates.shape[1])}) for row in range(len(gates))]
        best = int(np.argmax(gains))
        if gains[best] == 0:
            break
        chosen.append(best)
        uncovered -= {(b, int(gates[best, b])) for b in range(gates.shape[1])}
    rest = [row for row in range(len(gates)) if row not in chosen]
    return np.array(sorted(chosen + rest[: max(0, count - len(chosen))]), dtype=np.int64)


def _parity_inputs(
    data: str | Path | None,
    prep: Any,
    samples: int | None,
    input_meta: TensorMeta,
    trained_on_digits: bool,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Held-out inputs for the parity check: the user's file, or the digits held-out split
    (the first ``samples``, or all of it when None)."""
    if data is not None:
        inputs, labels = load_data_file(data)
        inputs, labels = inputs[:samples], (labels[:samples] if labels is not None else None)
        check_feed({"input": inputs}, {"input": input_meta})
        check_rows({"input": inputs}, {}, labels, source=f"'{data}'")  # finite, rows agree: before the long work
        return inputs, labels, str(Path(data).name)
    from slimdeploy.data import digits_inputs

    inputs, labels = digits_inputs("heldout", prep.input_size, prep.mean, prep.std, count=samples)
    # Digits labels mean something only for models trained on digits (the zoo's).
    if not trained_on_digits:
        labels = None
    return inputs, labels, "digits:heldout" + (f"[:{samples}]" if samples else "")


def _calibration_source(
    calib: str | Path | None, size: int | None, prep: Any, meta: Mapping[str, Any], model_id: Mapping[str, str] | None = None
) -> Any:
    """Calibration images (``CalibrationSet``) or stored ranges (``CalibrationRecord``) that
    belong to this checkpoint (``model_id``: arch and weights digest)."""
    from slimdeploy.calibration import CalibrationRecord, is_record, load_calibration
    from slimdeploy.calibration.readers import DEFAULT_SIZE, DIGITS

    if calib is None:
        if meta.get("dataset") != "digits":
            raise BadInputError(
                "--precision int8 needs calibration data like the model's inputs | Fix: pass --calib "
                "FOLDER (images), --calib FILE.npz, or --calib synthetic (random data, flagged)"
            )
        calib = DIGITS
    if str(calib) not in (DIGITS, "synthetic") and is_record(calib):
        if size is not None:
            raise BadInputError("--calib-size applies when calibrating, not when reusing stored ranges | Fix: leave --calib-size out")
        record = CalibrationRecord.load(calib)
        stored = record.data.get("model")
        if stored and model_id and stored.get("weights_sha256") != model_id["weights_sha256"]:
            raise BadInputError(
                f"the calibration ranges in '{calib}' were collected on another model ({stored.get('arch')}, weights "
                f"{str(stored.get('weights_sha256'))[:12]}), not on this checkpoint ({model_id['arch']}, weights "
                f"{model_id['weights_sha256'][:12]}) | Fix: recalibrate (--calib digits|PATH), or reuse the "
                "calibration.json of a bundle exported from this checkpoint"
            )
        return record
    return load_calibration(calib, prep.input_size, prep.mean, prep.std, size=DEFAULT_SIZE if size is None else size)


def weights_digest(module: Any) -> str:
    """SHA-256 of a module's state (names, shapes, dtypes, raw bytes, in name order): identifies
    the checkpoint that calibration ranges were collected on."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # Raw bytes whatever the dtype (bfloat16 has no numpy type).
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
