"""Ties: a threshold equal to a gate probability or an exit confidence, in every deployed form
and runner (issue 19 part 1).

The documented rules (``nn/gates.py``, ``exporters/gated.py``, ``nn/exit_stage.py``):

- a gated block executes iff its probability is *strictly* greater than ``gate_threshold``
  (a tie skips);
- a sample leaves at stage j iff its confidence ``>= exit_thresholds[j]`` under ``max_softmax``,
  ``<=`` under ``entropy`` (a tie exits).

A tie is only a tie when both sides are the same float32 number in the engine that compares
them. Two kinds are made here:

- *exact by construction*, the same in every engine: a feed-forward gate whose two logits are
  computed by identical weights gives ``softmax(a, a)[1] = 1 / 2`` exactly; an exit head whose
  first two classes have identical weights and whose other classes sit 1000 below gives a max
  softmax of exactly 1/2, and a head with one class 1000 above the rest an entropy of exactly 0.
  The threshold is then 0.5 (or 0.0), and ``nextafter`` of it on either side flips the decision.
- *the engine's own value*: the first gate's probability and a stage's confidence do not
  depend on the threshold (they are computed before any decision that the threshold changes),
  so a threshold set to the value an engine reported for one sample is a real tie in that
  engine on the next call; every decision must then follow the rule applied to the values
  the engine reports, bit for bit.

Runners: each composed form as composed and as onnxslim leaves it (what a bundle holds), in
ONNX Runtime; the staged controllers (``engines/staged.py``) over ONNX Runtime pieces; the
PyTorch model and ``TorchRunner``. Inputs are held-out digits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from slimdeploy.data import digits_inputs, digits_statistics
from slimdeploy.engines import OrtRunner, Runner, TensorMeta, TorchRunner
from slimdeploy.engines.staged import StagedExitRunner, StagedGatedRunner
from slimdeploy.exporters import early_exit, gated
from slimdeploy.exporters.simplify import simplify
from slimdeploy.models.s2d import S2DResNetCifar
from slimdeploy.models.skipnet import SkipNet
from slimdeploy.nn.gated_residual import GatedBasicBlock

INPUT_SIZE = (3, 32, 32)
INPUT_META = TensorMeta("input", np.dtype(np.float32), ("batch", *INPUT_SIZE))
SAMPLES = 12
HALF = np.float32(0.5)
BELOW_HALF = np.nextafter(HALF, np.float32(0))
ABOVE_HALF = np.nextafter(HALF, np.float32(1))
# Gates whose probability is exactly 1/2 by construction: gate 1 decides block 2 (inside the
# ``loop`` form's Loop over blocks 1-3), gate 3 decides block 4 (downsampling: a skip path).
TIED_GATES = (1, 3)


def _images() -> np.ndarray:
    mean, std = digits_statistics()
    return digits_inputs("heldout", INPUT_SIZE, mean, std, count=SAMPLES)[0]


def _runners(kind: str, graphs: dict[str, Any], plan: Any) -> Iterator[tuple[str, Runner]]:
    """(label, runner) of every deployed form of a gated (``kind="gated"``) or early-exit network."""
    module = gated if kind == "gated" else early_exit
    composed = gated.COMPOSED_FORMS if kind == "gated" else ("mask", "if")
    for form in composed:
        model = module.compose_form(form, graphs, plan, INPUT_SIZE)
        yield form, OrtRunner(model.SerializeToString(), threads=1)
        slimmed = simplify(model)
        assert not slimmed.error, slimmed.error
        yield f"{form}+onnxslim", OrtRunner(slimmed.model.SerializeToString(), threads=1)
    pieces = {name: graph.SerializeToString() for name, graph in graphs.items()}
    controller = StagedGatedRunner if kind == "gated" else StagedExitRunner
    yield "staged", controller(lambda name: OrtRunner(pieces[name], threads=1), plan.to_dict(), INPUT_META)


def _each_runner(kind: str, setup: dict[str, Any], check: Callable[[str, Runner], None]) -> None:
    """``check`` on every deployed runner and on ``TorchRunner`` over the PyTorch model."""
    for label, runner in _runners(kind, setup["graphs"], setup["plan"]):
        with runner:
            check(label, runner)
    threshold = "gate_threshold" if kind == "gated" else "exit_thresholds"
    n = setup["plan"].n_blocks - 1 if kind == "gated" else setup["plan"].n_stages
    meta = {"input": INPUT_META, threshold: TensorMeta(threshold, np.dtype(np.float32), () if kind == "gated" else (n,))}
    outputs = list(gated.OUTPUTS if kind == "gated" else early_exit.OUTPUTS)
    with TorchRunner(setup["module"], meta, outputs, threads=1) as runner:
        check("torch", runner)


# -- gated networks ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gated_setup() -> dict[str, Any]:
    """A SkipNet of 6 blocks (4, 1, 1 per group) with FFGate-II gates, random weights; gates
    ``TIED_GATES`` give exactly 1/2 (their execute and skip logits share weights)."""
    torch.manual_seed(0)
    module = SkipNet(GatedBasicBlock, (4, 1, 1), gate="ffgate2", dataset="cifar").eval()
    with torch.no_grad():
        for k in TIED_GATES:
            layer = module.gate_module(k).linear_layer
            layer.weight[1] = layer.weight[0]
            layer.bias[1] = layer.bias[0]
    graphs, plan = gated.gated_pieces(module, INPUT_SIZE)
    assert gated.loop_runs(graphs, plan) == [[1, 2, 3]] and plan.skips == [4, 5]
    return {"module": module, "graphs": graphs, "plan": plan, "x": _images()}


def _gated(runner: Runner, x: np.ndarray, threshold: np.float32) -> dict[str, np.ndarray]:
    return runner.infer({"input": x, "gate_threshold": np.array(threshold, dtype=np.float32)})


@pytest.mark.slow
def test_a_gate_tie_skips_in_every_form(gated_setup: dict[str, Any]) -> None:
    """Probability exactly 0.5: threshold 0.5 skips the block, the float32 just below runs it."""
    x, checked = gated_setup["x"], []

    def check(label: str, runner: Runner) -> None:
        at_half = _gated(runner, x, HALF)
        probs = at_half["gate_probs"]
        assert (probs[:, list(TIED_GATES)] == HALF).all(), (label, probs[:, list(TIED_GATES)])
        assert not at_half["gates"][:, list(TIED_GATES)].any(), label  # a tie skips
        np.testing.assert_array_equal(at_half["gates"], probs > HALF, err_msg=label)
        below = _gated(runner, x, BELOW_HALF)
        assert below["gates"][:, list(TIED_GATES)].all(), label
        np.testing.assert_array_equal(below["gates"], below["gate_probs"] > BELOW_HALF, err_msg=label)
        checked.append(label)

    _each_runner("gated", gated_setup, check)
    assert len(checked) == 2 * len(gated.COMPOSED_FORMS) + 2


def test_a_threshold_equal_to_the_engines_own_probability(gated_setup: dict[str, Any]) -> None:
    """Threshold = the first gate's probability of one sample, as this engine computed it: that
    sample skips, every decision is ``prob > threshold`` on the probabilities reported."""
    x, mixed = gated_setup["x"], {}

    def check(label: str, runner: Runner) -> None:
        first = _gated(runner, x, HALF)["gate_probs"][:, 0]
        sample = int(np.argsort(first)[len(first) // 2])  # the median: some above, some below
        threshold = first[sample]
        out = _gated(runner, x, threshold)
        np.testing.assert_array_equal(out["gate_probs"][:, 0], first, err_msg=label)  # the same numbers again
        assert out["gates"][sample, 0] == 0, label
        np.testing.assert_array_equal(out["gates"], out["gate_probs"] > threshold, err_msg=label)
        mixed[label] = set(out["gates"][:, 0].tolist())

    _each_runner("gated", gated_setup, check)
    assert all(values == {0, 1} for values in mixed.values()), mixed


# -- early-exit networks ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["max_softmax", "entropy"])
def exit_setup(request: pytest.FixtureRequest) -> dict[str, Any]:
    """S2D ResNet-8 (3 stages), random weights. Stage 0's head gives every sample exactly the
    confidence ``tie`` (max softmax 1/2: classes 0 and 1 share weights, the others sit 1000
    below; entropy 0: class 0 sits 1000 above the others); stage 1's head is left as it is."""
    rule = request.param
    torch.manual_seed(0)
    module = S2DResNetCifar(depth=8, exit_rule=rule).eval()
    with torch.no_grad():
        fc = module.heads[0].fc
        fc.weight[2:] = 0
        fc.bias[2:] = -1000
        if rule == "max_softmax":
            fc.weight[1], fc.bias[1] = fc.weight[0], fc.bias[0]
        else:
            fc.weight[1], fc.bias[1] = 0, -1000
    graphs, plan = early_exit.exit_pieces(module, INPUT_SIZE)
    tie = HALF if rule == "max_softmax" else np.float32(0)
    # A threshold that no confidence reaches (nobody exits) and the one next to the tie on the
    # side that does not exit.
    never = np.float32(2.0) if rule == "max_softmax" else np.float32(-1.0)
    beside = ABOVE_HALF if rule == "max_softmax" else np.nextafter(tie, np.float32(-1))
    return {"module": module, "graphs": graphs, "plan": plan, "x": _images(), "rule": rule,
            "tie": tie, "never": never, "beside": beside}


