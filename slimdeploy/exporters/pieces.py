"""Export many small graphs ("pieces") of one model with a single torch.export call.

Dynamic forms are built from pieces — a SkipNet's stem, each residual block, each skip path,
each gate, the head — so every form (``mask``, ``if``, ``compact``, ``staged``, ``loop``) shares one
definition of the computation and differs only in routing. Exporting each piece separately
would cost one torch.export per piece (seconds each); instead one wrapper module computes
every piece on its own inputs, side by side, and each piece is cut out of the resulting graph
with ``onnx.utils.Extractor`` by its input and output names.

    pieces = [Piece("exec3", lambda x: model.run_block(3, x), {"x": x3}, ["y"]), ...]
    graphs = export_pieces(model, pieces)   # {"exec3": ModelProto with input "x", output "y"}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from slimdeploy._optional import optional_import
from slimdeploy.exporters.onnx_export import DEFAULT_OPSET, ExportSpec, export_onnx

# Piece and tensor names are joined with this to name the wrapper graph's inputs and outputs.
SEPARATOR = "__"


@dataclass
class Piece:
    """One graph to cut out.

    Attributes:
        name: piece name, unique (e.g. ``"exec3"``).
        compute: callable taking the inputs positionally (in ``inputs`` order) and returning a
            tensor or a tuple of tensors, one per name in ``outputs``.
        inputs: example tensor per input name; axis 0 of every input is the dynamic batch.
        outputs: output names.
    """

    name: str
    compute: Callable[..., Any]
    inputs: Mapping[str, Any]
    outputs: Sequence[str]


def export_pieces(module: Any, pieces: Sequence[Piece], opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export every piece in one torch.export call and return ``{piece name: ModelProto}``.

    Each returned model has the piece's own input and output names and a dynamic batch axis.

    Args:
        module: the ``nn.Module`` whose parameters the pieces use (registered on the wrapper so
            torch.export lifts them as weights).
        pieces: the pieces; names must be unique.
        opset: ONNX opset. Defaults to 18.
    """
    torch = optional_import("torch", "export a model")
    onnx = optional_import("onnx")
    names = [piece.name for piece in pieces]
    if len(set(names)) != len(names):
        raise ValueError(f"piece names must be unique, got {names}")

    class SideBySide(torch.nn.Module):
        """Computes every piece on its own inputs; returns all outputs, flattened."""

        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, flat: list[Any]) -> tuple[Any, ...]:
            outputs: list[Any] = []
            position = 0
            for piece in pieces:
                args = flat[position:position + len(piece.inputs)]
                position += len(piece.inputs)
                result = piece.compute(*args)
                outputs.extend(result if isinstance(result, (tuple, list)) else [result])
            return tuple(outputs)

    input_names = [f"{p.name}{SEPARATOR}{i}" for p in pieces for i in p.inputs]
    output_names = [f"{p.name}{SEPARATOR}{o}" for p in pieces for o in p.outputs]
    examples = [tensor for p in pieces for tensor in p.inputs.values()]
    spec = ExportSpec(input_names=input_names, output_names=output_names, batch_inputs=input_names, opset=opset)
    combined = export_onnx(SideBySide().eval(), examples, spec, as_list=True)

    extractor = onnx.utils.Extractor(combined)
    graphs: dict[str, Any] = {}
    for piece in pieces:
        ins = [f"{piece.name}{SEPARATOR}{i}" for i in piece.inputs]
        outs = [f"{piece.name}{SEPARATOR}{o}" for o in piece.outputs]
        graphs[piece.name] = _strip_piece_prefix(extractor.extract_model(ins, outs), piece.name, combined)
    return graphs


def _strip_piece_prefix(model: Any, piece: str, source: Any) -> Any:
    """Rename ``piece__x`` to ``x`` in a cut-out graph and give it the source's opsets."""
    onnx = optional_import("onnx")
    prefix = f"{piece}{SEPARATOR}"
    rename = {v.name: v.name[len(prefix):] for v in [*model.graph.input, *model.graph.output]}
    if len(set(rename.values())) != len(rename):
        raise ValueError(f"piece '{piece}' uses one name for an input and an output: {sorted(rename.values())}")
    for value in [*model.graph.input, *model.graph.output]:
        value.name = rename[value.name]
    for node in model.graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
        node.output[:] = [rename.get(name, name) for name in node.output]
    # A piece whose output is its input unchanged would need an Identity; the extractor keeps
    # such outputs only when a node produces them, so check nothing dangles.
    produced = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.input}
    produced |= {init.name for init in model.graph.initializer}
    missing = [o.name for o in model.graph.output if o.name not in produced]
    if missing:
        raise ValueError(f"piece '{piece}' outputs {missing} are not computed by any node")
    del model.opset_import[:]
    model.opset_import.extend(source.opset_import)
    model.graph.name = piece
    onnx.checker.check_model(model)
    return model
