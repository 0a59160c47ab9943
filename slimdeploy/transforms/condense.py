"""Condense a trained CondenseNet into its deploy form, with the official converter's index
semantics (ShichenLiu/CondenseNet ``layers.CondensingConv``, ``utils.convert_model``).

For each ``LearnedGroupConv`` with G groups, condense factor C, ``in`` inputs and ``out`` outputs
(d_in = in/C inputs and d_out = out/G outputs per group):

- group i scans inputs j ascending and keeps those with ``mask[i, j] == 1`` (row i represents
  the group), up to d_in; ``index`` is the groups' lists concatenated (a channel may repeat);
- BN weight, bias and running statistics are gathered with the index;
- ``Wc[k + i*d_out, jj] = W[i + k*G, index[i*d_in + jj]]``; the shuffle after the grouped
  convolution restores the learned output order, so features are unchanged.

The classifier stays exact by default (all inputs, identity index). ``condense_classifier=True``
reproduces the official lossy ``CondensingLinear(0.5)``: keep the half of the inputs with the
largest column sum |W|, in ascending order of that sum.
"""

from __future__ import annotations

import torch
from torch import nn

from slimdeploy.models.condensenet import CondenseNet, condensenet_converted
from slimdeploy.nn.condensed_conv import CondensedConv, CondensedLinear
from slimdeploy.nn.learned_group_conv import LearnedGroupConv


@torch.no_grad()
def condense_index(layer: LearnedGroupConv) -> torch.Tensor:
    """The official index of a learned layer: per group, its first d_in kept inputs."""
    d_in = layer.in_channels // layer.condense_factor
    mask = layer._mask.flatten(2).mean(-1)  # [out, in]; 1 where the whole kernel is kept
    index: list[int] = []
    for i in range(layer.groups):
        kept = [j for j in range(layer.in_channels) if mask[i, j] == 1][:d_in]
        if len(kept) < d_in:
            # Upstream would silently fill this group's slots with the next group's channels.
            raise ValueError(
                f"group {i} keeps {len(kept)} inputs, fewer than in/C = {d_in}: the mask is "
                "condensed beyond the final stage and cannot be converted"
            )
        index.extend(kept)
    return torch.tensor(index, dtype=torch.long)


@torch.no_grad()
def condense_layer(layer: LearnedGroupConv, target: CondensedConv) -> None:
    """Fill ``target`` (built with in*G/C inputs) from ``layer``."""
    groups = layer.groups
    d_in = layer.in_channels // layer.condense_factor
    d_out = layer.out_channels // groups
    index = condense_index(layer)
    target.index.copy_(index)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(target.norm, name).copy_(getattr(layer.norm, name)[index])
    weight = layer.conv.weight  # [out, in, kh, kw]
    for i in range(groups):
        cols = index[i * d_in:(i + 1) * d_in]
        # Rows i, i+G, ... of the learned weight become rows i*d_out ... of the grouped one.
        target.conv.weight[i * d_out:(i + 1) * d_out] = weight[i::groups][:, cols]


@torch.no_grad()
def condense_linear(linear: nn.Linear, target: CondensedLinear, lossy: bool) -> None:
    """Fill ``target``: identity index (exact), or the official top-half by column sum |W|."""
    if lossy:
        order = linear.weight.abs().sum(0).sort()[1]
        index = order[linear.in_features - target.in_features:]
    else:
        index = torch.arange(linear.in_features)
    target.index.copy_(index)
    target.linear.weight.copy_(linear.weight[:, index])
    target.linear.bias.copy_(linear.bias)


@torch.no_grad()
def condense(model: CondenseNet, condense_classifier: bool = False) -> CondenseNet:
    """The deploy form of a training-form CondenseNet, in eval mode; ``model`` is unchanged.

    ``condense_classifier`` defaults to False: the classifier keeps all inputs and the logits
    equal the learned model's. True: the official lossy half-classifier.
    """
    if not isinstance(model, CondenseNet) or model.converted:
        raise TypeError("condense expects a training-form CondenseNet (architecture 'condensenet')")
    config = dict(model.config)
    deploy = condensenet_converted(**config, classifier_keep=0.5 if condense_classifier else 1.0)
    source = dict(model.named_modules())
    for name, module in deploy.named_modules():
        learned = source.get(name)
        if isinstance(module, CondensedConv):
            assert isinstance(learned, LearnedGroupConv)
            condense_layer(learned, module)
        elif isinstance(module, CondensedLinear):
            assert isinstance(learned, nn.Linear)
            condense_linear(learned, module, lossy=condense_classifier)
        elif isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) and not name.endswith(".conv_1.conv") \
                and not name.endswith(".conv_1.norm"):
            module.load_state_dict(learned.state_dict())
    return deploy.eval()
