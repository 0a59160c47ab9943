"""Canonical building blocks shared by the reference architectures (one block per file).

Importing this package imports torch.
"""

from slimdeploy.nn.depthwise_separable import DepthwiseSeparable
from slimdeploy.nn.spconv import SPConv3x3

__all__ = ["DepthwiseSeparable", "SPConv3x3"]
