"""The decision protocol in PyTorch: ``GatedBlock`` (strict threshold, per-sample paths, skip
modules, straight-through training), ``ControlledGate`` (state carried from gate to gate inside
``record_decisions``), ``Exit`` (logits, rule, record) and the record itself."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimdeploy.nn import ControlledGate, DecisionRecord, Exit, GatedBlock, record_decisions
from slimdeploy.nn.decisions import active_record
from slimdeploy.nn.exit_stage import exit_confidence
from tests.own_models import Embed, LSTMController, PoolGate


class FixedGate(nn.Module):
    """Probability = the first channel's mean: chosen by the test."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0].mean(dim=(1, 2))


def block(skip: nn.Module | None = None) -> GatedBlock:
    return GatedBlock(nn.Conv2d(2, 2, 1), FixedGate(), skip).eval()


def images(probs: list[float]) -> torch.Tensor:
    """Images whose first channel averages to ``probs``."""
    x = torch.randn(len(probs), 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.tensor(probs)[:, None, None]
    return x


def test_a_block_executes_iff_its_probability_is_strictly_greater() -> None:
    gated = block()
    x = images([0.2, 0.5, 0.7])
    with torch.no_grad(), record_decisions() as record:
        out = gated(x)
    assert record.gates().tolist() == [[0], [0], [1]]  # 0.5 does not pass 0.5
    torch.testing.assert_close(out[:2], x[:2])  # skipped: the identity
    torch.testing.assert_close(out[2:], gated.body(x[2:]))
    with torch.no_grad(), record_decisions(gate_threshold=0.1) as record:
        gated(x)
    assert record.gates().tolist() == [[1], [1], [1]]
    with torch.no_grad():  # no record: the default threshold, nothing recorded
        torch.testing.assert_close(gated(x), out)
    assert active_record() is None


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 1, width=32), min_size=1, max_size=6), st.floats(0, 1, width=32))
def test_every_row_is_one_path_exactly(probs: list[float], threshold: float) -> None:
    gated = block(skip=nn.Conv2d(2, 2, 1))
    x = images(probs)
    with torch.no_grad(), record_decisions(threshold) as record:
        out = gated(x)
        executed, skipped = gated.body(x), gated.skip(x)
    for row, prob in enumerate(record.probs[0].tolist()):
        expected = executed[row] if prob > threshold else skipped[row]
        assert torch.equal(out[row], expected)


def test_training_routes_as_inference_and_trains_the_gate() -> None:
    torch.manual_seed(0)
    gated = GatedBlock(nn.Conv2d(4, 4, 3, padding=1), PoolGate(4))
    x = torch.randn(6, 4, 5, 5)
    with torch.no_grad():
        expected = gated.eval()(x)
    gated.train()
    with record_decisions() as record:
        out = gated(x)
        loss = out.square().mean() + record.executed_fraction()
    loss.backward()
    assert torch.equal(out.detach(), expected)  # exactly the hard decision's path
    assert gated.gate.fc.weight.grad is not None and gated.gate.fc.weight.grad.abs().sum() > 0


def test_block_checks_its_parts() -> None:
    with pytest.raises(TypeError, match=r"skip must be an nn\.Module or None"):
        GatedBlock(nn.Identity(), FixedGate(), skip=lambda x: x)  # type: ignore[arg-type]
    mismatched = GatedBlock(nn.Conv2d(2, 3, 1), FixedGate()).eval()
    with pytest.raises(ValueError, match=r"body outputs \[1, 3, 4, 4\] but its skip path \[1, 2, 4, 4\].*Fix:"):
        mismatched(images([0.7]))
    column = GatedBlock(nn.Identity(), nn.Sequential(FixedGate(), nn.Unflatten(0, (-1, 1)))).eval()
    with pytest.raises(ValueError, match=r"returned shape \[2, 1\], expected \[batch\] = \[2\]"):
        column(images([0.7, 0.1]))


def test_parts_can_stay_where_the_model_registered_them() -> None:
    body, gate = nn.Conv2d(2, 2, 1), FixedGate()
    owned = GatedBlock(body, gate)
    assert set(owned.state_dict()) == {"body.weight", "body.bias"}
    view = GatedBlock(body, gate, register_parts=False)
    assert view.state_dict() == {} and view.body is body


def test_controlled_gates_carry_the_controller_state() -> None:
    torch.manual_seed(0)
    controller = LSTMController(width=3, hidden=5)
    embeds = [Embed(4, 3), Embed(4, 3)]
    blocks = [GatedBlock(nn.Conv2d(4, 4, 1), ControlledGate(e, controller)).eval() for e in embeds]
    x = torch.randn(3, 4, 2, 2)
    with torch.no_grad(), record_decisions() as record:
        middle = blocks[0](x)
        blocks[1](middle)
    with torch.no_grad():  # by hand: one LSTM step per gate from zero state
        first, state = controller(embeds[0](x), controller.init_state(x))
        second, _ = controller(embeds[1](middle), state)
    torch.testing.assert_close(record.gate_probs(), torch.stack([first, second], dim=1))
    with pytest.raises(RuntimeError, match="record_decisions"):
        blocks[0](x)  # outside a record there is nowhere to keep the state
    assert not any(module is controller for module in blocks[0].modules())  # the model registers it
    with pytest.raises(TypeError, match="init_state"):
        ControlledGate(Embed(4, 3), nn.Linear(3, 1))


def test_exit_returns_and_records_its_logits() -> None:
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    exit_ = Exit(head, rule="entropy", threshold=0.7)
    x = torch.randn(5, 4)
    with torch.no_grad(), record_decisions() as record:
        logits = exit_(x)
    torch.testing.assert_close(logits, head(x).detach())
    assert record.exits == [exit_] and torch.equal(record.exit_logits[0], logits)
    torch.testing.assert_close(exit_.confidence(logits), exit_confidence(logits, "entropy"))
    assert float(exit_.threshold) == pytest.approx(0.7)
    assert set(exit_.state_dict()) == {"head.weight", "head.bias", "threshold"}  # a tuned threshold is saved
    assert Exit(head, register_head=False).state_dict() == {}
    with pytest.raises(ValueError, match="unknown exit rule 'margin'"):
        Exit(head, rule="margin")


def test_records_nest_and_end() -> None:
    gated = block()
    with record_decisions(0.9) as outer:
        with torch.no_grad(), record_decisions(0.1) as inner:
            gated(images([0.5]))
        with torch.no_grad():
            gated(images([0.5]))
    assert inner.gates().tolist() == [[1]] and outer.gates().tolist() == [[0]]
    with pytest.raises(ValueError, match="no gated block ran"):
        DecisionRecord().gates()
