"""Reduced precision for an exported form: the step between simplification and the bundle.

    result = apply_precision(graphs, "int8", target="ort", form="compact", calibration=calib)
    result.graphs   # graph name -> FP16 or QDQ INT8 ONNX
    result.record   # the calibration ranges (stored as calibration.json in the bundle)
    result.info     # the manifest's ``calibration`` entry

INT8 calibrates once (or takes a stored ``CalibrationRecord``) and quantizes each graph in the
target's form (``int8.quantize_int8``). Single-graph forms (static models, ``compact``,
``mask``) are calibrated on the calibration images; each piece of a ``staged`` bundle on the
rows the staged controller hands it (``staged.piece_feeds``). ``if`` and ``loop`` graphs are
refused: ONNX Runtime's quantizer does not reach inside ``If`` branches and ``Loop`` bodies, where
the gated blocks are. Decision heads stay FP32 unless ``quantize_decisions``; in the ONNX Runtime
form with full placement they read the INT8 feature map through its quantized pooling (the
gate's first node), not the whole map dequantized. FP16 of ``if`` and
``loop`` graphs is refused too (for now): the converter does not follow outer-scope weights into
the subgraphs, and the graph it makes does not load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from slimdeploy.calibration.bias_correction import BiasCorrection, correct_biases
from slimdeploy.calibration.decisions import NO_DECISIONS, DecisionScope
from slimdeploy.calibration.fp16 import convert_fp16
from slimdeploy.calibration.int8 import graph_signature, quantize_int8, unranged_nodes
from slimdeploy.calibration.ranges import (
    DEFAULT_METHOD,
    CalibrationRecord,
    check_method,
    collect_ranges,
)
from slimdeploy.calibration.readers import CalibrationSet
from slimdeploy.engines.base import TensorMeta
from slimdeploy.errors import BadInputError

PRECISIONS = ("fp32", "fp16", "int8")
INT8_FORMS = "compact, staged or mask"
# Forms whose gated blocks sit in subgraphs, and what those subgraphs are.
SUBGRAPH_FORMS = {"if": "If branches", "loop": "Loop bodies"}


@dataclass
class PrecisionResult:
    """Graphs in the asked precision, the calibration ranges used (INT8) and the manifest entry."""

    graphs: dict[str, onnx.ModelProto]
    info: dict[str, Any]
    record: CalibrationRecord | None = None
    notes: list[str] = field(default_factory=list)


def check_precision(precision: str, form: str | None) -> None:
    """Refuse a precision this form cannot take, before any work."""
    if precision not in PRECISIONS:
        raise BadInputError(f"unknown precision '{precision}' | Note: expected one of {list(PRECISIONS)}")
    subgraphs = SUBGRAPH_FORMS.get(form or "")
    if precision == "int8" and subgraphs:
        raise BadInputError(
            f"--precision int8 cannot calibrate the '{form}' form: ONNX Runtime's quantizer leaves the "
            f"blocks inside {subgraphs} in FP32 | Fix: pass --dynamic with {INT8_FORMS} (flat graphs "
            "that calibrate completely)"
        )
    if precision == "fp16" and subgraphs:
        # The subgraphs read the weights from the outer graph, which the FP16 converter casts
        # without following them inside: the graph it makes does not load.
        raise BadInputError(
            f"--precision fp16 does not convert the '{form}' form yet (its {subgraphs} read outer-scope "
            f"weights) | Fix: pass --dynamic with {INT8_FORMS}"
        )


# Q/DQ only around the compute-heavy operators: additions, concatenations and pooling stay
# FP32, so features of different ranges are never forced onto one scale. In the TensorRT form
# only their inputs get Q/DQ (the placement TensorRT's own quantization toolkits use; TensorRT
# fuses the requantization into the layer before), and it is ``--calib-method auto``'s first
# choice there; in the ONNX Runtime form their outputs too, and it is the fallback when full
# placement flips too many answers (``calibration.stage.best_calibration``).
CONV_OPS = ("Conv", "Gemm", "MatMul")


def apply_precision(
    graphs: Mapping[str, onnx.ModelProto],
    precision: str,
    *,
    target: str = "ort",
    form: str | None = None,
    plan: Mapping[str, Any] | None = None,
    input_meta: TensorMeta | None = None,
    calibration: CalibrationSet | CalibrationRecord | None = None,
    method: str = DEFAULT_METHOD,
    op_types: Sequence[str] | None = None,
    quantize_decisions: bool = False,
    scope: DecisionScope | None = None,
    gate_threshold: float = 0.5,
    bias_correction: bool = True,
    correction_data: CalibrationSet | None = None,
    progress: Callable[[str], None] | None = None,
) -> PrecisionResult:
    """Convert the exported (simplified) FP32 graphs to ``precision``.

    Args:
        graphs: graph name → FP32 ONNX (``model``, or the pieces of a staged form).
        precision: ``fp32``, ``fp16`` or ``int8``.
        target: ``ort`` (U8S8 INT8) or ``trt`` (S8S8 symmetric INT8). Defaults to ``ort``.
        form: the dynamic form (None for static models). Defaults to None.
        plan: the gating plan; needed to calibrate a ``staged`` form. Defaults to None.
        input_meta: metadata of the image input; needed for ``staged``. Defaults to None.
        calibration: INT8 only: calibration images, or stored ranges to reuse.
        method: ``MinMax``, ``Entropy`` or ``Percentile`` (when calibrating). Defaults to Percentile.
        op_types: INT8 only: operator types that get Q/DQ (``CONV_OPS``: only the
            compute-heavy operators, everything between them in FP32; in the ``trt`` form only
            their inputs). Defaults to every
            type the quantizer handles, or the placement stored with reused ranges.
        quantize_decisions: also reduce the precision of gate and exit heads. Defaults to False.
        scope: what counts as a decision head. Defaults to gate and exit heads.
        gate_threshold: threshold the staged controller decides at while calibrating. Defaults to 0.5.
        bias_correction: INT8 only: shift each quantized Conv/Gemm's bias by its mean output
            error per channel on the calibration images (``bias_correction.correct_biases``).
            Needs images: skipped (and said) with stored ranges and no ``correction_data``.
            Defaults to True.
        correction_data: calibration images for the bias correction when ``calibration`` is a
            stored record. Defaults to None (the images of ``calibration``).
        progress: callable told each step. Defaults to silence.
    """
    say = progress or (lambda _message: None)
    check_precision(precision, form)
    scope = NO_DECISIONS if quantize_decisions else (scope or DecisionScope())
    info: dict[str, Any] = {"precision": precision, "target": target, "decisions_fp32": not quantize_decisions}
    if precision == "fp32":
        return PrecisionResult(dict(graphs), info)
    if precision == "fp16":
        say("converting to FP16 (decision heads, softmax and normalisations stay FP32)")
        out = {}
        for name, graph in graphs.items():
            out[name] = graph if scope.is_decision_piece(name) else convert_fp16(graph, keep=scope.nodes(graph))
        info["fp32_pieces"] = [name for name in graphs if scope.is_decision_piece(name)]
        return PrecisionResult(out, info)

    check_method(method)
    notes: list[str] = []
    if isinstance(calibration, CalibrationRecord):
        record = calibration
        if not set(record.graphs) & set(graphs):
            raise BadInputError(
                f"the stored calibration ranges are for graphs {sorted(record.graphs)}, this export makes "
                f"{sorted(graphs)} | Fix: reuse ranges from a bundle of the same model and dynamic form, or recalibrate"
            )
        stored = record.data.get("signatures", {})
        changed = sorted(name for name in graphs if name in stored and stored[name] != graph_signature(graphs[name]))
        if changed:
            raise BadInputError(
                f"the stored calibration ranges were collected on another graph than this export's {changed} (the "
                "tensors differ: another --dynamic form, --no-fold, or precision) | Fix: recalibrate "
                "(--calib digits|PATH), or reuse ranges from an INT8 export with the same --dynamic and folds"
            )
        say(f"reusing stored calibration ranges ({record.method}, {record.data.get('source')})")
        if op_types is None and record.data.get("op_types"):
            op_types = record.data["op_types"]
    elif isinstance(calibration, CalibrationSet):
        say(f"calibrating on {len(calibration)} samples from {calibration.source} ({method})")
        feeds = _graph_feeds(graphs, form, plan, input_meta, calibration.inputs, gate_threshold)
        ranges = {name: collect_ranges(graphs[name], [feed], method) for name, feed in feeds.items()}
        record = CalibrationRecord(method, ranges, {
            **calibration.describe(), "op_types": list(op_types) if op_types else None,
            # Which graphs the ranges fit (their float tensors): a reuse on another graph is refused.
            "signatures": {name: graph_signature(graph) for name, graph in graphs.items()},
        })
    else:
        raise BadInputError("--precision int8 needs calibration data | Fix: pass --calib digits, --calib PATH (images, .npy/.npz) or --calib synthetic")
    images = calibration.inputs if isinstance(calibration, CalibrationSet) else correction_data.inputs if correction_data else None
    if bias_correction and images is not None and isinstance(calibration, CalibrationRecord):
        feeds = _graph_feeds(graphs, form, plan, input_meta, images, gate_threshold)

    say(f"quantizing to INT8 in the {'TensorRT (S8S8)' if target == 'trt' else 'ONNX Runtime (U8S8)'} form")
    out, fp32_pieces, fp32_blocks, fp32_stems, fp32_pools = {}, [], {}, {}, {}
    corrections: dict[str, BiasCorrection] = {}
    if bias_correction and images is not None:
        say("correcting the quantized layers' biases on the calibration images")
    for name, graph in graphs.items():
        if scope.is_decision_piece(name):
            out[name] = graph
            fp32_pieces.append(name)
        elif name not in record.graphs:
            # No calibration row reached this piece (a block every sample skipped): no ranges.
            out[name] = graph
            fp32_pieces.append(name)
            notes.append(f"INT8: no calibration sample reached '{name}'; it stays FP32")
        else:
            exclude, rounded = scope.nodes(graph), []
            if target == "ort" and not op_types:
                # Full placement in the ONNX Runtime form (the conv-only fallback of
                # best_calibration is left as it is: it exists for the decisions' sake).
                # The convolution reading the image stays FP32 (see ``image_convs``), and so
                # do windowed average pools (``windowed_average_pools``).
                stems, windowed = image_convs(graph), windowed_average_pools(graph)
                exclude = [*exclude, *stems, *windowed]
                if stems:
                    fp32_stems[name] = stems
                if windowed:
                    fp32_pools[name] = windowed
                # The gate heads read the INT8 map's pooled values: one small tensor to
                # dequantize per gate instead of the whole feature map (decisions.entry_pools).
                pools = set(scope.entry_pools(graph))
                exclude = [node for node in exclude if node not in pools]
                rounded = [out for node in graph.graph.node if node.name in pools for out in node.output]
            out[name] = quantize_int8(graph, record.graphs[name], target=target, exclude=exclude, op_types=op_types, rounded=rounded)
            if bias_correction and images is not None and name in feeds:
                corrected = correct_biases(graph, out[name], feeds[name], _rounded_feed(name, feeds[name], out, form, plan))
                out[name] = corrected.model
                corrections[name] = corrected
            nodes = unranged_nodes(graph, record.graphs[name])
            # Pieces' nodes carry their piece as prefix (exec2/...); routing nodes have none.
            unreached = sorted({node.split("/")[0] for node in nodes if "/" in node}, key=_natural)
            if any("/" not in node for node in nodes):
                unreached.append(f"{sum('/' not in node for node in nodes)} routing node(s)")
            if unreached:
                fp32_blocks[name] = unreached
                notes.append(f"INT8: no calibration sample reached {', '.join(unreached)} in '{name}'; those nodes stay FP32")
    info.update({
        "method": record.method,
        **{key: record.data.get(key) for key in ("source", "size", "synthetic")},
        "form": "S8S8 symmetric, zero points 0, per-channel weights" if target == "trt" else "U8S8, per-channel weights",
        # Which operators got Q/DQ: all the quantizer handles, or only the compute-heavy ones.
        "op_types": list(op_types) if op_types else "all",
        # Where Q/DQ sits: the TensorRT form puts none after the layers of a partial placement.
        "placement": ("every quantizable operator" if not op_types else
                      f"inputs of {'/'.join(op_types)}" + ("" if target == "trt" else " and their outputs")),
        "fp32_pieces": fp32_pieces,
        # Per graph, the node groups (name prefixes) left FP32 because no sample reached them.
        "fp32_unreached": fp32_blocks,
        # Per graph, the convolutions reading the image, kept FP32 in the ONNX Runtime form.
        "fp32_image_convs": fp32_stems,
        # Per graph, the windowed average pools, kept FP32 in the ONNX Runtime form.
        "fp32_average_pools": fp32_pools,
        # Biases shifted by their layer's mean output error on the calibration images.
        "bias_correction": _correction_info(corrections) if corrections else False,
    })
    if bias_correction and images is None:
        notes.append("INT8: no bias correction: stored ranges carry no images | Fix: pass --calib digits|PATH to recalibrate")
    if record.data.get("synthetic"):
        notes.append("INT8 ranges come from synthetic (random) data, not real images: expect poor accuracy")
    return PrecisionResult(out, info, record, notes)


# At most this many channels in a graph input make it an image (RGB, grey, RGBA).
IMAGE_CHANNELS = 4


def image_convs(graph: onnx.ModelProto) -> list[str]:
    """The convolutions that read an image input of the graph directly (at most
    ``IMAGE_CHANNELS`` channels): kept FP32 in the ONNX Runtime INT8 form. Its U8S8 kernel
    on 3 input channels at full resolution runs at about half the speed of the FP32 (NCHWc)
    kernel it replaces (ONNX Runtime profile, benchmarks/README.md), and an FP32 first layer
    moves the one QuantizeLinear of the image to its output without adding a conversion."""
    images = set()
    for value in graph.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value") and dims[1].dim_value <= IMAGE_CHANNELS:
            images.add(value.name)
    return [node.name for node in graph.graph.node if node.op_type == "Conv" and node.input and node.input[0] in images]


def windowed_average_pools(graph: onnx.ModelProto) -> list[str]:
    """The average pools over a window smaller than the map (CondenseNet's 2x2 transitions;
    whole-map pools are ``GlobalAveragePool`` by then, ``exporters.rewrite``): kept FP32 in
    the ONNX Runtime INT8 form. Its ``QLinearAveragePool`` ran about 20x slower than the FP32
    ``AveragePool`` on CondenseNet's transition maps, a fifth of the INT8 graph's time, where
    the DequantizeLinear/QuantizeLinear around an FP32 pool cost far less (ONNX Runtime profile,
    benchmarks/README.md, ``results/op_profile_condensenet_int8.json``)."""
    return [node.name for node in graph.graph.node if node.op_type == "AveragePool"]


def _graph_feeds(graphs: Mapping[str, onnx.ModelProto], form: str | None, plan: Mapping[str, Any] | None,
                 input_meta: TensorMeta | None, images: np.ndarray, gate_threshold: float) -> dict[str, dict[str, np.ndarray]]:
    """What each graph is fed when the model runs ``images``: the images themselves, or for a
    staged form the rows the staged controller hands each piece."""
    if form != "staged":
        return {name: {"input": images} for name in graphs}
    if plan is None or input_meta is None:
        raise ValueError("calibrating a staged form needs its plan and input metadata")
    from slimdeploy.calibration.staged import piece_feeds

    return piece_feeds({n: g.SerializeToString() for n, g in graphs.items()}, plan, input_meta, images, gate_threshold=gate_threshold)


def _rounded_feed(name: str, feed: Mapping[str, np.ndarray], done: Mapping[str, onnx.ModelProto],
                  form: str | None, plan: Mapping[str, Any] | None) -> dict[str, np.ndarray] | None:
    """The feed of an early-exit stage as the INT8 bundle gives it: the features of the earlier
    stages recomputed by their (corrected) INT8 graphs on the same images, so the stage's bias
    correction also takes out the error those features bring. None where the rows cannot be
    followed (not a staged early exit, or a stage that does not read the image)."""
    if form != "staged" or not plan or plan.get("kind") != "early_exit" or "input" not in feed:
        return None
    from slimdeploy.engines.ort_runner import OrtRunner

    order = list(plan["graphs"])
    values = {"input": feed["input"]}
    for earlier in order[:order.index(name)]:
        if earlier not in done:
            return None
        with OrtRunner(done[earlier].SerializeToString(), spinning=False, name=earlier) as runner:
            wanted = list(runner.input_metadata())
            if any(key not in values for key in wanted):
                return None
            values.update(runner.infer({key: values[key] for key in wanted}, check_inputs=False))
    return {key: values.get(key, value) for key, value in feed.items()}


def _correction_info(corrections: Mapping[str, BiasCorrection]) -> dict[str, Any]:
    """The manifest's summary of the bias correction: layers corrected, mean output error
    per channel (mean over layers) before and after."""
    before = [v for c in corrections.values() for v in c.error_before.values()]
    after = [v for c in corrections.values() for v in c.error_after.values()]
    return {
        "applied": True,
        "layers": len(before),
        "skipped": sum(len(c.skipped) for c in corrections.values()),
        "mean_channel_error_before": float(f"{np.mean(before):.3g}") if before else 0.0,
        "mean_channel_error_after": float(f"{np.mean(after):.3g}") if after else 0.0,
    }


def _natural(name: str) -> tuple[str, int]:
    """Sort key putting exec2 before exec11."""
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem):] or 0)


def agreement(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Top-1 agreement of ``logits`` and exact agreement of ``gates`` between two runs."""
    result = {"top1": float((reference["logits"].argmax(1) == candidate["logits"].argmax(1)).mean())}
    if "gates" in reference and "gates" in candidate and reference["gates"].size:
        result["gates"] = float((reference["gates"] == candidate["gates"]).mean())
    return result
