"""Canonical building blocks shared by the reference architectures (one block per file), and
the decision protocol any network can use to be deployed with its gates and exits:
``GatedBlock`` (with ``ControlledGate`` for gates that share state), ``Exit`` and
``record_decisions`` (docs/design.md §3, "Your own dynamic network").

Importing this package imports torch.
"""

from slimdeploy.nn.condensed_conv import CondensedConv, CondensedLinear
from slimdeploy.nn.decisions import DecisionRecord, record_decisions
from slimdeploy.nn.depthwise_separable import DepthwiseSeparable
from slimdeploy.nn.exit import Exit
from slimdeploy.nn.gated_block import ControlledGate, GatedBlock
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
    "ControlledGate",
    "DecisionRecord",
    "DepthwiseSeparable",
    "Exit",
    "FeedforwardGateI",
    "FeedforwardGateII",
    "GatedBasicBlock",
    "GatedBlock",
    "GatedBottleneck",
    "GatedResidual",
    "LearnedGroupConv",
    "RecurrentGate",
    "RecurrentGateEmbedding",
    "SPConv3x3",
    "SparseFeatureReactivation",
    "SqueezeExcite",
    "projection_shortcut",
    "record_decisions",
]
