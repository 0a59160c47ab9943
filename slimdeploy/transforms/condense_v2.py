"""Condense a trained CondenseNetV2 into its deploy form, with the official converter's semantics
(jianghaojun/CondenseNetV2 ``utils.convert_model``: ``layers.CondensingLGC`` for every learned
group convolution, ``layers.CondensingSFR`` for every sparse feature reactivation; everything
else, ``fc`` and the classifier included, is kept as it is).

- ``conv_1`` (``LearnedGroupConv``): the CondenseNet semantics, ``condense.condense_layer``
  (per group its first in/C kept inputs, the BN gathered, the grouped weight, a shuffle after).
- ``sfr`` (``SparseFeatureReactivation``, G input groups, condense factor C, ``out`` outputs,
  d_in = in/G inputs per group): group g (inputs g, g+G, ..., represented by mask column g)
  scans outputs i ascending and keeps those with ``mask[i, g] == 1``, up to d = out/C; its s-th
  kept output i gives grouped row ``r = g*d + s`` with ``Wc[r, k] = W[i, g + k*G]`` and
  ``index[r, i] = 1``. The BN is copied whole. A group that keeps fewer than d outputs leaves
  zero rows (upstream leaves their random initial weights, multiplied by a zero index row: the
  same output); one that keeps more is cut to its first d, as upstream (then not exact).

After the final condensation stage every group keeps exactly d outputs (and in/C inputs for
``conv_1``), so the deploy model computes the learned model's logits.

``fold_sfr`` (export): the official deploy form multiplies by the [out, out] ``index`` at every
pixel, out*out MACs where the grouped convolution has in*out/C: 167M extra MACs on
CondenseNetV2-A (43M as designed), 2.5G on -C. Grouped convolution and index together are one
linear map, so each ``CondensedSFR`` becomes BN -> activation -> one dense 1x1 convolution of
in*out MACs (the learned layer's masked weight, zeros included): 21M extra on -A.
"""

from __future__ import annotations

import torch

from slimdeploy.models.condensenetv2 import BNActConv, CondenseNetV2, condensenetv2_converted
from slimdeploy.nn.condensed_conv import CondensedConv
from slimdeploy.nn.learned_group_conv import LearnedGroupConv
from slimdeploy.nn.sfr import CondensedSFR, SparseFeatureReactivation
from slimdeploy.transforms.condense import condense_layer


@torch.no_grad()
def condense_sfr(layer: SparseFeatureReactivation, target: CondensedSFR) -> None:
    """Fill ``target`` (grouped convolution of out*G/C outputs, ``index`` [out*G/C, out]) from
    ``layer``."""
    groups = layer.groups
    per_group = layer.out_channels // layer.condense_factor
    mask = layer._mask.flatten(2).mean(-1)  # [out, in]; 1 where the whole kernel is kept
    weight = layer.conv.weight  # [out, in, kh, kw]
    target.conv.weight.zero_()
    target.index.zero_()
    for g in range(groups):
        kept = [i for i in range(layer.out_channels) if mask[i, g] == 1][:per_group]
        rows = torch.arange(g * per_group, g * per_group + len(kept))
        # Grouped input k of group g is learned input g + k*G (the transposed shuffle).
        target.conv.weight[rows] = weight[kept][:, g::groups]
        target.index[rows, kept] = 1.0
    target.norm.load_state_dict(layer.norm.state_dict())


@torch.no_grad()
def condense_v2(model: CondenseNetV2) -> CondenseNetV2:
    """The deploy form of a training-form CondenseNetV2, in eval mode; ``model`` is unchanged."""
    if not isinstance(model, CondenseNetV2) or model.converted:
        raise TypeError("condense_v2 expects a training-form CondenseNetV2 (architecture 'condensenetv2')")
    deploy = condensenetv2_converted(**model.config)
    source = dict(model.named_modules())
    condensed: list[str] = []
    for name, module in deploy.named_modules():
        if isinstance(module, CondensedConv):
            learned = source[name]
            assert isinstance(learned, LearnedGroupConv)
            condense_layer(learned, module)
            condensed.append(name + ".")
        elif isinstance(module, CondensedSFR):
            learned = source[name]
            assert isinstance(learned, SparseFeatureReactivation)
            condense_sfr(learned, module)
            condensed.append(name + ".")
    # Everything outside the condensed layers is copied unchanged.
    state = deploy.state_dict()
    learned_state = model.state_dict()
    for key in state:
        if not any(key.startswith(prefix) for prefix in condensed):
            state[key].copy_(learned_state[key])
    return deploy.eval()


@torch.no_grad()
def dense_sfr_weight(sfr: CondensedSFR) -> torch.Tensor:
    """The dense [out, in, 1, 1] weight of the map that ``sfr``'s transposed shuffle, grouped
    convolution and ``index`` compute together."""
    groups = sfr.groups
    per_group = sfr.conv.out_channels // groups
    weight = sfr.conv.weight.flatten(1)  # [out*G/C, in/G]
    dense = torch.zeros(sfr.out_channels, sfr.in_channels)
    for g in range(groups):
        rows = slice(g * per_group, (g + 1) * per_group)
        # Grouped input k of group g is input g + k*G; index routes each row to its output.
        dense[:, g::groups] += sfr.index[rows].t() @ weight[rows]
    return dense[:, :, None, None]


@torch.no_grad()
def fold_sfr(model: CondenseNetV2) -> tuple[CondenseNetV2, int]:
    """Replace every ``CondensedSFR`` of a condensed CondenseNetV2, in place, with BN ->
    activation -> dense 1x1 convolution (``BNActConv``); returns the model (eval mode) and how
    many were replaced."""
    if not isinstance(model, CondenseNetV2) or not model.converted:
        raise TypeError("fold_sfr expects a condensed CondenseNetV2 (architecture 'condensenetv2_converted')")
    count = 0
    for layer in list(model.modules()):
        sfr = getattr(layer, "sfr", None)
        if not isinstance(sfr, CondensedSFR):
            continue
        dense = BNActConv(sfr.in_channels, sfr.out_channels, 1)
        dense.norm.load_state_dict(sfr.norm.state_dict())
        dense.activation = sfr.activation
        dense.conv.weight.copy_(dense_sfr_weight(sfr))
        layer.sfr = dense
        count += 1
    return model.eval(), count
