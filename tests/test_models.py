"""Tests for the architecture registry, the reference architectures and their blocks.

The registry drives the sweep: every registered architecture is built and run, so a new one is
tested as soon as it is registered. Specific tests pin the official SPConv key names and
semantics, and check that exported ONNX graphs keep a dynamic batch and match PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from slimdeploy.errors import ArchitectureError, DuplicateRegistrationError
from slimdeploy.models import get_arch, list_models, register_model
from slimdeploy.models.suggest import fingerprint, stored_fingerprints
from slimdeploy.nn import DepthwiseSeparable, SPConv3x3

# Keep the sweep fast: builders that take a `resolution` are built at this size, and the
# fully convolutional ImageNet models listed below (adaptive pooling; stride-2 SPConvs need
# even maps, so a multiple of 32) run on a smaller input than their registered 224x224.
_FAST_RESOLUTION = 64
_FAST_INPUT_HW = {"spconv_resnet18": 64, "spconv_resnet34": 64, "spconv_resnet50": 64}


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Run this module's tests on one intra-op thread, restoring the setting afterwards.

    These are small tensors, where thread synchronisation costs more than it saves; on the
    2-vCPU development VM two OpenMP threads made this file ~5x slower (64 s vs 12 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, the first of a tuple, or ``output["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["logits"]
    return output[0]


def _fast_build(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build ``name`` in eval mode with fast test arguments; returns (model, input C, H, W)."""
    info = get_arch(name)
    args = {"resolution": _FAST_RESOLUTION} if "resolution" in info.default_args() else {}
    model = info.build(**args).eval()
    channels, height, width = getattr(model, "input_size", info.input_size)
    if name in _FAST_INPUT_HW:
        height = width = _FAST_INPUT_HW[name]
    return model, (channels, height, width)


def _randomise(module: nn.Module, std: float = 0.3) -> None:
    """Random weights and BN statistics, so that BN and the fusion are not near-identities."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                sub.weight.normal_(0.0, std)
                if sub.bias is not None:
                    sub.bias.normal_(0.0, std)
            elif isinstance(sub, nn.BatchNorm2d):
                assert sub.running_mean is not None and sub.running_var is not None
                sub.weight.uniform_(0.5, 1.5)
                sub.bias.normal_(0.0, 0.5)
                sub.running_mean.normal_(0.0, 0.5)
                sub.running_var.uniform_(0.5, 2.0)


# --- registry -------------------------------------------------------------------------------


def test_registry_lists_this_issue_architectures() -> None:
    names = set(list_models())
    assert {"mobilenet_v1"} <= set(list_models("mobilenet"))
    assert {
        "spconv_resnet18",
        "spconv_resnet34",
        "spconv_resnet50",
        "spconv_resnet20_cifar",
        "spconv_resnet56_cifar",
    } <= set(list_models("spconv"))
    assert set(list_models("mobilenet")) | set(list_models("spconv")) <= names


def test_duplicate_registration_raises() -> None:
    # Re-registering an existing name raises before anything is inserted, so the registry is
    # left as it was.
    with pytest.raises(DuplicateRegistrationError, match="mobilenet_v1"):
        register_model(
            "mobilenet_v1", family="mobilenet", input_size=(3, 224, 224), description="again"
        )(lambda: None)
    assert get_arch("mobilenet_v1").family == "mobilenet"


def test_unknown_architecture_suggests_close_names() -> None:
    with pytest.raises(ArchitectureError, match="did you mean") as excinfo:
        get_arch("spconv_resnet19")
    assert "spconv_resnet18" in str(excinfo.value)


def test_bad_arch_args_raise_architecture_error() -> None:
    with pytest.raises(ArchitectureError, match="unknown argument"):
        get_arch("mobilenet_v1").build(width=2.0)
    with pytest.raises(ArchitectureError, match="resolution"):
        get_arch("mobilenet_v1").build(resolution=8)


@pytest.mark.parametrize("name", list_models())
def test_every_architecture_runs(name: str) -> None:
    """Every registered architecture builds, runs at batch 1 and 3, and is batch-independent."""
    torch.manual_seed(0)
    info = get_arch(name)
    model, (channels, height, width) = _fast_build(name)
    # The module's input_size at default arguments must agree with the registry.
    default_model = info.build()
    default_model_size = getattr(default_model, "input_size", info.input_size)
    assert tuple(default_model_size) == tuple(info.input_size)
    # Its key fingerprint is the one stored for suggesting --arch from a checkpoint's keys.
    assert fingerprint(default_model.state_dict()) == stored_fingerprints().get(name), (
        f"{name}'s keys changed: rebuild slimdeploy/models/key_patterns.json (slimdeploy.models.suggest.write_fingerprints)")

    x = torch.randn(3, channels, height, width)
    with torch.no_grad():
        logits_3 = _logits(model(x))
        logits_1 = _logits(model(x[:1]))
    num_classes = info.default_args().get("num_classes")
    for batch, logits in ((3, logits_3), (1, logits_1)):
        assert logits.shape[0] == batch
        if num_classes is not None:
            assert logits.shape == (batch, num_classes)
        assert torch.isfinite(logits).all()
    # In eval mode each sample's result must not depend on the rest of the batch.
    torch.testing.assert_close(logits_1, logits_3[:1], atol=1e-4, rtol=1e-4)


# --- blocks ---------------------------------------------------------------------------------


def _batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Inference batch norm written out, independently of nn.BatchNorm2d.forward."""
    assert bn.running_mean is not None and bn.running_var is not None
    shape = (1, -1, 1, 1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)


