"""Dynamic networks defined only here, never registered: what a user writes with the decision
protocol (``slimdeploy.nn``), for the discovery tests and the end-to-end ``--arch
tests/own_models.py:FACTORY`` exports.

- ``GatedNet``: a stem, a gated block, a transition convolution (code between gated blocks), a
  gated block with a downsampling skip module, a third gated block, a classifier; feed-forward
  gates, or ``ControlledGate``s sharing one LSTM-cell controller (``controlled=True``).
- ``TrunkExitNet``: a BranchyNet trunk with exits after the first two layers and a final Exit;
  each stage continues from the previous one's features.
- ``MultiInputExitNet``: S2D-like: every stage has its own stem on the image and its later
  layers also read the earlier stage's features.

``balance(model, images)`` sets the gates' biases (in call order) so that each gate opens for
about half of ``images``, and the exits' thresholds so that samples leave at every exit: random
weights then make decisions both ways, which parity must follow.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from slimdeploy.nn import ControlledGate, Exit, GatedBlock, record_decisions
from slimdeploy.nn.exit_stage import ExitHead

INPUT_SIZE = (3, 16, 16)


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


class Residual(nn.Module):
    """relu(x + conv-bn-relu-conv-bn(x)), the body of a gated block."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        out = channels
        self.branch = nn.Sequential(conv_bn(channels, out, stride), nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out))
        self.shortcut = nn.Identity() if stride == 1 else nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


class PoolGate(nn.Module):
    """Global average pool, a linear layer to one logit, sigmoid: probability [B]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x.mean(dim=(2, 3))))[:, 0]


class Embed(nn.Module):
    """A controlled gate's per-block input: global average pool, linear to the controller width."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class LSTMController(nn.Module):
    """One LSTM cell shared by every gate, then a linear layer and a sigmoid; state (h, c)."""

    def __init__(self, width: int = 8, hidden: int = 6) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = nn.LSTMCell(width, hidden)
        self.proj = nn.Linear(hidden, 1)

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = x.new_zeros((x.shape[0], self.hidden))
        return zeros, zeros

    def forward(self, inputs: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, c = self.cell(inputs, (state[0], state[1]))
        return torch.sigmoid(self.proj(h))[:, 0], (h, c)


class GatedNet(nn.Module):
    """Three gated blocks with a transition between the first two (see the module docstring)."""

    def __init__(self, controlled: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        self.input_size = INPUT_SIZE
        if controlled:
            self.controller = LSTMController()
        self.stem = conv_bn(3, 16)
        self.block1 = GatedBlock(Residual(16), self._gate(16))
        self.transition = conv_bn(16, 32, 2)
        self.block2 = GatedBlock(Residual(32, 2), self._gate(32),
                                 skip=nn.Sequential(nn.Conv2d(32, 32, 1, 2, bias=False), nn.BatchNorm2d(32)))
        self.block3 = GatedBlock(Residual(32), self._gate(32))
        self.fc = nn.Linear(32, num_classes)

    def _gate(self, channels: int) -> nn.Module:
        return ControlledGate(Embed(channels, 8), self.controller) if hasattr(self, "controller") else PoolGate(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        x = self.block3(self.block2(self.transition(x)))
        return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))


class TrunkExitNet(nn.Module):
    """A trunk of three layers with an exit after each (the last is the classifier)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.input_size = INPUT_SIZE
        self.layer1, self.layer2, self.layer3 = conv_bn(3, 8), conv_bn(8, 16, 2), conv_bn(16, 32, 2)
        self.exit1 = Exit(ExitHead(8, num_classes))
        self.exit2 = Exit(ExitHead(16, num_classes))
        self.classifier = Exit(ExitHead(32, num_classes))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.layer1(x)
        b = self.layer2(a)
        return [self.exit1(a), self.exit2(b), self.classifier(self.layer3(b))]


class MultiInputExitNet(nn.Module):
    """Two stages, each with its own stem on the image; stage 1's second layer also reads
    stage 0's first-layer features (S2D's concat indicators)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.input_size = INPUT_SIZE
        self.stem0, self.stem1 = conv_bn(3, 4), conv_bn(3, 8)
        self.layer0, self.layer1 = conv_bn(4, 8, 2), conv_bn(4 + 8, 16, 2)
        self.exit0 = Exit(ExitHead(8, num_classes), rule="entropy", threshold=1.0)
        self.exit1 = Exit(ExitHead(16, num_classes), rule="entropy")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a0 = self.stem0(x)
        a1 = self.stem1(x)
        first = self.exit0(self.layer0(a0))
        return first, self.exit1(self.layer1(torch.cat([a0, a1], dim=1)))


def gated_net(controlled: bool = False) -> GatedNet:
    return GatedNet(controlled)


def trunk_exit_net() -> TrunkExitNet:
    return TrunkExitNet()


def multi_input_exit_net() -> MultiInputExitNet:
    return MultiInputExitNet()


def initialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with reproducible weights and BatchNorm statistics that are not the identity,
    in eval mode."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):  # whatever the random state was when it was built
            module.reset_parameters()
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def balance(model: nn.Module, images: np.ndarray) -> nn.Module:
    """Decisions both ways on ``images``: each gate moved (in call order) so that it opens for
    about half of them (a feed-forward gate's bias shifted; a controlled gate's embedding bias
    moved along the direction that raises its logit), then sharpened; exit thresholds at
    quantiles of the exits' confidences, so that samples leave at every exit."""
    x = torch.from_numpy(images)
    controller = getattr(model, "controller", None)
    if controller is not None:  # random weights vary too little from sample to sample: sharpen
        with torch.no_grad():
            spread = min(float(logit.std()) for logit in _gate_logits(model, x))
            if spread < 1:
                controller.proj.weight.mul_(30)
                for module in model.modules():
                    if isinstance(module, Embed):
                        module.fc.weight.mul_(10)
    for k, block in enumerate(m for m in model.modules() if isinstance(m, GatedBlock)):
        if isinstance(block.gate, PoolGate):
            with torch.no_grad():
                block.gate.fc.bias -= float(_median_logit(model, x, k))
            continue
        bias = block.gate.embed.fc.bias
        bias.grad = None
        _median_logit(model, x, k, grad=True).backward()
        if bias.grad is None or not bool(torch.isfinite(bias.grad).all()) or float(bias.grad.norm()) == 0:
            continue
        direction, start = bias.grad / bias.grad.norm(), bias.detach().clone()
        low, high = -50.0, 50.0
        with torch.no_grad():
            for _ in range(40):  # bisection on the step along the direction
                middle = (low + high) / 2
                bias.copy_(start + middle * direction)
                low, high = (middle, high) if _median_logit(model, x, k) < 0 else (low, middle)
    _sharpen(model, x)
    exits = [m for m in model.modules() if isinstance(m, Exit)]
    if exits:
        with torch.no_grad(), record_decisions() as record:
            model(x)
        remaining = torch.ones(len(x), dtype=torch.bool)
        for j, (exit_module, logits) in enumerate(zip(exits[:-1], record.exit_logits)):
            confidence = exit_module.confidence(logits)
            share = 1.0 / (len(exits) - j)  # of the samples still here, this share leaves
            quantile = share if exit_module.rule == "entropy" else 1 - share
            threshold = float(torch.quantile(confidence[remaining], quantile))
            exit_module.threshold.fill_(threshold)
            leave = confidence <= threshold if exit_module.rule == "entropy" else confidence >= threshold
            remaining &= ~leave
    return model


def trained(model: nn.Module, epochs: int = 12, seed: int = 0) -> nn.Module:
    """``model`` trained on the digits training split with Adam: every exit's cross-entropy, and
    for gated blocks (straight-through, as ``GatedBlock`` trains) a penalty that keeps each
    gate open for half the samples, so that the gates learn which half; then ``balance`` on
    the calibration split. Logits that mean something are what reduced precision is judged on."""
    from slimdeploy.data import digits_inputs, digits_statistics

    torch.manual_seed(seed)
    mean, std = digits_statistics()
    images, labels = digits_inputs("train", INPUT_SIZE, mean, std)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * ((len(x) + 63) // 64))
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(x)).split(64):
            with record_decisions() as record:
                out = model(x[rows])
            loss = sum(nn.functional.cross_entropy(logits, y[rows]) for logits in (record.exit_logits or [out]))
            if record.probs:
                probs = record.gate_probs()
                hard = torch.stack(record.executed, dim=1).to(probs.dtype)
                rate = (hard + (probs - probs.detach())).mean(dim=0)
                loss = loss + 4 * ((rate - 0.5) ** 2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return balance(model.eval(), digits_inputs("calib", INPUT_SIZE, mean, std)[0])


def _sharpen(model: nn.Module, x: torch.Tensor, spread: float = 4.0) -> None:
    """Scale each gate's logit (weights and bias together, so every decision stays as it is) until
    its spread over ``x`` is at least ``spread``: probabilities far from the threshold, as a
    trained gate's are, rather than a crowd around it that any rounding flips."""
    blocks = [m for m in model.modules() if isinstance(m, GatedBlock)]
    with torch.no_grad():
        for k, block in enumerate(blocks):
            if not isinstance(block.gate, PoolGate):
                continue
            scale = spread / max(float(_gate_logits(model, x)[k].std()), 1e-3)
            if scale > 1:
                block.gate.fc.weight.mul_(scale)
                block.gate.fc.bias.mul_(scale)
        controller = getattr(model, "controller", None)
        if controller is not None:
            scale = spread / max(min(float(logit.std()) for logit in _gate_logits(model, x)), 1e-3)
            if scale > 1:  # the projection is after the LSTM: the state, and so every decision, stays
                controller.proj.weight.mul_(scale)
                controller.proj.bias.mul_(scale)


def _gate_logits(model: nn.Module, x: torch.Tensor, grad: bool = False) -> list[torch.Tensor]:
    """Every gate's logit [B] before its sigmoid, in call order (the last linear layer's output:
    exact where a probability has saturated)."""
    logits: list[torch.Tensor] = []
    layers = [m.fc for m in model.modules() if isinstance(m, PoolGate)] + [m.proj for m in model.modules() if isinstance(m, LSTMController)]
    hooks = [layer.register_forward_hook(lambda _m, _i, out: logits.append(out[:, 0])) for layer in layers]
    try:
        with torch.set_grad_enabled(grad), record_decisions():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits


def _median_logit(model: nn.Module, x: torch.Tensor, k: int, grad: bool = False) -> torch.Tensor:
    return _gate_logits(model, x, grad)[k].median()
