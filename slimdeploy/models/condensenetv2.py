"""CondenseNetV2 (Yang et al., "CondenseNet V2: Sparse Feature Reactivation for Deep Networks",
CVPR 2021): the training form ``condensenetv2`` and the deploy form ``condensenetv2_converted``.

Reproduces jianghaojun/CondenseNetV2 @64f1fa4 (``model/condensenetv2.py``,
``model/converted_condensenetv2.py``) with its state_dict keys:

- ``features.init_conv`` (3x3, stride 2 on ImageNet, 1 on CIFAR, 2*growth[0] channels);
- per block b and layer l, ``features.denseblock_{b}.denselayer_{l}``:
  ``conv_1`` (1x1 ``LearnedGroupConv`` to bottleneck*growth, or its ``CondensedConv`` deploy
  form), ``conv_2`` (BN-activation-3x3 conv with ``group_3x3`` groups to growth k),
  ``se`` (squeeze-excitation over the k new features, reduction 1; blocks from
  ``se_start_block``) and ``sfr`` (``SparseFeatureReactivation`` k -> the layer's inputs, or its
  ``CondensedSFR`` deploy form). The layer returns ``cat([x + sfr(new), new])``;
- the activation is ReLU in blocks before ``hs_start_block`` and hard-swish from it on;
- ``features.transition_{b}`` (2x2 AvgPool, no state), then ``features.norm_last`` (BN), ReLU,
  AvgPool (7 on ImageNet, 8 on CIFAR) and ``features.se_last`` (reduction
  ``last_se_reduction``);
- ``fc`` (Linear to ``fc_channel``), hard-swish, ``classifier`` (Linear). The official converter
  leaves both untouched, so the condensed model's logits equal the learned model's.

Named configurations (``config``; ImageNet, as upstream's ``cdnv2_a/b/c``; all use bottleneck 4,
``hs_start_block`` 2, ``se_start_block`` 3, ``last_se_reduction`` 16 and G = C for both learned
convolutions):

- ``"A"``: stages 1-1-4-6-8, growth 8-8-16-32-64, groups/condense factors 8, fc 828;
- ``"B"``: stages 2-4-6-8-6, growth 6-12-24-48-96, groups/condense factors 6, fc 1024;
- ``"C"``: stages 4-6-8-10-8, growth 8-16-32-64-128, groups/condense factors 8, fc 1024.

Explicit arguments override the named configuration. ``infer_condensenetv2_args`` reads
everything but ``hs_start_block`` (no key depends on an activation) from a checkpoint's keys and
shapes. The ImageNet layout needs 224x224 inputs (the final 7x7 pooling); ``data="cifar10"``
builds the CIFAR layout of the official code (stride-1 stem, 8x8 pooling, 32x32 inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimdeploy.models.condensenet import Transition
from slimdeploy.models.registry import register_model
from slimdeploy.nn.activation import make_activation
from slimdeploy.nn.condensed_conv import CondensedConv
from slimdeploy.nn.learned_group_conv import LearnedGroupConv
from slimdeploy.nn.sfr import CondensedSFR, SparseFeatureReactivation
from slimdeploy.nn.squeeze_excite import SqueezeExcite

_DATASETS = ("cifar10", "cifar100", "imagenet")
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
_LAYOUT = {"cifar": {"stride": 1, "pool": 8, "size": 32}, "imagenet": {"stride": 2, "pool": 7, "size": 224}}
_COMMON = {"bottleneck": 4, "hs_start_block": 2, "se_start_block": 3, "last_se_reduction": 16}
CONFIGS: dict[str, dict[str, Any]] = {
    "A": {"stages": (1, 1, 4, 6, 8), "growth": (8, 8, 16, 32, 64), "groups": 8, "fc_channel": 828},
    "B": {"stages": (2, 4, 6, 8, 6), "growth": (6, 12, 24, 48, 96), "groups": 6, "fc_channel": 1024},
    "C": {"stages": (4, 6, 8, 10, 8), "growth": (8, 16, 32, 64, 128), "groups": 8, "fc_channel": 1024},
}
# Constructor arguments besides the layout, in the order of CondenseNetV2's signature.
_ARG_NAMES = ("bottleneck", "group_1x1", "group_3x3", "group_trans", "condense_factor", "trans_factor",
              "hs_start_block", "se_start_block", "last_se_reduction", "fc_channel")


class BNActConv(nn.Sequential):
    """BN -> activation -> conv (no bias): the official ``layers.Conv``; keys ``norm.*``,
    ``conv.weight``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 groups: int = 1, activation: str = "relu") -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_channels))
        self.add_module("activation", make_activation(activation))
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding,
                                          groups=groups, bias=False))


