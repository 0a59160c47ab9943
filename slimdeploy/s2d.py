"""Build and train S2D early-exit networks (format: docs/s2d-format.md).

    net = build_s2d("resnet20_cifar", S2DConfig.even(n_stages=3))   # or a config from elsewhere
    loss = multi_exit_loss(net.forward_all(images), labels)          # sum_i alpha_i CE(f_i)

The S2DNAS architecture search is out of scope: a configuration found elsewhere (split points
and concat indicators per layer) arrives as an ``S2DConfig`` (or its JSON, the same keys as the
``s2d_resnet*_cifar`` architecture arguments).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from slimdeploy._optional import optional_import
from slimdeploy.errors import ArchitectureError

# Static backbones an S2D network can be built from: name -> the registered S2D architecture.
BACKBONES = {"resnet20_cifar": "s2d_resnet20_cifar", "resnet56_cifar": "s2d_resnet56_cifar"}


@dataclass
class S2DConfig:
    """A split configuration (the S2D format's fields; None = the architecture's default).

    Attributes:
        splits: cumulative split points per layer and stage.
        reuse: concat indicators: per layer and stage, the earlier stages read.
        exit_rule: ``"max_softmax"`` or ``"entropy"``. Defaults to ``"max_softmax"``.
        exit_thresholds: one per stage (the last ignored). Defaults to 0.9 each.
    """

    splits: list[list[int]] | None = None
    reuse: list[list[list[int]]] | None = None
    exit_rule: str = "max_softmax"
    exit_thresholds: list[float] | None = None

    @classmethod
    def even(cls, n_stages: int, depth: int = 20, **kwargs: Any) -> S2DConfig:
        """Stages owning equal shares of every layer, dense reuse."""
        from slimdeploy.models.s2d import default_splits, resnet_cifar_layers

        fractions = [(j + 1) / n_stages for j in range(n_stages)]
        return cls(splits=default_splits([w for w, _ in resnet_cifar_layers(depth)], fractions), **kwargs)

    def arch_args(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def build_s2d(backbone: str, config: S2DConfig | Mapping[str, Any] | None = None, num_classes: int = 10) -> Any:
    """An S2D network from a static backbone name (``resnet20_cifar``, ``resnet56_cifar``) and
    a split configuration. Returns the ``nn.Module``."""
    from slimdeploy.models.registry import get_arch

    if backbone not in BACKBONES:
        raise ArchitectureError(f"no S2D builder for backbone '{backbone}' | Note: expected one of {sorted(BACKBONES)}")
    args = config.arch_args() if isinstance(config, S2DConfig) else dict(config or {})
    return get_arch(BACKBONES[backbone]).build(num_classes=num_classes, **args)


def multi_exit_loss(all_logits: Sequence[Any], labels: Any, alphas: Sequence[float] | None = None, label_smoothing: float = 0.0) -> Any:
    """The multi-exit training loss sum_i alpha_i CE(f_i, y).

    Args:
        all_logits: logits of every stage (``forward_all``).
        labels: class indices.
        alphas: weight per stage. Defaults to 1 for each.
        label_smoothing: CE label smoothing. Defaults to 0.
    """
    torch = optional_import("torch", "train an S2D network")
    weights = list(alphas) if alphas is not None else [1.0] * len(all_logits)
    if len(weights) != len(all_logits):
        raise ValueError(f"{len(all_logits)} stages but {len(weights)} alphas")
    return sum(
        w * torch.nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        for w, logits in zip(weights, all_logits)
    )
