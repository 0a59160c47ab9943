"""Depthwise-separable convolution block of MobileNets (Howard et al., 2017, Figure 3).

A 3x3 depthwise convolution (one filter per input channel, carrying the stride) followed by a
1x1 pointwise convolution that mixes channels; each is followed by BatchNorm and ReLU. The
convolutions have no bias because BatchNorm follows them.
"""

from __future__ import annotations

import torch
from torch import nn


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU.

    Submodules: ``dw_conv``, ``dw_bn``, ``pw_conv``, ``pw_bn`` (plus the parameter-free ``relu``).

    Args:
        in_channels: input channels (also the depthwise convolution's groups).
        out_channels: output channels of the pointwise convolution.
        stride: stride of the depthwise convolution, 1 or 2. Defaults to 1.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.dw_conv = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size=3,
            stride=stride,
            padding=1,
            groups=in_channels,
            bias=False,
        )
        self.dw_bn = nn.BatchNorm2d(in_channels)
        self.pw_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.pw_bn = nn.BatchNorm2d(out_channels)
        # Plain ReLU as in the paper (not ReLU6, which MobileNetV2 introduced); not in place, so
        # the block has no in-place mutation for torch.export to functionalise.
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block; output [B, out_channels, H/stride, W/stride]."""
        x = self.relu(self.dw_bn(self.dw_conv(x)))
        return self.relu(self.pw_bn(self.pw_conv(x)))
