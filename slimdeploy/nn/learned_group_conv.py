"""Learned group convolution: the training form of CondenseNet's 1x1 convolutions (Huang et al.,
"CondenseNet: An Efficient DenseNet using Learned Group Convolutions", CVPR 2018).

BN -> ReLU -> (dropout) -> a dense convolution whose weight is multiplied by a 0/1 ``_mask`` of
the weight's shape. Output channels are split into ``groups`` G by interleaving: group i owns
outputs i, i+G, i+2G, ...; every output of a group shares one mask row, so row i is the group's
representative. Keys are those of the official ``layers.LearnedGroupConv``: ``norm.*``,
``conv.weight`` (dense, no bias) and the buffers ``_count`` (input channels dropped so far per
group), ``_stage`` (condensation stage reached) and ``_mask``.

Unlike the official layer, ``forward`` never changes the mask: the official forward reads a
class-global training progress and may drop channels on any call, which makes export and
inference stateful. Here the schedule runs only through the explicit ``condense_step(progress)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from slimdeploy.nn.activation import make_activation


@torch.no_grad()
def drop_weakest(weight: torch.Tensor, mask: torch.Tensor, groups: int, count: int, delta: int) -> None:
    """For each group of rows ``i::groups`` of ``mask`` (the layout of ``weight``,
    [rows, columns, kh, kw]), zero the columns ranked ``count .. count + delta`` by importance,
    the sum over the group's rows of |weight * mask|. Columns already dropped sum to 0 and sort
    first, so these are the ``delta`` weakest still kept (upstream's ascending sort).
    ``LearnedGroupConv`` drops inputs per output group; the sparse feature reactivation passes
    transposed views to drop outputs per input group."""
    importance = (weight * mask).abs().sum(dim=(2, 3))  # [rows, columns]
    for i in range(groups):
        order = importance[i::groups].sum(0).sort()[1]
        mask[i::groups, order[count : count + delta]] = 0


class LearnedGroupConv(nn.Module):
    """Masked dense convolution with ``groups`` learned groups and condense factor ``condense_factor``.

    ``condense_factor`` defaults to ``groups`` (as upstream); ``dropout_rate`` defaults to 0 (no
    ``drop`` submodule, so no extra keys); stride 1, padding 0; ``activation`` defaults to
    ``"relu"`` (``"hardswish"``: CondenseNetV2's ``HS``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        condense_factor: int | None = None,
        dropout_rate: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        condense_factor = groups if condense_factor is None else condense_factor
        if in_channels % groups or out_channels % groups or in_channels % condense_factor:
            raise ValueError(
                f"LearnedGroupConv: in_channels {in_channels} and out_channels {out_channels} must "
                f"be divisible by groups {groups}, in_channels by condense_factor {condense_factor}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.condense_factor = condense_factor
        self.dropout_rate = dropout_rate
        self.norm = nn.BatchNorm2d(in_channels)
        # Named `relu` whatever it is (stateless, so no key depends on it): CondenseNetV2 uses
        # hard-swish in its later blocks.
        self.relu = make_activation(activation)
        if dropout_rate > 0:
            self.drop = nn.Dropout(dropout_rate)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.register_buffer("_count", torch.zeros(1))
        self.register_buffer("_stage", torch.zeros(1))
        self.register_buffer("_mask", torch.ones_like(self.conv.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(x))
        if self.dropout_rate > 0:
            x = self.drop(x)
        return functional.conv2d(
            x, self.conv.weight * self._mask, None, self.conv.stride, self.conv.padding
        )

    # --- training-only schedule -------------------------------------------------------------

    @staticmethod
    def stage_for(progress: float, condense_factor: int) -> int:
        """The condensation stage at training ``progress`` in [0, 1]: stage s < C-1 while
        ``2 * progress < (s + 1) / (C - 1)``, else C-1 (the second half of training)."""
        for stage in range(condense_factor - 1):
            if progress * 2 < (stage + 1) / (condense_factor - 1):
                return stage
        return condense_factor - 1

    @torch.no_grad()
    def condense_step(self, progress: float) -> bool:
        """Advance the mask to the stage of ``progress`` (training only); True if it changed.

        On entering a new stage each group drops its ``in_channels // C`` least important still
        kept inputs, importance being the sum over the group's outputs of |W * mask|. Never
        called by ``forward``, ``eval`` or export.
        """
        stage = self.stage_for(progress, self.condense_factor)
        if int(self._stage[0]) >= stage:
            return False
        self._stage.fill_(stage)
        delta = self.in_channels // self.condense_factor
        if delta == 0:
            return False
        count = int(self._count[0])
        drop_weakest(self.conv.weight, self._mask, self.groups, count, delta)
        self._count.fill_(count + delta)
        return True

    def lasso_loss(self) -> torch.Tensor:
        """Group-lasso penalty: per group and input, the L2 norm of the masked weights."""
        weight = (self.conv.weight * self._mask).pow(2).sum(dim=(2, 3))  # [out, in]
        per_group = weight.view(self.out_channels // self.groups, self.groups, self.in_channels)
        return per_group.sum(0).clamp(min=1e-6).sqrt().sum()

    def extra_repr(self) -> str:
        return f"groups={self.groups}, condense_factor={self.condense_factor}"
