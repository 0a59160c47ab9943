"""A block that a gate can skip, for any network: ``GatedBlock(body, gate, skip=None)``.

The gate reads the block's input and gives, per sample, the probability [B] that the block
executes; the block executes iff that probability is strictly greater than the gate threshold
(0.5 unless ``record_decisions`` says otherwise). Executed, the block outputs ``body(x)``;
skipped, ``skip(x)``: the input itself (``skip=None``) or a module, such as a downsampling
projection, whose output has the body's shape.

    block = GatedBlock(InvertedResidual(32, 32), gate=PoolLinearGate(32))

Gates that share state from gate to gate (SkipNet's recurrent gate: one LSTM over the blocks)
are ``ControlledGate(embed, controller)``: the block's input goes through ``embed`` and then one
step of the shared ``controller``, whose state a ``record_decisions`` forward carries from gate
to gate in call order and starts afresh for every forward.

Eager forward is the reference, not the fast path: in eval mode both paths are computed and each
sample takes one (``torch.where``, exact); in training mode the decision is hard and its
gradient straight-through (``g = hard + (prob - prob.detach())``, output ``g * body(x) +
(1 - g) * skip(x)``), so training routes samples as inference does. slimdeploy's exported forms
compute only the path each sample takes (docs/design.md §3).
"""

from __future__ import annotations

import torch
from torch import nn

from slimdeploy.nn.decisions import DEFAULT_GATE_THRESHOLD, DecisionRecord, active_record


class ControlledGate(nn.Module):
    """A gate that is one step of a controller shared with other gates, carrying its state.

    Args:
        embed: module mapping the block's input to the controller's input.
        controller: the shared module: ``init_state(x) -> tuple of [B, width] tensors`` (at most
            two, of one width: the LSTM's (h, c)) and ``forward(inputs, state) -> (prob [B],
            new state)``. It is not registered here: register it once on the model (e.g.
            ``self.controller = controller``) so that its weights are trained and saved;
            slimdeploy refuses a controller that is not part of the model.
    """

    def __init__(self, embed: nn.Module, controller: nn.Module) -> None:
        super().__init__()
        if not hasattr(controller, "init_state"):
            raise TypeError(f"the controller of a ControlledGate needs init_state(x) -> tuple of [B, width] tensors; "
                            f"{type(controller).__name__} has none")
        self.embed = embed
        # Kept out of the module tree: every gate shares it, and its weights belong to the model once.
        self.__dict__["controller"] = controller

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The controller's state at the start of a forward pass; ``x`` gives the batch size."""
        return tuple(self.controller.init_state(x))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(probability [B] that the block executes, the controller's new state)."""
        prob, new_state = self.controller(self.embed(x), state)
        return prob, tuple(new_state)


def run_gate(gate: nn.Module, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One gate on ``x``: (probability [B] of executing, the state after it). A
    ``ControlledGate`` takes the controller's state and returns its next one; any other gate
    leaves ``state`` as it is."""
    if isinstance(gate, ControlledGate):
        return gate(x, state)
    return gate(x), state


class GatedBlock(nn.Module):
    """A block that a gate can skip (see the module docstring).

    Args:
        body: what runs when the block executes.
        gate: module mapping the block's input to the probability [B] of executing, or a
            ``ControlledGate``.
        skip: what runs when the block is skipped: None for the identity, or a module whose
            output has the body's shape. Defaults to None.
        register_parts: register ``body``, ``gate`` and ``skip`` as submodules (state_dict keys
            ``body.*``, ``gate.*``, ``skip.*``). False leaves them where the model registered
            them, for models whose keys are fixed (the official SkipNet layout). Defaults to True.

    Raises:
        TypeError: when a part is not an ``nn.Module`` (a skip path must be None or a module).
    """

    def __init__(self, body: nn.Module, gate: nn.Module, skip: nn.Module | None = None, *,
                 register_parts: bool = True) -> None:
        super().__init__()
        for role, part in (("body", body), ("gate", gate), ("skip", skip)):
            if part is not None and not isinstance(part, nn.Module):
                raise TypeError(f"GatedBlock {role} must be an nn.Module{' or None (the identity)' if role == 'skip' else ''}, "
                                f"got {type(part).__name__} | Fix: wrap the computation in an nn.Module")
        if body is None or gate is None:
            raise TypeError("GatedBlock needs a body and a gate")
        if register_parts:
            self.body, self.gate, self.skip = body, gate, skip
        else:
            self.__dict__.update(body=body, gate=gate, skip=skip)

    @property
    def controlled(self) -> bool:
        """True when the gate carries state through a shared controller."""
        return isinstance(self.gate, ControlledGate)

    def skip_path(self, x: torch.Tensor) -> torch.Tensor:
        """The output when the block is skipped: ``x``, or ``skip(x)``."""
        return x if self.skip is None else self.skip(x)

    def probability(self, x: torch.Tensor, record: DecisionRecord | None = None) -> torch.Tensor:
        """The probability [B] that the block executes for each sample of ``x``; a controlled
        gate takes and updates its controller's state in ``record``."""
        if self.controlled:
            if record is None:
                raise RuntimeError(
                    "a ControlledGate carries its controller's state from gate to gate, which lives in a "
                    "record_decisions forward | Fix: run the model inside `with record_decisions(): model(x)` "
                    "(slimdeploy.nn.record_decisions)")
            key = id(self.gate.controller)
            state = record.states[key] if key in record.states else self.gate.init_state(x)
            prob, record.states[key] = run_gate(self.gate, x, state)
        else:
            prob, _ = run_gate(self.gate, x, ())
        if prob.dim() != 1 or prob.shape[0] != x.shape[0]:
            raise ValueError(f"the gate of a GatedBlock returned shape {list(prob.shape)}, expected [batch] = "
                             f"[{x.shape[0]}] probabilities | Fix: end the gate with flatten() and index the "
                             "'execute' column (e.g. softmax(logits, 1)[:, 1]) or squeeze a [B, 1] sigmoid with [:, 0]")
        return prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output per sample: ``body(x)`` where the gate opens, else the skip path."""
        record = active_record()
        prob = self.probability(x, record)
        execute = prob > (record.gate_threshold if record is not None else DEFAULT_GATE_THRESHOLD)
        executed, skipped = self.body(x), self.skip_path(x)
        if executed.shape != skipped.shape:
            raise ValueError(f"a GatedBlock's body outputs {list(executed.shape)} but its skip path {list(skipped.shape)} "
                             "| Fix: give the block a skip module mapping its input to the body's output shape "
                             "(e.g. a 1x1 convolution with the body's stride)")
        rows = (-1,) + (1,) * (executed.dim() - 1)
        if self.training:
            # hard + (prob - prob.detach()): exactly 0 or 1 forward ((1 + p) - p need not be 1 in
            # floating point), the gradient of prob backward.
            weight = (execute.to(prob.dtype) + (prob - prob.detach())).view(rows)
            out = weight * executed + (1 - weight) * skipped
        else:
            out = torch.where(execute.view(rows), executed, skipped)
        if record is not None:
            record.probs.append(prob)
            record.executed.append(execute)
            record.gated_blocks.append(self)
        return out
