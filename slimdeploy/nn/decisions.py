"""What one forward pass decided: the record that ``GatedBlock`` and ``Exit`` write into.

The decision protocol (``GatedBlock``, ``ControlledGate``, ``Exit``; docs/design.md §3,
"Your own dynamic network") keeps no state between forward passes. A forward that runs inside
``record_decisions`` gives every gated block its threshold and every controlled gate its carried
state, and collects what each block and exit decided, in call order::

    with record_decisions(gate_threshold=0.5) as record:
        logits = model(images)
    record.gates()        # [B, n_gated] uint8, 1 = executed, column j = the j-th gated block called
    record.gate_probs()   # [B, n_gated] float32
    record.exit_logits    # the logits of every Exit called, in order

Outside ``record_decisions`` a model still runs: gated blocks decide at the default threshold
(0.5) and nothing is recorded; only gates that carry state (``ControlledGate``) need the record,
which is where their state lives between gates.

Training uses the same record: ``record.gate_probs()`` keeps its gradient, so a compute penalty
such as ``penalty * record.executed_fraction()`` can join the loss.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

DEFAULT_GATE_THRESHOLD = 0.5

_ACTIVE = threading.local()


@dataclass
class DecisionRecord:
    """The decisions of one forward pass.

    Attributes:
        gate_threshold: a gated block executes for a sample iff its probability is strictly
            greater (a float, or a 0-D tensor). Defaults to 0.5.
        probs: per gated block called, in order, the probability [B] that it executes.
        executed: per gated block called, in order, the decision [B] (bool, True = executed).
        gated_blocks: the gated blocks called, in order (what each column is about).
        exit_logits: per ``Exit`` called, in order, its logits [B, classes].
        exits: the ``Exit`` modules called, in order.
        states: the state each gate controller carries, by the controller's ``id``.
    """

    gate_threshold: float | torch.Tensor = DEFAULT_GATE_THRESHOLD
    probs: list[torch.Tensor] = field(default_factory=list)
    executed: list[torch.Tensor] = field(default_factory=list)
    gated_blocks: list[torch.nn.Module] = field(default_factory=list)
    exit_logits: list[torch.Tensor] = field(default_factory=list)
    exits: list[torch.nn.Module] = field(default_factory=list)
    states: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def gates(self) -> torch.Tensor:
        """Decisions [B, n_gated] uint8 (1 = executed)."""
        if not self.executed:
            raise ValueError("no gated block ran in this forward, so there are no gate decisions to stack")
        return torch.stack(self.executed, dim=1).to(torch.uint8)

    def gate_probs(self) -> torch.Tensor:
        """Probabilities [B, n_gated] that each gated block executes (with their gradient)."""
        if not self.probs:
            raise ValueError("no gated block ran in this forward, so there are no gate probabilities to stack")
        return torch.stack(self.probs, dim=1)

    def executed_fraction(self) -> torch.Tensor:
        """Mean over samples and gated blocks of the executed decisions, with the gradient of the
        probabilities (straight-through): a compute penalty for training."""
        probs = self.gate_probs()
        hard = torch.stack(self.executed, dim=1).to(probs.dtype)
        return (hard + (probs - probs.detach())).mean()


@contextmanager
def record_decisions(gate_threshold: float | torch.Tensor = DEFAULT_GATE_THRESHOLD) -> Iterator[DecisionRecord]:
    """Run a forward pass that records its decisions (see the module docstring).

    Args:
        gate_threshold: a gated block executes iff its probability is strictly greater.
            Defaults to 0.5.
    """
    record = DecisionRecord(gate_threshold=gate_threshold)
    stack = _stack()
    stack.append(record)
    try:
        yield record
    finally:
        stack.pop()


def active_record() -> DecisionRecord | None:
    """The record of the innermost ``record_decisions`` on this thread, or None."""
    stack = _stack()
    return stack[-1] if stack else None


def _stack() -> list[DecisionRecord]:
    if not hasattr(_ACTIVE, "records"):
        _ACTIVE.records = []
    return _ACTIVE.records
