"""Condensed convolution and linear layers: the deploy form of CondenseNet's learned group
convolutions and of its pruned classifier.

``CondensedConv``: index (a constant Gather of input channels; a channel may appear in several
groups) -> BN -> ReLU -> grouped convolution -> channel shuffle. The shuffle
(``view(B, G, out/G, H, W).transpose(1, 2)``) puts grouped-conv output ``k + i*out/G`` at
position ``i + k*G``, which restores the interleaved output order of the learned layer (group i
owns outputs i, i+G, ...). Keys are those of the official ``layers.CondenseConv``: ``index``,
``norm.*``, ``conv.weight``.

``CondensedLinear``: index -> Linear, the official ``layers.CondenseLinear`` (keys ``index``,
``linear.*``).
"""

from __future__ import annotations

import torch
from torch import nn

from slimdeploy.nn.activation import make_activation


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, G*d, H, W] -> the same with channel ``k + i*d`` moved to ``i + k*G``."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    # -1 for the batch keeps a dynamic batch dimension symbolic in export.
    return x.reshape(-1, channels, height, width)


class CondensedConv(nn.Module):
    """Index -> BN -> ReLU -> grouped conv (``groups``) -> shuffle.

    ``in_channels`` is the length of the index (the channels after the Gather); stride 1,
    padding 0, groups 1, ``activation`` ``"relu"`` by default. ``index`` starts as zeros and is filled by the condense
    transform or a checkpoint.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = make_activation(activation)  # stateless, named as in V1 whatever it is
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.register_buffer("index", torch.zeros(in_channels, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.index_select(x, 1, self.index)
        x = self.conv(self.relu(self.norm(x)))
        return channel_shuffle(x, self.groups)


class CondensedLinear(nn.Module):
    """Index -> Linear: ``in_features`` is the index length (the kept inputs)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.linear = nn.Linear(in_features, out_features)
        self.register_buffer("index", torch.zeros(in_features, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.index_select(x, 1, self.index))