def _exits_at(confidence: np.ndarray, threshold: np.float32, rule: str) -> np.ndarray:
    """The documented rule (``nn/exit_stage.py``), written out here on its own."""
    return confidence <= threshold if rule == "entropy" else confidence >= threshold


def _exit(runner: Runner, x: np.ndarray, thresholds: list[np.float32]) -> dict[str, np.ndarray]:
    return runner.infer({"input": x, "exit_thresholds": np.array(thresholds, dtype=np.float32)})


@pytest.mark.slow
def test_an_exit_tie_exits_in_every_form(exit_setup: dict[str, Any]) -> None:
    """Confidence exactly at the threshold (0.5 for max softmax, 0 for entropy): every sample
    leaves at stage 0; the float32 beside it on the other side keeps them all going."""
    x, setup, checked = exit_setup["x"], exit_setup, []

    def check(label: str, runner: Runner) -> None:
        at_tie = _exit(runner, x, [setup["tie"], setup["never"], np.float32(0)])
        assert (at_tie["exit_confidence"][:, 0] == setup["tie"]).all(), (label, at_tie["exit_confidence"][:, 0])
        np.testing.assert_array_equal(at_tie["exit_stage"], np.zeros(len(x)), err_msg=label)
        assert (at_tie["exit_confidence"][:, 1:] == -1).all(), label  # no later stage reached
        beside = _exit(runner, x, [setup["beside"], setup["never"], np.float32(0)])
        np.testing.assert_array_equal(beside["exit_stage"], np.full(len(x), 2), err_msg=label)
        checked.append(label)

    _each_runner("exit", exit_setup, check)
    assert len(checked) == 2 * 2 + 2


@pytest.mark.slow
def test_an_exit_threshold_equal_to_the_engines_own_confidence(exit_setup: dict[str, Any]) -> None:
    """Stage 1's threshold = one sample's stage-1 confidence as this engine computed it (every
    sample reaches stage 1 on the same rows both times): that sample leaves at stage 1, and
    every exit follows the rule on the confidences reported."""
    x, setup, mixed = exit_setup["x"], exit_setup, {}

    def check(label: str, runner: Runner) -> None:
        first = _exit(runner, x, [setup["beside"], setup["never"], np.float32(0)])["exit_confidence"][:, 1]
        sample = int(np.argsort(first)[len(first) // 2])
        threshold = first[sample]
        out = _exit(runner, x, [setup["beside"], threshold, np.float32(0)])
        np.testing.assert_array_equal(out["exit_confidence"][:, 1], first, err_msg=label)
        assert out["exit_stage"][sample] == 1, label
        expected = np.where(_exits_at(first, threshold, setup["rule"]), 1, 2)
        np.testing.assert_array_equal(out["exit_stage"], expected, err_msg=label)
        mixed[label] = set(out["exit_stage"].tolist())

    _each_runner("exit", exit_setup, check)
    assert all(values == {1, 2} for values in mixed.values()), mixed
