"""Dynamic forms of early-exit networks (S2D, docs/design.md §3), built from per-stage pieces.

Every form is assembled from the same pieces, exported once (``exporters.pieces``):

    stage{j}   [input,] <features of earlier stages it reads>  ->  logits, confidence, <features later stages read>

(``input`` only for stages that read the image: every S2D stage; only the first of a
BranchyNet-style trunk, whose later stages continue from the carried trunk features.)

A sample leaves at the first stage j whose ``confidence`` passes ``exit_thresholds[j]``
(``>=`` for max softmax, ``<=`` for entropy); the last stage always answers.

- ``mask``: every stage computed on every sample; the first confident exit is picked afterwards
  (``ArgMax`` over the exit bits, ``Where`` per sample). The baseline.
- ``if``: nested ``If``: stage 0, then an ``If`` on "every sample exits" (``ReduceMin`` over the
  batch, a 0-D bool); its else branch runs stage 1 on the whole batch with the carried
  features, and so on; per-sample ``Where`` keeps each sample's own exit, so results are exact
  at any batch size. Saves the later stages fully at batch 1.
- ``staged``: the pieces as separate graphs; ``engines.staged.StagedExitRunner`` drops the
  exited samples on the host after each stage.

Every form outputs ``logits`` (of the stage that answered), ``exit_stage`` ([B] int64, 0-based)
and ``exit_confidence`` ([B, n_stages] float32: each stage's confidence, -1 where the sample did
not reach the stage), and takes ``exit_thresholds`` ([n_stages] float32, the model's thresholds
stored as an initializer so it can be omitted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from slimdeploy._optional import optional_import
from slimdeploy.exporters.compose import GraphBuilder, rename_outputs
from slimdeploy.exporters.onnx_export import DEFAULT_OPSET, EXAMPLE_BATCH
from slimdeploy.exporters.pieces import Piece, export_pieces
from slimdeploy.flops import count_macs_of
from slimdeploy.forms import EXIT_FORMS

FORMS = EXIT_FORMS
OUTPUTS = ("logits", "exit_stage", "exit_confidence")
THRESHOLDS = "exit_thresholds"
NOT_REACHED = -1.0


@dataclass
class ExitPlan:
    """How the stage pieces connect: what the staged controller and the composed forms follow.
    Stored in the bundle manifest under ``exits``.

    Attributes:
        n_stages: stages (each ending in a classifier).
        exit_rule: ``max_softmax`` or ``entropy``.
        thresholds: the model's default exit thresholds, one per stage.
        needs: per stage, the carried feature names it reads (besides ``input``).
        provides: per stage, the feature names it outputs for later stages.
        reads_input: per stage, whether it reads the image ``input``.
        graphs: piece names (``stage0``...).
        macs: MACs per sample of each stage piece (Conv and Linear layers).
    """

    n_stages: int
    exit_rule: str
    thresholds: list[float]
    needs: list[list[str]]
    provides: list[list[str]]
    reads_input: list[bool]
    graphs: list[str] = field(default_factory=list)
    macs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "early_exit", "n_stages": self.n_stages, "exit_rule": self.exit_rule,
                "thresholds": self.thresholds, "needs": self.needs, "provides": self.provides,
                "reads_input": self.reads_input, "graphs": self.graphs, "macs": self.macs}


def feature_name(stage: int, layer: int) -> str:
    """Name of a carried feature map in the pieces and the staged controller."""
    return f"s{stage}_l{layer}"


def exit_pieces(model: Any, input_size: tuple[int, ...], opset: int = DEFAULT_OPSET) -> tuple[dict[str, onnx.ModelProto], ExitPlan]:
    """Export the stage pieces of an early-exit network (one torch.export call) and its plan.

    The model is an ``nn.exit_stage.EarlyExitNet``: ``n_stages``, ``exit_rule``,
    ``exit_thresholds``, ``needs(j)``, ``provides(j)``, ``reads_input(j)``, ``run_stage`` and
    ``stage_outputs``.
    """
    torch = optional_import("torch", "export a model")
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(EXAMPLE_BATCH, *input_size, generator=generator)
    carried: dict[tuple[int, int], Any] = {}
    pieces: list[Piece] = []
    needs, provides, reads = [], [], []
    with torch.inference_mode():
        for stage in range(model.n_stages):
            need = model.needs(stage)
            reads.append(bool(model.reads_input(stage)))
            inputs = {**({"input": image.clone()} if reads[-1] else {}), **{feature_name(*key): carried[key].clone() for key in need}}
            provided = [feature_name(*key) for key in model.provides(stage)]
            pieces.append(Piece(f"stage{stage}", _stage_fn(model, stage, reads[-1]), inputs, ["logits", "confidence", *provided]))
            needs.append([feature_name(*key) for key in need])
            provides.append(provided)
            _, features = model.run_stage(stage, image, carried)
            carried.update({(stage, layer): f for layer, f in enumerate(features)})
    graphs = export_pieces(model, pieces, opset=opset)
    macs = {
        piece.name: count_macs_of(model, piece.compute, *(t[:1] for t in piece.inputs.values())).macs
        for piece in pieces
    }
    plan = ExitPlan(model.n_stages, model.exit_rule, [float(t) for t in model.exit_thresholds], needs, provides,
                    reads, graphs=list(graphs), macs=macs)
    return graphs, plan


def _stage_fn(model: Any, stage: int, reads_input: bool) -> Any:
    if reads_input:
        return lambda x, *needed: model.stage_outputs(stage, x, *needed)
    return lambda *needed: model.stage_outputs(stage, None, *needed)


def compose_form(form: str, graphs: dict[str, onnx.ModelProto], plan: ExitPlan, input_size: tuple[int, ...]) -> onnx.ModelProto:
    """One ONNX graph of the ``mask`` or ``if`` form from the stage pieces."""
    if form not in ("mask", "if"):
        raise ValueError(f"compose_form builds mask and if, not '{form}'")
    g = GraphBuilder()
    composer = _Composer(g, graphs, plan)
    if form == "mask":
        logits, stage, confidence = composer.mask()
    else:
        logits, stage, confidence = composer.nested(g, 0, {})
    rename_outputs(g, [logits, stage, confidence], OUTPUTS)
    n = plan.n_stages
    num_classes = graphs["stage0"].graph.output[0].type.tensor_type.shape.dim[1].dim_value
    model = g.build(
        inputs=[
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_size]),
            helper.make_tensor_value_info(THRESHOLDS, TensorProto.FLOAT, [n]),
        ],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]),
            helper.make_tensor_value_info("exit_stage", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("exit_confidence", TensorProto.FLOAT, ["batch", n]),
        ],
        opset_imports=graphs["stage0"].opset_import,
        defaults={THRESHOLDS: np.asarray(plan.thresholds, dtype=np.float32)},
        name=f"early_exit_{form}",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


class _Composer:
    """Shared constants and the stage/exit building steps of the composed forms."""

    def __init__(self, g: GraphBuilder, graphs: dict[str, onnx.ModelProto], plan: ExitPlan) -> None:
        self.g, self.graphs, self.plan = g, graphs, plan
        self.axes1 = g.constant(np.array([1], dtype=np.int64), "axes1")
        start, end = g.constant(np.array([0], np.int64)), g.constant(np.array([1], np.int64))
        self.batch = g.one("Slice", [g.one("Shape", ["input"]), start, end], hint="batch")  # [1]
        self.not_reached = g.constant(np.array(NOT_REACHED, dtype=np.float32), "not_reached")
        self.thresholds = [
            g.one("Gather", [THRESHOLDS, g.constant(np.array(j, dtype=np.int64), f"stage{j}_index")], axis=0, hint=f"threshold{j}")
            for j in range(plan.n_stages - 1)
        ]

    def stage(self, builder: GraphBuilder, j: int, carried: dict[str, str]) -> tuple[str, str, dict[str, str]]:
        """Inline stage j: its logits, its confidence and the features it provides."""
        image = ["input"] if self.plan.reads_input[j] else []
        outs = builder.inline(self.graphs[f"stage{j}"], [*image, *(carried[n] for n in self.plan.needs[j])], f"stage{j}/")
        return outs[0], outs[1], dict(zip(self.plan.provides[j], outs[2:]))

    def exits(self, builder: GraphBuilder, j: int, confidence: str) -> str:
        op = "LessOrEqual" if self.plan.exit_rule == "entropy" else "GreaterOrEqual"
        return builder.one(op, [confidence, self.thresholds[j]], hint=f"exit{j}")

    def filled(self, builder: GraphBuilder, columns: int, value: float | int, elem: int) -> str:
        """A [B] (columns 0) or [B, columns] tensor filled with ``value``."""
        shape = self.batch if columns == 0 else builder.one(
            "Concat", [self.batch, self.g.constant(np.array([columns], np.int64))], axis=0)
        dtype = np.int64 if elem == TensorProto.INT64 else np.float32
        return builder.one("ConstantOfShape", [shape], value=helper.make_tensor("value", elem, [1], [dtype(value)]))

    def column(self, builder: GraphBuilder, value: str) -> str:
        return builder.one("Unsqueeze", [value, self.axes1])

    def mask(self) -> tuple[str, str, str]:
        g, n = self.g, self.plan.n_stages
        carried: dict[str, str] = {}
        logits, confidences, bits = [], [], []
        for j in range(n):
            stage_logits, confidence, provided = self.stage(g, j, carried)
            carried.update(provided)
            logits.append(stage_logits)
            confidences.append(self.column(g, confidence))
            if j < n - 1:
                bits.append(self.column(g, g.one("Cast", [self.exits(g, j, confidence)], to=TensorProto.INT32)))
        bits.append(self.filled(g, 1, 1, TensorProto.INT32) if n > 1 else "")
        bits = [b for b in bits if b]
        # ArgMax returns the first maximum: the first stage whose exit bit is set (the last's always is).
        stage = g.one("ArgMax", [g.one("Concat", bits, axis=1)], axis=1, keepdims=0, hint="exit_stage") if n > 1 else self.filled(g, 0, 0, TensorProto.INT64)
        chosen = logits[-1]
        for j in range(n - 2, -1, -1):
            here = g.one("Equal", [stage, g.constant(np.array(j, dtype=np.int64))])
            chosen = g.one("Where", [self.column(g, here), logits[j], chosen], hint=f"logits{j}")
        reached = g.one("LessOrEqual", [g.constant(np.arange(n, dtype=np.int64)[None, :], "stage_ids"), self.column(g, stage)])
        confidence = g.one("Where", [reached, g.one("Concat", confidences, axis=1), self.not_reached], hint="confidence")
        return chosen, stage, confidence

    def nested(self, builder: GraphBuilder, j: int, carried: dict[str, str]) -> tuple[str, str, str]:
        """Stages j.. in ``builder``: logits, exit stage [B] and confidences [B, n - j]."""
        n = self.plan.n_stages
        logits, confidence, provided = self.stage(builder, j, carried)
        if j == n - 1:
            return logits, self.filled(builder, 0, j, TensorProto.INT64), self.column(builder, confidence)
        leave = self.exits(builder, j, confidence)
        # 0-D condition from a rank-0 reduction over the exit bits cast to int32: the form
        # TensorRT accepts with a dynamic batch (docs/tensorrt-facts.md, "Control flow").
        all_leave = builder.one("Cast", [builder.one("ReduceMin", [builder.one("Cast", [leave], to=TensorProto.INT32)], keepdims=0)], to=TensorProto.BOOL)
        then_branch = builder.branch()
        then_conf = then_branch.one("Concat", [self.column(then_branch, confidence), self.filled(then_branch, n - j - 1, NOT_REACHED, TensorProto.FLOAT)], axis=1)
        then_outs = [logits, self.filled(then_branch, 0, j, TensorProto.INT64), then_conf]
        else_branch = builder.branch()
        rest_logits, rest_stage, rest_conf = self.nested(else_branch, j + 1, {**carried, **provided})
        leave_col = self.column(else_branch, leave)
        else_outs = [
            else_branch.one("Where", [leave_col, logits, rest_logits]),
            else_branch.one("Where", [leave, self.g.constant(np.array(j, dtype=np.int64)), rest_stage]),
            else_branch.one("Concat", [self.column(else_branch, confidence), else_branch.one("Where", [leave_col, self.not_reached, rest_conf])], axis=1),
        ]
        return tuple(builder.if_node(  # type: ignore[return-value]
            all_leave, then_branch, then_outs, else_branch, else_outs, hint=f"after_stage{j}",
            elem_types=[TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT],
        ))