class SFRDenseLayer(nn.Module):
    """``new = se?(conv_2(conv_1(x)))``; returns ``cat([x + sfr(new), new], 1)``."""

    def __init__(self, conv_1: nn.Module, conv_2: nn.Module, sfr: nn.Module,
                 se: nn.Module | None = None) -> None:
        super().__init__()
        self.conv_1 = conv_1
        self.conv_2 = conv_2
        self.sfr = sfr
        self.se = se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv_2(self.conv_1(x))
        if self.se is not None:
            new = self.se(new)
        return torch.cat([x + self.sfr(new), new], 1)


class CondenseNetV2(nn.Module):
    """CondenseNetV2 in training (``converted=False``) or deploy (``converted=True``) form.

    ``config`` holds the constructor arguments (``converted`` aside); ``features_pooled(x)``
    returns the features [B, num_features] fed to ``fc``.
    """

    def __init__(
        self,
        stages: Sequence[int],
        growth: Sequence[int],
        bottleneck: int = 4,
        group_1x1: int = 8,
        group_3x3: int = 8,
        group_trans: int = 8,
        condense_factor: int = 8,
        trans_factor: int = 8,
        hs_start_block: int = 2,
        se_start_block: int = 3,
        last_se_reduction: int = 16,
        fc_channel: int = 828,
        data: str = "imagenet",
        num_classes: int = 1000,
        converted: bool = False,
    ) -> None:
        super().__init__()
        if data not in _DATASETS:
            raise ValueError(f"data must be one of {_DATASETS}, got {data!r}")
        if len(stages) != len(growth):
            raise ValueError(f"stages {list(stages)} and growth {list(growth)} differ in length")
        layout = _LAYOUT["imagenet" if data == "imagenet" else "cifar"]
        self.config: dict[str, Any] = {
            "stages": list(stages), "growth": list(growth), "bottleneck": bottleneck,
            "group_1x1": group_1x1, "group_3x3": group_3x3, "group_trans": group_trans,
            "condense_factor": condense_factor, "trans_factor": trans_factor,
            "hs_start_block": hs_start_block, "se_start_block": se_start_block,
            "last_se_reduction": last_se_reduction, "fc_channel": fc_channel, "data": data,
            "num_classes": num_classes,
        }
        self.converted = converted
        self.input_size = (3, layout["size"], layout["size"])
        features = nn.Sequential()
        channels = 2 * growth[0]
        features.add_module("init_conv", nn.Conv2d(3, channels, 3, stride=layout["stride"],
                                                   padding=1, bias=False))
        for b, (n_layers, rate) in enumerate(zip(stages, growth)):
            activation = "hardswish" if b >= hs_start_block else "relu"
            block = nn.Sequential()
            width = bottleneck * rate
            for layer in range(1, n_layers + 1):
                conv_1: nn.Module
                sfr: nn.Module
                if converted:
                    conv_1 = CondensedConv(channels * group_1x1 // condense_factor, width, 1,
                                           groups=group_1x1, activation=activation)
                    sfr = CondensedSFR(rate, channels, group_trans, trans_factor, activation)
                else:
                    conv_1 = LearnedGroupConv(channels, width, 1, groups=group_1x1,
                                              condense_factor=condense_factor, activation=activation)
                    sfr = SparseFeatureReactivation(rate, channels, group_trans, trans_factor, activation)
                conv_2 = BNActConv(width, rate, 3, padding=1, groups=group_3x3, activation=activation)
                se = SqueezeExcite(rate, reduction=1) if b >= se_start_block else None
                block.add_module(f"denselayer_{layer}", SFRDenseLayer(conv_1, conv_2, sfr, se))
                channels += rate
            features.add_module(f"denseblock_{b + 1}", block)
            if b < len(stages) - 1:
                features.add_module(f"transition_{b + 1}", Transition())
        features.add_module("norm_last", nn.BatchNorm2d(channels))
        features.add_module("relu_last", nn.ReLU(inplace=True))
        features.add_module("pool_last", nn.AvgPool2d(layout["pool"]))
        features.add_module("se_last", SqueezeExcite(channels, reduction=last_se_reduction))
        self.features = features
        self.num_features = channels
        self.fc = nn.Linear(channels, fc_channel)
        self.fc_act = nn.Hardswish()
        self.classifier = nn.Linear(fc_channel, num_classes)

    def features_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, num_features], the input of ``fc``."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc_act(self.fc(self.features_pooled(x))))


