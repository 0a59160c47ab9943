"""Fold what the constants of a condensed CondenseNet allow, before export.

``fold_condensed(model)`` replaces every condensed dense layer (``CondensedConv`` then
``BNReLUConv``) with a ``FoldedDenseLayer`` that computes the same features with less runtime
work (the algebra is in ``slimdeploy/nn/folded_dense_layer.py``):

- ``bn_into_conv``: conv_2's BatchNorm folded into the 1x1 convolution before it (scale and bias,
  permuted through the shuffle);
- ``relu_before_shuffle``: the ReLU moved next to the 1x1 convolution (fused by ONNX Runtime);
- ``shuffle_into_weights``: the channel shuffle folded into the 3x3 convolution's weights, which
  are then stored dense (block structure, zeros outside the groups). This trades MACs for
  speed: ONNX Runtime's CPU kernels run these small grouped 3x3 convolutions slower than the
  dense ones with 4x the MACs (benchmarks/condensenet.py measures both). ``expand_3x3=False``
  keeps the grouped 3x3 convolution and the shuffle.

BN before a ReLU (the gathered BN of conv_1, ``norm_last``) is not linear in what follows and
stays, unless ``gather_into_conv`` (INT8 graphs for ONNX Runtime):

- ``gather_into_conv``: the channel Gather and the BN after it become one 1x1 convolution over
  the layer's input (a scaled selection matrix; ReLU fuses into it);
- ``bn_as_depthwise_conv``: ``norm_last`` becomes a depthwise 1x1 convolution (ReLU fuses).

A quantized graph then stays in ONNX Runtime's NHWC layout from end to end: a channel Gather or
a float BN cost two Transposes each (benchmarks/README.md). In FP32 the selection convolution
is slower than the Gather (more MACs), so FP32 bundles keep them.

The folded model is for export only (eval mode; BatchNorm statistics are baked in).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from slimdeploy.models.condensenet import BNReLUConv, CondenseNet, DenseLayer
from slimdeploy.nn.condensed_conv import CondensedConv
from slimdeploy.nn.folded_dense_layer import FoldedDenseLayer


@dataclass
class FoldReport:
    """How many of each fold were applied."""

    bn_into_conv: int = 0
    relu_before_shuffle: int = 0
    shuffle_into_weights: int = 0
    grouped_3x3_stored_dense: int = 0
    gather_into_conv: int = 0
    bn_as_depthwise_conv: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shuffle_source(channels: int, groups: int) -> torch.Tensor:
    """``source[c]``: the pre-shuffle channel that ``channel_shuffle`` puts at position ``c``."""
    d = channels // groups
    position = torch.arange(channels)
    # channel k + i*d goes to i + k*G, so position c = i + k*G came from k + i*d.
    return (position // groups) + (position % groups) * d


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift`` (per channel)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def bn_as_conv(bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Eval-mode BatchNorm as a depthwise 1x1 convolution with bias."""
    scale, shift = bn_affine(bn)
    conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=True)
    with torch.no_grad():
        conv.weight.copy_(scale.view(-1, 1, 1, 1))
        conv.bias.copy_(shift)
    return conv


