"""Export stage 5: reduced-precision graphs (FP16, INT8), checked against PyTorch and compared
with the FP32 graphs.

The calibration data (or stored ranges) is read and checked first, before the long work
(``read_calibration``). ``reduce_precision`` converts the checked FP32 graphs
(``apply_precision``); for INT8 with ``--calib-method auto`` it tries several methods and Q/DQ
placements and keeps the best (``best_calibration``). The reduced graphs are then checked
against PyTorch with the precision's tolerances and criteria, and their agreement with the FP32
graphs is recorded (manifest ``calibration.vs_fp32``). For the ``ort`` target both are timed
side by side on this CPU (manifest ``calibration.speed_vs_fp32``; ``calibration.speed``), and a
reduced graph slower than FP32 is a warning that names the layers costing most.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimdeploy.calibration.ranges import HistogramRangeError
from slimdeploy.errors import BadInputError
from slimdeploy.parity import run_batches

if TYPE_CHECKING:
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.exporters.checked import CheckedGraphs
    from slimdeploy.exporters.forms import ExportedGraphs
    from slimdeploy.held_out import HeldOut

Progress = Callable[[str], None]
CALIBRATION_FILE = "calibration.json"
# --calib-method auto: calibrate with each and keep the closest to FP32 (see best_calibration).
AUTO_METHODS = ("MinMax", "Percentile")


def read_calibration(calib: str | Path | None, size: int | None, prep: Any, meta: Mapping[str, Any],
                     model_id: Mapping[str, str] | None = None) -> Any:
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


def reduce_precision(checked: CheckedGraphs, held_out: HeldOut, calibration: Any, model_id: Mapping[str, str] | None,
                     options: ExportOptions, say: Progress) -> CheckedGraphs:
    """The checked FP32 graphs in ``options.precision``, with their parity report against
    PyTorch, how they were made and how they agree with the FP32 graphs."""
    from slimdeploy.calibration import CalibrationSet, DecisionScope, agreement, apply_precision
    from slimdeploy.calibration.ranges import DEFAULT_METHOD
    from slimdeploy.export.options import AUTO_CALIB

    precision, fp32 = options.precision, checked.exported

    def convert(method: str, op_types: Sequence[str] | None = None, stored: Any = None,
                fp32_pieces: Sequence[str] = ()) -> Any:
        # fp32_pieces: staged pieces kept FP32 whole, as decision heads are.
        scope = DecisionScope(patterns=(*DecisionScope().patterns, *fp32_pieces)) if fp32_pieces else None
        return apply_precision(
            fp32.graphs, precision, target=options.target, form=fp32.form, plan=fp32.plan, input_meta=fp32.input_meta,
            calibration=stored or calibration, method=method, op_types=op_types, scope=scope,
            quantize_decisions=options.quantize_decisions, bias_correction=options.bias_correction,
            correction_data=calibration if isinstance(calibration, CalibrationSet) else None, progress=say,
        )

    if options.calib_method == AUTO_CALIB and precision == "int8" and isinstance(calibration, CalibrationSet):
        converted = best_calibration(convert, fp32, calibration.inputs, options.target,
                                     [d.name for d in held_out.decisions], options.threads, say)
    else:
        converted = convert(DEFAULT_METHOD if options.calib_method == AUTO_CALIB else options.calib_method)
    reduced = fp32.with_graphs(converted.graphs)
    say(f"checking parity of the {precision} graph" + ("s" if len(reduced.graphs) > 1 else ""))
    report = held_out.check(reduced, options, precision, say, precision=precision)
    # Agreement with the FP32 graphs as well as with PyTorch: what the precision changed.
    say(f"comparing the {precision} graphs with the FP32 graphs")
    with fp32.runner(options.threads) as fp32_runner, reduced.runner(options.threads) as reduced_runner:
        largest = max(options.batch_sizes)
        fp32_out = run_batches(fp32_runner, held_out.feed, largest, ["input"])
        reduced_out = run_batches(reduced_runner, held_out.feed, largest, ["input"])
    info = {**converted.info, "vs_fp32": agreement(fp32_out, reduced_out), "fp32_parity_passed": checked.report.passed}
    warnings = []
    if options.target == "trt":
        info["speed_vs_fp32"] = {"measured": False, "reason": "the TensorRT form runs at its speed on the target GPU, not in ONNX Runtime here"}
    elif not options.speed_check:
        info["speed_vs_fp32"] = {"measured": False, "reason": "turned off (speed_check=False)"}
    else:
        # Never slower without saying so: timed against FP32 on this CPU, warned when slower.
        from slimdeploy.calibration.speed import speed_vs_fp32

        if isinstance(calibration, CalibrationSet):
            images, source = calibration.inputs, f"calibration inputs ({calibration.source})"
        else:
            images, source = held_out.inputs, f"parity samples ({held_out.source})"
        speed = speed_vs_fp32(fp32, reduced, images, precision, threads=options.threads, source=source, say=say)
        info["speed_vs_fp32"] = {"measured": True, **speed.info}
        warnings = [speed.warning] if speed.warning else []
    record = None
    if converted.record is not None:
        # Which checkpoint the ranges belong to: reusing them for another one is refused.
        converted.record.data["model"] = model_id
        record = converted.record.to_bytes()
        info["ranges"] = CALIBRATION_FILE
    return replace(checked, exported=reduced, report=report, notes=[*checked.notes, *converted.notes],
                   warnings=[*checked.warnings, *warnings], calibration=info, record=record)


def best_calibration(convert: Callable[..., Any], fp32: ExportedGraphs, images: np.ndarray, target: str,
                     decision_names: Sequence[str], threads: int, say: Progress) -> Any:
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
       exit decisions flip with full placement in the ONNX Runtime form), and, for a staged
       early-exit form, with the other placement on the last stage only and the stages that
       decide an exit kept FP32 (``deciding_stages``: the exits are then exactly FP32's, and the
       last stage, which answers every sample that reaches it and decides nothing, is
       quantized; with full placement its logits, calibrated on the few images that reach it,
       drift too far). The best of all candidates is kept: meeting the criteria first, then
       decision agreement, top-1 agreement, closeness.
    """
    from slimdeploy.calibration import CONV_OPS
    from slimdeploy.parity import DEFAULT_CRITERIA

    criteria = DEFAULT_CRITERIA["int8"]
    with fp32.runner(threads) as runner:
        expected = run_batches(runner, {"input": images}, 32, ["input"])

    def score(candidate: Any, label: str) -> dict[str, float]:
        with fp32.with_graphs(candidate.graphs).runner(threads) as runner:
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
    methods = []
    for method in AUTO_METHODS:
        name = label(method, placements[0])
        try:
            candidates[name] = convert(method, placements[0])
        except HistogramRangeError as exc:  # MinMax always works: the others may drop out
            say(f"{name}: left out ({str(exc).split(' | ')[0]})")
            continue
        methods.append(method)
        scores[name] = score(candidates[name], name)
    chosen = min(scores, key=lambda name: scores[name]["logits_error"])
    if not acceptable(scores[chosen]):
        for method in methods:
            name = label(method, placements[1])
            candidates[name] = convert(method, placements[1], stored=candidates[label(method, placements[0])].record)
            scores[name] = score(candidates[name], name)
        deciding = deciding_stages(fp32)
        for method in AUTO_METHODS if deciding else ():
            name = f"{label(method, placements[1])}, {'/'.join(deciding)} FP32"
            candidates[name] = convert(method, placements[1], stored=candidates[label(method, placements[0])].record,
                                       fp32_pieces=deciding)
            scores[name] = score(candidates[name], name)
        # Decisions first: they are what a dynamic model is about; then top-1, then closeness.
        chosen = max(scores, key=lambda name: (acceptable(scores[name]), scores[name]["decision_agreement"],
                                               scores[name]["top1_agreement"], -scores[name]["logits_error"]))
    best = candidates[chosen]
    best.info["method_choice"] = {
        "rule": f"{'Q/DQ on the Conv/Gemm/MatMul inputs only (TensorRT placement)' if target == 'trt' else 'full Q/DQ placement'} "
                "with the lowest mean |logits - FP32| on the calibration images if it meets the INT8 agreement "
                f"criteria, else the best of all candidates incl. {'full placement' if target == 'trt' else 'Q/DQ on Conv/Gemm/MatMul only'} "
                "and, for staged early exits, the stages that decide an exit kept FP32 "
                "(criteria met, decision agreement, top-1 agreement, closeness)",
        "chosen": chosen, "candidates": scores,
    }
    return best


def deciding_stages(graphs: ExportedGraphs) -> list[str]:
    """The pieces of a staged early-exit form whose exit decides (every stage but the last,
    which answers whatever reaches it); empty for other forms."""
    plan = graphs.plan or {}
    # An exit plan counts stages, a gated one blocks (exporters' plan_dict).
    if graphs.form != "staged" or "n_stages" not in plan:
        return []
    return [f"stage{stage}" for stage in range(int(plan["n_stages"]) - 1)]
