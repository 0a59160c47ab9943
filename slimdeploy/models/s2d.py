"""S2D multi-stage networks built from a CIFAR ResNet (slimdeploy's S2D format, docs/s2d-format.md).

S2DNAS (Yuan et al., ICLR 2020) splits each layer's channels into groups, one per stage; stage
j computes its own groups and may also read the features earlier stages computed at the
previous layer (concat indicators); each stage ends in a classifier, and a sample leaves at the
first stage whose confidence reaches that stage's threshold. No public implementation exists,
so this file defines the network from its configuration:

- ``splits[l]``: cumulative split points of layer l's output channels, one per stage, the last
  equal to the layer's width (layer 0 is the stem conv, layers 1..3n the residual blocks):
  stage j owns channels ``[splits[l][j-1], splits[l][j])``.
- ``reuse[l][j]``: earlier stages whose layer l-1 output stage j's layer l also reads
  (concatenated in stage order before its own); ``reuse[0]`` is all empty (the stem reads the image).
- one ``ExitHead`` per stage on the stage's last-layer features, used as an ``nn.Exit`` (the
  decision protocol's exit, with the rule and the stage's threshold);
- ``exit_rule`` (``max_softmax`` or ``entropy``) and ``exit_thresholds`` (one per stage, the
  last ignored: the last stage always answers).

Each stage's layer l is a basic block (3x3 conv-BN-ReLU, 3x3 conv-BN, shortcut, ReLU) with the
backbone's stride; the shortcut is the identity when the block keeps channels and resolution,
else a 1x1 conv + BN. Keys: ``stages.{j}.{l}.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}``
(layer 0: ``stages.{j}.0.{conv,bn}``), ``heads.{j}.fc``.

``forward``, ``forward_all`` and the exit rule come from ``nn.exit_stage.EarlyExitNet``: the
forward really stops (samples that left are dropped from the batch after each stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimdeploy.models.registry import register_model
from slimdeploy.nn.exit import Exit
from slimdeploy.nn.exit_stage import EarlyExitNet, ExitHead, Key, check_exit_rule

DEFAULT_FRACTIONS = (0.25, 0.5, 1.0)
DEFAULT_THRESHOLD = 0.9


def resnet_cifar_layers(depth: int) -> list[tuple[int, int]]:
    """(width, stride) of each layer of a CIFAR ResNet of ``depth`` (6n+2): stem, then 3n blocks."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 56, ...), got {depth}")
    n = (depth - 2) // 6
    layers = [(16, 1)]
    for width, first_stride in ((16, 1), (32, 2), (64, 2)):
        layers += [(width, first_stride)] + [(width, 1)] * (n - 1)
    return layers


