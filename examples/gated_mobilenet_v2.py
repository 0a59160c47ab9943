"""A MobileNetV2 whose inverted residual blocks a gate can skip: your own dynamic network, deployed
with slimdeploy without registering anything.

Every inverted residual block with a residual connection (stride 1, as many channels out as in)
is wrapped in ``slimdeploy.nn.GatedBlock``: a small gate (global average pool, one linear layer,
sigmoid) reads the block's input and decides, per image, whether the block runs; a skipped block
passes its input on unchanged (the residual connection alone). Blocks that change the shape are
not gated. Sized for 32x32 inputs (the digits data at that size), so that it trains in a minute
or two on a CPU (``examples/train.py``).

    slimdeploy export gated.pt --arch examples/gated_mobilenet_v2.py:gated_mobilenet_v2 --out bundle

Training (``training_loss``): gates decide hard and pass gradients straight through (what
``GatedBlock`` does in training mode); the loss is cross-entropy plus ``penalty`` times the
fraction of gated blocks executed, so the gates close where a block adds little.
"""

from __future__ import annotations

import torch
from torch import nn

from slimdeploy.nn import GatedBlock, record_decisions

INPUT_SIZE = (3, 32, 32)
# (expansion, output channels, blocks, stride of the first) per stage: MobileNetV2's layout,
# shortened for 32x32 inputs.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 3, 1))


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, project 1x1 (linear); plus the input where shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers = [conv_bn_relu(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class PoolGate(nn.Module):
    """Probability [B] that a block runs: global average pool, linear, sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, 2.0)  # start open (sigmoid(2) = 0.88)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x.mean(dim=(2, 3))))[:, 0]


class GatedMobileNetV2(nn.Module):
    """MobileNetV2 with gated inverted residuals (see the module docstring).

    Args:
        num_classes: classifier outputs. Defaults to 10.
        width: channels multiplier. Defaults to 1.0.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        self.input_size = INPUT_SIZE
        channels = max(8, int(32 * width))
        layers: list[nn.Module] = [conv_bn_relu(3, channels, 3, 2)]  # 32x32 -> 16x16
        for expansion, out, blocks, first_stride in STAGES:
            out = max(8, int(out * width))
            for i in range(blocks):
                block = InvertedResidual(channels, out, first_stride if i == 0 else 1, expansion)
                layers.append(GatedBlock(block, PoolGate(channels)) if block.residual else block)
                channels = out
        self.features = nn.Sequential(*layers)
        self.last = conv_bn_relu(channels, 4 * channels, 1)
        self.classifier = nn.Linear(4 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.features(x))
        return self.classifier(torch.flatten(x.mean(dim=(2, 3)), 1))


def gated_mobilenet_v2(num_classes: int = 10, width: float = 1.0) -> GatedMobileNetV2:
    """The factory slimdeploy imports (``--arch examples/gated_mobilenet_v2.py:gated_mobilenet_v2``)."""
    return GatedMobileNetV2(num_classes, width)


def training_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epoch: int, epochs: int,
                  penalty: float = 1.0) -> torch.Tensor:
    """Cross-entropy, and from the second epoch on ``penalty`` times the fraction of gated blocks
    executed (the first epoch trains with every block open: threshold -1)."""
    open_phase = epoch == 0 and epochs > 1
    with record_decisions(gate_threshold=-1.0 if open_phase else 0.5) as record:
        logits = model(images)
    loss = nn.functional.cross_entropy(logits, labels)
    return loss if open_phase else loss + penalty * record.executed_fraction()
