"""S2D early-exit networks: the model's exit rule, the three exported forms against PyTorch,
thresholds changed at run time, decision-aware parity of exits, and predicted MACs.

The forms are built from the pieces of the shipped demo model (``s2d_resnet20_digits``),
exported once, and run on held-out digits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from slimdeploy.bench import exit_macs
from slimdeploy.data import digits_inputs
from slimdeploy.engines import OrtRunner, Runner, TensorMeta
from slimdeploy.engines.staged import StagedExitRunner
from slimdeploy.errors import InputValidationError
from slimdeploy.exporters.early_exit import FORMS, compose_form, exit_pieces
from slimdeploy.loading import load_checkpoint
from slimdeploy.models.s2d import S2DResNetCifar
from slimdeploy.nn.exit_stage import exit_confidence
from slimdeploy.parity import DecisionSpec, compare_decisions
from slimdeploy.s2d import S2DConfig, build_s2d, multi_exit_loss
from slimdeploy.zoo import zoo_checkpoint_path

INPUT_META = TensorMeta("input", np.dtype(np.float32), ("batch", 3, 32, 32))
SAMPLES = 48


# --- the model ------------------------------------------------------------------------------


def test_exit_rule_and_outputs() -> None:
    torch.manual_seed(0)
    model = S2DResNetCifar(depth=8).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        every = model.forward_all(x)
        confidences = torch.stack([exit_confidence(logits) for logits in every], dim=1)
        # Thresholds between the samples' stage-0 confidences: some leave at 0, others go on.
        middle = float(confidences[:, 0].median())
        thresholds = torch.tensor([middle, 2.0, 0.0])
        logits, stage, confidence = model(x, thresholds)
    assert logits.shape == (6, 10) and stage.dtype == torch.int64 and confidence.shape == (6, 3)
    expected = torch.where(confidences[:, 0] >= middle, 0, 2)
    assert torch.equal(stage, expected) and {0, 2} <= set(stage.tolist())
    for i in range(6):
        j = int(stage[i])
        torch.testing.assert_close(logits[i], every[j][i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(confidence[i, : j + 1], confidences[i, : j + 1], atol=1e-6, rtol=1e-6)
        assert (confidence[i, j + 1:] == -1).all()  # stages not reached
    with torch.no_grad():
        assert (model(x, [0.0, 0.0, 0.0])[1] == 0).all()
        assert (model(x, [1.5, 1.5, 0.0])[1] == 2).all()  # the last stage always answers


def test_entropy_rule_exits_on_low_entropy() -> None:
    torch.manual_seed(0)
    model = S2DResNetCifar(depth=8, exit_rule="entropy").eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        entropy = exit_confidence(model.forward_all(x)[0], "entropy")
        cut = float(entropy.median())
        _, stage, confidence = model(x, [cut, -1.0, 0.0])
    assert torch.equal(stage == 0, entropy <= cut)
    torch.testing.assert_close(confidence[:, 0], entropy)


def test_config_validation_and_builder() -> None:
    with pytest.raises(ValueError, match="exit_thresholds must have shape \\[3\\]"):
        S2DResNetCifar(depth=8)(torch.zeros(1, 3, 32, 32), [0.5, 0.5])
    with pytest.raises(ValueError, match="increasing points"):
        S2DResNetCifar(depth=8, splits=[[8, 4, 16]] * 4)
    with pytest.raises(ValueError, match="earlier than"):
        S2DResNetCifar(depth=8, reuse=[[[], [], []]] + [[[], [1], [0]]] * 3)
    net = build_s2d("resnet20_cifar", S2DConfig.even(n_stages=2))
    assert net.n_stages == 2 and net.splits[-1] == [32, 64]
    # Stage 1 reads stage 0's features (dense reuse): its first block takes 8 + 8 channels.
    assert net.stages[1][1].conv1.in_channels == 16
    loss = multi_exit_loss(net.forward_all(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]), alphas=[0.5, 1.0])
    loss.backward()
    assert net.heads[0].fc.weight.grad is not None and net.heads[1].fc.weight.grad is not None


# --- exported forms -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    loaded = load_checkpoint(zoo_checkpoint_path("s2d_resnet20_digits"))
    model = loaded.module.eval()
    graphs, plan = exit_pieces(model, (3, 32, 32))
    pre = loaded.preprocessing
    x, labels = digits_inputs("heldout", pre.input_size, pre.mean, pre.std, count=SAMPLES)
    return {"model": model, "graphs": graphs, "plan": plan, "input": x, "labels": labels}


def form_runner(demo: dict[str, Any], form: str) -> Runner:
    if form == "staged":
        graphs = {name: graph.SerializeToString() for name, graph in demo["graphs"].items()}
        return StagedExitRunner(lambda name: OrtRunner(graphs[name], threads=1), demo["plan"].to_dict(), INPUT_META)
    return OrtRunner(compose_form(form, demo["graphs"], demo["plan"], (3, 32, 32)).SerializeToString(), threads=1)


def run_in_batches(runner: Runner, x: np.ndarray, batch: int, **extra: np.ndarray) -> dict[str, np.ndarray]:
    parts = [runner.infer({"input": x[i:i + batch], **extra}) for i in range(0, len(x), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def torch_outputs(model: Any, x: np.ndarray, thresholds: Any = None) -> dict[str, np.ndarray]:
    with torch.no_grad():
        logits, stage, confidence = model(torch.from_numpy(x), thresholds)
    return {"logits": logits.numpy(), "exit_stage": stage.numpy(), "exit_confidence": confidence.numpy()}


@pytest.mark.slow
def test_demo_model_exits_early_at_final_stage_accuracy(demo: dict[str, Any]) -> None:
    reference = torch_outputs(demo["model"], demo["input"])
    with torch.no_grad():
        final = demo["model"].forward_all(torch.from_numpy(demo["input"]))[-1].numpy()
    assert (reference["exit_stage"] == 0).mean() >= 0.3
    early = (reference["logits"].argmax(1) == demo["labels"]).mean()
    assert early >= (final.argmax(1) == demo["labels"]).mean() - 0.03


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.slow
def test_form_matches_pytorch(demo: dict[str, Any], form: str) -> None:
    reference = torch_outputs(demo["model"], demo["input"])
    counts = np.bincount(reference["exit_stage"], minlength=3)
    assert (counts > 0).all(), counts  # every stage answers for some held-out sample
    with form_runner(demo, form) as runner:
        for batch in (1, 8):
            out = run_in_batches(runner, demo["input"], batch)
            np.testing.assert_array_equal(out["exit_stage"], reference["exit_stage"])
            np.testing.assert_allclose(out["logits"], reference["logits"], atol=1e-4, rtol=1e-3)
            np.testing.assert_allclose(out["exit_confidence"], reference["exit_confidence"], atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_thresholds_at_run_time(demo: dict[str, Any], form: str) -> None:
    """exit_thresholds fed at run time move the exits as they move PyTorch's."""
    settings = [np.array(t, dtype=np.float32) for t in ([0.5, 0.5, 0.0], [0.9999, 0.9999, 0.0], [1.5, 0.0, 0.0])]
    seen = []
    with form_runner(demo, form) as runner:
        for thresholds in settings:
            reference = torch_outputs(demo["model"], demo["input"], torch.from_numpy(thresholds))
            out = run_in_batches(runner, demo["input"], 8, exit_thresholds=thresholds)
            np.testing.assert_array_equal(out["exit_stage"], reference["exit_stage"])
            np.testing.assert_allclose(out["logits"], reference["logits"], atol=1e-4, rtol=1e-3)
            seen.append(np.bincount(out["exit_stage"], minlength=3).tolist())
    assert seen[0][0] > seen[1][0]  # a higher threshold keeps more samples past stage 0
    assert seen[2] == [0, SAMPLES, 0]  # stage 0 never confident enough, stage 1 always


