"""An SPConv 3x3 layer after export-time folding (``slimdeploy.transforms.fold_spconv``).

``SPConv3x3`` computes ``A = bn1(gwc(x3) + pwc(pool?(x3)))``, ``B = bn2(conv1x1(pool?(x1)))``
and ``A * w3 + B * w1`` with ``[w3, w1] = softmax([mean(A), mean(B)])`` per channel. Folded:

- bn1 and bn2 are per-channel affine maps right after convolutions: scale and bias go into
  ``gwc``/``pwc`` (bias once) and ``conv1x1``;
- stride 2: a 2x2 average pool then a 1x1 convolution is a 2x2 stride-2 convolution with the
  weights divided by 4 (exact on even sizes, which SPConv needs anyway), so no AveragePool;
- ``dense_3x3``: ``pwc`` goes into the taps of the 3x3 convolution it lines up with (stride 1:
  the centre; stride 2: the 4 taps the pooled window covers), and the grouped ``gwc`` is stored
  dense, so the representative path is one convolution (more MACs, but ONNX Runtime's CPU
  kernels run small grouped convolutions slowly);
- a softmax over two scores is a sigmoid of their difference: ``w3 = sigmoid(mean(A) -
  mean(B))``, ``w1 = sigmoid(mean(B) - mean(A))``, with GlobalAveragePool for the means (no
  stack, index or unsqueeze, which broke the quantized graph into float islands);
- an affine map right after the layer (the block's BatchNorm, ``out * s + t``) goes into both
  paths: ``A' = A*s + t`` and ``B' = B*s + t`` give ``A'*w3 + B'*w1 = (A*w3 + B*w1)*s + t``
  because ``w3 + w1 = 1``; the scores then need ``(mean(A') - mean(B')) / s``
  (``score_scale``, 0 where ``s`` is 0: there ``A' = B'`` and the weights do not matter).

Keys: ``conv_3x3.weight``, ``conv_3x3.bias``, ``pwc.weight`` (only without ``dense_3x3``),
``conv_1x1.weight``, ``conv_1x1.bias``, ``score_scale``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class FoldedSPConv3x3(nn.Module):
    """SPConv 3x3 with BatchNorm, pooling and attention folded (two forms, same function).

    ``dense=True`` (ONNX Runtime): ``C = A - B`` and ``B`` straight from the whole input,
    ``out = B + C * sigmoid(gap(C) * score_scale)``. Both convolutions read every input
    channel (zeros where a path does not), so there is no channel split, no Sub and one
    full-size Mul. ``dense=False`` (TensorRT): ``x`` split, ``gwc`` grouped, ``pwc`` separate,
    ``out = A * sigmoid(d) + B * sigmoid(-d)`` with ``d = (gap(A) - gap(B)) * score_scale``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        split: input channels of the representative path (``x[:, :split]``).
        stride: 1 or 2.
        dense: the form. Defaults to True.
    """

    def __init__(self, in_channels: int, out_channels: int, split: int, stride: int,
                 dense: bool = True) -> None:
        super().__init__()
        self.split, self.stride, self.dense = split, stride, dense
        # dense: C (3x3 over all channels); else A's gwc part (3x3, 2 groups, representative).
        self.conv_3x3 = nn.Conv2d(in_channels if dense else split, out_channels, 3, stride=stride,
                                  padding=1, groups=1 if dense else 2, bias=True)
        # 1x1 (stride 1) or the 2x2 stride-2 convolution that replaces pool + 1x1.
        self.pwc = None if dense else nn.Conv2d(split, out_channels, stride, stride=stride, bias=False)
        # B, from all channels (dense) or the redundant ones.
        self.conv_1x1 = nn.Conv2d(in_channels if dense else in_channels - split, out_channels,
                                  stride, stride=stride, bias=True)
        self.register_buffer("score_scale", torch.ones(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output, shape [B, out_channels, H/stride, W/stride]."""
        if self.dense:
            b, c = self.conv_1x1(x), self.conv_3x3(x)
            return b + c * torch.sigmoid(functional.adaptive_avg_pool2d(c, 1) * self.score_scale)
        x_3x3 = x[:, : self.split]
        assert self.pwc is not None
        a = self.conv_3x3(x_3x3) + self.pwc(x_3x3)
        b = self.conv_1x1(x[:, self.split :])
        score = (functional.adaptive_avg_pool2d(a, 1) - functional.adaptive_avg_pool2d(b, 1)) * self.score_scale
        return a * torch.sigmoid(score) + b * torch.sigmoid(-score)

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        return f"split={self.split}, stride={self.stride}, dense={self.dense}"
