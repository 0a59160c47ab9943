"""Discovery: networks written with the decision protocol, defined only in the tests
(``tests/own_models.py``, never registered), cut into pieces and exported in every form.

Every form must reproduce the network's own forward (recorded with ``record_decisions``):
decisions exactly and logits within 1e-4, at batch 8 and batch 1, with thresholds given at run
time. What cannot be deployed is refused with an ``ExportError`` naming the module and the fix.
The pieces of each model are exported once per module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from slimdeploy.data import digits_inputs
from slimdeploy.discovery import DiscoveredExitNet, DiscoveredGatedNet, discover, protocol_kind
from slimdeploy.engines import OrtRunner, Runner, TensorMeta
from slimdeploy.engines.staged import StagedExitRunner, StagedGatedRunner
from slimdeploy.errors import ExportError
from slimdeploy.exporters import early_exit, gated
from slimdeploy.nn import ControlledGate, Exit, GatedBlock
from slimdeploy.nn.exit_stage import ExitHead
from slimdeploy.recipes import recipe_for
from slimdeploy.recipes.discovered import DiscoveredExitRecipe, DiscoveredGatedRecipe
from slimdeploy.recipes.early_exit import ExitRecipe
from slimdeploy.recipes.gated import GatedRecipe
from tests import own_models
from tests.own_models import INPUT_SIZE, PoolGate, balance, conv_bn, initialised

META = TensorMeta("input", np.dtype(np.float32), ("batch", *INPUT_SIZE))
MEAN, STD = (0.3,) * 3, (0.4,) * 3
SAMPLES = 32


def digits(split: str, count: int) -> np.ndarray:
    return digits_inputs(split, INPUT_SIZE, MEAN, STD, count=count)[0]


def built(factory: Any, **kwargs: Any) -> nn.Module:
    """A test network with weights whose decisions go both ways (balanced on the calibration
    split; the tests run on the held-out split)."""
    return balance(initialised(factory(**kwargs)), digits("calib", 100))


def run_in_batches(runner: Runner, x: np.ndarray, batch: int, **extra: np.ndarray) -> dict[str, np.ndarray]:
    parts = [runner.infer({"input": x[i:i + batch], **extra}) for i in range(0, len(x), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


# --- gated networks -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["feedforward", "controlled"])
def gated_kit(request: pytest.FixtureRequest) -> dict[str, Any]:
    model = built(own_models.gated_net, controlled=request.param)
    network = discover(model, INPUT_SIZE)
    graphs, plan = gated.gated_pieces(network, INPUT_SIZE)
    return {"model": model, "network": network, "graphs": graphs, "plan": plan, "input": digits("heldout", SAMPLES)}


def gated_runner(kit: dict[str, Any], form: str) -> Runner:
    if form == "staged":
        graphs = {name: graph.SerializeToString() for name, graph in kit["graphs"].items()}
        return StagedGatedRunner(lambda name: OrtRunner(graphs[name], threads=1), kit["plan"].to_dict(), META)
    return OrtRunner(gated.compose_form(form, kit["graphs"], kit["plan"], INPUT_SIZE).SerializeToString(), threads=1)


def own_forward(model: nn.Module, x: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """The network's own forward with its decisions recorded (no adapter involved)."""
    from slimdeploy.nn import record_decisions

    with torch.no_grad(), record_decisions(threshold) as record:
        logits = model(torch.from_numpy(x))
    return {"logits": logits.numpy(), "gates": record.gates().numpy(), "gate_probs": record.gate_probs().numpy()}


