"""Dynamic forms of gated residual networks (SkipNet), docs/design.md §3.

Every form is assembled from the same pieces, exported once (``exporters.pieces``):

    stem      input                      -> x          (stem and block 0, which always runs)
    exec{k}   x                          -> y          (block k executed), k = 1..n-1
    skip{k}   x                          -> y          (block k skipped; only blocks that downsample)
    gate{k}   x [, h, c]                 -> prob [, h_next, c_next]   (gate on block k's output), k = 0..n-2
    head      x                          -> logits

Block k (k >= 1) executes for a sample iff ``gate{k-1}``'s probability > ``gate_threshold``.

- ``mask``: every block computed, ``Where`` picks per sample (what the papers' code does).
- ``if``: one ``If`` per gated block on a 0-D bool (any sample executes); inside, the block runs
  on the whole batch and, unless every sample executes (a nested ``If``), ``Where`` keeps the
  skip path for samples whose gate is closed. Exact at any batch size; saves the block when no
  sample needs it (fully at batch 1).
- ``compact``: ``NonZero`` → ``Gather`` the executing rows → block → ``ScatterND`` back over the
  skip path. Exact and saves per sample at any batch size.
- ``staged``: the pieces as separate graphs; ``engines.staged.StagedGatedRunner`` routes rows
  on the host.
- ``loop``: as ``if``, but each run of consecutive gated blocks of one structure (a stage's
  blocks after its first, downsampling, one) is one ``Loop`` whose body is one gated block: the
  gate, then the ``if`` routing. The body's weights differ per block, so they are stacked along
  a new axis 0 and the body gathers row ``iteration`` (``exporters.stacking`` says why the body
  is built this way); the features and the recurrent gate's state are loop-carried; each
  iteration's decision and probability are scan outputs. The graph grows with the number of
  stages, not of blocks. Blocks outside a run (downsampling, or alone) are routed as in ``if``.

Every form outputs ``logits``, ``gates`` ([B, n-1] uint8, 1 = executed) and ``gate_probs``
([B, n-1] float32), and takes ``gate_threshold`` (0-D float32, default 0.5 stored as an
initializer so it can be omitted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from slimdeploy._optional import optional_import
from slimdeploy.exporters.compose import GraphBuilder, rename_outputs
from slimdeploy.exporters.onnx_export import DEFAULT_OPSET, EXAMPLE_BATCH
from slimdeploy.exporters.pieces import Piece, export_pieces
from slimdeploy.exporters.stacking import same_structure, stack_pieces
from slimdeploy.flops import count_macs_of
from slimdeploy.forms import GATED_FORMS

FORMS = GATED_FORMS
COMPOSED_FORMS = ("mask", "if", "compact", "loop")
# A Loop of one block would only add the loop's overhead: runs shorter than this are routed as in ``if``.
MIN_LOOP_BLOCKS = 2
DEFAULT_GATE_THRESHOLD = 0.5
OUTPUTS = ("logits", "gates", "gate_probs")


@dataclass
class GatedPlan:
    """How the pieces of a gated network connect: what the staged controller and the
    composed forms follow. Stored in the bundle manifest under ``stages``."""

    n_blocks: int
    state: list[str]  # names of the carried gate state tensors ([] or ["h", "c"])
    state_width: int  # columns of each state tensor
    skips: list[int]  # blocks with a downsampling skip path
    graphs: list[str] = field(default_factory=list)
    # MACs per sample of each piece (Conv and Linear layers), for predicted savings.
    macs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "gated", "n_blocks": self.n_blocks, "state": self.state,
                "state_width": self.state_width, "skips": self.skips, "graphs": self.graphs,
                "macs": self.macs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatedPlan:
        return cls(data["n_blocks"], list(data["state"]), data["state_width"], list(data["skips"]),
                   list(data["graphs"]), dict(data.get("macs", {})))


def gated_pieces(model: Any, input_size: tuple[int, ...], opset: int = DEFAULT_OPSET) -> tuple[dict[str, onnx.ModelProto], GatedPlan]:
    """Export the pieces of a gated network (one torch.export call) and describe the plan."""
    torch = optional_import("torch", "export a model")
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(EXAMPLE_BATCH, *input_size, generator=generator)
    pieces: list[Piece] = [Piece("stem", lambda x: model.run_block(0, model.stem(x)), {"x": image}, ["y"])]
    skips: list[int] = []
    with torch.inference_mode():
        x = model.run_block(0, model.stem(image))
        state = model.gate_init_state(x)
    state_names = ["h", "c"][: len(state)]
    state_width = int(state[0].shape[1]) if state else 0
    for k in range(1, model.n_blocks):
        gate_inputs = {"x": x.clone(), **{n: s.clone() for n, s in zip(state_names, state)}}
        # State outputs need names of their own: a graph's input and output cannot share one.
        next_state = [f"{n}_next" for n in state_names]
        pieces.append(Piece(f"gate{k - 1}", _gate_fn(model, k - 1, len(state)), gate_inputs, ["prob", *next_state]))
        pieces.append(Piece(f"exec{k}", _block_fn(model.run_block, k), {"x": x.clone()}, ["y"]))
        if model.block(k).downsample is not None:
            skips.append(k)
            pieces.append(Piece(f"skip{k}", _block_fn(model.skip, k), {"x": x.clone()}, ["y"]))
        with torch.inference_mode():
            _, state = model.gate(k - 1, x, state)
            x = model.run_block(k, x)
    pieces.append(Piece("head", model.head, {"x": x.clone()}, ["logits"]))
    graphs = export_pieces(model, pieces, opset=opset)
    macs = {
        piece.name: count_macs_of(model, piece.compute, *(t[:1] for t in piece.inputs.values())).macs
        for piece in pieces
    }
    plan = GatedPlan(model.n_blocks, state_names, state_width, skips, graphs=list(graphs), macs=macs)
    return graphs, plan


def _block_fn(method: Any, k: int) -> Any:
    return lambda x: method(k, x)


def _gate_fn(model: Any, k: int, n_state: int) -> Any:
    def gate(x: Any, *state: Any) -> Any:
        prob, new_state = model.gate(k, x, tuple(state))
        return (prob, *new_state) if n_state else prob

    return gate


def compose_form(form: str, graphs: dict[str, onnx.ModelProto], plan: GatedPlan, input_size: tuple[int, ...]) -> onnx.ModelProto:
    """One ONNX graph of the ``mask``, ``if``, ``compact`` or ``loop`` form from the pieces."""
    if form not in COMPOSED_FORMS:
        raise ValueError(f"compose_form builds {', '.join(COMPOSED_FORMS)}, not '{form}'")
    g = GraphBuilder()
    x = g.inline(graphs["stem"], ["input"], "stem/")[0]
    state = _initial_state(g, plan) if plan.state else []
    # Axes constants, made only for the forms that use them (no unused initializers).
    axes0 = g.constant(np.array([0], dtype=np.int64), "axes0") if form == "compact" else ""
    axes123 = g.constant(np.array([1, 2, 3], dtype=np.int64), "axes123") if form != "compact" else ""
    axes1 = g.constant(np.array([1], dtype=np.int64), "axes1")
    loops = {run[0]: run for run in loop_runs(graphs, plan)} if form == "loop" else {}
    gate_bits, gate_probs = [], []  # [B, columns] each, in block order
    k = 1
    while k < plan.n_blocks:
        if k in loops:
            x, state, bits, probs = _loop(g, graphs, plan, loops[k], x, state, axes123)
            gate_bits.append(bits)
            gate_probs.append(probs)
            k += len(loops[k])
            continue
        prob, *state = g.inline(graphs[f"gate{k - 1}"], [x, *state], f"gate{k - 1}/")
        execute = g.one("Greater", [prob, "gate_threshold"], hint=f"execute{k}")
        # Gate bits stay BOOL inside the graph and become UINT8 only in the last node: TensorRT
        # takes UINT8 only at network inputs and outputs (docs/tensorrt-facts.md, operator constraints).
        gate_bits.append(g.one("Unsqueeze", [execute, axes1]))
        gate_probs.append(g.one("Unsqueeze", [prob, axes1]))
        skipped = g.inline(graphs[f"skip{k}"], [x], f"skip{k}/")[0] if k in plan.skips else x
        if form == "mask":
            executed = g.inline(graphs[f"exec{k}"], [x], f"exec{k}/")[0]
            x = g.one("Where", [g.one("Unsqueeze", [execute, axes123]), executed, skipped], hint=f"x{k}")
        elif form in ("if", "loop"):
            x = _route_if(g, execute, skipped, _inliner(graphs[f"exec{k}"], [x], f"exec{k}/"), axes123, k)
        else:  # compact
            rows = g.one("NonZero", [execute], hint=f"rows{k}")  # [1, K]
            picked = g.one("Gather", [x, g.one("Squeeze", [rows, axes0])], axis=0, hint=f"picked{k}")
            executed = g.inline(graphs[f"exec{k}"], [picked], f"exec{k}/")[0]
            x = g.one("ScatterND", [skipped, g.one("Transpose", [rows], perm=[1, 0]), executed], hint=f"x{k}")
        k += 1
    logits = g.inline(graphs["head"], [x], "head/")[0]
    if gate_bits:
        gates = g.one("Concat", gate_bits, axis=1)
        probs = g.one("Concat", gate_probs, axis=1)
    else:  # a network with one block decides nothing: [B, 0] outputs
        gates = g.one("Slice", [g.one("Cast", [logits], to=TensorProto.BOOL), g.constant(np.array([0], np.int64)), g.constant(np.array([0], np.int64)), axes1])
        probs = g.one("Slice", [logits, g.constant(np.array([0], np.int64)), g.constant(np.array([0], np.int64)), axes1])
    rename_outputs(g, [logits, probs], ["logits", "gate_probs"])
    g.node("Cast", [gates], ["gates"], to=TensorProto.UINT8)
    n_gated = plan.n_blocks - 1
    num_classes = graphs["head"].graph.output[0].type.tensor_type.shape.dim[1].dim_value
    model = g.build(
        inputs=[
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_size]),
            helper.make_tensor_value_info("gate_threshold", TensorProto.FLOAT, []),
        ],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]),
            helper.make_tensor_value_info("gates", TensorProto.UINT8, ["batch", n_gated]),
            helper.make_tensor_value_info("gate_probs", TensorProto.FLOAT, ["batch", n_gated]),
        ],
        opset_imports=graphs["stem"].opset_import,
        defaults={"gate_threshold": np.array(DEFAULT_GATE_THRESHOLD, dtype=np.float32)},
        name=f"skipnet_{form}",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _route_if(g: GraphBuilder, execute: str, skipped: str, run_block: Callable[[GraphBuilder], str],
              axes123: str, tag: int | str) -> str:
    """The ``if`` form's routing of one block: ``run_block(branch)`` adds the executed block to
    a branch and names its output; ``skipped`` is the block's output where the gate closed."""
    # 0-D condition from a rank-0 reduction over the gate bits cast to int32: the form
    # TensorRT accepts with a dynamic batch (docs/tensorrt-facts.md, "Control flow").
    bits = g.one("Cast", [execute], to=TensorProto.INT32)
    any_execute = g.one("Cast", [g.one("ReduceMax", [bits], keepdims=0)], to=TensorProto.BOOL)
    all_execute = g.one("Cast", [g.one("ReduceMin", [bits], keepdims=0)], to=TensorProto.BOOL)
    then_branch = g.branch()
    executed = run_block(then_branch)
    # When every sample executes (always so at batch 1) the block's output is the answer: a
    # nested If spares the per-sample Where.
    mixed = then_branch.branch()
    chosen = mixed.one("Where", [mixed.one("Unsqueeze", [execute, axes123]), executed, skipped])
    chosen = then_branch.if_node(all_execute, then_branch.branch(), [executed], mixed, [chosen], hint=f"all{tag}")[0]
    return g.if_node(any_execute, then_branch, [chosen], g.branch(), [skipped], hint=f"block{tag}")[0]


