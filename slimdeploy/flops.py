"""Multiply-accumulate (MAC) and parameter counts of a PyTorch model, per layer.

Counts convolutions and linear layers, which dominate CNN compute (BatchNorm, activations and
pooling are left out, as in the MobileNets and CondenseNet papers). One MAC = one multiply and
one add; papers that say "FLOPs" for CNNs usually mean MACs. Counted with forward hooks on one
example of the model's input size, so it follows whatever path ``forward`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimdeploy._optional import optional_import


@dataclass
class MacsReport:
    """Total MACs and parameters, and MACs per named layer (in call order)."""

    macs: int
    params: int
    per_layer: dict[str, int] = field(default_factory=dict)


def count_macs(module: Any, input_size: tuple[int, ...]) -> MacsReport:
    """Count MACs of one forward on a zero input of ``(1, *input_size)``.

    Args:
        module: ``nn.Module`` (eval mode is restored as it was).
        input_size: (C, H, W).
    """
    torch = optional_import("torch", "count MACs")
    return count_macs_of(module, module, torch.zeros(1, *input_size))


def count_macs_of(module: Any, compute: Any, *inputs: Any) -> MacsReport:
    """Count the MACs of ``compute(*inputs)``, a computation using ``module``'s layers (a whole
    forward, or one piece of it such as a single residual block). Inputs should have batch 1:
    the count is per sample.

    Args:
        module: the ``nn.Module`` whose Conv2d and Linear layers are counted.
        compute: the callable to run.
        inputs: its arguments.
    """
    torch = optional_import("torch", "count MACs")
    nn = torch.nn
    per_layer: dict[str, int] = {}
    handles = []

    from slimdeploy.nn.learned_group_conv import LearnedGroupConv
    from slimdeploy.nn.sfr import SparseFeatureReactivation

    masked = (LearnedGroupConv, SparseFeatureReactivation)

    def hook(name: str):
        def record(layer: Any, args: Any, output: Any) -> None:
            if isinstance(layer, (nn.Conv2d, *masked)):
                # A LearnedGroupConv (or CondenseNetV2's SFR) runs functional.conv2d on its
                # (masked, dense) weight, so its inner Conv2d never fires a hook: count the
                # dense convolution it computes.
                weight = layer.conv.weight if isinstance(layer, masked) else layer.weight
                kernel = weight.shape[1] * weight.shape[2] * weight.shape[3]
                macs = output.numel() // max(output.shape[0], 1) * kernel
            else:  # nn.Linear
                rows = output.numel() // max(output.shape[0], 1) // layer.out_features
                macs = layer.in_features * layer.out_features * rows
            per_layer[name] = per_layer.get(name, 0) + int(macs)

        return record

    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear, *masked)):
            handles.append(layer.register_forward_hook(hook(name)))
    was_training = module.training
    try:
        module.eval()
        with torch.inference_mode():
            compute(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    params = sum(p.numel() for p in module.parameters())
    return MacsReport(sum(per_layer.values()), int(params), per_layer)