@pytest.mark.parametrize("form", FORMS)
def test_wrong_threshold_shape_is_a_clear_error(demo: dict[str, Any], form: str) -> None:
    with form_runner(demo, form) as runner, pytest.raises(InputValidationError, match="exit_thresholds"):
        runner.infer({"input": demo["input"][:2], "exit_thresholds": np.array([0.5, 0.5], dtype=np.float32)})


def test_staged_runner_drops_exited_samples(demo: dict[str, Any]) -> None:
    reference = torch_outputs(demo["model"], demo["input"])
    with form_runner(demo, "staged") as runner:
        runner.reset_counters()
        run_in_batches(runner, demo["input"], SAMPLES)
        stage = reference["exit_stage"]
        # Stage j ran only on the samples that did not leave before it.
        assert runner.stage_rows.tolist() == [SAMPLES, int((stage >= 1).sum()), int((stage >= 2).sum())]


# --- parity and bench accounting ------------------------------------------------------------


def test_exit_parity_reports_margins() -> None:
    spec = DecisionSpec("exit_stage", "exit_confidence", [0.9, 0.8, 0.0], kind="exit")
    reference = {
        "exit_stage": np.array([0, 1, 2, 1]),
        "exit_confidence": np.array([[0.95, -1, -1], [0.5, 0.8004, -1], [0.3, 0.2, 0.6], [0.1, 0.85, -1]], np.float32),
    }
    # Sample 1 flips at stage 1 (margin 4e-4: near-threshold); sample 3 flips with margin 0.05.
    candidate = {"exit_stage": np.array([0, 2, 2, 2])}
    result = compare_decisions(spec, reference, candidate, batch_size=4)
    assert result.agreement == 0.5 and result.near_threshold == 1 and result.defects == 1 and not result
    flips = {d["sample"]: d for d in result.disagreements}
    assert flips[1]["stage"] == 1 and flips[1]["near_threshold"] and flips[1]["margin"] == pytest.approx(4e-4, abs=1e-6)
    assert flips[3]["margin"] == pytest.approx(0.05, abs=1e-6) and not flips[3]["near_threshold"]
    assert result.reference_open == [1, 2, 1] and result.rows_agree == [True, False, True, False]


