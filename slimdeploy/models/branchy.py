"""Early-exit heads on a registered static backbone (BranchyNet style; Teerapittayanon et al.,
ICPR 2016): the backbone's layers are cut into consecutive segments, and every segment but the
last ends in an extra classifier. Stage j runs segment j on the features stage j-1 produced
(carried), so only stage 0 reads the image; the last stage is the backbone's own head.

``branchy_mobilenet_v1`` cuts MobileNet v1 after depthwise-separable blocks ``exits`` (block
indices 1..12, default (3, 7): after the 256- and 512-channel blocks at width 1). Keys: the
backbone's own (``backbone.stem``, ``backbone.features.{i}``, ``backbone.classifier``) and
``heads.{j}.fc`` for the extra classifiers, so a trained ``mobilenet_v1`` state dict loads into
``backbone`` unchanged. Exits share the machinery of ``nn.exit_stage.EarlyExitNet`` (rule,
thresholds, forward that stops, the exporters' stage pieces) with S2D networks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slimdeploy.models.mobilenet import MobileNetV1
from slimdeploy.models.registry import register_model
from slimdeploy.nn.exit import Exit
from slimdeploy.nn.exit_stage import EarlyExitNet, ExitHead, Key, check_exit_rule

DEFAULT_EXITS = (3, 7)
DEFAULT_THRESHOLD = 0.9


class BranchyMobileNetV1(EarlyExitNet):
    """MobileNet v1 with extra exits after chosen blocks.

    Args:
        num_classes: classes. Defaults to 1000.
        width_mult: MobileNet width multiplier. Defaults to 1.0.
        resolution: input size. Defaults to 224.
        exits: blocks (1..12, increasing) after which an extra classifier sits. Defaults to (3, 7).
        exit_rule: ``"max_softmax"`` or ``"entropy"``. Defaults to ``"max_softmax"``.
        exit_thresholds: one per stage (``len(exits) + 1``, the last ignored). Defaults to 0.9 each.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        resolution: int = 224,
        exits: Sequence[int] = DEFAULT_EXITS,
        exit_rule: str = "max_softmax",
        exit_thresholds: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = MobileNetV1(num_classes=num_classes, width_mult=width_mult, resolution=resolution)
        blocks = len(self.backbone.features)
        self.exits = [int(e) for e in exits]
        if any(not 1 <= e < blocks for e in self.exits) or any(b <= a for a, b in zip(self.exits, self.exits[1:])):
            raise ValueError(f"exits {list(exits)} must be increasing block indices in 1..{blocks - 1}")
        self.n_stages = len(self.exits) + 1
        self.num_classes = num_classes
        self.input_size = self.backbone.input_size
        check_exit_rule(exit_rule)
        thresholds = list(exit_thresholds) if exit_thresholds is not None else [DEFAULT_THRESHOLD] * self.n_stages
        if len(thresholds) != self.n_stages:
            raise ValueError(f"exit_thresholds needs {self.n_stages} values (one per stage), got {len(thresholds)}")
        # Stage j runs blocks [bounds[j], bounds[j + 1]).
        self.bounds = [0, *self.exits, blocks]
        self.heads = nn.ModuleList(
            ExitHead(self.backbone.features[e - 1].pw_conv.out_channels, num_classes) for e in self.exits
        )
        # The extra heads and the backbone's classifier as the decision protocol's exits
        # (slimdeploy.nn.Exit), keys kept as they are.
        heads = [*self.heads, _BackboneClassifier(self.backbone)]
        self.exit_modules = [Exit(head, exit_rule, t, register_head=False) for head, t in zip(heads, thresholds)]

    def needs(self, stage: int) -> list[Key]:
        return [(stage - 1, 0)] if stage else []

    def provides(self, stage: int) -> list[Key]:
        return [(stage, 0)] if stage < self.n_stages - 1 else []

    def reads_input(self, stage: int) -> bool:
        return stage == 0

    def run_stage(self, stage: int, x: torch.Tensor | None, carried: dict[Key, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.backbone.stem(x) if stage == 0 else carried[(stage - 1, 0)]
        for block in range(self.bounds[stage], self.bounds[stage + 1]):
            h = self.backbone.features[block](h)
        return self.exit_modules[stage](h), [h]


class _BackboneClassifier(nn.Module):
    """The backbone's own head (pool, dropout, classifier) as the last exit's head."""

    def __init__(self, backbone: MobileNetV1) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.backbone.classifier(self.backbone.dropout(torch.flatten(self.backbone.pool(h), 1)))


@register_model("branchy_mobilenet_v1", family="early_exit", input_size=(3, 224, 224), dynamic=True)
def branchy_mobilenet_v1(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    resolution: int = 224,
    exits: list[int] | None = None,
    exit_rule: str = "max_softmax",
    exit_thresholds: list[float] | None = None,
) -> BranchyMobileNetV1:
    """MobileNet v1 with BranchyNet-style exits after blocks 3 and 7 (3 stages)."""
    return BranchyMobileNetV1(num_classes, width_mult, resolution, exits or DEFAULT_EXITS, exit_rule, exit_thresholds)