def _inliner(piece: onnx.ModelProto, inputs: list[str], prefix: str) -> Callable[[GraphBuilder], str]:
    """A ``run_block`` for ``_route_if``: inline ``piece`` reading ``inputs``, give its output."""
    return lambda branch: branch.inline(piece, inputs, prefix)[0]


def loop_runs(graphs: dict[str, onnx.ModelProto], plan: GatedPlan) -> list[list[int]]:
    """The runs of consecutive gated blocks that the ``loop`` form puts in one ``Loop`` each:
    blocks without a skip path (their output has their input's shape, so the features can be
    loop-carried) whose gate and block pieces have one structure, at least ``MIN_LOOP_BLOCKS``
    long. In a SkipNet, a stage's blocks after its first."""
    runs: list[list[int]] = []
    current: list[int] = []
    for k in range(1, plan.n_blocks):
        loopable = k not in plan.skips and _keeps_shape(graphs[f"exec{k}"])
        if loopable and current and all(
            same_structure(graphs[f"{kind}{current[0] - shift}"], graphs[f"{kind}{k - shift}"])
            for kind, shift in (("gate", 1), ("exec", 0))
        ):
            current.append(k)
            continue
        if len(current) >= MIN_LOOP_BLOCKS:
            runs.append(current)
        current = [k] if loopable else []
    if len(current) >= MIN_LOOP_BLOCKS:
        runs.append(current)
    return runs


