"""Activations selectable by name, for blocks whose official code switches between them.

``"relu"`` is ``nn.ReLU(inplace=True)`` (safe: it always follows a BatchNorm that made a new
tensor); ``"hardswish"`` is ``nn.Hardswish``, the same function as CondenseNetV2's ``HS``
(``x * relu6(x + 3) / 6``) and one ONNX ``HardSwish`` node. Neither has state, so the choice
never changes a state_dict key.
"""

from __future__ import annotations

from torch import nn

ACTIVATIONS = ("relu", "hardswish")


def make_activation(name: str = "relu") -> nn.Module:
    """A fresh activation module for ``name`` (one of ``ACTIVATIONS``; defaults to ReLU)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "hardswish":
        return nn.Hardswish()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
