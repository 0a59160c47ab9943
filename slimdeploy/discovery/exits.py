"""A network with ``Exit``s, cut into the stages of ``nn.exit_stage.EarlyExitNet`` that
``exporters.early_exit.exit_pieces`` consumes (``n_stages``, ``exit_rule``, ``exit_thresholds``,
``needs``, ``provides``, ``reads_input``, ``run_stage``).

With exits E0..E(m-1) in call order, stage j is every computation that E(j) needs and no
earlier exit needs: a node belongs to the first exit that needs it. A value one stage computes
and a later stage reads is carried between them (``provides`` / ``needs``), and a stage that
reads the image gets it: a BranchyNet trunk (each stage continues from the last one's features)
and an S2D network (every stage reads the image and earlier stages' features) are both this
shape. The last exit always answers, so the network's final classifier is an ``Exit``; a forward
whose output needs layers no exit needs is refused, as are exits with different rules.

``forward(x, exit_thresholds=None)`` is the reference: the model's own forward, every exit
recorded, each sample answered by its first confident exit (``EarlyExitNet``'s outputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from slimdeploy.discovery.trace import TracedNetwork
from slimdeploy.errors import ExportError
from slimdeploy.nn.decisions import record_decisions
from slimdeploy.nn.exit import Exit
from slimdeploy.nn.exit_stage import NOT_REACHED, EarlyExitNet, Key, exit_confidence, exits


class DiscoveredExitNet(EarlyExitNet):
    """The early-exit API over a network's ``Exit``s (see the module docstring).

    Args:
        model: the network (registered here, so its parameters are this module's).
        traced: its traced forward.
    """

    def __init__(self, model: nn.Module, traced: TracedNetwork) -> None:
        super().__init__()
        self.model = model
        nodes, self.paths, self.exit_modules = traced.protocol_calls(Exit)
        self.__dict__["_traced"] = traced
        rules = sorted({e.rule for e in self.exit_modules})
        if len(rules) > 1:
            raise ExportError(f"the exits of {traced.name} use different rules {rules} | Note: a deployment compares every "
                              "exit's confidence the same way | Fix: give every Exit the same rule")
        self.n_stages = len(nodes)
        stage_of = _stage_of(traced, nodes)
        _refuse_unexited_output(traced, stage_of, self.paths[-1])
        order = {node: i for i, node in enumerate(traced.nodes)}
        provided: list[list[fx.Node]] = [[] for _ in nodes]
        read_by: list[set[fx.Node]] = [set() for _ in nodes]
        self._reads = [False] * len(nodes)
        for source, readers in traced.users().items():
            for reader in readers:
                if reader not in stage_of:
                    continue
                if source is traced.image:
                    self._reads[stage_of[reader]] = True
                elif source in stage_of and stage_of[reader] > stage_of[source]:
                    if source not in provided[stage_of[source]]:
                        provided[stage_of[source]].append(source)
                    read_by[stage_of[reader]].add(source)
        for features in provided:
            features.sort(key=order.__getitem__)
        self.__dict__["_key_of"] = {node: (j, i) for j, features in enumerate(provided) for i, node in enumerate(features)}
        self._needs: list[list[Key]] = [sorted(self._key_of[node] for node in sources) for sources in read_by]
        self._provides: list[list[Key]] = [[(j, i) for i in range(len(features))] for j, features in enumerate(provided)]
        if not self._reads[0]:
            raise ExportError(f"Exit '{self.paths[0]}' does not depend on the image | Fix: place it on the network's features")
        by_key = {key: node for node, key in self._key_of.items()}
        self._stages = [
            traced.segment([n for n in stage_of if stage_of[n] == j],
                           [traced.image] * self._reads[j] + [by_key[key] for key in self._needs[j]],
                           [nodes[j], *provided[j]])
            for j in range(len(nodes))
        ]
        self.num_classes = 0  # set by check_exits from an example

    def needs(self, stage: int) -> list[Key]:
        """Earlier stages' features ``stage`` reads, sorted."""
        return list(self._needs[stage])

    def provides(self, stage: int) -> list[Key]:
        """This stage's features that later stages read, sorted."""
        return list(self._provides[stage])

    def reads_input(self, stage: int) -> bool:
        """Whether ``stage`` reads the image."""
        return self._reads[stage]

    def run_stage(self, stage: int, x: torch.Tensor | None, carried: dict[Key, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage ``stage`` on the image (when it reads it) and the carried features it needs:
        its exit's logits and the features it provides."""
        values = [x] * self._reads[stage] + [carried[key] for key in self._needs[stage]]
        logits, *features = self._stages[stage].run(self.model, *values)
        return logits, features

    def forward(self, x: torch.Tensor, exit_thresholds: torch.Tensor | Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's own forward with every exit recorded; each sample answered by its first
        confident exit: (logits, exit_stage [B] int64, exit_confidence [B, n_stages], -1 where
        not reached)."""
        thresholds = self.thresholds_tensor(exit_thresholds)
        with record_decisions() as record:
            self.model(x)
        if [id(e) for e in record.exits] != [id(e) for e in self.exit_modules]:
            raise ExportError(f"{type(self.model).__name__}.forward ran {len(record.exits)} exits, not the {self.n_stages} "
                              "traced, in order | Fix: call each Exit once per forward, from the model's forward")
        return choose_exits(record.exit_logits, thresholds, self.exit_rule)


def choose_exits(all_logits: Sequence[torch.Tensor], thresholds: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample, the first exit whose confidence passes its threshold (the last always
    answers): (its logits, its index [B] int64, every confidence [B, S] with -1 after it)."""
    stacked = torch.stack(list(all_logits), dim=1)  # [B, S, classes]
    confidence = torch.stack([exit_confidence(logits, rule) for logits in all_logits], dim=1)
    leave = exits(confidence, thresholds[None, :].to(confidence.dtype), rule)
    leave[:, -1] = True
    stage = leave.to(torch.int64).argmax(dim=1)  # the first exit that passes
    rows = torch.arange(stacked.shape[0])
    reached = torch.arange(len(all_logits))[None, :] <= stage[:, None]
    return stacked[rows, stage], stage, torch.where(reached, confidence, torch.full_like(confidence, NOT_REACHED))


def _stage_of(traced: TracedNetwork, exit_nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """Per node that depends on the image, the first exit that needs it."""
    stage_of: dict[fx.Node, int] = {}
    for j, node in enumerate(exit_nodes):
        for needed in traced.needed([node]):
            if needed in traced.data and needed not in stage_of:
                stage_of[needed] = j
    return stage_of


def _refuse_unexited_output(traced: TracedNetwork, stage_of: dict[fx.Node, int], last: str) -> None:
    """Everything the forward returns must come from the exits' computations."""
    returned = traced.needed(traced.output.all_input_nodes)
    order = {node: i for i, node in enumerate(traced.nodes)}
    outside = sorted((n for n in returned if n in traced.data and n not in stage_of), key=order.__getitem__)
    if outside:
        raise ExportError(
            f"{traced.name}.forward returns what layers after the last Exit ('{last}') compute, "
            f"{traced.where(outside[0])} to {traced.where(outside[-1])} | Note: the last Exit always answers, so the final "
            "classifier is an Exit too | Fix: wrap the final classifier in Exit(...)")


def check_exits(adapter: DiscoveredExitNet, example: torch.Tensor) -> None:
    """Refuse a network whose stages cannot be carried or do not compute its exits (on
    ``example``); set ``num_classes``."""
    traced: TracedNetwork = adapter._traced
    values = traced.evaluate(example)
    for node, (stage, _) in adapter._key_of.items():
        value = values[node]
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != example.shape[0]:
            raise ExportError(
                f"stage {stage} passes {type(value).__name__} {traced.where(node)} ({node.name}) to a later exit's stage | "
                "Note: stages hand on per-sample tensors [batch, ...] only | Fix: compute that value again where it is used")
    classes = {tuple(values[node].shape[1:]) for node in traced.calls(Exit)}
    shapes = [list(values[node].shape) for node in traced.calls(Exit)]
    if len(classes) != 1 or any(len(shape) != 2 for shape in shapes):
        raise ExportError(f"the exits of {traced.name} output {shapes} | Note: every exit answers with logits "
                          "[batch, classes], the same classes | Fix: end every Exit's head in the same classifier width")
    adapter.num_classes = shapes[0][1]
    with torch.inference_mode():
        staged = adapter.forward_all(example)
        with record_decisions() as record:
            adapter.model(example)
    if len(record.exit_logits) != len(staged) or not all(
            torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(staged, record.exit_logits)):
        raise ExportError(f"{traced.name}'s exits, cut into stages, do not compute what its forward computes | Note: "
                          "randomness in forward, or an Exit whose forward was changed, breaks that | Fix: keep "
                          "forward deterministic in eval mode and each Exit's work in its head")
