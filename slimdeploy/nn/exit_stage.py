"""Exit machinery shared by early-exit networks (S2D, BranchyNet-style heads; docs/design.md §3):
confidence, exit rule, and ``EarlyExitNet``, the base class that runs the stages.

A stage's classifier answers for a sample when its confidence reaches the stage's threshold:

    max_softmax  confidence = max_k softmax(logits)_k, exit iff confidence >= threshold
    entropy      confidence = -sum_k p_k log p_k,      exit iff confidence <= threshold

The last stage always answers (its threshold is ignored). ``exit_confidence`` is what the
exported graphs compute too (it is part of each stage's exported piece), so PyTorch and ONNX
decide on the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

Key = tuple[int, int]  # (stage, index of the stage's feature map) of a carried feature map

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


class EarlyExitNet(nn.Module):
    """Base of early-exit networks: stages run in order, each ending in a classifier; a sample
    leaves at the first stage whose confidence passes its threshold.

    Subclasses set ``n_stages``, ``num_classes`` and ``exit_modules`` (one ``nn.exit.Exit`` per
    stage, whose rule and thresholds are ``exit_rule`` and ``exit_thresholds``; the rule is the
    first exit's) and implement ``run_stage``, ``needs`` and ``provides``; ``reads_input`` says
    whether a stage reads the image (the exporters and the staged controller feed it only then).

    ``forward(x, exit_thresholds=None) -> (logits, exit_stage, exit_confidence)`` really stops:
    after each stage the samples that left are dropped from the batch. ``exit_confidence``
    [B, S] holds each stage's confidence, -1 for stages a sample did not reach.
    ``forward_all(x)`` runs every stage on every sample (training).
    """

    n_stages: int
    num_classes: int
    exit_modules: Sequence[Any]  # nn.exit.Exit, one per stage

    @property
    def exit_rule(self) -> str:
        """How every exit's confidence is compared (``max_softmax`` or ``entropy``)."""
        return self.exit_modules[0].rule

    @property
    def exit_thresholds(self) -> list[float]:
        """Each stage's default threshold (the last is ignored: the last stage always answers)."""
        return [float(e.threshold) for e in self.exit_modules]

    @exit_thresholds.setter
    def exit_thresholds(self, values: Sequence[float]) -> None:
        values = [float(v) for v in values]
        if len(values) != len(self.exit_modules):
            raise ValueError(f"exit_thresholds needs {len(self.exit_modules)} values (one per stage), got {len(values)}")
        for exit_, value in zip(self.exit_modules, values):
            exit_.threshold.fill_(value)

    def needs(self, stage: int) -> list[Key]:
        """Earlier stages' feature maps ``stage`` reads, sorted."""
        raise NotImplementedError

    def provides(self, stage: int) -> list[Key]:
        """This stage's feature maps that later stages read, sorted."""
        raise NotImplementedError

    def reads_input(self, stage: int) -> bool:
        """Whether ``stage`` reads the image. Defaults to True for every stage."""
        return True

    def run_stage(self, stage: int, x: torch.Tensor | None, carried: dict[Key, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage ``stage`` on images ``x`` and the carried features it reads: its logits and
        its feature maps (indexed by the second element of their ``Key``)."""
        raise NotImplementedError

    def stage_outputs(self, stage: int, x: torch.Tensor | None, *needed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The exported piece of a stage: ``(logits, confidence, *provided features)`` from the
        image (None when the stage does not read it) and the ``needs(stage)`` features in order."""
        logits, features = self.run_stage(stage, x, dict(zip(self.needs(stage), needed)))
        provided = [features[index] for _, index in self.provides(stage)]
        return (logits, exit_confidence(logits, self.exit_rule), *provided)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every stage for every sample (training)."""
        carried: dict[Key, torch.Tensor] = {}
        all_logits = []
        for stage in range(self.n_stages):
            logits, features = self.run_stage(stage, x, carried)
            carried.update({(stage, index): f for index, f in enumerate(features)})
            all_logits.append(logits)
        return all_logits

    def thresholds_tensor(self, exit_thresholds: torch.Tensor | Sequence[float] | None) -> torch.Tensor:
        """The thresholds to use as a [n_stages] float32 tensor; a wrong shape raises ValueError."""
        if exit_thresholds is None:
            return torch.tensor(self.exit_thresholds, dtype=torch.float32)
        thresholds = torch.as_tensor(exit_thresholds, dtype=torch.float32)
        if tuple(thresholds.shape) != (self.n_stages,):
            raise ValueError(f"exit_thresholds must have shape [{self.n_stages}] (one per stage), got {list(thresholds.shape)}")
        return thresholds

    def forward(
        self, x: torch.Tensor, exit_thresholds: torch.Tensor | Sequence[float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Early-exit inference: samples stop at the first confident stage.

        Args:
            x: images [B, C, H, W].
            exit_thresholds: [n_stages] thresholds. Defaults to the model's ``exit_thresholds``.

        Returns:
            ``logits`` [B, classes] of the stage that answered, ``exit_stage`` [B] int64 and
            ``exit_confidence`` [B, n_stages] float32 (-1 where a stage was not reached).
        """
        thresholds = self.thresholds_tensor(exit_thresholds)
        batch = x.shape[0]
        logits_out = x.new_zeros(batch, self.num_classes)
        stage_out = torch.full((batch,), self.n_stages - 1, dtype=torch.int64)
        confidence_out = x.new_full((batch, self.n_stages), NOT_REACHED)
        active = torch.arange(batch)
        carried: dict[Key, torch.Tensor] = {}
        for stage in range(self.n_stages):
            logits, features = self.run_stage(stage, x, carried)
            confidence = exit_confidence(logits, self.exit_rule)
            confidence_out[active, stage] = confidence
            last = stage == self.n_stages - 1
            leave = torch.ones_like(confidence, dtype=torch.bool) if last else exits(confidence, thresholds[stage], self.exit_rule)
            logits_out[active[leave]] = logits[leave]
            stage_out[active[leave]] = stage
            stay = ~leave
            if last or not bool(stay.any()):
                break
            # Drop the samples that left: later stages run on the rest only.
            active, x = active[stay], x[stay]
            carried = {key: value[stay] for key, value in carried.items()}
            carried.update({key: features[key[1]][stay] for key in self.provides(stage)})
        return logits_out, stage_out, confidence_out
