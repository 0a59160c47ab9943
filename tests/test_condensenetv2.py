"""Tests for CondenseNetV2: the sparse feature reactivation layers, the official A/B/C
configurations and key names, key/shape inference, the condense transform (exact logits), and
loading and exporting a learned checkpoint.

No official checkpoint is available offline: the models carry random weights, non-trivial
BatchNorm statistics and masks at the official kept fraction (1/C per group, reached through
the training schedule), so a wrong index, shuffle or weight layout changes the logits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimdeploy.loading import Preprocessing, load_checkpoint, save_checkpoint
from slimdeploy.models import get_arch, list_models
from slimdeploy.models.condensenetv2 import CondenseNetV2, infer_condensenetv2_args
from slimdeploy.nn import CondensedSFR, LearnedGroupConv, SparseFeatureReactivation
from slimdeploy.transforms.condense_v2 import condense_sfr, condense_v2, dense_sfr_weight, fold_sfr
from tests.conftest import assert_clean_error, run_cli

# A small CIFAR-layout model (32x32 inputs) that still has every part: ReLU and hard-swish
# blocks, squeeze-excitation from block 2, G = C and G != C.
SMALL = {"stages": [2, 2, 2], "growth": [8, 8, 16], "group_1x1": 4, "group_3x3": 4,
         "group_trans": 4, "condense_factor": 4, "trans_factor": 4, "hs_start_block": 1,
         "se_start_block": 1, "last_se_reduction": 4, "fc_channel": 32, "data": "cifar10"}
SMALL_UNEVEN = {**SMALL, "group_1x1": 2, "group_trans": 2, "data": "cifar100"}


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread: small tensors, where threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _schedule(factor: int) -> list[float]:
    """Training progress values that enter every condensation stage 1 .. C-1 once."""
    # Upstream drops only while 2 * progress < 1.001: the last stage is entered at 0.5.
    return [min((stage + 0.5) / (2 * (factor - 1)), 0.5) for stage in range(1, factor)]


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, then the whole condensation schedule (masks at
    the official kept fraction, chosen by the random weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # Scaled by fan-in so that activations stay O(1) through 40 layers.
                std = 1.5 / module.weight[0].numel() ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
    for module in model.modules():
        if isinstance(module, (LearnedGroupConv, SparseFeatureReactivation)):
            for progress in _schedule(module.condense_factor):
                module.condense_step(progress)
    return model.eval()


@pytest.fixture(scope="module")
def small() -> CondenseNetV2:
    return _randomise(get_arch("condensenetv2").build(**SMALL))


# --- layers -----------------------------------------------------------------------------------


def test_sfr_schedule_keeps_out_over_c_outputs_per_input_group() -> None:
    layer = SparseFeatureReactivation(8, 24, groups=4, condense_factor=4)
    torch.nn.init.normal_(layer.conv.weight)
    layer.train()
    layer(torch.randn(2, 8, 3, 3))
    assert torch.equal(layer._mask, torch.ones_like(layer._mask))  # forward never condenses
    assert layer.condense_step(0.2)  # stage 1 of 3 at progress 0.2 with C = 4
    assert int(layer._stage[0]) == 1 and int(layer._count[0]) == 6
    assert not layer.condense_step(0.2)
    for progress in _schedule(4)[1:]:
        layer.condense_step(progress)
    kept = layer._mask[:, :, 0, 0]  # [out, in]
    assert (kept.sum(0) == 24 // 4).all()  # every input keeps out/C outputs
    for g in range(4):  # inputs g, g+G, ... share one column
        assert torch.equal(kept[:, g::4], kept[:, g:g + 1].expand(-1, 2))
    # The dropped outputs of a group are its least important (smallest summed |W|).
    weight = layer.conv.weight[:, 0::4, 0, 0].abs().sum(1)
    assert weight[kept[:, 0] == 1].min() >= weight[kept[:, 0] == 0].max()


def test_condensed_sfr_index_semantics() -> None:
    # Group 0 keeps outputs {1, 4}, group 1 keeps {1, 2}: output 1 adds both groups' rows.
    layer = SparseFeatureReactivation(4, 6, groups=2, condense_factor=3)
    with torch.no_grad():
        layer.conv.weight.normal_()
        layer.norm.weight.fill_(1.0)
        layer._mask.zero_()
        layer._mask[[1, 4], 0::2] = 1
        layer._mask[[1, 2], 1::2] = 1
    target = CondensedSFR(4, 6, groups=2, condense_factor=3)
    condense_sfr(layer, target)
    assert target.index.shape == (4, 6)
    assert target.index.nonzero().tolist() == [[0, 1], [1, 4], [2, 1], [3, 2]]
    # Row 2 (group 1, first kept output 1) reads learned inputs 1 and 3.
    assert torch.equal(target.conv.weight[2, :, 0, 0], layer.conv.weight[1, 1::2, 0, 0])
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), layer.eval()(x), atol=1e-6, rtol=1e-6)


# --- configurations and keys --------------------------------------------------------------------


def test_registry_and_named_configurations() -> None:
    assert {"condensenetv2", "condensenetv2_converted"} <= set(list_models("condensenet"))
    # Upstream cdnv2_a/b/c, and the parameter counts of its README (2.0M, 3.6M, 6.1M:
    # convolutions and linear layers of the converted model).
    expected = {"A": ((1, 1, 4, 6, 8), (8, 8, 16, 32, 64), 8, 828, 2.0),
                "B": ((2, 4, 6, 8, 6), (6, 12, 24, 48, 96), 6, 1024, 3.6),
                "C": ((4, 6, 8, 10, 8), (8, 16, 32, 64, 128), 8, 1024, 6.1)}
    for name, (stages, growth, groups, fc, params) in expected.items():
        model = get_arch("condensenetv2_converted").build(config=name)
        config = model.config
        assert (tuple(config["stages"]), tuple(config["growth"]), config["fc_channel"]) == (stages, growth, fc)
        assert {config[k] for k in ("group_1x1", "group_3x3", "group_trans", "condense_factor", "trans_factor")} == {groups}
        assert (config["hs_start_block"], config["se_start_block"], config["last_se_reduction"]) == (2, 3, 16)
        assert model.input_size == (3, 224, 224) and model.features.init_conv.stride == (2, 2)
        assert model.num_features == 2 * growth[0] + sum(s * g for s, g in zip(stages, growth))
        counted = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                      for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert round(counted / 1e6, 1) == params
    # Activations: ReLU before block 2, hard-swish from it on; SE from block 3 on.
    model = get_arch("condensenetv2").build(config="B")
    assert isinstance(model.features.denseblock_2.denselayer_1.conv_1.relu, nn.ReLU)
    assert isinstance(model.features.denseblock_3.denselayer_1.sfr.activation, nn.Hardswish)
    assert model.features.denseblock_3.denselayer_1.se is None
    assert model.features.denseblock_4.denselayer_1.se is not None


# The official state_dict keys, as model/condensenetv2.py and model/converted_condensenetv2.py
# (with utils/layers.py: LGC/SFR, CondenseLGC/CondenseSFR, Conv, SELayer) name them.
_LAYER = r"features\.denseblock_\d+\.denselayer_\d+\."
_BN = r"norm\.(weight|bias|running_mean|running_var|num_batches_tracked)"
_COMMON_KEYS = [
    r"features\.init_conv\.weight",
    _LAYER + r"conv_1\." + _BN,
    _LAYER + r"conv_1\.conv\.weight",
    _LAYER + r"conv_2\." + _BN,
    _LAYER + r"conv_2\.conv\.weight",
    _LAYER + r"sfr\." + _BN,
    _LAYER + r"sfr\.conv\.weight",
    _LAYER + r"se\.fc\.[02]\.weight",
    r"features\.norm_last\.(weight|bias|running_mean|running_var|num_batches_tracked)",
    r"features\.se_last\.fc\.[02]\.weight",
    r"fc\.(weight|bias)",
    r"classifier\.(weight|bias)",
]
OFFICIAL_KEYS = {
    "condensenetv2": [*_COMMON_KEYS, _LAYER + r"(conv_1|sfr)\._(count|stage|mask)"],
    "condensenetv2_converted": [*_COMMON_KEYS, _LAYER + r"(conv_1|sfr)\.index"],
}


@pytest.mark.parametrize("arch", sorted(OFFICIAL_KEYS))
def test_state_dict_keys_follow_the_official_names(arch: str) -> None:
    state = get_arch(arch).build(config="A").state_dict()
    patterns = [re.compile(p) for p in OFFICIAL_KEYS[arch]]
    assert [k for k in state if not any(p.fullmatch(k) for p in patterns)] == []
    assert all(any(p.fullmatch(k) for k in state) for p in patterns)  # every pattern is used
    layers = [k for k in state if k.endswith("conv_2.conv.weight")]
    assert len(layers) == 1 + 1 + 4 + 6 + 8
    assert len([k for k in state if re.fullmatch(_LAYER + r"se\.fc\.0\.weight", k)]) == 6 + 8
    first = "features.denseblock_1.denselayer_1."
    if arch == "condensenetv2":
        # Dense masked weights: conv_1 16 -> 4*8, sfr 8 -> 16 (back onto the layer's inputs).
        assert state[first + "conv_1._mask"].shape == (32, 16, 1, 1)
        assert state[first + "sfr._mask"].shape == (16, 8, 1, 1)
    else:
        # conv_1 gathers in*G/C = 16 channels (a long index); sfr is grouped with a float 0/1
        # [out, out] matrix (G = C in every official configuration).
        assert state[first + "conv_1.index"].dtype == torch.long and state[first + "conv_1.index"].shape == (16,)
        assert state[first + "conv_1.conv.weight"].shape == (32, 2, 1, 1)
        assert state[first + "sfr.conv.weight"].shape == (16, 1, 1, 1)
        assert state[first + "sfr.index"].dtype == torch.float32 and state[first + "sfr.index"].shape == (16, 16)
    assert state["fc.weight"].shape == (828, 800) and state["features.se_last.fc.0.weight"].shape == (50, 800)


# --- condense ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [SMALL, SMALL_UNEVEN], ids=["g_eq_c", "g_lt_c"])
def test_condense_keeps_the_logits(args: dict[str, Any]) -> None:
    model = _randomise(get_arch("condensenetv2").build(**args), seed=1)
    masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}
    deploy = condense_v2(model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        learned, condensed = model(x), deploy(x)
        single = deploy(x[:1])
    assert (learned - condensed).abs().max().item() <= 1e-5
    assert (single - learned[:1]).abs().max().item() <= 1e-5
    # The classifier and fc are kept as they are; the masks are untouched.
    for key in ("fc.weight", "fc.bias", "classifier.weight", "classifier.bias"):
        assert torch.equal(deploy.state_dict()[key], model.state_dict()[key])
    for key, value in masks.items():
        assert torch.equal(model.state_dict()[key], value)
    # The condensed 1x1 weights are 1/C of the dense ones (each group keeps 1/C).
    dense = sum(m.conv.weight.numel() for m in model.modules()
                if isinstance(m, (LearnedGroupConv, SparseFeatureReactivation)))
    grouped = sum(m.conv.weight.numel() for name, m in deploy.named_modules()
                  if name.endswith((".conv_1", ".sfr")))
    assert grouped * 4 == dense


def test_condense_official_configuration_a_keeps_the_logits() -> None:
    model = _randomise(get_arch("condensenetv2").build(config="A", num_classes=10), seed=3)
    deploy = condense_v2(model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(x) - deploy(x)).abs().max().item() <= 1e-5


def test_fold_sfr_stores_the_learned_masked_weight_and_keeps_the_logits(small: CondenseNetV2) -> None:
    deploy = condense_v2(small)
    learned = small.features.denseblock_2.denselayer_2.sfr
    condensed = deploy.features.denseblock_2.denselayer_2.sfr
    assert isinstance(condensed, CondensedSFR)
    # Final masks: the grouped weights and index together are exactly the masked dense weight.
    assert torch.equal(dense_sfr_weight(condensed), learned.conv.weight * learned._mask)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = small(x)
        folded, count = fold_sfr(deploy)
        assert count == 6 and not any(isinstance(m, CondensedSFR) for m in folded.modules())
        assert (folded(x) - reference).abs().max().item() <= 1e-5


def test_macs_count_the_reactivation_dense_learned_and_grouped_condensed(small: CondenseNetV2) -> None:
    from slimdeploy.flops import count_macs

    learned = count_macs(small, (3, 32, 32)).per_layer
    condensed = count_macs(condense_v2(small), (3, 32, 32)).per_layer
    name = "features.denseblock_1.denselayer_2.sfr"
    assert learned[name] == 8 * 24 * 32 * 32  # growth 8 -> 24 inputs of the layer, 32x32
    assert condensed[name + ".conv"] * 4 == learned[name]  # C = 4


def test_condense_refuses_a_converted_model() -> None:
    with pytest.raises(TypeError, match="training-form"):
        condense_v2(get_arch("condensenetv2_converted").build(**SMALL))


# --- inference and loading ----------------------------------------------------------------------


def test_args_are_inferred_from_learned_and_converted_state_dicts(small: CondenseNetV2) -> None:
    expected = {k: v for k, v in small.config.items() if k != "hs_start_block"}
    learned = infer_condensenetv2_args(small.state_dict())
    assert {k: learned[k] for k in expected} == expected
    deploy = condense_v2(small)
    converted = infer_condensenetv2_args(deploy.state_dict())
    assert {k: converted[k] for k in expected} == expected
    uneven = infer_condensenetv2_args(_randomise(get_arch("condensenetv2").build(**SMALL_UNEVEN)).state_dict())
    assert (uneven["group_1x1"], uneven["group_trans"], uneven["condense_factor"], uneven["data"]) == (2, 2, 4, "cifar100")
    # The official named configurations round-trip through their own keys.
    for name in "ABC":
        config = get_arch("condensenetv2_converted").build(config=name).config
        inferred = infer_condensenetv2_args(get_arch("condensenetv2_converted").build(config=name).state_dict())
        assert inferred.pop("config") == name
        assert inferred == {k: config[k] for k in inferred}


@pytest.mark.slow
def test_official_style_checkpoint_loads(small: CondenseNetV2, tmp_path: Path) -> None:
    # Upstream saves {'state_dict': ...} from a DataParallel model ('module.' prefix).
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in small.state_dict().items()}}, path)
    loaded = load_checkpoint(path, arch="condensenetv2", arch_args={"hs_start_block": 1})
    assert loaded.arch == "condensenetv2" and loaded.preprocessing.input_size == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), small(x))
    converted = tmp_path / "converted.pth.tar"
    torch.save({"state_dict": condense_v2(small).state_dict()}, converted)
    loaded = load_checkpoint(converted, arch="condensenetv2_converted", arch_args={"hs_start_block": 1})
    with torch.no_grad():
        assert (loaded.module(x) - small(x)).abs().max().item() <= 1e-5
    # A timm-style training checkpoint as upstream's train.py writes it: its factory name and
    # the moving-average weights next to the raw ones (the official converter uses the average).
    raw = get_arch("condensenetv2").build(config="B")
    ema = _randomise(get_arch("condensenetv2").build(config="B"), seed=7)
    timm_style = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 350, "arch": "cdnv2_b", "state_dict": raw.state_dict(),
                "state_dict_ema": {"module." + k: v for k, v in ema.state_dict().items()}}, timm_style)
    loaded = load_checkpoint(timm_style)
    assert loaded.arch == "condensenetv2" and loaded.module.config == ema.config
    assert any("state_dict_ema" in note for note in loaded.notes)
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in loaded.module.state_dict().items())
    # Before condensation has started, the group counts come from the named configuration.
    assert get_arch("cdnv2_b").build(**infer_condensenetv2_args(raw.state_dict())).config == raw.config
    shown = run_cli("inspect", str(path), "--arch", "condensenetv2", "--json", "-")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["arch"] == "condensenetv2"


@pytest.mark.slow
def test_export_refuses_condense_classifier(small: CondenseNetV2, tmp_path: Path) -> None:
    path = tmp_path / "v2.pt"
    save_checkpoint(path, small, "condensenetv2", small.config, Preprocessing.default_for((3, 32, 32)))
    result = run_cli("export", str(path), "--condense-classifier", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "CondenseNetV2", "classifier")


@pytest.mark.slow
@pytest.mark.parametrize("no_fold", [False, True], ids=["folded", "index"])
def test_export_condenses_and_passes_parity_and_check(small: CondenseNetV2, tmp_path: Path, no_fold: bool) -> None:
    path = tmp_path / "v2.pt"
    save_checkpoint(path, small, "condensenetv2", small.config, Preprocessing.default_for((3, 32, 32)))
    out = tmp_path / "bundle"
    result = run_cli("export", str(path), "--out", str(out), "--samples", "16", "--batch-sizes", "1,4",
                     *(["--no-fold"] if no_fold else []))
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "condensenetv2"
    assert manifest["model"]["deployed_arch"] == "condensenetv2_converted"
    assert manifest["model"]["transforms"] == (["condense"] if no_fold else ["condense", "fold"])
    assert manifest["model"]["folds"] == ({} if no_fold else {"sfr_index_into_dense_conv": 6})
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["top1_agreement"] == 1.0
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(out / "model.onnx").graph
    ops = [node.op_type for node in graph.node]
    assert "Gather" in ops and "HardSwish" in ops  # conv_1's index, the later blocks' activation
    grouped = sum(1 for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    # conv_1 and conv_2 of the 6 layers are grouped; the index form adds the 6 grouped sfr convolutions
    # (and 6 1x1 index convolutions, so 24 + init_conv either way).
    assert grouped == (18 if no_fold else 12) and ops.count("Conv") == (25 if no_fold else 19)
    assert run_cli("check", str(out)).returncode == 0
