"""The gated model API over a network's ``GatedBlock``s: what ``exporters.gated.gated_pieces``
consumes, shared by the built-in SkipNet and by any network discovery cut at its gated blocks.

    stem(x)                  the image -> block 0's input
    run_block(0, x)          block 0, which always runs (the identity where there is none)
    run_block(k, x)          gated block k (k = 1..n-1) executed: its body, then ``after_block``
    skip(k, x)               gated block k skipped: its skip path, then ``after_block``
    gate_init_state(x)       the shared controller's state at the start (``()`` without one)
    gate(k, features, state) gated block k + 1's gate on its input: (probability [B], new state)
    head(x)                  the last block's output -> logits

``after_block(k, x)`` is the code between gated block k and the next one (none by default):
the executed and the skipped piece both end with it. Every decision is the block's own
(``GatedBlock.probability`` and ``skip_path``), so the pieces compute what the blocks do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimdeploy.nn.gated_block import GatedBlock, run_gate


class GatedNetwork(nn.Module):
    """Base of networks the gated forms export (see the module docstring). Subclasses give
    ``gated_blocks``, ``stem`` and ``head``, and ``first_block``/``after_block`` where they
    have them."""

    @property
    def gated_blocks(self) -> Sequence[GatedBlock]:
        """The gated blocks, in call order."""
        raise NotImplementedError

    @property
    def n_blocks(self) -> int:
        """Block 0 and the gated blocks."""
        return len(self.gated_blocks) + 1

    def stem(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def first_block(self, x: torch.Tensor) -> torch.Tensor:
        """Block 0, which always runs. Defaults to none (the identity)."""
        return x

    def after_block(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """The code between gated block k and the next. Defaults to none."""
        return x

    def run_block(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Block k executed."""
        return self.first_block(x) if k == 0 else self.after_block(k, self.gated_blocks[k - 1].body(x))

    def skip(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Block k skipped."""
        return self.after_block(k, self.gated_blocks[k - 1].skip_path(x))

    @property
    def gate_controller(self) -> Any:
        """The controller the gates share (None for feed-forward gates)."""
        return next((b.gate.controller for b in self.gated_blocks if b.controlled), None)

    def gate_init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The state carried from gate to gate at the start of a forward: ``()`` without a
        controller; ``x`` (any [B, ...] tensor) gives the batch size, dtype and device."""
        controller = self.gate_controller
        return () if controller is None else tuple(controller.init_state(x))

    def gate(self, k: int, features: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Gated block k + 1's gate on its input: (probability [B] that it executes, new state)."""
        return run_gate(self.gated_blocks[k].gate, features, state)
