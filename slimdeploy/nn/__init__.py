"""Canonical building blocks shared by the reference architectures (one block per file).

Importing this package imports torch.
"""

from slimdeploy.nn.condensed_conv import CondensedConv, CondensedLinear
from slimdeploy.nn.depthwise_separable import DepthwiseSeparable
from slimdeploy.nn.gated_residual import (
    GatedBasicBlock,
    GatedBottleneck,
    GatedResidual,
    projection_shortcut,
)
from slimdeploy.nn.gates import (
    FeedforwardGateI,
    FeedforwardGateII,
    RecurrentGate,
    RecurrentGateEmbedding,
)
from slimdeploy.nn.learned_group_conv import LearnedGroupConv
from slimdeploy.nn.sfr import CondensedSFR, SparseFeatureReactivation
from slimdeploy.nn.spconv import SPConv3x3
from slimdeploy.nn.squeeze_excite import SqueezeExcite

__all__ = [
    "CondensedConv",
    "CondensedLinear",
    "CondensedSFR",
    "DepthwiseSeparable",
    "FeedforwardGateI",
    "FeedforwardGateII",
    "GatedBasicBlock",
    "GatedBottleneck",
    "GatedResidual",
    "LearnedGroupConv",
    "RecurrentGate",
    "RecurrentGateEmbedding",
    "SPConv3x3",
    "SparseFeatureReactivation",
    "SqueezeExcite",
    "projection_shortcut",
]
