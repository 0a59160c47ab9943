"""Tests for CondenseNet: the official kit checkpoints (learned and converted), the blocks, the
condense transform's index semantics, and export of the condensed form.

The kit (tests/fixtures/upstream/condensenet_cifar10_small) holds an official learned
checkpoint, its official ``convert_model`` output, an input batch and the official outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from slimdeploy.loading import load_checkpoint
from slimdeploy.models import get_arch
from slimdeploy.models.condensenet import CondenseNet, infer_condensenet_args
from slimdeploy.nn import CondensedConv, LearnedGroupConv
from slimdeploy.transforms import condense
from slimdeploy.transforms.condense import condense_index, condense_layer
from tests.conftest import UPSTREAM, require_fixture

KIT = UPSTREAM / "condensenet_cifar10_small"
KIT_ARGS = {"stages": [2, 2, 2], "growth": [4, 8, 16], "bottleneck": 4, "group_1x1": 4,
            "group_3x3": 4, "condense_factor": 4, "data": "cifar10", "num_classes": 10}

needs_kit = pytest.mark.needs_fixture(KIT)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread: small tensors, where threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kit() -> dict[str, Any]:
    refs = torch.load(require_fixture(KIT) / "ref_outputs.pt")
    return {"input": torch.load(KIT / "input.pt"), **refs}


@pytest.fixture(scope="module")
def learned() -> CondenseNet:
    return load_checkpoint(require_fixture(KIT) / "checkpoint.pth.tar").module


@pytest.fixture(scope="module")
def converted() -> CondenseNet:
    return load_checkpoint(require_fixture(KIT) / "converted_checkpoint.pth.tar", arch="condensenet_converted").module


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- kit parity -----------------------------------------------------------------------------


@needs_kit
def test_learned_checkpoint_loads_without_arch_and_matches(learned: CondenseNet, kit: dict) -> None:
    loaded = load_checkpoint(KIT / "checkpoint.pth.tar")
    assert loaded.arch == "condensenet"  # from the checkpoint's own `model` field
    assert {k: loaded.arch_args[k] for k in KIT_ARGS} == KIT_ARGS
    with torch.no_grad():
        features = learned.features_pooled(kit["input"])
        logits = learned(kit["input"])
    assert _max_diff(features, kit["features_learned"]) <= 1e-5
    assert _max_diff(logits, kit["logits_learned"]) <= 1e-5


@needs_kit
def test_converted_checkpoint_loads_and_matches(converted: CondenseNet, kit: dict) -> None:
    inferred = infer_condensenet_args(
        {k.removeprefix("module."): v for k, v in
         torch.load(KIT / "converted_checkpoint.pth.tar", weights_only=False)["state_dict"].items()})
    assert {k: inferred[k] for k in KIT_ARGS} == KIT_ARGS
    assert inferred["classifier_keep"] == 0.5
    with torch.no_grad():
        features = converted.features_pooled(kit["input"])
        logits = converted(kit["input"])
    assert _max_diff(features, kit["features_converted"]) <= 1e-5
    assert _max_diff(logits, kit["logits_converted"]) <= 1e-4


@needs_kit
def test_keys_match_the_official_learned_model() -> None:
    lines = (KIT / "keys.txt").read_text().splitlines()
    official = {line.split("\t")[0].removeprefix("module.")
                for line in lines if line and not line.startswith("#")}
    built = get_arch("condensenet").build(**KIT_ARGS)
    assert set(built.state_dict()) == official


@needs_kit
def test_condense_exact_classifier_keeps_learned_logits(learned: CondenseNet, kit: dict) -> None:
    mask_before = {k: v.clone() for k, v in learned.state_dict().items() if k.endswith("_mask")}
    deploy = condense(learned)
    with torch.no_grad():
        features = deploy.features_pooled(kit["input"])
        logits = deploy(kit["input"])
    assert _max_diff(features, kit["features_learned"]) <= 1e-4
    assert _max_diff(logits, kit["logits_learned"]) <= 1e-4
    # condense (and the forwards above) never touch the learned masks.
    for key, value in mask_before.items():
        assert torch.equal(learned.state_dict()[key], value)


@needs_kit
def test_condense_lossy_classifier_reproduces_official_converter(
    learned: CondenseNet, converted: CondenseNet, kit: dict
) -> None:
    deploy = condense(learned, condense_classifier=True)
    with torch.no_grad():
        logits = deploy(kit["input"])
    assert _max_diff(logits, kit["logits_converted"]) <= 1e-4
    ours, official = deploy.state_dict(), converted.state_dict()
    assert set(ours) == set(official)
    for key, value in official.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(ours[key], value), key
    # The exact form differs only in the classifier; its tensors load into the official model.
    exact = condense(learned).state_dict()
    comparable = {k: v for k, v in exact.items() if not k.startswith("classifier.")}
    for key, value in comparable.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, official[key]), key


@needs_kit
def test_condensed_has_about_one_over_c_of_the_1x1_weights(learned: CondenseNet) -> None:
    deploy = condense(learned)
    dense = sum(m.conv.weight.numel() for m in learned.modules() if isinstance(m, LearnedGroupConv))
    grouped = sum(m.conv.weight.numel() for m in deploy.modules() if isinstance(m, CondensedConv))
    assert grouped * 4 == dense  # C = 4, and in*G/C inputs in G groups: exactly 1/C


@needs_kit
def test_batch_one(learned: CondenseNet, kit: dict) -> None:
    deploy = condense(learned)
    with torch.no_grad():
        assert _max_diff(learned(kit["input"][:1]), kit["logits_learned"][:1]) <= 1e-5
        assert _max_diff(deploy(kit["input"][:1]), kit["logits_learned"][:1]) <= 1e-4


@needs_kit
@pytest.mark.slow
def test_condensed_onnx_export_dynamic_batch(learned: CondenseNet, kit: dict, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    deploy = condense(learned)
    example = torch.randn(2, 3, 32, 32)
    program = torch.onnx.export(
        deploy, (example,), dynamo=True, opset_version=18, input_names=["input"],
        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    path = tmp_path / "condensenet.onnx"
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert "Gather" in ops
    convs = [node for node in graph.node if node.op_type == "Conv"]
    groups = [next((a.i for a in node.attribute if a.name == "group"), 1) for node in convs]
    # init_conv is dense; every 1x1 and 3x3 of the dense layers is grouped (6 + 6 here).
    assert sum(g == 4 for g in groups) == 12 and groups.count(1) == 1
    assert not any(node.op_type == "Mul" for node in graph.node), "masked weight baked in"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)
    for x in (kit["input"], kit["input"][:1]):
        (actual,) = session.run(["logits"], {"input": x.numpy()})
        np.testing.assert_allclose(actual, kit["logits_learned"][: len(x)].numpy(), atol=1e-4)


# --- blocks and transform on random models --------------------------------------------------


def _random_masks(model: nn.Module, seed: int) -> None:
    """Drive every learned layer through the whole schedule with random weights."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0.0, 0.3)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.5)
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    for module in model.modules():
        if isinstance(module, LearnedGroupConv):
            for progress in (0.1, 0.3, 0.45, 0.9):
                module.condense_step(progress)


