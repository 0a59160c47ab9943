"""Sparse feature reactivation (SFR), CondenseNetV2's second learned group convolution (Yang et
al., "CondenseNet V2: Sparse Feature Reactivation for Deep Networks", CVPR 2021).

Each dense layer's new features (``in_channels`` = growth k) are mapped back onto the layer's
input features (``out_channels``) and added to them, so that a layer can refresh earlier
features. The map is learned sparse, like ``LearnedGroupConv`` but transposed: the *inputs* are
split into ``groups`` G by interleaving (group g owns inputs g, g+G, ...), and each group learns
which outputs it updates; at the end of training each group keeps ``out/C`` outputs
(C = ``condense_factor``).

``SparseFeatureReactivation`` (training form, the official ``layers.SFR``): BN -> activation
-> dense 1x1 convolution with its weight multiplied by a 0/1 ``_mask``; keys ``norm.*``,
``conv.weight``, ``_count``, ``_stage``, ``_mask``. As in ``LearnedGroupConv``, ``forward``
never changes the mask (the official forward reads a class-global progress); the schedule runs
only through ``condense_step(progress)``.

``CondensedSFR`` (deploy form, the official ``layers.CondenseSFR``): BN -> activation -> the
transposed shuffle (input g + k*G moves to position k + g*k/G, so each group's inputs are
contiguous) -> grouped convolution to ``out*G/C`` channels (``out/C`` per group) -> a 0/1
``index`` matrix [out*G/C, out] that adds each grouped output into the learned output it
stands for (several groups may update the same output). Keys ``norm.*``, ``conv.weight``,
``index``. Upstream multiplies by ``index`` with a MatMul over [N, HW, C]; here it is a 1x1
convolution with weight ``index^T``: the same sums, and a single Conv node in ONNX.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from slimdeploy.nn.activation import make_activation
from slimdeploy.nn.learned_group_conv import LearnedGroupConv, drop_weakest


def channel_shuffle_transposed(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, C, H, W] -> the same with channel ``g + k*G`` moved to ``k + g*C/G`` (the official
    ``ShuffleLayerTrans``: group g's interleaved channels become one contiguous slice)."""
    batch, channels, height, width = x.shape
    x = x.view(batch, channels // groups, groups, height, width).transpose(1, 2)
    # -1 for the batch keeps a dynamic batch dimension symbolic in export.
    return x.reshape(-1, channels, height, width)


class SparseFeatureReactivation(nn.Module):
    """Masked dense 1x1 convolution from ``in_channels`` new features back to ``out_channels``
    earlier ones, with ``groups`` learned input groups and condense factor ``condense_factor``.

    ``condense_factor`` defaults to ``groups``; ``activation`` defaults to ``"relu"``. The BN
    scale starts at 0 (as upstream), so a fresh layer adds nothing to the earlier features.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1,
                 condense_factor: int | None = None, activation: str = "relu") -> None:
        super().__init__()
        condense_factor = groups if condense_factor is None else condense_factor
        if in_channels % groups or out_channels % groups or out_channels % condense_factor:
            raise ValueError(
                f"SparseFeatureReactivation: in_channels {in_channels} and out_channels "
                f"{out_channels} must be divisible by groups {groups}, out_channels by "
                f"condense_factor {condense_factor}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.condense_factor = condense_factor
        self.norm = nn.BatchNorm2d(in_channels)
        self.activation = make_activation(activation)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.register_buffer("_count", torch.zeros(1))
        self.register_buffer("_stage", torch.zeros(1))
        self.register_buffer("_mask", torch.ones_like(self.conv.weight))
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm(x))
        return functional.conv2d(x, self.conv.weight * self._mask)

    @torch.no_grad()
    def condense_step(self, progress: float) -> bool:
        """Advance the mask to the stage of ``progress`` (training only); True if it changed.

        On entering a new stage each input group drops its ``out_channels // C`` least
        important still kept outputs, importance being the sum over the group's inputs of
        |W * mask| (upstream's ``SFR._dropping``).
        """
        stage = LearnedGroupConv.stage_for(progress, self.condense_factor)
        if int(self._stage[0]) >= stage:
            return False
        self._stage.fill_(stage)
        delta = self.out_channels // self.condense_factor
        count = int(self._count[0])
        # Input groups over outputs: LearnedGroupConv's drop on the transposed [in, out] views.
        drop_weakest(self.conv.weight.transpose(0, 1), self._mask.transpose(0, 1), self.groups, count, delta)
        self._count.fill_(count + delta)
        return True

    def lasso_loss(self) -> torch.Tensor:
        """Group-lasso penalty: per output and input group, the L2 norm of the masked weights."""
        weight = (self.conv.weight * self._mask).pow(2).sum(dim=(2, 3))  # [out, in]
        per_group = weight.view(self.out_channels, self.in_channels // self.groups, self.groups)
        return per_group.sum(1).clamp(min=1e-6).sqrt().sum()

    def extra_repr(self) -> str:
        return f"groups={self.groups}, condense_factor={self.condense_factor}"


class CondensedSFR(nn.Module):
    """BN -> activation -> transposed shuffle -> grouped 1x1 conv -> ``index`` scatter-add.

    ``out_channels`` are the learned outputs (the layer's input features); the grouped
    convolution has ``out_channels * groups // condense_factor`` outputs (``condense_factor``
    defaults to ``groups``, as in every official configuration, which makes ``index`` square).
    ``index`` starts as zeros and is filled by the condense transform or a checkpoint.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1,
                 condense_factor: int | None = None, activation: str = "relu") -> None:
        super().__init__()
        condense_factor = groups if condense_factor is None else condense_factor
        kept = out_channels * groups // condense_factor
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.condense_factor = condense_factor
        self.norm = nn.BatchNorm2d(in_channels)
        self.activation = make_activation(activation)
        self.conv = nn.Conv2d(in_channels, kept, 1, groups=groups, bias=False)
        self.register_buffer("index", torch.zeros(kept, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channel_shuffle_transposed(self.activation(self.norm(x)), self.groups)
        x = self.conv(x)
        # out[:, i] = sum_c x[:, c] * index[c, i]: upstream's MatMul as a 1x1 convolution.
        return functional.conv2d(x, self.index.t()[:, :, None, None])