@pytest.mark.parametrize("form", gated.FORMS)
@pytest.mark.parametrize("batch", [8, 1])
def test_gated_forms_reproduce_the_network(gated_kit: dict[str, Any], form: str, batch: int) -> None:
    reference = own_forward(gated_kit["model"], gated_kit["input"])
    gates = reference["gates"]
    assert 0 < gates.sum() < gates.size  # blocks run and blocks are skipped
    with gated_runner(gated_kit, form) as runner:
        out = run_in_batches(runner, gated_kit["input"], batch)
    np.testing.assert_array_equal(out["gates"], gates)
    np.testing.assert_allclose(out["logits"], reference["logits"], atol=1e-4, rtol=0)
    # Probabilities to 1e-4: the test gates are sharpened, which magnifies float rounding.
    np.testing.assert_allclose(out["gate_probs"], reference["gate_probs"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("form", ["compact", "staged"])
def test_gate_threshold_is_a_runtime_input(gated_kit: dict[str, Any], form: str) -> None:
    x = gated_kit["input"]
    seen = []
    with gated_runner(gated_kit, form) as runner:
        for threshold in (0.3, 0.7):
            out = runner.infer({"input": x, "gate_threshold": np.array(threshold, dtype=np.float32)})
            reference = own_forward(gated_kit["model"], x, threshold)
            np.testing.assert_array_equal(out["gates"], reference["gates"])
            np.testing.assert_allclose(out["logits"], reference["logits"], atol=1e-4, rtol=0)
            seen.append(out["gates"])
    assert seen[0].sum() > seen[1].sum()  # a lower threshold opens more blocks


def test_staged_runs_each_block_on_its_rows_only(gated_kit: dict[str, Any]) -> None:
    with gated_runner(gated_kit, "staged") as runner:
        out = runner.infer({"input": gated_kit["input"]})
        executed = runner.executed_rows
    np.testing.assert_array_equal(executed[1:], out["gates"].sum(axis=0))


def test_gated_plan_follows_the_network(gated_kit: dict[str, Any]) -> None:
    plan = gated_kit["plan"]
    assert plan.n_blocks == 4 and gated_kit["network"].paths == ["block1", "block2", "block3"]
    # block1's skip path runs the transition after it; block2 has a skip module; block3 neither.
    assert plan.skips == [1, 2]
    controlled = isinstance(gated_kit["model"].block1.gate, ControlledGate)
    assert (plan.state, plan.state_width) == ((["h", "c"], 6) if controlled else ([], 0))
    # MACs per piece, by hand: the transition is a 3x3 conv 16->32 of stride 2 onto 8x8.
    transition = 8 * 8 * 32 * (16 * 9)
    residual16 = 2 * 16 * 16 * 16 * (16 * 9)
    assert plan.macs["skip1"] == transition and plan.macs["exec1"] == residual16 + transition
    assert plan.macs["skip2"] == 4 * 4 * 32 * 32 and plan.macs["stem"] == 16 * 16 * 16 * (3 * 9)
    assert plan.macs["head"] == 32 * 10


def test_discovered_network_is_the_gated_model_api(gated_kit: dict[str, Any]) -> None:
    network: DiscoveredGatedNet = gated_kit["network"]
    x = torch.from_numpy(gated_kit["input"][:8])
    with torch.no_grad():
        logits, gates, _ = network(x)
        composed, composed_gates = network.composed(x)
        # The skip path of block 1 is the transition alone; of block 3 the identity.
        stem = network.stem(x)
        torch.testing.assert_close(network.skip(1, stem), gated_kit["model"].transition(stem))
    assert torch.equal(gates, composed_gates)
    torch.testing.assert_close(logits, composed, atol=1e-5, rtol=1e-5)
    assert network.block(3).downsample is None and network.block(1).downsample is not None


# --- early-exit networks --------------------------------------------------------------------


@pytest.fixture(scope="module", params=["trunk", "multi_input"])
def exit_kit(request: pytest.FixtureRequest) -> dict[str, Any]:
    factory = own_models.trunk_exit_net if request.param == "trunk" else own_models.multi_input_exit_net
    model = built(factory)
    network = discover(model, INPUT_SIZE)
    graphs, plan = early_exit.exit_pieces(network, INPUT_SIZE)
    return {"name": request.param, "model": model, "network": network, "graphs": graphs, "plan": plan,
            "input": digits("heldout", SAMPLES)}


def exit_runner(kit: dict[str, Any], form: str) -> Runner:
    if form == "staged":
        graphs = {name: graph.SerializeToString() for name, graph in kit["graphs"].items()}
        return StagedExitRunner(lambda name: OrtRunner(graphs[name], threads=1), kit["plan"].to_dict(), META)
    return OrtRunner(early_exit.compose_form(form, kit["graphs"], kit["plan"], INPUT_SIZE).SerializeToString(), threads=1)


def own_exits(model: nn.Module, x: np.ndarray, thresholds: list[float]) -> dict[str, np.ndarray]:
    """The network's own forward (every exit computed), each sample answered by its first
    confident exit: written here from the exits' logits, independent of the adapter."""
    from slimdeploy.nn import record_decisions

    exits = [m for m in model.modules() if isinstance(m, Exit)]
    with torch.no_grad(), record_decisions() as record:
        model(torch.from_numpy(x))
    confidence = np.stack([e.confidence(logits).numpy() for e, logits in zip(exits, record.exit_logits)], axis=1)
    passes = confidence <= thresholds if exits[0].rule == "entropy" else confidence >= thresholds
    passes[:, -1] = True
    stage = passes.argmax(axis=1)
    logits = np.stack([logits.numpy() for logits in record.exit_logits], axis=1)[np.arange(len(x)), stage]
    reached = np.arange(len(exits))[None, :] <= stage[:, None]
    return {"logits": logits, "exit_stage": stage, "exit_confidence": np.where(reached, confidence, -1.0)}


@pytest.mark.parametrize("form", early_exit.FORMS)
@pytest.mark.parametrize("batch", [8, 1])
def test_exit_forms_reproduce_the_network(exit_kit: dict[str, Any], form: str, batch: int) -> None:
    thresholds = exit_kit["network"].exit_thresholds
    reference = own_exits(exit_kit["model"], exit_kit["input"], thresholds)
    assert set(reference["exit_stage"]) == set(range(len(thresholds)))  # samples leave at every exit
    with exit_runner(exit_kit, form) as runner:
        out = run_in_batches(runner, exit_kit["input"], batch)
    np.testing.assert_array_equal(out["exit_stage"], reference["exit_stage"])
    np.testing.assert_allclose(out["logits"], reference["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["exit_confidence"], reference["exit_confidence"], atol=1e-5, rtol=0)


def test_adapter_reference_is_the_network(exit_kit: dict[str, Any]) -> None:
    network: DiscoveredExitNet = exit_kit["network"]
    x = exit_kit["input"]
    with torch.no_grad():
        logits, stage, confidence = network(torch.from_numpy(x))
    reference = own_exits(exit_kit["model"], x, network.exit_thresholds)
    np.testing.assert_array_equal(stage.numpy(), reference["exit_stage"])
    np.testing.assert_allclose(logits.numpy(), reference["logits"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(confidence.numpy(), reference["exit_confidence"], atol=1e-6, rtol=0)


def test_exit_thresholds_are_a_runtime_input(exit_kit: dict[str, Any]) -> None:
    x = exit_kit["input"]
    n = exit_kit["plan"].n_stages
    everyone_first = [-1.0 if exit_kit["network"].exit_rule == "max_softmax" else 100.0] * n
    with exit_runner(exit_kit, "staged") as runner:
        out = runner.infer({"input": x, "exit_thresholds": np.asarray(everyone_first, dtype=np.float32)})
    assert (out["exit_stage"] == 0).all()
    np.testing.assert_allclose(out["logits"], own_exits(exit_kit["model"], x, everyone_first)["logits"], atol=1e-4, rtol=0)


def test_exit_plan_follows_the_network(exit_kit: dict[str, Any]) -> None:
    plan = exit_kit["plan"]
    if exit_kit["name"] == "trunk":
        # Each stage continues from the last one's features; only the first reads the image.
        assert (plan.needs, plan.provides, plan.reads_input) == ([[], ["s0_l0"], ["s1_l0"]], [["s0_l0"], ["s1_l0"], []], [True, False, False])
        assert plan.exit_rule == "max_softmax" and exit_kit["network"].paths == ["exit1", "exit2", "classifier"]
        assert plan.macs["stage1"] == 8 * 8 * 16 * (8 * 9) + 16 * 10
    else:
        # Stage 1 reads the image (its own stem) and stage 0's stem features.
        assert (plan.needs, plan.reads_input, plan.exit_rule) == ([[], ["s0_l0"]], [True, True], "entropy")
        assert plan.macs["stage1"] == 16 * 16 * 8 * 27 + 8 * 8 * 16 * (12 * 9) + 16 * 10
    assert plan.thresholds[:-1] == exit_kit["network"].exit_thresholds[:-1]


# --- the recipe -----------------------------------------------------------------------------


def test_recipe_falls_back_to_discovery() -> None:
    assert type(recipe_for(None, own_models.gated_net())) is DiscoveredGatedRecipe
    assert type(recipe_for("mobilenet", own_models.trunk_exit_net())) is DiscoveredExitRecipe  # a registered family too
    assert isinstance(recipe_for(None, own_models.gated_net()), GatedRecipe)
    assert isinstance(recipe_for(None, own_models.trunk_exit_net()), ExitRecipe)
    assert type(recipe_for("skipnet", own_models.trunk_exit_net())) is GatedRecipe  # a family's own recipe wins
    assert recipe_for(None, nn.Linear(2, 2)).name == "plain"
    assert protocol_kind(nn.Linear(2, 2)) is None


# --- what cannot be deployed is refused ----------------------------------------------------


class _Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.block = GatedBlock(conv_bn(8, 8), PoolGate(8))
        self.fc = nn.Linear(8, 10)


class _Crossing(_Stem):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        y = self.block(features)
        return self.fc((y + features).mean(dim=(2, 3)))  # the block's input flows past it


class _ReturnsTuple(_Stem):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.block(self.stem(x))
        return self.fc(y.mean(dim=(2, 3))), y


class _Looped(_Stem):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _ in range(2):
            x = self.block(x)
        return self.fc(x.mean(dim=(2, 3)))


class _DataLoop(_Stem):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        while x.mean() > 0:  # as many blocks as the data asks for
            x = self.block(x) - 1
        return self.fc(x.mean(dim=(2, 3)))


class _Branching(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class _BranchInside(_Stem):
    def __init__(self) -> None:
        super().__init__()
        self.decide = _Branching()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.decide(self.block(self.stem(x))).mean(dim=(2, 3)))


class _OnImage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = GatedBlock(conv_bn(3, 3), PoolGate(3))
        self.fc = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(x).mean(dim=(2, 3)))


class _Nested(_Stem):
    def __init__(self) -> None:
        super().__init__()
        self.block = GatedBlock(GatedBlock(conv_bn(8, 8), PoolGate(8)), PoolGate(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


class _Mixed(_Stem):
    def __init__(self) -> None:
        super().__init__()
        self.exit = Exit(ExitHead(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit(self.block(self.stem(x)))


class _FinalNotAnExit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1, self.layer2 = conv_bn(3, 8), conv_bn(8, 8)
        self.exit1 = Exit(ExitHead(8, 10))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.layer1(x)
        return [self.exit1(a), self.fc(self.layer2(a).mean(dim=(2, 3)))]


class _MixedRules(_FinalNotAnExit):
    def __init__(self) -> None:
        super().__init__()
        self.exit2 = Exit(ExitHead(8, 10), rule="entropy")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.layer1(x)
        return [self.exit1(a), self.exit2(self.layer2(a))]


class _CarriesAnInt(_FinalNotAnExit):
    def __init__(self) -> None:
        super().__init__()
        self.exit1, self.exit2 = Exit(nn.Linear(8, 10)), Exit(nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.layer1(x)
        n = a.size(0)  # computed in stage 0, read again by stage 1
        first = self.exit1(a.mean(dim=(2, 3)).view(n, -1))
        return [first, self.exit2(self.layer2(a).mean(dim=(2, 3)).view(n, -1))]


class _TwoControllers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.first, self.second = own_models.LSTMController(), own_models.LSTMController()
        self.block1 = GatedBlock(conv_bn(8, 8), ControlledGate(own_models.Embed(8, 8), self.first))
        self.block2 = GatedBlock(conv_bn(8, 8), ControlledGate(own_models.Embed(8, 8), self.second))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(self.stem(x))).mean(dim=(2, 3)))


class _HiddenController(_Stem):
    def __init__(self) -> None:
        super().__init__()
        self.block = GatedBlock(conv_bn(8, 8), ControlledGate(own_models.Embed(8, 8), own_models.LSTMController()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


class _Doubled(GatedBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.body(x)  # not what body, gate and skip declare


class _ChangedForward(_Stem):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Doubled(conv_bn(8, 8), PoolGate(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize(("model", "fragments"), [
    (_Crossing, ["flows past GatedBlock 'block'", "Fix:"]),
    (_ReturnsTuple, ["returns a tuple", "Fix: return the logits only"]),
    (_Looped, ["GatedBlock 'block' runs more than once", "Fix: give every call its own GatedBlock"]),
    (_DataLoop, ["cannot trace _DataLoop.forward", "loop whose length depends on the data", "Fix:"]),
    (_BranchInside, ["cannot trace _BranchInside.forward with torch.fx in 'decide'", "Fix:"]),
    (_OnImage, ["GatedBlock 'block' reads the image itself", "Fix: put a layer"]),
    (_Nested, ["GatedBlock 'block' holds GatedBlock 'block.body'", "Fix:"]),
    (_Mixed, ["has gated blocks ('block') and exits ('exit')", "Fix:"]),
    (_FinalNotAnExit, ["layers after the last Exit ('exit1')", "'fc'", "Fix: wrap the final classifier in Exit"]),
    (_MixedRules, ["different rules ['entropy', 'max_softmax']", "Fix:"]),
    (_CarriesAnInt, ["stage 0 passes int", "Fix:"]),
    (_TwoControllers, ["use different controllers", "Fix: share one controller"]),
    (_HiddenController, ["is not part of the model", "Fix: assign it to the model"]),
    (_ChangedForward, ["GatedBlock", "Fix:"]),
], ids=lambda value: value.__name__.strip("_") if isinstance(value, type) else "")
def test_what_cannot_be_deployed_is_refused(model: type, fragments: list[str]) -> None:
    with pytest.raises(ExportError) as refused:
        discover(initialised(model()), INPUT_SIZE)
    message = str(refused.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