def default_splits(widths: Sequence[int], fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[list[int]]:
    """Split points of every layer at ``fractions`` of its width. Defaults to (1/4, 1/2, 1):
    stages own 1/4, 1/4 and 1/2 of each layer."""
    return [[max(1, round(width * f)) for f in fractions[:-1]] + [width] for width in widths]


def dense_reuse(n_layers: int, n_stages: int) -> list[list[list[int]]]:
    """Every stage reads every earlier stage's features at every layer but the stem."""
    return [[[] for _ in range(n_stages)]] + [[list(range(j)) for j in range(n_stages)] for _ in range(n_layers - 1)]


class _StemLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _BlockLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class S2DResNetCifar(EarlyExitNet):
    """A CIFAR ResNet split into stages with early exits (see the module docstring).

    Args:
        depth: backbone depth, 6n+2. Defaults to 20.
        num_classes: classes. Defaults to 10.
        splits: split points per layer (``n_layers`` lists of ``n_stages`` ints). Defaults to
            ``default_splits`` at (1/4, 1/2, 1): 3 stages.
        reuse: concat indicators per layer and stage. Defaults to ``dense_reuse``.
        exit_rule: ``"max_softmax"`` or ``"entropy"``. Defaults to ``"max_softmax"``.
        exit_thresholds: one per stage (the last ignored). Defaults to 0.9 for each.
        in_channels: image channels. Defaults to 3.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        splits: Sequence[Sequence[int]] | None = None,
        reuse: Sequence[Sequence[Sequence[int]]] | None = None,
        exit_rule: str = "max_softmax",
        exit_thresholds: Sequence[float] | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        layers = resnet_cifar_layers(depth)
        widths = [w for w, _ in layers]
        self.splits = [list(map(int, s)) for s in (splits or default_splits(widths))]
        self.n_layers, self.n_stages = len(layers), len(self.splits[0])
        self.reuse = [[sorted(map(int, r)) for r in layer] for layer in (reuse or dense_reuse(self.n_layers, self.n_stages))]
        check_exit_rule(exit_rule)
        thresholds = list(exit_thresholds) if exit_thresholds is not None else [DEFAULT_THRESHOLD] * self.n_stages
        self._validate(widths, thresholds)
        self.num_classes = num_classes
        self.stages = nn.ModuleList()
        for j in range(self.n_stages):
            stage = nn.ModuleList()
            for layer, (_, stride) in enumerate(layers):
                out = self.width(j, layer)
                if layer == 0:
                    stage.append(_StemLayer(in_channels, out))
                else:
                    reads = sum(self.width(i, layer - 1) for i in self.reuse[layer][j]) + self.width(j, layer - 1)
                    stage.append(_BlockLayer(reads, out, stride))
            self.stages.append(stage)
        self.heads = nn.ModuleList(ExitHead(self.width(j, self.n_layers - 1), num_classes) for j in range(self.n_stages))
        # The heads as the decision protocol's exits (slimdeploy.nn.Exit), keys kept as they are.
        self.exit_modules = [Exit(head, exit_rule, t, register_head=False) for head, t in zip(self.heads, thresholds)]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _validate(self, widths: Sequence[int], thresholds: Sequence[float]) -> None:
        if len(self.splits) != len(widths):
            raise ValueError(f"splits has {len(self.splits)} layers, the depth-{len(widths)} backbone has {len(widths)}")
        for layer, (points, width) in enumerate(zip(self.splits, widths)):
            if len(points) != self.n_stages or points[-1] != width or any(b <= a for a, b in zip([0, *points], points)):
                raise ValueError(f"splits[{layer}] = {points}: need {self.n_stages} increasing points ending at the width {width}")
        if len(self.reuse) != self.n_layers or any(len(r) != self.n_stages for r in self.reuse):
            raise ValueError(f"reuse needs {self.n_layers} layers of {self.n_stages} stage lists")
        for layer, per_stage in enumerate(self.reuse):
            for j, sources in enumerate(per_stage):
                if any(not 0 <= i < j for i in sources) or (layer == 0 and sources):
                    raise ValueError(f"reuse[{layer}][{j}] = {sources}: stages must be earlier than {j} (none at layer 0)")
        if len(thresholds) != self.n_stages:
            raise ValueError(f"exit_thresholds needs {self.n_stages} values (one per stage), got {len(thresholds)}")

    def width(self, stage: int, layer: int) -> int:
        """Channels stage ``stage`` computes at ``layer``."""
        points = self.splits[layer]
        return points[stage] - (points[stage - 1] if stage else 0)

    # --- the decomposition the exporters and the staged controller follow -------------------
    def needs(self, stage: int) -> list[Key]:
        """Earlier stages' feature maps (stage, layer) that ``stage`` reads, sorted."""
        return sorted({(i, layer - 1) for layer in range(1, self.n_layers) for i in self.reuse[layer][stage]})

    def provides(self, stage: int) -> list[Key]:
        """This stage's feature maps that later stages read, sorted."""
        return sorted({key for later in range(stage + 1, self.n_stages) for key in self.needs(later) if key[0] == stage})

    def run_stage(self, stage: int, x: torch.Tensor, carried: dict[Key, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage ``stage`` on images ``x`` with the earlier stages' features it reads: its
        logits and its feature map at every layer."""
        features: list[torch.Tensor] = []
        for layer, module in enumerate(self.stages[stage]):
            if layer == 0:
                features.append(module(x))
                continue
            inputs = [carried[(i, layer - 1)] for i in self.reuse[layer][stage]] + [features[-1]]
            features.append(module(torch.cat(inputs, dim=1) if len(inputs) > 1 else inputs[0]))
        return self.exit_modules[stage](features[-1]), features


def _s2d(depth: int, num_classes: int, splits: Any, reuse: Any, exit_rule: str, exit_thresholds: Any) -> S2DResNetCifar:
    return S2DResNetCifar(depth, num_classes, splits, reuse, exit_rule, exit_thresholds)


@register_model("s2d_resnet20_cifar", family="early_exit", input_size=(3, 32, 32), dynamic=True)
def s2d_resnet20_cifar(
    num_classes: int = 10,
    splits: list[list[int]] | None = None,
    reuse: list[list[list[int]]] | None = None,
    exit_rule: str = "max_softmax",
    exit_thresholds: list[float] | None = None,
) -> S2DResNetCifar:
    """S2D ResNet-20 (CIFAR layout, 32x32): 3 stages owning 1/4, 1/4, 1/2 of every layer, dense reuse."""
    return _s2d(20, num_classes, splits, reuse, exit_rule, exit_thresholds)


@register_model("s2d_resnet56_cifar", family="early_exit", input_size=(3, 32, 32), dynamic=True)
def s2d_resnet56_cifar(
    num_classes: int = 10,
    splits: list[list[int]] | None = None,
    reuse: list[list[list[int]]] | None = None,
    exit_rule: str = "max_softmax",
    exit_thresholds: list[float] | None = None,
) -> S2DResNetCifar:
    """S2D ResNet-56 (CIFAR layout, 32x32): 3 stages owning 1/4, 1/4, 1/2 of every layer, dense reuse."""
    return _s2d(56, num_classes, splits, reuse, exit_rule, exit_thresholds)
