"""Exit machinery shared by early-exit networks (S2D, DESIGN.md §3): confidence and exit rule.

A stage's classifier answers for a sample when its confidence reaches the stage's threshold:

    max_softmax  confidence = max_k softmax(logits)_k, exit iff confidence >= threshold
    entropy      confidence = -sum_k p_k log p_k,      exit iff confidence <= threshold

The last stage always answers (its threshold is ignored). ``exit_confidence`` is what the
exported graphs compute too (it is part of each stage's exported piece), so PyTorch and ONNX
decide on the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

EXIT_RULES = ("max_softmax", "entropy")
# exit_confidence of a stage a sample never reached (max softmax is in [0, 1], entropy >= 0).
NOT_REACHED = -1.0


def check_exit_rule(rule: str) -> str:
    """``rule`` if known; raises ValueError otherwise."""
    if rule not in EXIT_RULES:
        raise ValueError(f"unknown exit rule '{rule}', expected one of {list(EXIT_RULES)}")
    return rule


def exit_confidence(logits: torch.Tensor, rule: str = "max_softmax") -> torch.Tensor:
    """Per-sample confidence [B] of a stage's logits [B, K] under ``rule``. Defaults to max softmax."""
    if rule == "entropy":
        log_p = torch.log_softmax(logits, dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)
    return torch.softmax(logits, dim=1).amax(dim=1)


def exits(confidence: torch.Tensor, threshold: torch.Tensor | float, rule: str = "max_softmax") -> torch.Tensor:
    """Bool [B]: which samples leave at this stage."""
    return confidence <= threshold if rule == "entropy" else confidence >= threshold


class ExitHead(nn.Module):
    """A stage's classifier: global average pooling and a linear layer (keys ``fc``).

    Args:
        channels: input channels.
        num_classes: classes.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))
