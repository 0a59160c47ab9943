"""Squeeze-and-excitation as CondenseNetV2 uses it (its ``layers.SELayer``).

Global average pool -> Linear (no bias) to ``channels // reduction`` -> ReLU -> Linear (no bias)
back to ``channels`` -> sigmoid, which scales each channel. Keys ``fc.0.weight`` and
``fc.2.weight``, as upstream.
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """Channel attention over ``channels`` with bottleneck ``channels // reduction`` (default 16)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean over H, W is the adaptive average pool to 1x1; flatten(1) keeps batch 1 working.
        scale = self.fc(x.mean(dim=(2, 3)))
        return x * scale[:, :, None, None]