def _keeps_shape(block: onnx.ModelProto) -> bool:
    """Whether a block piece's output has its input's type and shape."""
    return block.graph.input[0].type == block.graph.output[0].type


def _loop(g: GraphBuilder, graphs: dict[str, onnx.ModelProto], plan: GatedPlan, run: list[int],
          x: str, state: list[str], axes123: str) -> tuple[str, list[str], str, str]:
    """One ``Loop`` over the blocks ``run``: returns the features and gate state after it, and
    its decisions and probabilities as [B, len(run)] columns (BOOL and FLOAT)."""
    gate = stack_pieces([graphs[f"gate{k - 1}"] for k in run])
    block = stack_pieces([graphs[f"exec{k}"] for k in run])
    if gate is None or block is None:
        raise ValueError(f"blocks {run} differ in structure; loop_runs does not group such blocks")
    tag = f"loop{run[0]}"
    iteration, condition = g.fresh(f"{tag}_iteration"), g.fresh(f"{tag}_condition")
    carried = [g.fresh(f"{tag}_x"), *(g.fresh(f"{tag}_{name}") for name in plan.state)]
    body = g.branch()
    # Row ``iteration`` of each stacked weight; the block's rows are gathered inside the branch
    # that runs it, so a skipped block copies no weights.
    gate_weights = [body.one("Gather", [g.constant(array, f"{tag}_gate_weights"), iteration], axis=0) for array in gate.stacked]
    prob, *next_state = body.inline(gate.template, [*carried, *gate_weights], f"{tag}/gate/")
    execute = body.one("Greater", [prob, "gate_threshold"], hint=f"{tag}_execute")

    def run_block(branch: GraphBuilder) -> str:
        weights = [branch.one("Gather", [g.constant(array, f"{tag}_block_weights"), iteration], axis=0) for array in block.stacked]
        return branch.inline(block.template, [carried[0], *weights], f"{tag}/exec/")[0]

    x_next = _route_if(body, execute, carried[0], run_block, axes123, tag)
    # The carried values keep the types and shapes of the pieces' inputs (x of the block, h and
    # c of the gate) in every iteration: declared so, on the way in and out.
    carried_types = [value.type for value in [block.template.graph.input[0], *gate.template.graph.input[1:1 + len(state)]]]
    body_inputs = [helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
                   helper.make_tensor_value_info(condition, TensorProto.BOOL, []),
                   *(helper.make_value_info(name, kind) for name, kind in zip(carried, carried_types))]
    body_outputs = [helper.make_tensor_value_info(body.one("Identity", [condition]), TensorProto.BOOL, []),
                    *(helper.make_value_info(name, kind) for name, kind in zip([x_next, *next_state], carried_types)),
                    helper.make_tensor_value_info(execute, TensorProto.BOOL, None),
                    helper.make_tensor_value_info(prob, TensorProto.FLOAT, None)]
    trips = g.constant(np.array(len(run), dtype=np.int64), f"{tag}_trips")
    x, *rest = g.loop_node(trips, body, body_inputs, body_outputs, [x, *state], hint=tag)
    bits, probs = (g.one("Transpose", [scan], perm=[1, 0]) for scan in rest[len(state):])  # [T, B] -> [B, T]
    return x, rest[:len(state)], bits, probs


def _initial_state(g: GraphBuilder, plan: GatedPlan) -> list[str]:
    """Zero recurrent state [B, width] for each state tensor, B read from the input."""
    start, end = g.constant(np.array([0], np.int64)), g.constant(np.array([1], np.int64))
    batch = g.one("Slice", [g.one("Shape", ["input"]), start, end], hint="batch")
    shape = g.one("Concat", [batch, g.constant(np.array([plan.state_width], np.int64))], axis=0)
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    return [g.one("ConstantOfShape", [shape], value=zero, hint=f"{name}0") for name in plan.state]
