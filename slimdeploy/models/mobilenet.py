"""MobileNet v1 (Howard et al., "MobileNets", 2017), body as in the paper's Table 1.

A 3x3 stride-2 convolution to 32 channels, thirteen depthwise-separable blocks, global average
pooling and a fully connected classifier. ``width_mult`` is the paper's width multiplier
(alpha); ``resolution`` is its resolution multiplier expressed as the input size (rho * 224).

State-dict keys: ``stem.conv``, ``stem.bn``, ``features.{i}.{dw_conv,dw_bn,pw_conv,pw_bn}``
(i = 0..12), ``classifier``.
"""

from __future__ import annotations

import torch
from torch import nn

from slimdeploy.models.registry import register_model
from slimdeploy.nn import DepthwiseSeparable

# (output channels, stride) of each depthwise-separable block, Table 1 of the paper. The
# paper's table lists the last block with stride 2, but its output stays 7x7 (and every
# reference implementation uses stride 1), so that entry is a known typo.
_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
_STEM_CHANNELS = 32


def _scaled(channels: int, width_mult: float) -> int:
    """Channels scaled by the width multiplier, truncated, and never below 8."""
    return max(8, int(channels * width_mult))


class _Stem(nn.Module):
    """Full 3x3 convolution, stride 2, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply conv, BN and ReLU."""
        return self.relu(self.bn(self.conv(x)))


class MobileNetV1(nn.Module):
    """MobileNet v1.

    Args:
        num_classes: classifier outputs. Defaults to 1000.
        width_mult: width multiplier alpha; every layer has ``max(8, int(c * width_mult))``
            channels. Defaults to 1.0.
        resolution: input height and width the model is meant for (recorded in
            ``input_size``; adaptive pooling accepts any size). Defaults to 224.
        in_chans: input image channels. Defaults to 3.
        dropout: dropout probability before the classifier (0 disables it). Defaults to 0.0.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        resolution: int = 224,
        in_chans: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if resolution < 32:
            # Five stride-2 layers: anything smaller collapses to a single pixel early on.
            raise ValueError(f"resolution must be at least 32, got {resolution}")
        # The loader reads this attribute to make example inputs of the right shape.
        self.input_size = (in_chans, resolution, resolution)

        channels = _scaled(_STEM_CHANNELS, width_mult)
        self.stem = _Stem(in_chans, channels)
        blocks = []
        for out_channels, stride in _BLOCKS:
            out_channels = _scaled(out_channels, width_mult)
            blocks.append(DepthwiseSeparable(channels, out_channels, stride))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        # Adaptive pooling instead of the paper's fixed 7x7 average pool, so that the
        # resolution multiplier works without changing any weights.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [B, num_classes] for images [B, in_chans, H, W]."""
        x = self.features(self.stem(x))
        # flatten(1) keeps the batch dimension symbolic under torch.export.
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))


@register_model(
    "mobilenet_v1",
    family="mobilenet",
    input_size=(3, 224, 224),
    description="MobileNet v1 (Howard et al. 2017), depthwise-separable body of Table 1",
)
def mobilenet_v1(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    resolution: int = 224,
    in_chans: int = 3,
    dropout: float = 0.0,
) -> MobileNetV1:
    """MobileNet v1; see ``MobileNetV1`` for the arguments and their defaults."""
    return MobileNetV1(
        num_classes=num_classes,
        width_mult=width_mult,
        resolution=resolution,
        in_chans=in_chans,
        dropout=dropout,
    )
