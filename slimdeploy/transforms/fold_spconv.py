"""Fold the SPConv layers of an SPConv ResNet before export.

``fold_spconv(model)`` replaces every ``SPConv3x3`` with a ``FoldedSPConv3x3`` that computes
the same function with a graph ONNX Runtime quantizes end to end (the algebra is in
``slimdeploy/nn/folded_spconv.py``):

- ``bn_into_conv``: the layer's own bn1 and bn2 folded into its convolutions;
- ``block_bn_into_spconv``: the block's BatchNorm right after the layer (``bn1``/``bn2`` of a
  ``BasicBlock``, ``bn2`` of a ``Bottleneck``) folded into both paths and the attention scores;
  the block keeps an ``Identity`` in its place;
- ``pool_into_conv``: stride 2, each 2x2 average pool + 1x1 convolution became a 2x2 stride-2
  convolution (2 per layer);
- ``softmax_to_sigmoid``: the two-way softmax attention became a sigmoid of the difference;
- ``pwc_into_3x3`` and ``grouped_3x3_stored_dense`` (``dense_3x3=True``): pwc folded into the
  taps of a dense 3x3 convolution. This trades MACs for speed on ONNX Runtime's CPU kernels;
  ``dense_3x3=False`` keeps gwc grouped and pwc separate (TensorRT runs grouped convolutions well).

The folded model is for export only (eval mode; BatchNorm statistics are baked in).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from slimdeploy.models.spconv_resnet import BasicBlock, Bottleneck
from slimdeploy.nn.folded_spconv import FoldedSPConv3x3
from slimdeploy.nn.spconv import SPConv3x3
from slimdeploy.transforms.fold import bn_affine


@dataclass
class SPConvFoldReport:
    """How many of each fold were applied."""

    bn_into_conv: int = 0
    block_bn_into_spconv: int = 0
    pool_into_conv: int = 0
    softmax_to_sigmoid: int = 0
    split_into_weights: int = 0
    grouped_3x3_stored_dense: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _strided_1x1(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """A 1x1 weight as the kernel that replaces ``avg_pool2d(2, 2)`` + 1x1 (stride 2)."""
    return weight if stride == 1 else weight.expand(-1, -1, 2, 2) / 4


@torch.no_grad()
def fold_spconv_layer(layer: SPConv3x3, after: nn.BatchNorm2d | None = None,
                      dense: bool = True) -> FoldedSPConv3x3:
    """The folded equivalent of ``after(layer(x))`` (``after`` optional; eval-mode BatchNorm)."""
    out, split, stride = layer.out_channels, layer.in_channels_3x3, layer.stride
    folded = FoldedSPConv3x3(layer.in_channels, out, split, stride, dense=dense).eval()
    scale_1, shift_1 = bn_affine(layer.bn1)
    scale_2, shift_2 = bn_affine(layer.bn2)
    scale, shift = bn_affine(after) if after is not None else (torch.ones(out), torch.zeros(out))
    # A = gwc*s1*s + pwc*s1*s + (t1*s + t); B = conv1x1*s2*s + ((bias*s2 + t2)*s + t).
    column_a = (scale_1 * scale).view(-1, 1, 1, 1)
    gwc = layer.gwc.weight * column_a  # [out, split/2, 3, 3], two groups
    pwc = _strided_1x1(layer.pwc.weight * column_a, stride)
    bias_a = shift_1 * scale + shift
    weight_b = _strided_1x1(layer.conv1x1.weight * (scale_2 * scale).view(-1, 1, 1, 1), stride)
    bias_b = (layer.conv1x1.bias * scale_2 + shift_2) * scale + shift
    # Scores of the unscaled paths: (mean(A') - mean(B')) / s; where s == 0 both paths are
    # the constant shift, so any finite factor gives the same output.
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    folded.score_scale.copy_(torch.where(scale == 0, torch.zeros_like(scale), 1 / safe).view(1, -1, 1, 1))
    if not dense:
        folded.conv_3x3.weight.copy_(gwc)
        folded.conv_3x3.bias.copy_(bias_a)
        assert folded.pwc is not None
        folded.pwc.weight.copy_(pwc)
        folded.conv_1x1.weight.copy_(weight_b)
        folded.conv_1x1.bias.copy_(bias_b)
        return folded
    # C = A - B over all input channels: gwc stored dense (zeros outside its two groups), and
    # the 1x1 paths in the taps they line up with. Stride 1: the centre tap; stride 2 (pad 1):
    # output o reads input rows 2o-1..2o+1 while the pooled window covers 2o, 2o+1 (taps 1, 2).
    taps = slice(1, 2) if stride == 1 else slice(1, 3)
    weight_c = torch.zeros(out, layer.in_channels, 3, 3)
    half_in, half_out = split // 2, out // 2
    for g in range(2):
        rows = slice(g * half_out, (g + 1) * half_out)
        weight_c[rows, g * half_in:(g + 1) * half_in] = gwc[rows]
    weight_c[:, :split, taps, taps] += pwc
    weight_c[:, split:, taps, taps] -= weight_b
    folded.conv_3x3.weight.copy_(weight_c)
    folded.conv_3x3.bias.copy_(bias_a - bias_b)
    # B reads only the redundant channels (zeros on the representative ones).
    folded.conv_1x1.weight.zero_()
    folded.conv_1x1.weight[:, split:] = weight_b
    folded.conv_1x1.bias.copy_(bias_b)
    return folded


@torch.no_grad()
def fold_spconv(model: nn.Module, dense: bool = True) -> tuple[nn.Module, SPConvFoldReport]:
    """Fold every SPConv layer of ``model`` in place (with the block BatchNorm that follows it);
    returns the model (eval mode) and what was folded. ``dense`` (the ``FoldedSPConv3x3`` form)
    defaults to True."""
    model.eval()
    report = SPConvFoldReport()

    def replace(block: nn.Module, conv: str, bn: str | None) -> None:
        layer = getattr(block, conv)
        after = getattr(block, bn) if bn else None
        setattr(block, conv, fold_spconv_layer(layer, after, dense))
        report.bn_into_conv += 2
        report.softmax_to_sigmoid += 1
        report.pool_into_conv += 2 if layer.stride == 2 else 0
        if after is not None:
            setattr(block, bn, nn.Identity())
            report.block_bn_into_spconv += 1
        if dense:
            report.split_into_weights += 1
            report.grouped_3x3_stored_dense += 1

    for block in list(model.modules()):
        if isinstance(block, BasicBlock):
            replace(block, "conv1", "bn1")
            replace(block, "conv2", "bn2")
        elif isinstance(block, Bottleneck):
            replace(block, "conv2", "bn2")
    if not any(isinstance(m, FoldedSPConv3x3) for m in model.modules()):
        raise TypeError("fold_spconv found no SPConv layer inside SPConv ResNet blocks")
    return model, report