def test_exit_macs_per_form() -> None:
    macs = [10, 20, 70]
    stage = np.array([0, 0, 1, 2])
    assert exit_macs(macs, stage, "mask", 1) == 100
    assert exit_macs(macs, stage, "staged", 4) == pytest.approx((10 + 10 + 30 + 100) / 4)
    assert exit_macs(macs, stage, "if", 1) == pytest.approx((10 + 10 + 30 + 100) / 4)
    # At batch 2 the If runs a stage for the whole pair when either sample reaches it.
    assert exit_macs(macs, stage, "if", 2) == pytest.approx((2 * 10 + 2 * 100) / 4)


# --- BranchyNet-style heads on another backbone (same exit machinery) -----------------------


def _gap_threshold(values: np.ndarray) -> float:
    """A threshold in the widest gap between the middle values: far from every sample."""
    ordered = np.sort(values)
    middle = ordered[len(ordered) // 4: 3 * len(ordered) // 4 + 1]
    gaps = np.diff(middle)
    k = int(np.argmax(gaps))
    return float((middle[k] + middle[k + 1]) / 2)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.slow
def test_branchy_mobilenet_forms_match_pytorch(form: str) -> None:
    from slimdeploy.models.registry import get_arch

    torch.manual_seed(0)
    model = get_arch("branchy_mobilenet_v1").build(num_classes=10, width_mult=0.25, resolution=32).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        confidences = [exit_confidence(logits).numpy() for logits in model.forward_all(x)]
    model.exit_thresholds = [_gap_threshold(confidences[0]), _gap_threshold(confidences[1]), 0.0]
    reference = torch_outputs(model, x.numpy())
    assert len(set(reference["exit_stage"].tolist())) >= 2
    graphs, plan = exit_pieces(model, (3, 32, 32))
    assert plan.reads_input == [True, False, False] and plan.needs[2] == ["s1_l0"]
    demo = {"graphs": graphs, "plan": plan}
    with form_runner(demo, form) as runner:
        for batch in (1, 8):
            out = run_in_batches(runner, x.numpy(), batch)
            np.testing.assert_array_equal(out["exit_stage"], reference["exit_stage"])
            np.testing.assert_allclose(out["logits"], reference["logits"], atol=1e-4, rtol=1e-3)


def test_early_exit_forms_and_default() -> None:
    from slimdeploy.errors import BadInputError
    from slimdeploy.recipes import recipe_for

    recipe = recipe_for("early_exit")
    assert recipe.choose_form(None, "ort") == "staged"
    assert recipe.choose_form("if", "ort") == "if"
    with pytest.raises(BadInputError, match="unknown dynamic form 'compact' for an early-exit model"):
        recipe.choose_form("compact", "ort")


def test_check_parity_takes_margins_at_the_fed_thresholds(demo: dict[str, Any]) -> None:
    from slimdeploy.parity import check_parity

    thresholds = np.array([0.5, 0.5, 0.0], dtype=np.float32)
    x = demo["input"][:16]
    reference = torch_outputs(demo["model"], x, torch.from_numpy(thresholds))
    # Pretend the reference sent sample 0 one stage further: the flip is judged at stage 0
    # against the fed 0.5, not the model's default threshold.
    reference["exit_stage"] = reference["exit_stage"].copy()
    assert reference["exit_stage"][0] == 0
    reference["exit_stage"][0] = 1
    spec = DecisionSpec("exit_stage", "exit_confidence", list(demo["model"].exit_thresholds), kind="exit",
                        threshold_input="exit_thresholds")
    with form_runner(demo, "staged") as runner:
        report = check_parity(runner, {"input": x, "exit_thresholds": thresholds}, reference, [8], "torch",
                              decisions=[spec], batch_inputs=["input"])
    flip = report.decisions["exit_stage"][0].disagreements[0]
    assert flip["sample"] == 0 and flip["stage"] == 0
    assert flip["margin"] == pytest.approx(abs(reference["exit_confidence"][0, 0] - 0.5), abs=1e-6)
    assert report.excluded_samples == {"8": 1} and not report.passed


@pytest.mark.slow
def test_entropy_rule_in_every_form() -> None:
    torch.manual_seed(1)
    model = S2DResNetCifar(depth=8, exit_rule="entropy").eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        entropies = [exit_confidence(logits, "entropy").numpy() for logits in model.forward_all(x)]
    model.exit_thresholds = [_gap_threshold(entropies[0]), _gap_threshold(entropies[1]), 0.0]
    reference = torch_outputs(model, x.numpy())
    assert len(set(reference["exit_stage"].tolist())) >= 2
    graphs, plan = exit_pieces(model, (3, 32, 32))
    assert plan.exit_rule == "entropy"
    for form in FORMS:
        with form_runner({"graphs": graphs, "plan": plan}, form) as runner:
            out = run_in_batches(runner, x.numpy(), 8)
        np.testing.assert_array_equal(out["exit_stage"], reference["exit_stage"], err_msg=form)
        np.testing.assert_allclose(out["exit_confidence"], reference["exit_confidence"], atol=1e-5, err_msg=form)
