"""SPConv export-time folding (transforms.fold_spconv): the folded layers compute the original
function, and an INT8 export of the trained demo model is one quantized graph that passes check."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from slimdeploy.models.spconv_resnet import spconv_resnet20_cifar
from slimdeploy.nn.folded_spconv import FoldedSPConv3x3
from slimdeploy.nn.spconv import SPConv3x3
from slimdeploy.transforms.fold_spconv import fold_spconv, fold_spconv_layer
from tests.conftest import run_cli


def _randomise_bn(module: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (negative scales included), so a
    wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                bn.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                bn.weight.copy_(torch.rand(n, generator=generator) * 3 - 1.5)
                bn.bias.copy_(torch.rand(n, generator=generator) * 2 - 1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("with_block_bn", [True, False])
def test_folded_layer_matches_spconv(stride: int, dense: bool, with_block_bn: bool) -> None:
    torch.manual_seed(stride)
    layer = SPConv3x3(16, 24, stride).eval()
    after = nn.BatchNorm2d(24).eval() if with_block_bn else None
    _randomise_bn(layer, 0)
    if after is not None:
        _randomise_bn(after, 1)
        with torch.no_grad():
            after.weight[5] = 0.0  # a zero scale: both paths become the shift, no division by 0
    folded = fold_spconv_layer(layer, after, dense=dense)
    x = torch.randn(3, 16, 10, 12)
    with torch.no_grad():
        expected = layer(x) if after is None else after(layer(x))
        np.testing.assert_allclose(folded(x).numpy(), expected.numpy(), atol=1e-5, rtol=1e-5)
    # The dense form has no grouped convolution and no channel split; stride 2 needs no pooling.
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.groups == 1 for c in convs) == dense
    assert all(c.in_channels == 16 for c in convs) == dense
    assert all(c.kernel_size[0] in (stride, 3) for c in convs)


@pytest.mark.parametrize("dense", [True, False])
def test_folded_resnet_matches_and_drops_the_block_batchnorms(dense: bool) -> None:
    torch.manual_seed(0)
    model = spconv_resnet20_cifar().eval()
    _randomise_bn(model, 2)
    folded, report = fold_spconv(copy.deepcopy(model), dense=dense)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), atol=1e-5, rtol=1e-5)
        # batch 1 too (nothing in the folded layers depends on the batch size)
        np.testing.assert_allclose(folded(x[:1]).numpy(), model(x[:1]).numpy(), atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, FoldedSPConv3x3) for m in folded.modules()) == 18
    assert not any(isinstance(m, SPConv3x3) for m in folded.modules())
    # The 18 block BNs after an SPConv are folded; the stem BN and the 2 shortcut BNs remain
    # (ONNX Runtime folds them into the convolution right before them).
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 3
    assert report.block_bn_into_spconv == 18 and report.bn_into_conv == 36 and report.softmax_to_sigmoid == 18
    assert report.pool_into_conv == 4  # two stride-2 layers, two pooled paths each
    assert report.split_into_weights == (18 if dense else 0)


@pytest.mark.parametrize("stride", [1, 2])
def test_folded_bottleneck_matches(stride: int) -> None:
    from slimdeploy.models.spconv_resnet import Bottleneck, _downsample

    torch.manual_seed(stride)
    block = Bottleneck(32, 8, stride, _downsample(32, 32, stride)).eval()
    _randomise_bn(block, 3)
    folded, report = fold_spconv(nn.Sequential(copy.deepcopy(block)))
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), block(x).numpy(), atol=1e-5, rtol=1e-5)
    # The SPConv (conv2) and the bn2 after it folded; bn1, bn3 and the shortcut BN stay.
    assert report.block_bn_into_spconv == 1 and isinstance(folded[0].bn2, nn.Identity)


def test_fold_refuses_a_model_without_spconv() -> None:
    with pytest.raises(TypeError, match="no SPConv layer"):
        fold_spconv(nn.Sequential(nn.Conv2d(3, 8, 3)))


@pytest.mark.slow
def test_zoo_spconv_int8_exports_folded_and_passes_check(tmp_path: Path, exported_bundle: Path) -> None:
    out = tmp_path / "int8"
    result = run_cli("export", "zoo:spconv_resnet20_digits", "--out", str(out), "--precision", "int8", "--no-speed-check")
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["transforms"] == ["fold"]
    assert manifest["model"]["folds"]["block_bn_into_spconv"] == 18
    assert manifest["model"]["folds"]["split_into_weights"] == 18
    ops = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
    # No float islands left: no BN, pooling, channel split, ReduceMean or softmax.
    assert not {"BatchNormalization", "AveragePool", "Split", "Slice", "ReduceMean", "Softmax", "Sub", "Neg"} & set(ops)
    assert ops.count("GlobalAveragePool") == 19 and ops.count("Sigmoid") == 18
    # Every float op sits between Q/DQ: as many DequantizeLinear feeding each kind as it has inputs.
    model = onnx.load(out / "model.onnx")
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Mul", "Add", "Sigmoid", "GlobalAveragePool"):
            assert all(producer.get(i) == "DequantizeLinear" for i in node.input[:2] if i in producer), node.name
    check = run_cli("check", str(out))
    assert check.returncode == 0, check.stdout + check.stderr
    # FP32 is not folded (the original graph runs faster there); --no-fold keeps INT8 unfolded.
    assert json.loads((exported_bundle / "manifest.json").read_text())["model"]["transforms"] == []
    plain = tmp_path / "plain"
    result = run_cli("export", "zoo:spconv_resnet20_digits", "--out", str(plain), "--precision", "int8", "--no-fold",
                     "--calib-size", "20", "--samples", "16", "--batch-sizes", "16", "--no-speed-check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((plain / "manifest.json").read_text())["model"]["transforms"] == []
    assert "Slice" in [n.op_type for n in onnx.load(plain / "model.onnx").graph.node]


def test_spatial_means_and_whole_map_pools_become_global_average_pools() -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from slimdeploy.exporters import to_global_average_pool

    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    channel_axes = helper.make_tensor("channel_axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=1, name="spatial"),
         helper.make_node("ReduceMean", ["x", "axes"], ["flat"], keepdims=0, name="spatial_flat"),
         helper.make_node("ReduceMean", ["x", "channel_axes"], ["per_pixel"], keepdims=1, name="channels"),
         helper.make_node("AveragePool", ["x"], ["whole"], kernel_shape=[5, 6], name="whole_map"),
         helper.make_node("AveragePool", ["x"], ["window"], kernel_shape=[5, 5], name="window")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 5, 6])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in
         (("pooled", ["batch", 4, 1, 1]), ("flat", ["batch", 4]), ("per_pixel", ["batch", 1, 5, 6]),
          ("whole", ["batch", 4, 1, 1]), ("window", ["batch", 4, 1, 2]))],
        initializer=[axes, channel_axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 6)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    # Only the spatial mean that keeps its dims and the pool over the whole map are global pools.
    assert to_global_average_pool(model) == 2
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool", "ReduceMean", "ReduceMean",
                                                    "GlobalAveragePool", "AveragePool"]
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, atol=1e-6)
