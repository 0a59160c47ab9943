"""SPConv: the split-based 3x3 convolution of "Split to Be Slim" (Zhang et al., IJCAI 2020).

``SPConv3x3`` reproduces ``SPConv_3x3`` of the official code (qiulinzhang/SPConv.pytorch,
``code/resnet_sp.py`` @78c734f) so that official checkpoints load by key and compute the same
outputs. The input channels are split at ``int(in_channels * ratio)``:

- the *representative* part goes through ``gwc`` (3x3, groups=2, no bias) plus ``pwc`` (1x1,
  no bias), summed, then ``bn1``;
- the *redundant* part goes through ``conv1x1`` (1x1, with bias), then ``bn2``;
- both parts are fused with a softmax over their global averages, per output channel.

Submodule names (``gwc``, ``pwc``, ``conv1x1``, ``bn1``, ``bn2``) are the official ones, so the
state_dict keys match. The official module also registers parameter-free pooling layers
(``avgpool_s2_1`` ...); they add no keys, so this implementation uses functional pooling.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class SPConv3x3(nn.Module):
    """Split-based 3x3 convolution with the official SPConv_3x3 semantics.

    With ``stride=2`` the 3x3 path is strided, while ``pwc`` and ``conv1x1`` run on a 2x2
    average-pooled input (stride 2), as upstream does. The two results only line up when the
    input height and width are even; with an odd size the sum in the representative path fails
    with a shape error (upstream behaves the same). No check is made in ``forward`` because a
    Python-level shape check would specialise the shapes under ``torch.export``.

    Args:
        in_channels: input channels. ``int(in_channels * ratio)`` must be even (``gwc`` uses
            two groups).
        out_channels: output channels; must be even (``gwc`` uses two groups).
        stride: 1 or 2. Defaults to 1.
        ratio: fraction of the input channels treated as representative. Defaults to 0.5
            (the only value the official networks use).

    Raises:
        ValueError: if ``stride`` is not 1 or 2, ``ratio`` is not in (0, 1), or a channel count
            does not divide into the two groups of ``gwc``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, ratio: float = 0.5
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            # Upstream pools only when stride == 2; any other stride would silently misalign
            # the 3x3 and 1x1 outputs, so refuse it here.
            raise ValueError(f"SPConv3x3 supports stride 1 or 2, got {stride}")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"SPConv3x3 ratio must be in (0, 1), got {ratio}")
        # The split point is computed exactly as upstream: int(c * ratio), truncating.
        self.in_channels_3x3 = int(in_channels * ratio)
        self.in_channels_1x1 = in_channels - self.in_channels_3x3
        if self.in_channels_3x3 < 2 or self.in_channels_3x3 % 2 or out_channels % 2:
            raise ValueError(
                f"SPConv3x3 needs an even representative part and even out_channels "
                f"(gwc has groups=2); got in_channels={in_channels}, ratio={ratio} "
                f"(representative {self.in_channels_3x3}), out_channels={out_channels}"
            )
        if self.in_channels_1x1 < 1:
            raise ValueError(
                f"SPConv3x3 leaves no redundant channels: in_channels={in_channels}, ratio={ratio}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.ratio = ratio

        # Representative part: group-wise 3x3 plus point-wise 1x1 (both without bias).
        self.gwc = nn.Conv2d(
            self.in_channels_3x3,
            out_channels,
            kernel_size=3,
            stride=stride,
            padding=1,
            groups=2,
            bias=False,
        )
        self.pwc = nn.Conv2d(self.in_channels_3x3, out_channels, kernel_size=1, bias=False)
        # Redundant part: a cheap 1x1 with bias (upstream leaves nn.Conv2d's default bias on).
        self.conv1x1 = nn.Conv2d(self.in_channels_1x1, out_channels, kernel_size=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the fused output, shape [B, out_channels, H/stride, W/stride]."""
        # Channel counts are static (fixed by the weights), so slicing by a Python int keeps
        # the batch and spatial dimensions dynamic under torch.export.
        x_3x3 = x[:, : self.in_channels_3x3]
        x_1x1 = x[:, self.in_channels_3x3 :]

        # gwc sees the full-resolution input and strides itself; pwc and conv1x1 see a 2x2
        # average-pooled input instead (upstream: "use avgpool first to reduce information lost").
        out_gwc = self.gwc(x_3x3)
        if self.stride == 2:
            x_3x3 = functional.avg_pool2d(x_3x3, kernel_size=2, stride=2)
            x_1x1 = functional.avg_pool2d(x_1x1, kernel_size=2, stride=2)
        out_3x3 = self.bn1(out_gwc + self.pwc(x_3x3))
        out_1x1 = self.bn2(self.conv1x1(x_1x1))

        # Per-channel global averages of both parts, stacked on a new last dim as
        # [B, out, 2] (representative first), softmax over that dim.
        scores = torch.stack((out_3x3.mean(dim=(2, 3)), out_1x1.mean(dim=(2, 3))), dim=2)
        weights = torch.softmax(scores, dim=2)
        # Index and unsqueeze instead of view(b, c, 1, 1): no Python int derived from the
        # batch size, so the exported graph keeps a dynamic batch.
        w_3x3 = weights[:, :, 0, None, None]
        w_1x1 = weights[:, :, 1, None, None]
        return out_1x1 * w_1x1 + out_3x3 * w_3x3

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, ratio={self.ratio}"
