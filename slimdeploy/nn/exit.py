"""An exit placed anywhere in a network: ``Exit(head, rule="max_softmax", threshold=0.9)``.

An exit's head maps the features where it sits to logits; its confidence rule and threshold
say when a sample may leave there (``nn.exit_stage``):

    max_softmax  confidence = max_k softmax(logits)_k, leave iff confidence >= threshold
    entropy      confidence = -sum_k p_k log p_k,      leave iff confidence <= threshold

A sample leaves at the first exit, in call order, whose confidence passes; the last exit always
answers (its threshold is ignored), so the network's final classifier is an ``Exit`` too. Every
exit of a network uses one rule.

Eager forward returns the head's logits (every exit runs: what training wants, with a loss
over all exits) and, inside ``record_decisions``, records them in call order. slimdeploy's
exported forms stop each sample at its exit (docs/design.md §3).
"""

from __future__ import annotations

import torch
from torch import nn

from slimdeploy.nn.decisions import active_record
from slimdeploy.nn.exit_stage import check_exit_rule, exit_confidence

DEFAULT_EXIT_THRESHOLD = 0.9


class Exit(nn.Module):
    """An exit head with its confidence rule and default threshold.

    Args:
        head: module mapping features to logits [B, classes].
        rule: ``"max_softmax"`` or ``"entropy"``. Defaults to ``"max_softmax"``.
        threshold: default threshold (a deployment may change it at run time); a 0-D buffer,
            so that a threshold tuned after training is saved with the weights (set it with
            ``exit.threshold.fill_(0.8)``). Defaults to 0.9.
        register_head: register ``head`` as a submodule and save the threshold in the
            state_dict (keys ``head.*``, ``threshold``); False leaves the head where the model
            registered it and the threshold out of the state_dict, for models whose keys are
            fixed. Defaults to True.

    Raises:
        TypeError: when ``head`` is not an ``nn.Module``; ValueError on an unknown rule.
    """

    def __init__(self, head: nn.Module, rule: str = "max_softmax", threshold: float = DEFAULT_EXIT_THRESHOLD, *,
                 register_head: bool = True) -> None:
        super().__init__()
        if not isinstance(head, nn.Module):
            raise TypeError(f"an Exit's head must be an nn.Module, got {type(head).__name__} | Fix: wrap it in an nn.Module")
        self.rule = check_exit_rule(rule)
        # float64, so that the threshold given is the threshold read back.
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64), persistent=register_head)
        if register_head:
            self.head = head
        else:
            self.__dict__["head"] = head

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample confidence [B] of this exit's logits under its rule."""
        return exit_confidence(logits, self.rule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's logits; recorded when a ``record_decisions`` forward is active."""
        logits = self.head(x)
        record = active_record()
        if record is not None:
            record.exit_logits.append(logits)
            record.exits.append(self)
        return logits
