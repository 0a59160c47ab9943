"""A condensed CondenseNet dense layer after export-time folding.

The condensed layer computes ``cat([x, conv_2(conv_1(x))])`` with
``conv_1 = index -> BN -> ReLU -> grouped 1x1 conv -> shuffle`` and
``conv_2 = BN -> ReLU -> grouped 3x3 conv``. Folded (``slimdeploy.transforms.fold``):

- conv_2's BN is linear and follows the 1x1 convolution through the shuffle (a permutation),
  so it becomes the 1x1 convolution's per-output scale and bias;
- ReLU commutes with a permutation, so it moves before the shuffle, next to the convolution
  (ONNX Runtime fuses Conv + ReLU);
- the shuffle itself folds into the 3x3 convolution's input channels when that convolution is
  stored dense (``groups_3x3 == 1``, zeros outside the groups): a dense convolution of permuted
  channels is a dense convolution with permuted weights. With ``groups_3x3 > 1`` the shuffle
  stays (``shuffle_groups``);
- ``source_channels > 0`` (INT8 graphs): the Gather and the BN after it become one 1x1
  convolution ``select`` over the layer's whole input (row i holds the BN scale at column
  ``index[i]``, the bias is the BN shift), so the ReLU fuses into it. ONNX Runtime cannot move
  its NHWC layout through a channel Gather: each Gather (and the float BN) cost two Transposes
  in a quantized graph. More MACs, fewer and faster quantized ops.

Keys: ``index``, ``norm.*`` (or ``select.weight``, ``select.bias``), ``conv_1.weight``,
``conv_1.bias``, ``conv_2.weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from slimdeploy.nn.condensed_conv import channel_shuffle


class FoldedDenseLayer(nn.Module):
    """``cat([x, conv_2(shuffle?(relu(conv_1(relu(norm(x[:, index]))))))], 1)``, with
    ``select(x)`` in place of ``norm(x[:, index])`` when ``source_channels > 0``.

    Args:
        in_channels: length of the index (channels after the Gather).
        mid_channels: 1x1 outputs (bottleneck * growth).
        out_channels: 3x3 outputs (growth).
        groups_1x1: groups of the 1x1 convolution.
        groups_3x3: groups of the 3x3 convolution; 1 when the shuffle is folded into it.
        shuffle_groups: shuffle groups kept between the two convolutions; 0 (default) when folded.
        source_channels: channels of the layer's input when the Gather and BN are one 1x1
            convolution; 0 (default) keeps the Gather and the BN.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, groups_1x1: int,
                 groups_3x3: int = 1, shuffle_groups: int = 0, source_channels: int = 0) -> None:
        super().__init__()
        self.shuffle_groups = shuffle_groups
        self.select: nn.Conv2d | None = None
        if source_channels:
            self.select = nn.Conv2d(source_channels, in_channels, 1, bias=True)
        else:
            self.register_buffer("index", torch.zeros(in_channels, dtype=torch.long))
            self.norm = nn.BatchNorm2d(in_channels)
        self.conv_1 = nn.Conv2d(in_channels, mid_channels, 1, groups=groups_1x1, bias=True)
        self.conv_2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1, groups=groups_3x3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.select(x) if self.select is not None else self.norm(torch.index_select(x, 1, self.index))
        y = torch.relu(y)
        y = torch.relu(self.conv_1(y))
        if self.shuffle_groups:
            y = channel_shuffle(y, self.shuffle_groups)
        return torch.cat([x, self.conv_2(y)], 1)
