"""Residual blocks that a gate can skip: the blocks of SkipNet (Wang et al., ECCV 2018).

A gated residual block has two paths:

- ``forward(x)``: the ordinary residual block, ``relu(F(x) + shortcut(x))``;
- ``skip(x)``: what the block outputs when its gate closes, ``downsample(x)`` (1x1 conv with the
  block's stride + BN, no ReLU) where the block changes the shape, else ``x`` unchanged.

``select(x, execute)`` picks per sample between the two (``execute`` is a [B] bool tensor) and is
exact: each row is bit-for-bit one path or the other. It is what the official SkipNet code computes
with its ``mask * x + (1 - mask) * prev`` blend, whose masks are exactly 0 or 1.

Submodule names are those of the official ``BasicBlock``/``Bottleneck`` (ucbdrive/skipnet
``cifar/models.py`` and ``imagenet/models.py``): ``conv1``, ``bn1``, ``conv2``, ``bn2``
(``conv3``, ``bn3``), ``downsample.0`` (conv) and ``downsample.1`` (BN), so state_dict keys match
official checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn


def projection_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """The downsample path: 1x1 conv (stride, no bias) then BN; keys ``0.weight`` and ``1.*``."""
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class GatedResidual(nn.Module):
    """Base of the gated residual blocks: the skip path and per-sample selection.

    Subclasses define ``residual(x)`` (the branch before the addition) and set ``downsample``.
    """

    expansion = 1
    downsample: nn.Sequential | None

    def residual(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The residual branch F(x), before the shortcut is added."""
        raise NotImplementedError

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """``downsample(x)`` where the block changes the shape, else ``x``."""
        return x if self.downsample is None else self.downsample(x)

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The output when the gate closes: the shortcut alone, without ReLU."""
        return self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The executed block: ``relu(F(x) + shortcut(x))``."""
        return torch.relu(self.residual(x) + self.shortcut(x))

    def select(self, x: torch.Tensor, execute: torch.Tensor) -> torch.Tensor:
        """Per sample, ``forward(x)`` where ``execute`` ([B] bool) is true, else ``skip(x)``.

        Both paths are computed (this is the reference, not the fast path); the result is exact.
        """
        return torch.where(execute[:, None, None, None], self.forward(x), self.skip(x))


class GatedBasicBlock(GatedResidual):
    """Two 3x3 convolutions with BN (official ``BasicBlock``), skippable.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution. Defaults to 1.
        downsample: the shortcut projection, or None for the identity. Defaults to None.
    """

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Sequential | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.in_planes, self.planes, self.stride = in_planes, planes, stride

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """conv-BN-ReLU-conv-BN."""
        out = torch.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class GatedBottleneck(GatedResidual):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4, each with BN (official
    ``Bottleneck``), skippable.

    Args:
        in_planes: input channels.
        planes: bottleneck width; the output has ``4 * planes`` channels.
        stride: stride of the 3x3 convolution. Defaults to 1.
        downsample: the shortcut projection, or None for the identity. Defaults to None.
    """

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Sequential | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.in_planes, self.planes, self.stride = in_planes, planes, stride

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """1x1-BN-ReLU, 3x3-BN-ReLU, 1x1-BN."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))
