"""A CIFAR-style ResNet with exits where you choose: your own early-exit network, deployed with
slimdeploy without registering anything.

Three stages of basic residual blocks (16, 32, 64 channels); an ``slimdeploy.nn.Exit`` (a small
convolutional branch and a classifier) after each stage you name in ``exits_after`` (default:
stages 1 and 2), and the final classifier is an ``Exit`` too (the last exit always answers). A sample leaves at the first exit whose max-softmax
confidence reaches that exit's threshold. Sized for 32x32 inputs (the digits data at that size),
so that it trains in a minute or two on a CPU (``examples/train.py``).

    slimdeploy export exits.pt --arch examples/early_exit_resnet.py:early_exit_resnet --out bundle

Training (``training_loss``): the sum of every exit's cross-entropy. The thresholds are then
chosen on the calibration split (``choose_thresholds``: the lowest at which the samples leaving
an exit are as accurate as ``target``) and saved with the weights (an Exit's threshold is a
buffer); a deployment can still change them at run time (the ``exit_thresholds`` input).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slimdeploy.nn import Exit, record_decisions
from slimdeploy.nn.exit_stage import ExitHead

INPUT_SIZE = (3, 32, 32)
WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BN and a shortcut (a 1x1 projection where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class BranchHead(nn.Sequential):
    """An exit's classifier, BranchyNet style: a 3x3 convolution of stride 2 (twice the channels),
    BN, ReLU, global average pooling, a linear layer."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(nn.Conv2d(channels, 2 * channels, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, num_classes))


class EarlyExitResNet(nn.Module):
    """A ResNet with exits after chosen stages (see the module docstring).

    Args:
        num_classes: classes. Defaults to 10.
        blocks: basic blocks per stage. Defaults to 1.
        exits_after: stages (1, 2) followed by an exit. Defaults to (1, 2).
    """

    def __init__(self, num_classes: int = 10, blocks: int = 1, exits_after: Sequence[int] = (1, 2)) -> None:
        super().__init__()
        self.input_size = INPUT_SIZE
        self.stem = nn.Sequential(nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False), nn.BatchNorm2d(WIDTHS[0]), nn.ReLU())
        self.stages = nn.ModuleList()
        channels = WIDTHS[0]
        for index, width in enumerate(WIDTHS):
            stride = 1 if index == 0 else 2
            self.stages.append(nn.Sequential(*[BasicBlock(channels if i == 0 else width, width, stride if i == 0 else 1)
                                               for i in range(blocks)]))
            channels = width
        self.exits_after = [int(stage) for stage in exits_after]
        self.exits = nn.ModuleDict({str(stage): Exit(BranchHead(WIDTHS[stage - 1], num_classes)) for stage in self.exits_after})
        self.classifier = Exit(ExitHead(WIDTHS[-1], num_classes))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The logits of every exit, in order, the classifier's last (what training wants)."""
        x = self.stem(x)
        outputs = []
        for index, stage in enumerate(self.stages, 1):
            x = stage(x)
            if str(index) in self.exits:
                outputs.append(self.exits[str(index)](x))
        return [*outputs, self.classifier(x)]


def early_exit_resnet(num_classes: int = 10, blocks: int = 1, exits_after: Sequence[int] = (1, 2)) -> EarlyExitResNet:
    """The factory slimdeploy imports (``--arch examples/early_exit_resnet.py:early_exit_resnet``)."""
    return EarlyExitResNet(num_classes, blocks, exits_after)


def training_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epoch: int, epochs: int) -> torch.Tensor:
    """The sum of every exit's cross-entropy."""
    return sum(nn.functional.cross_entropy(logits, labels) for logits in model(images))


def choose_thresholds(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, target: float = 0.99) -> list[float]:
    """Set every exit's threshold but the last to the lowest confidence at which the samples that
    would leave there are at least ``target`` accurate (on ``images``); return them all."""
    exits = [m for m in model.modules() if isinstance(m, Exit)]
    with torch.no_grad(), record_decisions() as record:
        model.eval()(images)
    for exit_, logits in zip(exits[:-1], record.exit_logits):
        confidence, right = exit_.confidence(logits), logits.argmax(dim=1) == labels
        for candidate in torch.linspace(0.8, 0.999, 200):
            leaving = confidence >= candidate
            if bool(leaving.any()) and float(right[leaving].float().mean()) >= target:
                exit_.threshold.fill_(float(candidate))
                break
        else:
            exit_.threshold.fill_(1.01)  # never confident enough: every sample goes on
    return [float(e.threshold) for e in exits]
