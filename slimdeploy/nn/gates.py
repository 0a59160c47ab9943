"""SkipNet gates (Wang et al., ECCV 2018): each one looks at a block's output and gives the
probability that the *next* block executes.

Three kinds, with the official submodule names so that official checkpoints load by key
(ucbdrive/skipnet ``cifar/models.py``, ``imagenet/models.py``):

- ``FeedforwardGateI`` (FFGate-I): MaxPool2d(2), conv3x3+BN+ReLU, conv3x3 stride 2+BN+ReLU,
  AvgPool2d over what is left of the map, then a 1x1 conv to two logits (``linear_layer``).
  Keys ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``linear_layer``.
- ``FeedforwardGateII`` (FFGate-II): conv3x3 stride 2+BN+ReLU, AvgPool2d, 1x1 conv to two
  logits. Keys ``conv1``, ``bn1``, ``linear_layer``.
- Recurrent gate, in two parts: a per-block ``RecurrentGateEmbedding`` (AvgPool2d over the whole
  map, then a 1x1 conv C -> embed_dim; a ``Sequential`` so its keys are ``1.weight``/``1.bias``)
  and one ``RecurrentGate`` shared by every block (``rnn``: LSTM(embed_dim, hidden_dim);
  ``proj``: hidden_dim -> 1 as a Linear on CIFAR or a 1x1 Conv2d on ImageNet; then a sigmoid).
  Its LSTM state (h, c) starts at zeros for every forward pass and is carried from gate to gate
  in block order.

Every gate returns the probability of executing, a [B] float tensor; the decision is
``probability > threshold`` (strictly: a tie skips). Feed-forward gates take
``softmax(logits)[:, 1]``. Pool kernels are fixed as upstream fixes them, so a gate expects the
feature-map size it was built for (``pool_size``: 32/16/8 on CIFAR, 56/28/14/7 on ImageNet).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional


def _conv3x3(channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)


class FeedforwardGateI(nn.Module):
    """FFGate-I: two 3x3 convolutions after a 2x2 max-pool, then a two-way 1x1 classifier.

    Args:
        channels: channels of the block output the gate reads.
        pool_size: height (= width) of that output; the final average pool has kernel
            ``round_half_up(floor(pool_size / 2) / 2)`` (8/4/2 for 32/16/8), leaving 1x1.
    """

    def __init__(self, channels: int, pool_size: int) -> None:
        super().__init__()
        self.channels, self.pool_size = channels, pool_size
        self.maxpool = nn.MaxPool2d(2)
        self.conv1 = _conv3x3(channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, stride=2)
        self.bn2 = nn.BatchNorm2d(channels)
        # After the 2x2 max-pool the map is floor(p / 2); the stride-2 conv rounds half up.
        self.avg_layer = nn.AvgPool2d((pool_size // 2 + 1) // 2)
        self.linear_layer = nn.Conv2d(channels, 2, kernel_size=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Two logits per sample, [B, 2]: (skip, execute)."""
        x = self.maxpool(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        # flatten(1), not squeeze(): the batch axis survives at batch size 1.
        return torch.flatten(self.linear_layer(self.avg_layer(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probability of executing the next block, [B]."""
        return torch.softmax(self.logits(x), dim=1)[:, 1]


class FeedforwardGateII(nn.Module):
    """FFGate-II: one stride-2 3x3 convolution, then a two-way 1x1 classifier.

    Args:
        channels: channels of the block output the gate reads.
        pool_size: height (= width) of that output; the average pool has kernel
            ``round_half_up(pool_size / 2)`` (16/8/4 for 32/16/8), leaving 1x1.
    """

    def __init__(self, channels: int, pool_size: int) -> None:
        super().__init__()
        self.channels, self.pool_size = channels, pool_size
        self.conv1 = _conv3x3(channels, stride=2)
        self.bn1 = nn.BatchNorm2d(channels)
        self.avg_layer = nn.AvgPool2d((pool_size + 1) // 2)
        self.linear_layer = nn.Conv2d(channels, 2, kernel_size=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Two logits per sample, [B, 2]: (skip, execute)."""
        x = torch.relu(self.bn1(self.conv1(x)))
        return torch.flatten(self.linear_layer(self.avg_layer(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probability of executing the next block, [B]."""
        return torch.softmax(self.logits(x), dim=1)[:, 1]


class RecurrentGateEmbedding(nn.Sequential):
    """Per-block input of the recurrent gate: average-pool the whole map, 1x1 conv to
    ``embed_dim``. A ``Sequential`` (pool, conv) as upstream, so the keys are ``1.weight``,
    ``1.bias``.

    Args:
        channels: channels of the block output.
        pool_size: height (= width) of the block output (the pool kernel).
        embed_dim: embedding size, the LSTM input. Defaults to 10.
    """

    def __init__(self, channels: int, pool_size: int, embed_dim: int = 10) -> None:
        super().__init__(nn.AvgPool2d(pool_size), nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.channels, self.pool_size, self.embed_dim = channels, pool_size, embed_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding, [B, embed_dim]."""
        return torch.flatten(self(x), 1)


RecurrentState = tuple[torch.Tensor, torch.Tensor]


class RecurrentGate(nn.Module):
    """The recurrent controller shared by all blocks: one LSTM step per gate, then a projection
    to one logit and a sigmoid (official ``RNNGate``/``RNNGatePolicy``, module ``control``).

    The state is (h, c), each [B, hidden_dim] (no layer axis). By default a step calls
    ``self.rnn`` (the ``nn.LSTM`` with the official keys ``rnn.weight_ih_l0`` ...) exactly as
    upstream does, so eager results are bit-for-bit the official ones (on CPU that call runs
    oneDNN's LSTM) and it exports as one ONNX ``LSTM`` node. With ``explicit_cell = True`` the
    step is written out with the same parameters (MatMul/Add/Sigmoid/Tanh/Mul), for graphs that
    want plain operators; the two agree to about 1e-7 (the written-out cell equals PyTorch's
    non-oneDNN LSTM exactly).

    Args:
        embed_dim: input size. Defaults to 10.
        hidden_dim: LSTM hidden size. Defaults to 10.
        proj: ``"linear"`` (CIFAR: ``nn.Linear(hidden_dim, 1)``) or ``"conv"`` (ImageNet:
            ``nn.Conv2d(hidden_dim, 1, 1)``). Defaults to ``"linear"``.
    """

    def __init__(
        self, embed_dim: int = 10, hidden_dim: int = 10, proj: Literal["linear", "conv"] = "linear"
    ) -> None:
        super().__init__()
        if proj not in ("linear", "conv"):
            raise ValueError(f"proj must be 'linear' or 'conv', got {proj!r}")
        self.embed_dim, self.hidden_dim, self.proj_kind = embed_dim, hidden_dim, proj
        self.rnn = nn.LSTM(embed_dim, hidden_dim)
        self.explicit_cell = False
        self.proj: nn.Module = (
            nn.Linear(hidden_dim, 1)
            if proj == "linear"
            else nn.Conv2d(hidden_dim, 1, kernel_size=1)
        )

    def init_state(self, reference: torch.Tensor) -> RecurrentState:
        """Zero (h, c), each [B, hidden_dim], with ``reference``'s batch size, dtype and device."""
        # new_zeros with the (symbolic) batch size keeps the batch dynamic under torch.export.
        zeros = reference.new_zeros((reference.shape[0], self.hidden_dim))
        return zeros, zeros

    def lstm_step(self, x: torch.Tensor, state: RecurrentState) -> RecurrentState:
        """One LSTM step: input [B, embed_dim], state (h, c) -> new (h, c)."""
        h, c = state
        if not self.explicit_cell:
            # One time step of the official nn.LSTM call, with its (1, B, dim) layout.
            _, (h_next, c_next) = self.rnn(x[None], (h[None], c[None]))
            return h_next[0], c_next[0]
        # PyTorch's reference LSTM cell: gates = W_hh h + b_hh + W_ih x + b_ih, chunked
        # (input, forget, cell, output).
        rnn = self.rnn
        gates = functional.linear(h, rnn.weight_hh_l0, rnn.bias_hh_l0) + functional.linear(
            x, rnn.weight_ih_l0, rnn.bias_ih_l0
        )
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=1)
        c_next = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
        h_next = torch.sigmoid(out_gate) * torch.tanh(c_next)
        return h_next, c_next

    def probability(self, h: torch.Tensor) -> torch.Tensor:
        """sigmoid(proj(h)), [B]."""
        if self.proj_kind == "linear":
            logit = self.proj(h)
        else:
            logit = torch.flatten(self.proj(h[:, :, None, None]), 1)
        return torch.sigmoid(logit[:, 0])

    def forward(
        self, x: torch.Tensor, state: RecurrentState
    ) -> tuple[torch.Tensor, RecurrentState]:
        """One gate: embedding [B, embed_dim] and carried state -> (probability [B], new state)."""
        state = self.lstm_step(x, state)
        return self.probability(state[0]), state
