"""SkipNet: ResNets whose residual blocks a gate can skip (Wang et al., "SkipNet: Learning
Dynamic Routing in Convolutional Networks", ECCV 2018).

Reproduces the official models of ucbdrive/skipnet @4825e53 (``cifar/models.py``,
``imagenet/models.py``) under their factory names, misspellings included
(``cifar10_feedfoward_rl_38``, ``cifar100_feeforward_38``, ``cifar100_feedford_rl_38``), with
their state_dict keys, so official checkpoints load by key and their ``arch`` field selects the
architecture:

- ``conv1``, ``bn1``; then for every block in order ``group{g}_ds{i}`` (only when the block
  downsamples; the same module is also ``group{g}_layer{i}.downsample``, so its tensors appear
  under both names), ``group{g}_layer{i}`` and ``group{g}_gate{i}``; then ``control``
  (recurrent gates) and ``fc``.
- CIFAR (32x32): 3x3 stem to 16 channels, three groups of basic blocks with 16/32/64 planes,
  AvgPool2d(8). 38/74/110/152 layers = 6/12/18/25 blocks per group.
- ImageNet (224x224): 7x7/2 stem + max-pool, four groups with 64/128/256/512 planes (basic
  blocks for 18/34, bottlenecks for 50/101/152), AvgPool2d(7), recurrent gates only.

Inference semantics (all variants): the first block always runs; the gate evaluated on block
k's output decides block k+1; block k+1 executes iff the probability is strictly above
``gate_threshold`` (default 0.5, as upstream); a skipped block outputs its skip path
(``downsample(x)`` where it downsamples, else ``x``). The last block's gate decides nothing.
SP (supervised pre-training) and RL checkpoints share architecture and keys; they differ only
in what the official forward returns (see ``official_forward``).

The model API, which every export form builds on:

- ``forward(x, gate_threshold=0.5) -> (logits [B, classes], gates [B, n_gated] uint8,
  gate_probs [B, n_gated] float32)``, ``n_gated = n_blocks - 1``, column j about block j + 1;
- the pieces it is written with: ``stem``, ``n_blocks``, ``block(k)``, ``run_block(k, x)``,
  ``skip(k, x)``, ``gate_init_state(x)``, ``gate(k, features, state)``, ``head``
  (``nn.gated_network.GatedNetwork``, the API of any network built with ``GatedBlock``s).

The decisions are the decision protocol's (``slimdeploy.nn``): blocks 1..n-1 are
``GatedBlock``s over the official modules (gate k - 1, the block, its ``downsample`` as the skip
path), recurrent gates ``ControlledGate``s of the shared LSTM; they register nothing, so the
state_dict keys stay the official ones.

Unlike the official code, batch size 1 works (no bare ``squeeze()``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional

from slimdeploy.models.registry import register_model
from slimdeploy.nn.decisions import record_decisions
from slimdeploy.nn.gated_block import ControlledGate, GatedBlock, run_gate
from slimdeploy.nn.gated_network import GatedNetwork
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

GateType = Literal["ffgate1", "ffgate2", "rnn"]
Dataset = Literal["cifar", "imagenet"]
Stage = Literal["sp", "rl"]

# Per dataset: stem width, group widths, feature-map side of each group at the native input
# (the gates' pool sizes), final pool kernel, native input size.
_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar": {
        "planes": (16, 32, 64),
        "maps": (32, 16, 8),
        "head_pool": 8,
        "input_size": (3, 32, 32),
    },
    "imagenet": {
        "planes": (64, 128, 256, 512),
        "maps": (56, 28, 14, 7),
        "head_pool": 7,
        "input_size": (3, 224, 224),
    },
}


class _GateEmbedding(nn.Module):
    """A recurrent gate's per-block embedding as a ``ControlledGate``'s ``embed``: [B, embed_dim]."""

    def __init__(self, module: RecurrentGateEmbedding) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.embed(x)


class SkipNet(GatedNetwork):
    """A gated ResNet with the official SkipNet module layout.

    Args:
        block: ``GatedBasicBlock`` or ``GatedBottleneck``.
        layers: blocks per group (3 groups on CIFAR, 4 on ImageNet).
        gate: ``"ffgate1"``, ``"ffgate2"`` or ``"rnn"`` (recurrent).
        dataset: ``"cifar"`` (32x32 input) or ``"imagenet"`` (224x224 input).
        stage: ``"sp"`` or ``"rl"``, the official training stage the checkpoint comes from; it
            changes only ``official_forward``'s outputs. Defaults to ``"sp"``.
        num_classes: classifier outputs. Defaults to 10.
        embed_dim: recurrent gate embedding size. Defaults to 10.
        hidden_dim: recurrent gate LSTM size. Defaults to 10.

    Raises:
        ValueError: on an unknown gate, dataset or stage, a feed-forward gate on ImageNet (upstream
            has none), or a wrong number of groups.
    """

    def __init__(
        self,
        block: type[GatedBasicBlock] | type[GatedBottleneck],
        layers: tuple[int, ...],
        gate: GateType,
        dataset: Dataset,
        stage: Stage = "sp",
        num_classes: int = 10,
        embed_dim: int = 10,
        hidden_dim: int = 10,
    ) -> None:
        super().__init__()
        if dataset not in _LAYOUT:
            raise ValueError(f"dataset must be 'cifar' or 'imagenet', got {dataset!r}")
        if gate not in ("ffgate1", "ffgate2", "rnn"):
            raise ValueError(f"gate must be 'ffgate1', 'ffgate2' or 'rnn', got {gate!r}")
        if stage not in ("sp", "rl"):
            raise ValueError(f"stage must be 'sp' or 'rl', got {stage!r}")
        if dataset == "imagenet" and gate != "rnn":
            raise ValueError("the official ImageNet SkipNets have recurrent gates only")
        layout = _LAYOUT[dataset]
        if len(layers) != len(layout["planes"]) or min(layers) < 1:
            raise ValueError(
                f"{dataset} SkipNets have {len(layout['planes'])} groups of at least one block, "
                f"got layers={tuple(layers)}"
            )
        self.gate_type, self.dataset, self.stage = gate, dataset, stage
        self.layers = tuple(layers)
        self.num_classes = num_classes
        self.input_size: tuple[int, int, int] = layout["input_size"]

        # Registration order is the official one (stem, then ds/layer/gate per block, control,
        # fc), so state_dict() lists keys as official checkpoints do.
        if dataset == "cifar":
            self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.maxpool: nn.Module | None = None
            in_planes = 16
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            in_planes = 64

        block_names: list[str] = []
        gate_names: list[str] = []
        groups = zip(layout["planes"], layers, layout["maps"])
        for g, (planes, blocks, side) in enumerate(groups, 1):
            out_planes = planes * block.expansion
            for i in range(blocks):
                stride = 2 if g > 1 and i == 0 else 1
                downsample = None
                if stride != 1 or in_planes != out_planes:
                    downsample = projection_shortcut(in_planes, out_planes, stride)
                    setattr(self, f"group{g}_ds{i}", downsample)
                setattr(self, f"group{g}_layer{i}", block(in_planes, planes, stride, downsample))
                setattr(self, f"group{g}_gate{i}", self._make_gate(out_planes, side, embed_dim))
                block_names.append(f"group{g}_layer{i}")
                gate_names.append(f"group{g}_gate{i}")
                in_planes = out_planes
        self.block_names: tuple[str, ...] = tuple(block_names)
        self.gate_names: tuple[str, ...] = tuple(gate_names)

        self.control: RecurrentGate | None = None
        if gate == "rnn":
            self.control = RecurrentGate(
                embed_dim, hidden_dim, proj="linear" if dataset == "cifar" else "conv"
            )
        self.avgpool = nn.AvgPool2d(layout["head_pool"])
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()
        # The official modules seen through the decision protocol (slimdeploy.nn): gate k as a
        # gate (a ControlledGate of the shared LSTM for recurrent gates), block k + 1 as a
        # GatedBlock. They register nothing, so the keys stay the official ones.
        self.__dict__["_gates"] = [self._protocol_gate(k) for k in range(self.n_blocks)]
        self.__dict__["_gated_blocks"] = [
            GatedBlock(self.block(k), self._gates[k - 1], self.block(k).downsample, register_parts=False)
            for k in range(1, self.n_blocks)
        ]

    def _make_gate(self, channels: int, side: int, embed_dim: int) -> nn.Module:
        if self.gate_type == "ffgate1":
            return FeedforwardGateI(channels, side)
        if self.gate_type == "ffgate2":
            return FeedforwardGateII(channels, side)
        return RecurrentGateEmbedding(channels, side, embed_dim)

    def _protocol_gate(self, k: int) -> nn.Module:
        module = self.gate_module(k)
        if self.control is None:
            return module
        assert isinstance(module, RecurrentGateEmbedding)
        return ControlledGate(_GateEmbedding(module), self.control)

    def _init_weights(self) -> None:
        # The official initialisation: normal convolutions with std sqrt(2 / (k*k*out)), BN
        # weight 1 and bias 0, Linear weights with std sqrt(2 / (out*in)); the RL recurrent
        # models also zero Linear biases. Conv biases and the LSTM keep PyTorch's defaults.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / module.weight.numel()))
                if self.stage == "rl" and self.gate_type == "rnn":
                    nn.init.zeros_(module.bias)

    # --- the pieces every form is built from ----------------------------------------------

    @property
    def n_blocks(self) -> int:
        """Number of residual blocks (each with a gate module)."""
        return len(self.block_names)

    @property
    def gated_blocks(self) -> list[GatedBlock]:
        """Blocks 1..n-1 as ``GatedBlock``s (block k gated by gate k - 1)."""
        return self._gated_blocks

    @property
    def n_gated(self) -> int:
        """Number of gated blocks: every block but the first."""
        return len(self.block_names) - 1

    def block(self, k: int) -> GatedResidual:
        """The k-th gated residual block (k from 0, in execution order)."""
        return getattr(self, self.block_names[k])

    def gate_module(self, k: int) -> nn.Module:
        """The gate module attached to block k (FFGate, or the recurrent gate's embedding)."""
        return getattr(self, self.gate_names[k])

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> input of block 0."""
        x = torch.relu(self.bn1(self.conv1(x)))
        return x if self.maxpool is None else self.maxpool(x)

    def first_block(self, x: torch.Tensor) -> torch.Tensor:
        """Block 0, which always runs."""
        return self.block(0)(x)

    def gate_init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The state carried from gate to gate at the start of a forward: ``()`` for
        feed-forward gates, zero (h, c) [B, hidden_dim] for the recurrent gate. ``x`` (any
        [B, ...] tensor) gives the batch size, dtype and device."""
        if self.control is None:
            return ()
        return self.control.init_state(x)

    def gate(
        self, k: int, features: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Gate k on block k's output: (probability [B] that block k + 1 executes, new state).
        Every block has a gate, the last one's deciding nothing (official_forward evaluates it)."""
        return run_gate(self._gates[k], features, state)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> logits [B, num_classes]."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    # --- reference forward -----------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, gate_threshold: torch.Tensor | float = 0.5
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference inference: (logits [B, classes] float32, gates [B, n_gated] uint8 with
        1 = executed, gate_probs [B, n_gated] float32 probability of executing).

        Column j describes block j + 1. Every block is computed and each sample takes the
        executed or the skip path (``GatedBlock``: exact, but saves nothing: the export forms do
        that). The last block's gate decides nothing, so it is not evaluated here.

        Args:
            x: images [B, 3, H, W].
            gate_threshold: a block executes iff its probability is strictly greater. A float
                or a 0-D tensor (a graph input once exported). Defaults to 0.5.
        """
        with record_decisions(gate_threshold) as record:
            x = self.run_block(0, self.stem(x))
            for block in self.gated_blocks:
                x = block(x)
            logits = self.head(x)
        if not record.executed:  # a single-block network decides nothing
            empty = logits.new_zeros((logits.shape[0], 0))
            return logits, empty.to(torch.uint8), empty
        return logits, record.gates(), record.gate_probs()

    # --- the official return signature, for tests against upstream ------------------------

    def official_forward(self, x: torch.Tensor) -> tuple[Any, ...]:
        """What the official eval-mode forward returns, at threshold 0.5 (and at batch 1 too).

        - CIFAR: ``(logits, masks, gprobs)``; ImageNet: ``(logits, masks, gprobs, (h, c))`` with
          h, c of shape [1, B, hidden_dim], the LSTM state after the last gate evaluated.
        - ``masks``: n_blocks - 1 float [B] tensors of 0/1, ``masks[k]`` deciding block k + 1.
        - ``gprobs``, one per gate evaluated: CIFAR SP FFGate log-softmax [B, 2]; CIFAR RL FFGate
          softmax [B, 2]; CIFAR SP recurrent sigmoid [B, 1]; CIFAR RL recurrent
          (1 - p, p) [B, 2]; ImageNet p [B]. CIFAR SP and RL FFGate models evaluate the last
          block's gate too (n_blocks gprobs); the RL recurrent models do not (n_blocks - 1);
          ImageNet SP evaluates it (it changes the returned state) but does not return its gprob.
        """
        x = self.stem(x)
        state = self.gate_init_state(x)
        last = self.n_blocks - 1
        evaluates_last_gate = not (self.gate_type == "rnn" and self.stage == "rl")
        masks: list[torch.Tensor] = []
        gprobs: list[torch.Tensor] = []
        mask: torch.Tensor | None = None
        for k in range(self.n_blocks):
            if mask is None:
                x = self.run_block(k, x)
            else:
                executed = mask[:, None, None, None] > 0
                x = torch.where(executed, self.run_block(k, x), self.skip(k, x))
            if k == last and not evaluates_last_gate:
                break
            prob, state, gprob = self._official_gate(k, x, state)
            mask = (prob > 0.5).to(prob.dtype)
            if k < last:
                masks.append(mask)
            if k < last or self.dataset == "cifar":
                gprobs.append(gprob)
        logits = self.head(x)
        if self.dataset == "imagenet":
            h, c = state
            return logits, masks, gprobs, (h[None], c[None])
        return logits, masks, gprobs

    def _official_gate(
        self, k: int, x: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        module = self.gate_module(k)
        if isinstance(module, (FeedforwardGateI, FeedforwardGateII)):
            logits = module.logits(x)
            prob = torch.softmax(logits, dim=1)[:, 1]
            if self.stage == "sp":
                return prob, state, functional.log_softmax(logits, dim=1)
            return prob, state, torch.softmax(logits, dim=1)
        prob, state = self.gate(k, x, state)
        if self.dataset == "imagenet":
            return prob, state, prob
        if self.stage == "sp":
            return prob, state, prob[:, None]
        return prob, state, torch.stack((1 - prob, prob), dim=1)


# --- registered architectures ---------------------------------------------------------------

_CIFAR_LAYERS = {38: (6, 6, 6), 74: (12, 12, 12), 110: (18, 18, 18), 152: (25, 25, 25)}
_Block = type[GatedBasicBlock] | type[GatedBottleneck]
_IMAGENET_LAYERS: dict[int, tuple[_Block, tuple[int, ...]]] = {
    18: (GatedBasicBlock, (2, 2, 2, 2)),
    34: (GatedBasicBlock, (3, 4, 6, 3)),
    50: (GatedBottleneck, (3, 4, 6, 3)),
    101: (GatedBottleneck, (3, 4, 23, 3)),
    152: (GatedBottleneck, (3, 8, 36, 3)),
}
_GATE_TEXT = {"ffgate1": "FFGate-I", "ffgate2": "FFGate-II", "rnn": "recurrent gate"}


def _register(
    name: str,
    *,
    dataset: Dataset,
    depth: int,
    gate: GateType,
    stage: Stage,
    num_classes: int,
) -> None:
    """Register one official factory name as a builder ``name(num_classes=<official>)``."""
    if dataset == "cifar":
        block: type[GatedBasicBlock] | type[GatedBottleneck] = GatedBasicBlock
        layers = _CIFAR_LAYERS[depth]
        data_text = f"CIFAR-{num_classes}"
    else:
        block, layers = _IMAGENET_LAYERS[depth]
        data_text = "ImageNet"
    description = (
        f"SkipNet-{depth} with {_GATE_TEXT[gate]} ({stage.upper()}), {data_text} "
        f"(official {name})"
    )

    def builder(num_classes: int = num_classes) -> SkipNet:
        return SkipNet(
            block, layers, gate=gate, dataset=dataset, stage=stage, num_classes=num_classes
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{description}. ``num_classes`` defaults to the official {num_classes}."
    register_model(
        name,
        family="skipnet",
        input_size=_LAYOUT[dataset]["input_size"],
        dynamic=True,
        description=description,
    )(builder)


# The official factory names of cifar/models.py, spelt as upstream spells them.
_CIFAR_FACTORIES: tuple[tuple[str, int, GateType, Stage], ...] = (
    ("{c}_feedforward_38", 38, "ffgate1", "sp"),
    ("{c}_feedforward_74", 74, "ffgate1", "sp"),
    ("{c}_feedforward_110", 110, "ffgate2", "sp"),
    ("{c}_rnn_gate_38", 38, "rnn", "sp"),
    ("{c}_rnn_gate_74", 74, "rnn", "sp"),
    ("{c}_rnn_gate_110", 110, "rnn", "sp"),
    ("{c}_rnn_gate_152", 152, "rnn", "sp"),
    ("{c}_feedforward_rl_38", 38, "ffgate1", "rl"),
    ("{c}_feedforward_rl_74", 74, "ffgate1", "rl"),
    ("{c}_feedforward_rl_110", 110, "ffgate2", "rl"),
    ("{c}_rnn_gate_rl_38", 38, "rnn", "rl"),
    ("{c}_rnn_gate_rl_74", 74, "rnn", "rl"),
    ("{c}_rnn_gate_rl_110", 110, "rnn", "rl"),
)
# Upstream's misspellings: these are the only spellings its code (and so its checkpoints' arch
# field) has for these models.
_CIFAR_SPELLING = {
    "cifar10_feedforward_rl_38": "cifar10_feedfoward_rl_38",
    "cifar100_feedforward_38": "cifar100_feeforward_38",
    "cifar100_feedforward_rl_38": "cifar100_feedford_rl_38",
}

for _prefix, _classes in (("cifar10", 10), ("cifar100", 100)):
    for _pattern, _depth, _gate, _stage in _CIFAR_FACTORIES:
        _name = _pattern.format(c=_prefix)
        _register(
            _CIFAR_SPELLING.get(_name, _name),
            dataset="cifar",
            depth=_depth,
            gate=_gate,
            stage=_stage,
            num_classes=_classes,
        )

for _depth in _IMAGENET_LAYERS:
    for _stage, _infix in (("sp", ""), ("rl", "_rl")):
        _register(
            f"imagenet_rnn_gate{_infix}_{_depth}",
            dataset="imagenet",
            depth=_depth,
            gate="rnn",
            stage=_stage,  # type: ignore[arg-type]
            num_classes=1000,
        )
