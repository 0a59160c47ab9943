"""CondenseNet (Huang et al., "CondenseNet: An Efficient DenseNet using Learned Group
Convolutions", CVPR 2018): the training form ``condensenet`` and the deploy form
``condensenet_converted``.

Reproduces ShichenLiu/CondenseNet @833a91d (``models/condensenet.py``,
``models/condensenet_converted.py``) with its state_dict keys:

- ``features.init_conv`` (3x3, stride 1 on CIFAR, 2 on ImageNet, 2*growth[0] channels);
- per block b and layer l, ``features.denseblock_{b}.denselayer_{l}.conv_1`` (1x1
  ``LearnedGroupConv`` to bottleneck*growth channels, or its ``CondensedConv`` deploy form) and
  ``.conv_2`` (BN-ReLU-3x3 conv with ``group_3x3`` groups to growth channels), the layer output
  concatenated to its input;
- ``features.transition_{b}`` between blocks (2x2 AvgPool, no state);
- ``features.norm_last`` (BN), ReLU and AvgPool (8 on CIFAR, 7 on ImageNet);
- ``classifier``: ``Linear`` (training form) or ``CondensedLinear`` (deploy form; the official
  converter keeps half of its inputs, ``classifier_keep=0.5``; the exact condense transform
  keeps all, ``classifier_keep=1.0``).

Defaults: the official CIFAR configuration (stages 14-14-14, growth 8-16-32) or, with
``data="imagenet"``, stages 4-6-8-10-8 and growth 8-16-32-64-128; bottleneck, group_1x1,
group_3x3 and condense_factor 4; num_classes 10/100/1000 by ``data``. ``infer_args`` reads all of
them from a checkpoint's keys and shapes. Batch size 1 works (no bare ``squeeze``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimdeploy.models.registry import register_model
from slimdeploy.nn.condensed_conv import CondensedConv, CondensedLinear
from slimdeploy.nn.learned_group_conv import LearnedGroupConv

_DATASETS = ("cifar10", "cifar100", "imagenet")
_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar": {"stages": (14, 14, 14), "growth": (8, 16, 32), "stride": 1, "pool": 8, "size": 32},
    "imagenet": {
        "stages": (4, 6, 8, 10, 8),
        "growth": (8, 16, 32, 64, 128),
        "stride": 2,
        "pool": 7,
        "size": 224,
    },
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


class BNReLUConv(nn.Sequential):
    """BN -> ReLU -> conv (no bias): the official ``layers.Conv``; keys ``norm.*``, ``conv.weight``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size,
                                          padding=padding, groups=groups, bias=False))


class DenseLayer(nn.Module):
    """``cat([x, conv_2(conv_1(x))], 1)``."""

    def __init__(self, conv_1: nn.Module, conv_2: nn.Module) -> None:
        super().__init__()
        self.conv_1 = conv_1
        self.conv_2 = conv_2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv_2(self.conv_1(x))], 1)


