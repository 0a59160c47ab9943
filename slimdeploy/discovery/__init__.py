"""Discovery: any ``nn.Module`` built with the decision protocol (``slimdeploy.nn.GatedBlock``,
``ControlledGate``, ``Exit``) becomes a model the dynamic forms export.

    net = discover(model, input_size=(3, 32, 32))   # DiscoveredGatedNet or DiscoveredExitNet

The forward is traced with torch.fx (``trace``), the gated blocks or exits found in call order,
and the graph cut into the API the exporters already consume: the gated model API of SkipNet
(``gated``) or the stages of ``EarlyExitNet`` (``exits``). Pieces, forms, plans, MACs per piece,
decision outputs, threshold inputs and decision-covering samples then follow unchanged
(``recipes.discovered`` is the recipe). What cannot be deployed is refused with an
``ExportError`` (exit 2) that names the module and what would make it deployable.

Importing this package imports torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimdeploy.discovery.exits import DiscoveredExitNet, check_exits
from slimdeploy.discovery.gated import DiscoveredGatedNet, check_gated
from slimdeploy.discovery.trace import protocol_modules, trace_network
from slimdeploy.errors import ExportError
from slimdeploy.nn.exit import Exit
from slimdeploy.nn.gated_block import GatedBlock

__all__ = ["DiscoveredExitNet", "DiscoveredGatedNet", "discover", "protocol_kind"]


def protocol_kind(model: Any) -> str | None:
    """``"gated"`` when ``model`` holds ``GatedBlock``s, ``"early_exit"`` when it holds
    ``Exit``s, None for neither; refuses both in one model, and one inside another."""
    if not isinstance(model, nn.Module):
        return None
    found = protocol_modules(model)
    gated = [path for path, module in found.items() if isinstance(module, GatedBlock)]
    exits = [path for path, module in found.items() if isinstance(module, Exit)]
    if gated and exits:
        raise ExportError(f"{type(model).__name__} has gated blocks ('{gated[0]}') and exits ('{exits[0]}') | Note: "
                          "a deployment routes one kind of decision | Fix: export a model with one kind")
    return "gated" if gated else "early_exit" if exits else None


def discover(model: nn.Module, input_size: tuple[int, ...]) -> DiscoveredGatedNet | DiscoveredExitNet:
    """The gated or early-exit API over ``model`` (put in eval mode), checked on one example
    batch of ``input_size`` against the model's own forward."""
    kind = protocol_kind(model)
    if kind is None:
        raise ExportError(f"{type(model).__name__} has no GatedBlock or Exit | Fix: build its decisions with "
                          "slimdeploy.nn.GatedBlock or slimdeploy.nn.Exit")
    model.eval()
    traced = trace_network(model)
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    if kind == "gated":
        gated = DiscoveredGatedNet(model, traced).eval()
        check_gated(gated, example)
        return gated
    exits = DiscoveredExitNet(model, traced).eval()
    check_exits(exits, example)
    return exits