def test_forward_and_eval_never_change_the_mask() -> None:
    layer = LearnedGroupConv(16, 8, groups=4, condense_factor=4)
    layer.train()
    layer(torch.randn(2, 16, 3, 3))
    layer.eval()
    layer(torch.randn(2, 16, 3, 3))
    assert torch.equal(layer._mask, torch.ones_like(layer._mask))
    assert layer.condense_step(0.3)  # stage 1 at progress 0.3 with C = 4
    assert int(layer._stage[0]) == 1 and int(layer._count[0]) == 4
    assert not layer.condense_step(0.3)
    # One drop per stage entered, as upstream (a skipped stage drops nothing extra).
    layer.condense_step(0.45)
    layer.condense_step(0.9)  # final stage: in/C kept per group, rows shared within a group
    kept = layer._mask[:, :, 0, 0]
    assert (kept.sum(1) == 4).all()
    for i in range(4):
        assert torch.equal(kept[i::4], kept[i].expand(2, -1))


def test_condense_index_semantics_with_an_untrained_mask() -> None:
    # All inputs kept: each group takes the first in/C channels, ascending.
    layer = LearnedGroupConv(8, 8, groups=2, condense_factor=4)
    assert condense_index(layer).tolist() == [0, 1, 0, 1]
    target = CondensedConv(4, 8, groups=2)
    condense_layer(layer, target)
    assert torch.equal(target.conv.weight[0:4], layer.conv.weight[0::2][:, [0, 1]])