def _reference_spconv(x: torch.Tensor, m: SPConv3x3, ratio: float, stride: int) -> torch.Tensor:
    """SPConv_3x3 as upstream describes it, with functional ops and the module's weights."""
    split = int(x.shape[1] * ratio)
    representative, redundant = x[:, :split], x[:, split:]
    gwc = functional.conv2d(representative, m.gwc.weight, stride=stride, padding=1, groups=2)
    if stride == 2:
        representative = functional.avg_pool2d(representative, kernel_size=2, stride=2)
        redundant = functional.avg_pool2d(redundant, kernel_size=2, stride=2)
    pwc = functional.conv2d(representative, m.pwc.weight)
    out_3x3 = _batch_norm(gwc + pwc, m.bn1)
    out_1x1 = _batch_norm(functional.conv2d(redundant, m.conv1x1.weight, m.conv1x1.bias), m.bn2)
    # Two-way softmax per (sample, channel) over the global averages, written out.
    e_3x3 = torch.exp(out_3x3.mean(dim=(2, 3), keepdim=True))
    e_1x1 = torch.exp(out_1x1.mean(dim=(2, 3), keepdim=True))
    return out_1x1 * e_1x1 / (e_1x1 + e_3x3) + out_3x3 * e_3x3 / (e_1x1 + e_3x3)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    ("in_channels", "out_channels", "ratio", "height", "width"),
    [(12, 8, 0.5, 8, 10), (16, 6, 0.25, 6, 6), (20, 10, 0.5, 4, 12)],
)
def test_spconv_matches_functional_reference(
    in_channels: int, out_channels: int, ratio: float, height: int, width: int, stride: int
) -> None:
    torch.manual_seed(1)
    module = SPConv3x3(in_channels, out_channels, stride=stride, ratio=ratio).eval()
    _randomise(module)
    x = torch.randn(3, in_channels, height, width)
    with torch.no_grad():
        out = module(x)
        expected = _reference_spconv(x, module, ratio, stride)
    assert out.shape == (3, out_channels, height // stride, width // stride)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_spconv_keys_shapes_and_parameter_count() -> None:
    cin, cout = 64, 128
    module = SPConv3x3(cin, cout, stride=2)
    shapes = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    # The official SPConv_3x3 submodule names; its pooling layers have no state.
    assert shapes["gwc.weight"] == (cout, cin // 4, 3, 3)  # 32 inputs in 2 groups
    assert shapes["pwc.weight"] == (cout, cin // 2, 1, 1)
    assert shapes["conv1x1.weight"] == (cout, cin // 2, 1, 1)
    assert shapes["conv1x1.bias"] == (cout,)
    for bn in ("bn1", "bn2"):
        for stat in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert f"{bn}.{stat}" in shapes
    assert "gwc.bias" not in shapes and "pwc.bias" not in shapes
    # gwc 9/4 + pwc 1/2 + conv1x1 1/2 of cin*cout, plus the conv1x1 bias and two affine BNs.
    assert sum(p.numel() for p in module.parameters()) == int(3.25 * cin * cout) + 5 * cout


def test_spconv_rejects_unsupported_configurations() -> None:
    with pytest.raises(ValueError, match="stride"):
        SPConv3x3(16, 16, stride=3)
    with pytest.raises(ValueError, match="even"):
        SPConv3x3(10, 16)  # representative part of 5 channels cannot split into 2 groups
    with pytest.raises(ValueError, match="even"):
        SPConv3x3(16, 15)


def test_depthwise_separable_structure() -> None:
    block = DepthwiseSeparable(8, 16, stride=2).eval()
    assert block.dw_conv.groups == 8 and block.dw_conv.stride == (2, 2)
    assert tuple(block.pw_conv.weight.shape) == (16, 8, 1, 1)
    assert {"dw_bn.running_mean", "pw_bn.running_var"} <= set(block.state_dict())
    out = block(torch.randn(2, 8, 9, 9))
    assert out.shape == (2, 16, 5, 5) and (out >= 0).all()


# --- official key layout and sizes ----------------------------------------------------------


def test_spconv_resnet18_has_official_keys() -> None:
    state = get_arch("spconv_resnet18").build().state_dict()
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.gwc.weight",
        "layer1.0.conv1.pwc.weight",
        "layer1.0.conv1.conv1x1.weight",
        "layer1.0.conv1.conv1x1.bias",
        "layer1.0.conv1.bn1.running_mean",
        "layer1.0.conv1.bn2.weight",
        "layer1.0.bn1.weight",
        "layer1.1.conv2.gwc.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer4.1.bn2.bias",
        "fc.weight",
        "fc.bias",
    ):
        assert key in state, key
    assert "layer1.0.downsample.0.weight" not in state  # 64 -> 64, stride 1: identity shortcut
    # 64 inputs -> 32 representative channels in 2 groups of 16.
    assert tuple(state["layer2.0.conv1.gwc.weight"].shape) == (128, 16, 3, 3)
    assert tuple(state["fc.weight"].shape) == (1000, 512)


def test_spconv_resnet50_has_official_bottleneck_keys() -> None:
    state = get_arch("spconv_resnet50").build().state_dict()
    assert tuple(state["layer1.0.conv1.weight"].shape) == (64, 64, 1, 1)
    assert tuple(state["layer1.0.conv2.gwc.weight"].shape) == (64, 16, 3, 3)
    assert tuple(state["layer1.0.conv3.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state["layer4.2.bn3.running_mean"].shape) == (2048,)
    assert tuple(state["fc.weight"].shape) == (1000, 2048)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        # SPConv at ratio 1/2 keeps about 36% of each 3x3 convolution's weights, so the
        # ResNets shrink from 11.7M / 21.8M / 25.6M (torchvision) to these ranges.
        ("spconv_resnet18", 4.5e6, 5.0e6),
        ("spconv_resnet34", 8.0e6, 9.0e6),
        ("spconv_resnet50", 17.5e6, 19.0e6),
        ("spconv_resnet20_cifar", 0.09e6, 0.12e6),  # plain ResNet-20: 0.27M
        ("spconv_resnet56_cifar", 0.30e6, 0.35e6),  # plain ResNet-56: 0.85M
        ("mobilenet_v1", 4.2e6, 4.25e6),  # the paper's 4.2M
    ],
)
def test_parameter_counts_are_plausible(name: str, low: float, high: float) -> None:
    count = sum(p.numel() for p in get_arch(name).build().parameters())
    assert low <= count <= high, f"{name}: {count} parameters"


def test_mobilenet_width_multiplier_and_resolution() -> None:
    model = get_arch("mobilenet_v1").build(width_mult=0.25, resolution=128, num_classes=7)
    assert model.input_size == (3, 128, 128)
    assert model.stem.conv.out_channels == 8  # int(32 * 0.25) = 8
    assert model.features[12].pw_conv.out_channels == 256
    assert len(model.features) == 13
    assert tuple(model.classifier.weight.shape) == (7, 256)


# --- ONNX export ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "arch_args"),
    [("spconv_resnet20_cifar", {}), ("mobilenet_v1", {"resolution": _FAST_RESOLUTION})],
)
@pytest.mark.slow
def test_onnx_export_with_dynamic_batch_matches_torch(
    name: str, arch_args: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("onnxscript")  # the dynamo exporter needs it
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(2)
    model = get_arch(name).build(**arch_args).eval()
    _randomise(model, std=0.1)
    channels, height, width = model.input_size
    path = tmp_path / f"{name}.onnx"
    # Example batch 2: a batch-1 example would let the exporter specialise the dimension.
    example = torch.randn(2, channels, height, width)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    assert program is not None
    program.save(str(path))

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str), "batch dimension was specialised"
    for batch in (1, 4):
        x = torch.randn(batch, channels, height, width)  # differs from the export example
        with torch.no_grad():
            expected = model(x).numpy()
        (actual,) = session.run(["logits"], {"input": x.numpy()})
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)
