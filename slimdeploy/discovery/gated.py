"""A network with ``GatedBlock``s, cut at its gated blocks into the gated model API that
``exporters.gated.gated_pieces`` consumes (``nn.gated_network.GatedNetwork``: ``stem``,
``n_blocks``, ``block(k)``, ``run_block``, ``skip``, ``gate_init_state``, ``gate``, ``head``),
the API the built-in SkipNet has too.

With gated blocks G1..Gm in call order, the forward is cut into:

    stem      the image -> G1's input
    block k   (k = 1..m) Gk's body, then the code between Gk and G(k+1) (none after Gm)
    skip k    Gk's skip path, then the same code between (a piece only where that is not the identity)
    gate k-1  Gk's gate on Gk's input (with the controller's state for a ControlledGate)
    head      Gm's output -> the logits

Block 0 of the API is the empty block (the stem ends where G1 starts). The code between two
gated blocks runs in both the executed and the skipped piece of the block before it, so the
forms stay those of SkipNet (``mask``, ``if``, ``compact``, ``staged``) and a sample computes it
once in ``staged``. What cannot be cut so is refused (``discover``): a value other than the
block's input crossing a gated block, a forward that returns more than the logits, gates with
more than one controller.

``forward(x, gate_threshold=0.5)`` is the reference: the model's own forward, recorded, as
``(logits, gates [B, m] uint8, gate_probs [B, m])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from slimdeploy.discovery.trace import Segment, TracedNetwork
from slimdeploy.errors import ExportError
from slimdeploy.nn.decisions import DEFAULT_GATE_THRESHOLD, record_decisions
from slimdeploy.nn.gated_block import GatedBlock
from slimdeploy.nn.gated_network import GatedNetwork

# The exported state carries at most two tensors of one width (an LSTM's h and c; GatedPlan).
MAX_STATE_TENSORS = 2


@dataclass(frozen=True)
class BlockPaths:
    """What ``gated_pieces`` asks of block k: ``downsample`` is not None where the skipped
    block computes something (its skip module, or the code after the block)."""

    downsample: Any


class DiscoveredGatedNet(GatedNetwork):
    """The gated model API over a network's ``GatedBlock``s (see the module docstring).

    Args:
        model: the network (registered here, so its parameters are this module's).
        traced: its traced forward.
    """

    def __init__(self, model: nn.Module, traced: TracedNetwork) -> None:
        super().__init__()
        self.model = model
        nodes, self.paths, self.blocks = traced.protocol_calls(GatedBlock)
        self.__dict__["_traced"] = traced
        logits = _returned_logits(traced)
        _refuse_crossings(traced, nodes)
        inputs = [node.args[0] for node in nodes]
        if inputs[0] is traced.image:
            raise ExportError(f"GatedBlock '{self.paths[0]}' reads the image itself | Note: the stem before the first "
                              "gated block is a piece of its own | Fix: put a layer (a stem convolution) before it")
        if logits is nodes[-1]:
            raise ExportError(f"{traced.name}.forward returns the output of GatedBlock '{self.paths[-1]}' as its logits "
                              "| Fix: put the classifier after the last gated block")
        segment_of = _segment_index(traced, nodes)
        members = [[n for n, j in segment_of.items() if j == k] for k in range(len(nodes) + 1)]
        self._stem = traced.segment(members[0], [traced.image], [inputs[0]])
        self._after = [traced.segment(members[k], [nodes[k - 1]], [inputs[k]]) for k in range(1, len(nodes))]
        self._head = traced.segment(members[-1], [nodes[-1]], [logits])
        _check_controller(model, self.blocks, self.paths)

    # --- the gated model API (GatedNetwork) -------------------------------------------------

    @property
    def gated_blocks(self) -> list[GatedBlock]:
        return self.blocks

    def block(self, k: int) -> BlockPaths:
        """Block k's skip path: computing something (``downsample`` set) or the identity."""
        if k == 0:
            return BlockPaths(None)
        gated = self.blocks[k - 1]
        after = self._after[k - 1] if k - 1 < len(self._after) else None
        return BlockPaths(gated.skip if gated.skip is not None else (after or None))

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The image -> the first gated block's input."""
        return self._stem.run(self.model, x)[0]

    def after_block(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """The code between gated block k and the next (none after the last)."""
        return self._after[k - 1].run(self.model, x)[0] if k - 1 < len(self._after) else x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last gated block's output -> logits."""
        return self._head.run(self.model, x)[0]

    # --- the reference ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, gate_threshold: torch.Tensor | float = DEFAULT_GATE_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's own forward, recorded: (logits, gates [B, m] uint8, gate_probs [B, m])."""
        with record_decisions(gate_threshold) as record:
            logits = self.model(x)
        if [id(b) for b in record.gated_blocks] != [id(b) for b in self.blocks]:
            raise ExportError(f"{type(self.model).__name__}.forward ran its gated blocks in another order than traced "
                              f"({len(record.gated_blocks)} decisions, {len(self.blocks)} gated blocks) | Fix: call each "
                              "GatedBlock once per forward, from the model's forward")
        return logits, record.gates(), record.gate_probs()

    def composed(self, x: torch.Tensor, gate_threshold: float = DEFAULT_GATE_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
        """The network computed from the API's pieces (every block and skip path, one picked
        per sample): (logits, gates), what the exported ``mask`` form computes."""
        x = self.stem(x)
        state = self.gate_init_state(x)
        bits = []
        for k in range(1, self.n_blocks):
            prob, state = self.gate(k - 1, x, state)
            execute = prob > gate_threshold
            executed, skipped = self.run_block(k, x), self.skip(k, x)
            x = torch.where(execute.view((-1,) + (1,) * (executed.dim() - 1)), executed, skipped)
            bits.append(execute)
        return self.head(x), torch.stack(bits, dim=1).to(torch.uint8)


def _returned_logits(traced: TracedNetwork) -> fx.Node:
    """The node forward returns; a gated network returns its logits tensor alone."""
    returned = traced.output.args[0]
    if not isinstance(returned, fx.Node):
        raise ExportError(f"{traced.name}.forward returns a {type(returned).__name__} | Note: a gated network's forward "
                          "returns its logits tensor (the gates' decisions come from slimdeploy.nn.record_decisions) | "
                          "Fix: return the logits only")
    return returned


def _segment_index(traced: TracedNetwork, gated: list[fx.Node]) -> dict[fx.Node, int]:
    """Per node that depends on the image (image and gated blocks excluded), how many gated
    blocks run before or at it: 0 = stem, k = after gated block k."""
    index, found = 0, {}
    boundaries = set(gated)
    for node in traced.nodes:
        if node in boundaries:
            index += 1
            continue
        if node in traced.data and node is not traced.image and node.op != "output":
            found[node] = index
    return found


def _refuse_crossings(traced: TracedNetwork, gated: list[fx.Node]) -> None:
    """Only a gated block's input may flow into it, and nothing computed before a gated block
    may be read after it."""
    position = {node: k + 1 for k, node in enumerate(gated)}
    index = _segment_index(traced, gated)
    index[traced.image] = 0
    for k, node in enumerate(gated):
        index[node] = k + 1
    index[traced.output] = len(gated)
    for source, readers in traced.users().items():
        if source not in index:
            continue
        for reader in readers:
            if reader not in index or index[reader] == index[source] or (
                    reader in position and index[reader] == index[source] + 1 and reader.args[0] is source):
                continue
            crossed = gated[index[source]] if index[source] < len(gated) else gated[-1]
            what = "the image" if source is traced.image else f"a value computed in {traced.where(source)} ({source.name})"
            raise ExportError(
                f"{what} flows past GatedBlock '{crossed.target}' to {traced.where(reader)} ({reader.name}) | Note: only a "
                "gated block's output may reach what follows it, because a skipped block's samples carry its skip path "
                "alone | Fix: move that connection inside the block (its body and skip path), or leave the block ungated")


def _check_controller(model: nn.Module, blocks: list[GatedBlock], paths: list[str]) -> None:
    """Refuse ``ControlledGate``s with several controllers, or one that is not part of the model."""
    controllers = {id(b.gate.controller): (b.gate.controller, p) for b, p in zip(blocks, paths) if b.controlled}
    if not controllers:
        return
    if len(controllers) > 1:
        shown = [path for _, path in controllers.values()][:2]
        raise ExportError(f"the ControlledGates of {shown} use different controllers | Note: a deployment carries one "
                          "gate state from gate to gate | Fix: share one controller between all controlled gates")
    controller, path = next(iter(controllers.values()))
    if not any(module is controller for module in model.modules()):
        raise ExportError(f"the controller of the ControlledGate in '{path}' is not part of the model, so its weights "
                          "are neither trained nor saved with it | Fix: assign it to the model (self.controller = controller)")


def check_gated(adapter: DiscoveredGatedNet, example: torch.Tensor) -> None:
    """Refuse a network whose pieces do not compute what its own forward computes (on
    ``example``): a state the export cannot carry, a forward that bypasses its blocks."""
    traced: TracedNetwork = adapter._traced
    with torch.inference_mode():
        state = adapter.gate_init_state(example)
        widths = {tuple(t.shape[1:]) for t in state}
        if len(state) > MAX_STATE_TENSORS or any(t.dim() != 2 for t in state) or len(widths) > 1:
            raise ExportError(f"the gate controller's state is {[list(t.shape) for t in state]} | Note: a deployment carries "
                              f"at most {MAX_STATE_TENSORS} state tensors of shape [batch, width], of one width (an LSTM's "
                              "h and c) | Fix: keep the controller's state to (h,) or (h, c)")
        logits, gates, _ = adapter(example)
        composed, composed_gates = adapter.composed(example)
    if not torch.equal(gates, composed_gates) or not torch.allclose(logits, composed, atol=1e-5, rtol=1e-4):
        raise ExportError(f"{traced.name}'s gated blocks, cut into pieces, do not compute what its forward computes | "
                          "Note: GatedBlock runs body, gate and skip as given; a subclass that changes forward, or "
                          "randomness in forward, breaks that | Fix: keep the block's behaviour in its body, gate and skip")


def segments_of(adapter: DiscoveredGatedNet) -> list[Segment]:
    """The adapter's segments (stem, between blocks, head), for tests and descriptions."""
    return [adapter._stem, *adapter._after, adapter._head]
