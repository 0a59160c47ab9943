"""ResNets whose 3x3 convolutions are SPConv (Zhang et al., "Split to Be Slim", IJCAI 2020).

ImageNet variants (``spconv_resnet18/34/50``) follow the official ``code/resnet_sp.py`` of
qiulinzhang/SPConv.pytorch @78c734f, which is torchvision's ResNet with every 3x3 convolution
inside a block replaced by ``SPConv3x3`` (ratio 0.5). Their state_dict keys are the official
ones: ``conv1``, ``bn1``, ``layer{1..4}.{i}.{conv1,bn1,conv2,bn2[,conv3,bn3]}``,
``layer{s}.0.downsample.{0,1}``, ``fc``; inside each SPConv: ``gwc``, ``pwc``, ``conv1x1``,
``bn1``, ``bn2``.

Upstream releases no CIFAR models, so the CIFAR variants (``spconv_resnet20_cifar``,
``spconv_resnet56_cifar``) are slimdeploy's own: the usual CIFAR ResNet (3x3 stem to 16
channels, three stages of 16/32/64 planes) built from the same blocks with the same key style,
projection shortcuts (1x1 conv with stride + BN) where the shape changes.
"""

from __future__ import annotations

import torch
from torch import nn

from slimdeploy.models.registry import register_model
from slimdeploy.nn import SPConv3x3


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Projection shortcut: 1x1 conv (stride, no bias) + BN; keys ``downsample.0/1``."""
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two SPConv 3x3 layers with BN, plus the shortcut (official ``BasicBlock``).

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first SPConv (1 or 2). Defaults to 1.
        downsample: shortcut module, or None for the identity. Defaults to None.
    """

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = SPConv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = SPConv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, SPConv 3x3 (carrying the stride), 1x1 expand (official ``Bottleneck``).

    Args:
        in_planes: input channels.
        planes: bottleneck width; the output has ``planes * 4`` channels.
        stride: stride of the SPConv (1 or 2). Defaults to 1.
        downsample: shortcut module, or None for the identity. Defaults to None.
    """

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Upstream computes width = int(planes * base_width / 64) * groups; only the plain
        # ResNet-50 (groups 1, base width 64) is registered here, so width == planes.
        width = planes
        self.conv1 = nn.Conv2d(in_planes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = SPConv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck],
    in_planes: int,
    planes: int,
    blocks: int,
    stride: int,
) -> tuple[nn.Sequential, int]:
    """A stage of ``blocks`` blocks; the first carries the stride. Returns (stage, out planes)."""
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = _downsample(in_planes, out_planes, stride)
    layers: list[nn.Module] = [block(in_planes, planes, stride, downsample)]
    layers += [block(out_planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out_planes


def _init_weights(model: nn.Module) -> None:
    # Upstream's initialisation (torchvision's): Kaiming-normal convolutions (fan_out),
    # BN weight 1 and bias 0. Conv biases (SPConv's conv1x1) keep PyTorch's default.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class SPConvResNet(nn.Module):
    """ImageNet ResNet with SPConv blocks; keys match the official ``ResNet``.

    Stride-2 SPConvs need even feature maps, so the input height and width must be multiples
    of 32 (224 by default).

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, four entries.
        num_classes: classifier outputs. Defaults to 1000.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.input_size = (3, 224, 224)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        planes = 64
        self.layer1, planes = _make_stage(block, planes, 64, layers[0], stride=1)
        self.layer2, planes = _make_stage(block, planes, 128, layers[1], stride=2)
        self.layer3, planes = _make_stage(block, planes, 256, layers[2], stride=2)
        self.layer4, planes = _make_stage(block, planes, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [B, num_classes] for images [B, 3, H, W]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # flatten(1) keeps the batch dimension symbolic under torch.export.
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SPConvResNetCifar(nn.Module):
    """CIFAR ResNet (6n+2 layers) with SPConv basic blocks.

    Stride-2 SPConvs need even feature maps, so the input height and width must be multiples
    of 4 (32 by default).

    Args:
        blocks_per_stage: n, the number of basic blocks in each of the three stages.
        num_classes: classifier outputs. Defaults to 10.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.input_size = (3, 32, 32)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes = 16
        self.layer1, planes = _make_stage(BasicBlock, planes, 16, blocks_per_stage, stride=1)
        self.layer2, planes = _make_stage(BasicBlock, planes, 32, blocks_per_stage, stride=2)
        self.layer3, planes = _make_stage(BasicBlock, planes, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [B, num_classes] for images [B, 3, H, W]."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model(
    "spconv_resnet18",
    family="spconv",
    input_size=(3, 224, 224),
    description="ResNet-18 with SPConv 3x3 layers (official SPConv.pytorch ImageNet keys)",
)
def spconv_resnet18(num_classes: int = 1000) -> SPConvResNet:
    """SPConv ResNet-18 for ImageNet. ``num_classes`` defaults to 1000."""
    return SPConvResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes)


@register_model(
    "spconv_resnet34",
    family="spconv",
    input_size=(3, 224, 224),
    description="ResNet-34 with SPConv 3x3 layers (official SPConv.pytorch ImageNet keys)",
)
def spconv_resnet34(num_classes: int = 1000) -> SPConvResNet:
    """SPConv ResNet-34 for ImageNet. ``num_classes`` defaults to 1000."""
    return SPConvResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes)


@register_model(
    "spconv_resnet50",
    family="spconv",
    input_size=(3, 224, 224),
    description="ResNet-50 with SPConv 3x3 layers (official SPConv.pytorch ImageNet keys)",
)
def spconv_resnet50(num_classes: int = 1000) -> SPConvResNet:
    """SPConv ResNet-50 for ImageNet. ``num_classes`` defaults to 1000."""
    return SPConvResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes)


@register_model(
    "spconv_resnet20_cifar",
    family="spconv",
    input_size=(3, 32, 32),
    description="CIFAR ResNet-20 with SPConv 3x3 layers (slimdeploy's own; upstream has none)",
)
def spconv_resnet20_cifar(num_classes: int = 10) -> SPConvResNetCifar:
    """SPConv ResNet-20 for CIFAR (3 blocks per stage). ``num_classes`` defaults to 10."""
    return SPConvResNetCifar(3, num_classes=num_classes)


@register_model(
    "spconv_resnet56_cifar",
    family="spconv",
    input_size=(3, 32, 32),
    description="CIFAR ResNet-56 with SPConv 3x3 layers (slimdeploy's own; upstream has none)",
)
def spconv_resnet56_cifar(num_classes: int = 10) -> SPConvResNetCifar:
    """SPConv ResNet-56 for CIFAR (9 blocks per stage). ``num_classes`` defaults to 10."""
    return SPConvResNetCifar(9, num_classes=num_classes)