@torch.no_grad()
def fold_layer(layer: DenseLayer, expand_3x3: bool, source_channels: int = 0) -> FoldedDenseLayer:
    """The folded equivalent of one condensed dense layer (eval-mode BatchNorm). With
    ``source_channels`` (the layer's input channels) the Gather and BN become a 1x1 convolution."""
    conv_1, conv_2 = layer.conv_1, layer.conv_2
    assert isinstance(conv_1, CondensedConv) and isinstance(conv_2, BNReLUConv)
    mid, out = conv_1.out_channels, conv_2.conv.out_channels
    groups_3x3 = conv_2.conv.groups
    folded = FoldedDenseLayer(conv_1.in_channels, mid, out, conv_1.groups,
                              groups_3x3=1 if expand_3x3 else groups_3x3,
                              shuffle_groups=0 if expand_3x3 else conv_1.groups,
                              source_channels=source_channels).eval()
    if folded.select is not None:
        # Row i picks input channel index[i], scaled by the gathered BN (duplicates allowed).
        norm_scale, norm_shift = bn_affine(conv_1.norm)
        folded.select.weight.zero_()
        folded.select.weight[torch.arange(conv_1.in_channels), conv_1.index, 0, 0] = norm_scale
        folded.select.bias.copy_(norm_shift)
    else:
        folded.index.copy_(conv_1.index)
        folded.norm.load_state_dict(conv_1.norm.state_dict())
    # conv_2's BN as y*scale + shift on shuffled channels; position c reads pre-shuffle
    # channel source[c], so pre-shuffle channel source[c] takes scale[c] and shift[c].
    scale, shift = bn_affine(conv_2.norm)
    source = shuffle_source(mid, conv_1.groups)
    pre_scale = torch.empty_like(scale)
    pre_shift = torch.empty_like(shift)
    pre_scale[source], pre_shift[source] = scale, shift
    folded.conv_1.weight.copy_(conv_1.conv.weight * pre_scale.view(-1, 1, 1, 1))
    folded.conv_1.bias.copy_(pre_shift)
    weight = conv_2.conv.weight  # [out, mid/groups, 3, 3]
    if not expand_3x3:
        folded.conv_2.weight.copy_(weight)
        return folded
    # Dense weight over the shuffled channels (zeros outside each output's group), then the
    # input axis re-indexed so that it reads the pre-shuffle channels directly.
    per_group_in, per_group_out = mid // groups_3x3, out // groups_3x3
    dense = torch.zeros(out, mid, *weight.shape[2:])
    for g in range(groups_3x3):
        rows = slice(g * per_group_out, (g + 1) * per_group_out)
        dense[rows, g * per_group_in:(g + 1) * per_group_in] = weight[rows]
    unshuffled = torch.zeros_like(dense)
    unshuffled[:, source] = dense
    folded.conv_2.weight.copy_(unshuffled)
    return folded


@torch.no_grad()
def fold_condensed(model: CondenseNet, expand_3x3: bool = True,
                   gather_into_conv: bool = False) -> tuple[CondenseNet, FoldReport]:
    """Fold every condensed dense layer of ``model`` in place; returns it (eval mode) and what
    was folded. ``expand_3x3`` defaults to True (store the 3x3 convolutions dense and fold the
    shuffle into them); ``gather_into_conv`` defaults to False (True: Gather + BN as 1x1
    convolutions and ``norm_last`` as a depthwise one, for INT8 graphs)."""
    if not isinstance(model, CondenseNet) or not model.converted:
        raise TypeError("fold_condensed expects a condensed CondenseNet (architecture 'condensenet_converted')")
    model.eval()
    report = FoldReport()
    # Channels entering each layer: the stem's, plus each dense layer's growth (transitions
    # only pool).
    channels = model.features.init_conv.out_channels
    for block in model.features.children():
        if not isinstance(block, nn.Sequential):
            continue
        for name, layer in list(block.named_children()):
            if isinstance(layer, DenseLayer) and isinstance(layer.conv_1, CondensedConv):
                growth = layer.conv_2.conv.out_channels
                setattr(block, name, fold_layer(layer, expand_3x3, channels if gather_into_conv else 0))
                channels += growth
                report.gather_into_conv += 1 if gather_into_conv else 0
                report.bn_into_conv += 1
                report.relu_before_shuffle += 1
                if expand_3x3:
                    report.shuffle_into_weights += 1
                    report.grouped_3x3_stored_dense += 1
    if gather_into_conv and isinstance(model.features.norm_last, nn.BatchNorm2d):
        model.features.norm_last = bn_as_conv(model.features.norm_last)
        report.bn_as_depthwise_conv += 1
    return model, report