class Transition(nn.Module):
    """2x2 average pooling between dense blocks (no state, as upstream)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class CondenseNet(nn.Module):
    """CondenseNet in training (``converted=False``) or deploy (``converted=True``) form.

    ``features_pooled(x)`` returns the pooled features [B, num_features] fed to the classifier.
    """

    def __init__(
        self,
        stages: Sequence[int],
        growth: Sequence[int],
        bottleneck: int = 4,
        group_1x1: int = 4,
        group_3x3: int = 4,
        condense_factor: int = 4,
        data: str = "cifar10",
        num_classes: int = 10,
        dropout_rate: float = 0.0,
        converted: bool = False,
        classifier_keep: float = 0.5,
    ) -> None:
        super().__init__()
        if data not in _DATASETS:
            raise ValueError(f"data must be one of {_DATASETS}, got {data!r}")
        if len(stages) != len(growth):
            raise ValueError(f"stages {list(stages)} and growth {list(growth)} differ in length")
        layout = _LAYOUT["imagenet" if data == "imagenet" else "cifar"]
        self.config = {
            "stages": tuple(stages), "growth": tuple(growth), "bottleneck": bottleneck,
            "group_1x1": group_1x1, "group_3x3": group_3x3, "condense_factor": condense_factor,
            "data": data, "num_classes": num_classes,
        }
        self.converted = converted
        self.input_size = (3, layout["size"], layout["size"])
        features = nn.Sequential()
        channels = 2 * growth[0]
        features.add_module("init_conv", nn.Conv2d(3, channels, 3, stride=layout["stride"],
                                                   padding=1, bias=False))
        for b, (n_layers, rate) in enumerate(zip(stages, growth), start=1):
            block = nn.Sequential()
            width = bottleneck * rate
            for layer in range(1, n_layers + 1):
                conv_1: nn.Module
                if converted:
                    # The deploy layer gathers in*G/C channels: in/C per group.
                    conv_1 = CondensedConv(channels * group_1x1 // condense_factor, width, 1,
                                           groups=group_1x1)
                else:
                    conv_1 = LearnedGroupConv(channels, width, 1, groups=group_1x1,
                                              condense_factor=condense_factor,
                                              dropout_rate=dropout_rate)
                conv_2 = BNReLUConv(width, rate, 3, padding=1, groups=group_3x3)
                block.add_module(f"denselayer_{layer}", DenseLayer(conv_1, conv_2))
                channels += rate
            features.add_module(f"denseblock_{b}", block)
            if b < len(stages):
                features.add_module(f"transition_{b}", Transition())
        features.add_module("norm_last", nn.BatchNorm2d(channels))
        features.add_module("relu_last", nn.ReLU(inplace=True))
        features.add_module("pool_last", nn.AvgPool2d(layout["pool"]))
        self.features = features
        self.num_features = channels
        self.classifier: nn.Module
        if converted:
            self.classifier = CondensedLinear(int(channels * classifier_keep), num_classes)
        else:
            self.classifier = nn.Linear(channels, num_classes)

    def features_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, num_features], the classifier's input."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features_pooled(x))


def _resolve(stages: Sequence[int] | None, growth: Sequence[int] | None, data: str,
             num_classes: int | None) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    layout = _LAYOUT["imagenet" if data == "imagenet" else "cifar"]
    if data not in _NUM_CLASSES:
        raise ValueError(f"data must be one of {_DATASETS}, got {data!r}")
    return (tuple(stages) if stages is not None else layout["stages"],
            tuple(growth) if growth is not None else layout["growth"],
            num_classes if num_classes is not None else _NUM_CLASSES[data])


def infer_condensenet_args(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Constructor args read from the keys and shapes of a learned or converted checkpoint.

    stages/growth: layers per block and conv_2 outputs; bottleneck: conv_1 outputs / growth;
    group_3x3: conv_2 inputs / its weight's inputs; num_classes: classifier outputs; data:
    ImageNet unless there are 3 blocks. Learned form: condense_factor from ``_count`` and
    ``_stage`` (in/C channels dropped per stage), group_1x1 from the period of the mask rows
    (outputs i, i+G, ... share a row); both left at their defaults while no channel is dropped.
    Converted form: group_1x1 = index length / conv_1 weight inputs, condense_factor = in*G/len,
    classifier_keep = classifier index length / features.
    """
    args: dict[str, Any] = {}
    prefix = "features.denseblock_"
    layers: dict[int, int] = {}
    for key in state_dict:
        if key.startswith(prefix) and ".denselayer_" in key:
            block, rest = key[len(prefix):].split(".", 1)
            layer = int(rest.split(".", 1)[0].removeprefix("denselayer_"))
            layers[int(block)] = max(layers.get(int(block), 0), layer)
    if not layers:
        return args
    stages = [layers[b] for b in sorted(layers)]
    growth = [int(state_dict[f"{prefix}{b}.denselayer_1.conv_2.conv.weight"].shape[0])
              for b in sorted(layers)]
    first = f"{prefix}1.denselayer_1"
    conv_2 = state_dict[f"{first}.conv_2.conv.weight"]
    width = int(state_dict[f"{first}.conv_2.norm.weight"].shape[0])
    args.update(stages=stages, growth=growth, bottleneck=width // growth[0],
                group_3x3=width // int(conv_2.shape[1]))
    if "classifier.weight" in state_dict:
        args["num_classes"] = int(state_dict["classifier.weight"].shape[0])
    elif "classifier.linear.weight" in state_dict:
        args["num_classes"] = int(state_dict["classifier.linear.weight"].shape[0])
    args["data"] = ("cifar100" if args.get("num_classes") == 100 else "cifar10") \
        if len(stages) == 3 else "imagenet"

    in_first = int(state_dict["features.init_conv.weight"].shape[0])
    if f"{first}.conv_1.index" in state_dict:  # converted form
        length = int(state_dict[f"{first}.conv_1.index"].shape[0])
        group_1x1 = length // int(state_dict[f"{first}.conv_1.conv.weight"].shape[1])
        args.update(group_1x1=group_1x1, condense_factor=in_first * group_1x1 // length)
        features = int(state_dict["features.norm_last.weight"].shape[0])
        args["classifier_keep"] = int(state_dict["classifier.index"].shape[0]) / features
        return args

    period = 1
    for key, mask in state_dict.items():
        if not key.endswith("conv_1._mask"):
            continue
        base = key.removesuffix("_mask")
        stage, count = float(state_dict[base + "_stage"][0]), float(state_dict[base + "_count"][0])
        if stage > 0 and count > 0 and "condense_factor" not in args:
            args["condense_factor"] = round(mask.shape[1] * stage / count)
        rows = mask.flatten(1)
        out = rows.shape[0]
        # The smallest G dividing out with row r == row r+G for all r divides the true groups.
        for g in range(1, out + 1):
            if out % g == 0 and torch.equal(rows[g:], rows[:-g] if g < out else rows[:0]):
                period = math.lcm(period, g)
                break
    if period > 1:
        args["group_1x1"] = period
    return args


@register_model("condensenet", family="condensenet", input_size=(3, 32, 32),
                infer_args=infer_condensenet_args,
                description="CondenseNet, training form (learned group convolutions with masks)")
def condensenet(
    stages: Sequence[int] | None = None,
    growth: Sequence[int] | None = None,
    bottleneck: int = 4,
    group_1x1: int = 4,
    group_3x3: int = 4,
    condense_factor: int = 4,
    data: str = "cifar10",
    num_classes: int | None = None,
    dropout_rate: float = 0.0,
) -> CondenseNet:
    """CondenseNet training form; stages/growth/num_classes default to the official ``data`` config."""
    stages, growth, num_classes = _resolve(stages, growth, data, num_classes)
    return CondenseNet(stages, growth, bottleneck, group_1x1, group_3x3, condense_factor, data,
                       num_classes, dropout_rate)


@register_model("condensenet_converted", family="condensenet", input_size=(3, 32, 32),
                infer_args=infer_condensenet_args,
                description="CondenseNet, deploy form (index + group convolution + shuffle)")
def condensenet_converted(
    stages: Sequence[int] | None = None,
    growth: Sequence[int] | None = None,
    bottleneck: int = 4,
    group_1x1: int = 4,
    group_3x3: int = 4,
    condense_factor: int = 4,
    data: str = "cifar10",
    num_classes: int | None = None,
    classifier_keep: float = 0.5,
) -> CondenseNet:
    """CondenseNet deploy form; ``classifier_keep`` 0.5 as the official converter (1.0: exact)."""
    stages, growth, num_classes = _resolve(stages, growth, data, num_classes)
    return CondenseNet(stages, growth, bottleneck, group_1x1, group_3x3, condense_factor, data,
                       num_classes, converted=True, classifier_keep=classifier_keep)
