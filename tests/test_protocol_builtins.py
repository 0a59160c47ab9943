"""The built-in dynamic families speak the decision protocol: SkipNet's blocks are
``GatedBlock``s (recurrent gates ``ControlledGate``s of the shared LSTM), S2D's and BranchyNet's
heads are ``Exit``s, with the official state_dict keys unchanged. The official-code fixtures
(tests/test_skipnet.py, test_gated_forms.py) check the numbers; these check the structure."""

from __future__ import annotations

import pytest
import torch

from slimdeploy.models import get_arch
from slimdeploy.nn import ControlledGate, Exit, GatedBlock, record_decisions
from slimdeploy.nn.gated_network import GatedNetwork


@pytest.mark.parametrize("arch", ["cifar10_feedforward_38", "cifar10_rnn_gate_38"])
def test_skipnet_blocks_are_gated_blocks(arch: str) -> None:
    torch.manual_seed(0)
    model = get_arch(arch).build().eval()
    assert isinstance(model, GatedNetwork) and len(model.gated_blocks) == model.n_blocks - 1
    for k, gated in enumerate(model.gated_blocks, 1):
        assert isinstance(gated, GatedBlock) and gated.body is model.block(k) and gated.skip is model.block(k).downsample
        if model.control is None:
            assert gated.gate is model.gate_module(k - 1)
        else:
            assert isinstance(gated.gate, ControlledGate) and gated.gate.controller is model.control
    # They register nothing: the keys are the official ones (conv1, group1_layer0..., fc).
    assert not any("gated" in key or "controller" in key for key in model.state_dict())
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    # The reference forward is the blocks' own: one gated block, recorded, decides as forward does.
    with torch.no_grad():
        x = torch.randn(4, 3, 32, 32)
        _, gates, probs = model(x, 0.5)
        features = model.run_block(0, model.stem(x))
        with record_decisions(0.5) as record:
            model.gated_blocks[0](features)
    torch.testing.assert_close(record.gate_probs()[:, 0], probs[:, 0])
    assert torch.equal(record.gates()[:, 0], gates[:, 0])


@pytest.mark.parametrize("arch", ["s2d_resnet20_cifar", "branchy_mobilenet_v1"])
def test_early_exit_heads_are_exits(arch: str) -> None:
    args = {"resolution": 64, "width_mult": 0.25, "num_classes": 10} if arch.startswith("branchy") else {}
    model = get_arch(arch).build(**args).eval()
    keys = set(model.state_dict())
    assert all(isinstance(e, Exit) for e in model.exit_modules) and len(model.exit_modules) == model.n_stages
    assert model.exit_modules[0].head is model.heads[0]
    assert not any(key.endswith("threshold") or key.startswith("exit_modules") for key in keys)
    model.exit_thresholds = [0.25] * model.n_stages  # the Exits hold them
    assert [float(e.threshold) for e in model.exit_modules] == model.exit_thresholds == [0.25] * model.n_stages
    with pytest.raises(ValueError, match="one per stage"):
        model.exit_thresholds = [0.5]
    size = model.input_size if hasattr(model, "input_size") else (3, 32, 32)
    with torch.no_grad(), record_decisions() as record:
        every = model.forward_all(torch.randn(2, *size))
    assert len(record.exit_logits) == model.n_stages  # forward_all runs every Exit
    for recorded, logits in zip(record.exit_logits, every):
        assert torch.equal(recorded, logits)