def _resolve(config: str, data: str, num_classes: int | None, **explicit: Any) -> dict[str, Any]:
    """Constructor arguments: the named ``config``, overridden by the explicit (non-None) ones."""
    key = config.upper()
    if key not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {config!r}")
    if data not in _NUM_CLASSES:
        raise ValueError(f"data must be one of {_DATASETS}, got {data!r}")
    named = CONFIGS[key]
    args: dict[str, Any] = {
        "stages": named["stages"], "growth": named["growth"], **_COMMON,
        "group_1x1": named["groups"], "group_3x3": named["groups"], "group_trans": named["groups"],
        "condense_factor": named["groups"], "trans_factor": named["groups"],
        "fc_channel": named["fc_channel"],
    }
    args.update({k: v for k, v in explicit.items() if v is not None})
    args.update(data=data, num_classes=num_classes if num_classes is not None else _NUM_CLASSES[data])
    return args


def _period(rows: torch.Tensor) -> int:
    """The smallest G dividing len(rows) with rows[r] == rows[r + G] for every r."""
    count = rows.shape[0]
    for g in range(1, count + 1):
        if count % g == 0 and torch.equal(rows[g:], rows[:count - g]):
            return g
    return count


def infer_condensenetv2_args(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Constructor args read from the keys and shapes of a learned or converted checkpoint.

    stages/growth: layers per block and conv_2 outputs; bottleneck: conv_2 inputs / growth;
    group_3x3: conv_2 inputs / its weight's inputs; se_start_block: the first block with ``se``
    keys; fc_channel, num_classes, last_se_reduction from ``fc``, ``classifier`` and ``se_last``;
    data: ImageNet unless there are 3 blocks (as CondenseNet); config: the named configuration
    with these stages and growth, if any (its defaults apply). Learned form: the group counts
    from the period of the mask rows (conv_1: outputs i, i+G, ... share a row) or columns (sfr:
    inputs g, g+G, ... share a column), the condense factors from ``_count`` and ``_stage``; each
    stays at its default while nothing is dropped. Converted form: from the index lengths and
    grouped weight shapes. ``hs_start_block`` no key shows: it keeps its default (2, as in every
    official configuration).
    """
    prefix = "features.denseblock_"
    layers: dict[int, int] = {}
    for key in state_dict:
        if key.startswith(prefix) and ".denselayer_" in key:
            block, rest = key[len(prefix):].split(".", 1)
            layer = int(rest.split(".", 1)[0].removeprefix("denselayer_"))
            layers[int(block)] = max(layers.get(int(block), 0), layer)
    if not layers or "fc.weight" not in state_dict:
        return {}
    blocks = sorted(layers)
    stages = [layers[b] for b in blocks]
    growth = [int(state_dict[f"{prefix}{b}.denselayer_1.conv_2.conv.weight"].shape[0]) for b in blocks]
    first = f"{prefix}1.denselayer_1"
    width = int(state_dict[f"{first}.conv_2.norm.weight"].shape[0])
    features = int(state_dict["features.norm_last.weight"].shape[0])
    se_blocks = [i for i, b in enumerate(blocks) if f"{prefix}{b}.denselayer_1.se.fc.0.weight" in state_dict]
    args: dict[str, Any] = {
        "stages": stages, "growth": growth, "bottleneck": width // growth[0],
        "group_3x3": width // int(state_dict[f"{first}.conv_2.conv.weight"].shape[1]),
        "se_start_block": se_blocks[0] if se_blocks else len(stages),
        "last_se_reduction": features // int(state_dict["features.se_last.fc.0.weight"].shape[0]),
        "fc_channel": int(state_dict["fc.weight"].shape[0]),
        "num_classes": int(state_dict["classifier.weight"].shape[0]),
    }
    args["data"] = ("cifar100" if args["num_classes"] == 100 else "cifar10") if len(stages) == 3 else "imagenet"
    # A named configuration's layout also brings its group counts, which a checkpoint shows
    # only once condensation has started.
    for name, named in CONFIGS.items():
        if (tuple(stages), tuple(growth)) == (named["stages"], named["growth"]):
            args["config"] = name

    in_first = int(state_dict["features.init_conv.weight"].shape[0])
    if f"{first}.conv_1.index" in state_dict:  # converted form
        length = int(state_dict[f"{first}.conv_1.index"].shape[0])
        group_1x1 = length // int(state_dict[f"{first}.conv_1.conv.weight"].shape[1])
        sfr = state_dict[f"{first}.sfr.conv.weight"]  # [in_first * G / C, growth / G, 1, 1]
        group_trans = growth[0] // int(sfr.shape[1])
        args.update(group_1x1=group_1x1, condense_factor=in_first * group_1x1 // length,
                    group_trans=group_trans, trans_factor=in_first * group_trans // int(sfr.shape[0]))
        return args

    groups: dict[str, int] = {"conv_1": 1, "sfr": 1}
    for key, mask in state_dict.items():
        kind = key.rsplit(".", 2)[-2] if key.endswith("._mask") else ""
        if kind not in groups:
            continue
        base = key.removesuffix("_mask")
        stage, count = float(state_dict[base + "_stage"][0]), float(state_dict[base + "_count"][0])
        rows = mask.flatten(1) if kind == "conv_1" else mask.flatten(1).t()
        # conv_1 drops in/C inputs per stage and group, sfr out/C outputs.
        dropped_axis = mask.shape[1] if kind == "conv_1" else mask.shape[0]
        factor = "condense_factor" if kind == "conv_1" else "trans_factor"
        if stage > 0 and count > 0 and factor not in args:
            args[factor] = round(dropped_axis * stage / count)
        groups[kind] = math.lcm(groups[kind], _period(rows))
    if groups["conv_1"] > 1:
        args["group_1x1"] = groups["conv_1"]
    if groups["sfr"] > 1:
        args["group_trans"] = groups["sfr"]
    return args


# Upstream's factory names, which its training checkpoints record in their ``arch`` field: the
# configuration itself is read from the keys and shapes (the defaults are those of "A").
@register_model("condensenetv2", family="condensenet", input_size=(3, 224, 224),
                infer_args=infer_condensenetv2_args, aliases=("cdnv2_a", "cdnv2_b", "cdnv2_c"),
                description="CondenseNetV2 (A/B/C), training form (learned group convolutions and "
                            "sparse feature reactivation with masks)")
def condensenetv2(
    config: str = "A",
    stages: Sequence[int] | None = None,
    growth: Sequence[int] | None = None,
    bottleneck: int | None = None,
    group_1x1: int | None = None,
    group_3x3: int | None = None,
    group_trans: int | None = None,
    condense_factor: int | None = None,
    trans_factor: int | None = None,
    hs_start_block: int | None = None,
    se_start_block: int | None = None,
    last_se_reduction: int | None = None,
    fc_channel: int | None = None,
    data: str = "imagenet",
    num_classes: int | None = None,
) -> CondenseNetV2:
    """CondenseNetV2 training form: the named ``config`` ("A", "B" or "C"; default "A") with any
    explicit argument overriding it; num_classes defaults to ``data``'s (ImageNet: 1000)."""
    explicit = dict(zip(("stages", "growth", *_ARG_NAMES),
                        (stages, growth, bottleneck, group_1x1, group_3x3, group_trans, condense_factor,
                         trans_factor, hs_start_block, se_start_block, last_se_reduction, fc_channel)))
    return CondenseNetV2(**_resolve(config, data, num_classes, **explicit))


@register_model("condensenetv2_converted", family="condensenet", input_size=(3, 224, 224),
                infer_args=infer_condensenetv2_args,
                aliases=("converted_cdnv2_a", "converted_cdnv2_b", "converted_cdnv2_c"),
                description="CondenseNetV2 (A/B/C), deploy form (index + group convolutions + "
                            "0/1 reactivation matrix)")
def condensenetv2_converted(
    config: str = "A",
    stages: Sequence[int] | None = None,
    growth: Sequence[int] | None = None,
    bottleneck: int | None = None,
    group_1x1: int | None = None,
    group_3x3: int | None = None,
    group_trans: int | None = None,
    condense_factor: int | None = None,
    trans_factor: int | None = None,
    hs_start_block: int | None = None,
    se_start_block: int | None = None,
    last_se_reduction: int | None = None,
    fc_channel: int | None = None,
    data: str = "imagenet",
    num_classes: int | None = None,
) -> CondenseNetV2:
    """CondenseNetV2 deploy form (the official converter's output); arguments as ``condensenetv2``."""
    explicit = dict(zip(("stages", "growth", *_ARG_NAMES),
                        (stages, growth, bottleneck, group_1x1, group_3x3, group_trans, condense_factor,
                         trans_factor, hs_start_block, se_start_block, last_se_reduction, fc_channel)))
    return CondenseNetV2(**_resolve(config, data, num_classes, **explicit), converted=True)