@pytest.mark.parametrize(("data", "groups", "factor"), [("cifar10", 4, 4), ("cifar100", 2, 4)])
def test_condense_random_model_is_exact_and_args_are_inferred(data: str, groups: int, factor: int) -> None:
    args = {"stages": [1, 2, 2], "growth": [4, 4, 8], "group_1x1": groups, "condense_factor": factor,
            "data": data}
    model = get_arch("condensenet").build(**args).eval()
    _random_masks(model, seed=3)
    inferred = infer_condensenet_args(model.state_dict())
    assert {k: inferred[k] for k in ("stages", "group_1x1", "condense_factor", "data")} == {
        "stages": [1, 2, 2], "group_1x1": groups, "condense_factor": factor, "data": data}
    deploy = condense(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), atol=1e-4, rtol=1e-4)
    # The deploy form's own checkpoint round-trips through infer_args.
    rebuilt = get_arch("condensenet_converted").build(**infer_condensenet_args(deploy.state_dict()))
    rebuilt.load_state_dict(deploy.state_dict())


def test_imagenet_configuration_shapes() -> None:
    model = get_arch("condensenet").build(data="imagenet")
    assert model.input_size == (3, 224, 224)
    assert model.classifier.out_features == 1000
    assert model.features.init_conv.stride == (2, 2)
    assert model.num_features == 16 + 4 * 8 + 6 * 16 + 8 * 32 + 10 * 64 + 8 * 128


def _perturb_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)


@pytest.mark.parametrize(("expand_3x3", "gather_into_conv"), [(True, False), (False, False), (True, True)])
def test_fold_keeps_the_condensed_features(learned: CondenseNet, kit: dict, expand_3x3: bool,
                                           gather_into_conv: bool) -> None:
    import copy

    from slimdeploy.nn.folded_dense_layer import FoldedDenseLayer
    from slimdeploy.transforms.fold import fold_condensed

    condensed = condense(learned)
    _perturb_batchnorm(condensed)
    folded, report = fold_condensed(copy.deepcopy(condensed), expand_3x3=expand_3x3,
                                    gather_into_conv=gather_into_conv)
    layers = [m for m in folded.modules() if isinstance(m, FoldedDenseLayer)]
    assert len(layers) == 6 and report.bn_into_conv == 6
    assert report.shuffle_into_weights == (6 if expand_3x3 else 0)
    assert all((layer.conv_2.groups == 1) == expand_3x3 for layer in layers)
    # Gather + BN as a 1x1 convolution over the layer's whole input; no BN left at all.
    assert report.gather_into_conv == report.bn_as_depthwise_conv * 6 == (6 if gather_into_conv else 0)
    assert all((layer.select is not None) == gather_into_conv for layer in layers)
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) != gather_into_conv
    with torch.no_grad():
        expected = condensed.features_pooled(kit["input"])
        np.testing.assert_allclose(folded.features_pooled(kit["input"]).numpy(), expected.numpy(), atol=1e-5, rtol=1e-5)
        # batch 1 too (no batch-dependent reshapes in the folded layer)
        np.testing.assert_allclose(folded(kit["input"][:1]).numpy(), condensed(kit["input"][:1]).numpy(), atol=1e-5, rtol=1e-5)


def test_fold_refuses_a_learned_model(learned: CondenseNet) -> None:
    from slimdeploy.transforms.fold import fold_condensed

    with pytest.raises(TypeError, match="condensed CondenseNet"):
        fold_condensed(learned)


def test_shuffle_source_inverts_channel_shuffle() -> None:
    from slimdeploy.nn.condensed_conv import channel_shuffle
    from slimdeploy.transforms.fold import shuffle_source

    x = torch.arange(12.0).view(1, 12, 1, 1)
    shuffled = channel_shuffle(x, 4).flatten()
    assert shuffled.tolist() == shuffle_source(12, 4).float().tolist()


def test_macs_count_learned_group_convolutions(learned: CondenseNet) -> None:
    from slimdeploy.flops import count_macs
    from slimdeploy.nn.learned_group_conv import LearnedGroupConv

    report = count_macs(learned, (3, 32, 32))
    learned_layers = [name for name, m in learned.named_modules() if isinstance(m, LearnedGroupConv)]
    assert set(learned_layers) <= set(report.per_layer)
    # A 1x1 learned layer computes the dense convolution: in * out MACs per output pixel.
    first = learned.features.denseblock_1.denselayer_1.conv_1
    assert report.per_layer[learned_layers[0]] == first.in_channels * first.out_channels * 32 * 32
