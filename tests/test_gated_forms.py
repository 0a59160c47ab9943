"""SkipNet dynamic forms against the official code's outputs (tests/fixtures/upstream).

The pieces of each kit model are exported once; every form is composed from them and must
reproduce the kit's gate decisions exactly and its logits within 1e-4, at batch 8 and batch 1
(where the official code fails), and follow ``gate_threshold`` given at run time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch

from slimdeploy.engines import OrtRunner, Runner, TensorMeta
from slimdeploy.engines.staged import StagedGatedRunner
from slimdeploy.exporters.gated import FORMS, GatedPlan, compose_form, gated_pieces, loop_runs
from slimdeploy.exporters.stacking import same_structure, stack_pieces
from slimdeploy.loading import load_checkpoint
from tests.conftest import UPSTREAM, require_fixture

KIT = UPSTREAM
KIT_MODELS = ["skipnet_cifar10_feedforward_38", "skipnet_cifar10_rnn_gate_38"]
INPUT_META = TensorMeta("input", np.dtype(np.float32), ("batch", 3, 32, 32))


@pytest.fixture(scope="module", params=KIT_MODELS)
def kit(request: pytest.FixtureRequest) -> dict[str, Any]:
    folder = require_fixture(KIT / request.param)
    loaded = load_checkpoint(folder / "checkpoint.pth.tar")  # the checkpoint names its arch
    graphs, plan = gated_pieces(loaded.module, (3, 32, 32))
    reference = torch.load(folder / "ref_outputs.pt", weights_only=True)
    return {
        "name": request.param,
        "module": loaded.module,
        "graphs": graphs,
        "plan": plan,
        "input": torch.load(folder / "input.pt", weights_only=True).numpy(),
        "logits": reference["logits"].numpy(),
        "executed": reference["executed"].numpy().T.astype(np.uint8),  # [B, n_gated]
        "p_execute": reference["p_execute"].numpy().T,
    }


def form_runner(kit: dict[str, Any], form: str, replay: bool = False) -> Runner:
    """A runner for ``form`` built from the kit model's pieces."""
    if form == "staged":
        graphs = {name: graph.SerializeToString() for name, graph in kit["graphs"].items()}
        return StagedGatedRunner(lambda name: OrtRunner(graphs[name], threads=1), kit["plan"].to_dict(), INPUT_META, replay=replay)
    return OrtRunner(compose_form(form, kit["graphs"], kit["plan"], (3, 32, 32)).SerializeToString(), threads=1)


def run_in_batches(runner: Runner, x: np.ndarray, batch: int, **extra: Any) -> dict[str, np.ndarray]:
    parts = [runner.infer({"input": x[i:i + batch], **{k: (v[i:i + batch] if k == "gates" else v) for k, v in extra.items()}})
             for i in range(0, len(x), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("batch", [8, 1])
@pytest.mark.slow
def test_form_reproduces_official_outputs(kit: dict[str, Any], form: str, batch: int) -> None:
    with form_runner(kit, form) as runner:
        out = run_in_batches(runner, kit["input"], batch)
    np.testing.assert_array_equal(out["gates"], kit["executed"])
    np.testing.assert_allclose(out["logits"], kit["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["gate_probs"], kit["p_execute"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.slow
def test_threshold_is_a_runtime_input(kit: dict[str, Any], form: str) -> None:
    x = kit["input"]
    with form_runner(kit, form) as runner:
        for threshold in (0.3, 0.7):
            out = runner.infer({"input": x, "gate_threshold": np.array(threshold, dtype=np.float32)})
            with torch.inference_mode():
                logits, gates, _ = kit["module"](torch.from_numpy(x), threshold)
            np.testing.assert_array_equal(out["gates"], gates.numpy())
            np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-4, rtol=0)
        assert not np.array_equal(
            runner.infer({"input": x, "gate_threshold": np.array(0.3, np.float32)})["gates"],
            runner.infer({"input": x, "gate_threshold": np.array(0.7, np.float32)})["gates"],
        )


def test_staged_replays_given_decisions(kit: dict[str, Any]) -> None:
    flipped = kit["executed"].copy()
    flipped[:, 3] = 1 - flipped[:, 3]  # force block 4 the other way for every sample
    with form_runner(kit, "staged", replay=True) as runner:
        out = run_in_batches(runner, kit["input"], 4, gates=flipped)
    np.testing.assert_array_equal(out["gates"], flipped)
    assert np.abs(out["logits"] - kit["logits"]).max() > 1e-3  # the flip changed the answer
    with form_runner(kit, "staged", replay=True) as runner:
        same = run_in_batches(runner, kit["input"], 8, gates=kit["executed"])
    np.testing.assert_allclose(same["logits"], kit["logits"], atol=1e-4, rtol=0)


def test_staged_batch_shrinks_per_block(kit: dict[str, Any]) -> None:
    with form_runner(kit, "staged") as runner:
        runner.infer({"input": kit["input"]})
        executed = runner.executed_rows
    assert executed[0] == len(kit["input"])
    np.testing.assert_array_equal(executed[1:], kit["executed"].sum(axis=0))


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_graph_structure_of_each_form(kit: dict[str, Any]) -> None:
    n_gated = kit["plan"].n_blocks - 1
    if_model = compose_form("if", kit["graphs"], kit["plan"], (3, 32, 32))
    ifs = [node for node in if_model.graph.node if node.op_type == "If"]
    assert len(ifs) == n_gated
    # Each condition is a 0-D bool made by a rank-0 reduction (what TensorRT accepts).
    producers = {out: node for node in if_model.graph.node for out in node.output}
    for node in ifs:
        cast = producers[node.input[0]]
        assert cast.op_type == "Cast" and producers[cast.input[0]].op_type == "ReduceMax"
        then_names = {o.name for o in node.attribute[0].g.output} | {o.name for o in node.attribute[1].g.output}
        assert len(then_names) == 2  # the two branches' outputs are named apart
    compact = compose_form("compact", kit["graphs"], kit["plan"], (3, 32, 32))
    assert _ops(compact).count("NonZero") == n_gated and _ops(compact).count("ScatterND") == n_gated
    assert "If" not in _ops(compact)
    mask = compose_form("mask", kit["graphs"], kit["plan"], (3, 32, 32))
    assert "If" not in _ops(mask) and "NonZero" not in _ops(mask)
    assert [i.name for i in mask.graph.input] == ["input", "gate_threshold"]
    assert [o.name for o in mask.graph.output] == ["logits", "gates", "gate_probs"]
    # loop: one Loop per stage over its 5 blocks after the first; the 2 downsampling blocks
    # are routed as in ``if``; the graph is a fraction of ``if``'s.
    loop = compose_form("loop", kit["graphs"], kit["plan"], (3, 32, 32))
    assert _ops(loop).count("Loop") == 3 and _ops(loop).count("If") == len(kit["plan"].skips) == 2
    assert [o.name for o in loop.graph.output] == ["logits", "gates", "gate_probs"]
    assert len(loop.graph.node) < len(if_model.graph.node) / 3
    assert loop.ByteSize() < if_model.ByteSize()


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}


def test_loop_form_runs_the_repeated_blocks_of_each_stage(kit: dict[str, Any]) -> None:
    assert loop_runs(kit["graphs"], kit["plan"]) == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11], [13, 14, 15, 16, 17]]
    loop = compose_form("loop", kit["graphs"], kit["plan"], (3, 32, 32))
    weights = _initializers(loop)
    for node in (n for n in loop.graph.node if n.op_type == "Loop"):
        assert weights[node.input[0]] == 5 and node.input[1] == ""  # a constant trip count, no condition
        body = node.attribute[0].g
        # Body: iteration, condition, then the carried features (and h, c for the recurrent gate).
        assert len(body.input) == 2 + 1 + len(kit["plan"].state)
        gathers = [n for n in body.node if n.op_type == "Gather" and n.input[1] == body.input[0].name]
        assert gathers and all(weights[n.input[0]].shape[0] == 5 for n in gathers)
        routing = [n for n in body.node if n.op_type == "If"]
        assert len(routing) == 1  # the block's weights are gathered inside the branch that runs it
        then_branch = routing[0].attribute[0].g if routing[0].attribute[0].name == "then_branch" else routing[0].attribute[1].g
        assert any(n.op_type == "Gather" for n in then_branch.node)
        # The recurrent gate's LSTM is shared by every block: its weights are read, not stacked.
        for lstm in (n for n in body.node if n.op_type == "LSTM"):
            assert lstm.input[1] in weights and weights[lstm.input[1]].ndim == 3


def test_stacked_weights_are_the_blocks_own(kit: dict[str, Any]) -> None:
    graphs = kit["graphs"]
    blocks = [graphs[f"exec{k}"] for k in (7, 8, 9)]
    stack = stack_pieces(blocks)
    assert stack is not None and stack.shared == 0 and len(stack.stacked) == 4  # 2 folded convs: weight, bias
    added = [value.name for value in stack.template.graph.input[1:]]
    for row, block in enumerate(blocks):
        own = _initializers(block)
        by_position = [own[name.replace("group2_layer1", f"group2_layer{1 + row}")] for name in added]
        for stacked, expected in zip(stack.stacked, by_position):
            np.testing.assert_array_equal(stacked[row], expected)
    # The template fed with row j computes block j (to rounding: ONNX Runtime packs constant
    # convolution weights ahead and computed ones per call, with other kernels).
    x = np.random.default_rng(0).standard_normal((2, 32, 16, 16)).astype(np.float32)
    with OrtRunner(stack.template.SerializeToString(), threads=1) as template, OrtRunner(blocks[2].SerializeToString(), threads=1) as third:
        fed = template.infer({"x": x, **{name: array[2] for name, array in zip(added, stack.stacked)}})
        np.testing.assert_allclose(fed["y"], third.infer({"x": x})["y"], atol=1e-5, rtol=0)
    # Blocks of different stages differ in shape: nothing to stack.
    assert stack_pieces([graphs["exec2"], graphs["exec8"]]) is None
    assert not same_structure(graphs["exec2"], graphs["exec8"]) and same_structure(graphs["exec2"], graphs["exec3"])


def test_loop_form_keeps_a_block_of_another_structure_out_of_the_loop(kit: dict[str, Any]) -> None:
    """A block whose graph differs (here an extra Identity: the same function) ends the run and
    is routed as in ``if``; the outputs do not change."""
    graphs = dict(kit["graphs"])
    changed = onnx.ModelProto()
    changed.CopyFrom(graphs["exec3"])
    changed.graph.node[-1].output[0] = "y_before"
    changed.graph.node.append(onnx.helper.make_node("Identity", ["y_before"], ["y"]))
    graphs["exec3"] = changed
    assert loop_runs(graphs, kit["plan"]) == [[1, 2], [4, 5], [7, 8, 9, 10, 11], [13, 14, 15, 16, 17]]
    with OrtRunner(compose_form("loop", graphs, kit["plan"], (3, 32, 32)).SerializeToString(), threads=1) as runner:
        out = run_in_batches(runner, kit["input"], 8)
    np.testing.assert_array_equal(out["gates"], kit["executed"])
    np.testing.assert_allclose(out["logits"], kit["logits"], atol=1e-4, rtol=0)


def test_plan_roundtrip(kit: dict[str, Any]) -> None:
    plan: GatedPlan = kit["plan"]
    assert GatedPlan.from_dict(plan.to_dict()) == plan
    assert plan.skips == [6, 12]  # the blocks that open groups 2 and 3 downsample
    assert plan.state == ([] if "feedforward" in kit["name"] else ["h", "c"])


def test_compose_refuses_staged(kit: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="not 'staged'"):
        compose_form("staged", kit["graphs"], kit["plan"], (3, 32, 32))




def test_simplified_forms_keep_the_threshold_input(kit: dict[str, Any]) -> None:
    """onnxslim would fold the default threshold into a constant; simplify keeps it an input."""
    from slimdeploy.exporters import simplify

    model = compose_form("compact", kit["graphs"], kit["plan"], (3, 32, 32))
    slimmed = simplify(model)
    assert not slimmed.error
    with OrtRunner(slimmed.model.SerializeToString(), threads=1) as runner:
        assert runner.input_metadata()["gate_threshold"].optional
        strict = runner.infer({"input": kit["input"], "gate_threshold": np.array(0.9, np.float32)})
        default = runner.infer({"input": kit["input"]})
    np.testing.assert_array_equal(default["gates"], kit["executed"])
    assert strict["gates"].sum() < default["gates"].sum()


@pytest.mark.parametrize("form", ["if", "compact"])
def test_simplified_recurrent_gates_lose_their_round_trips_and_keep_the_official_outputs(kit: dict[str, Any], form: str) -> None:
    """simplify's rewrites (issue 16, per-piece overheads): the LSTM state no longer goes through
    Gather/Unsqueeze/Slice between steps, the embedding conv is folded into the LSTM, and the
    decisions and logits are still the official code's."""
    from slimdeploy.exporters import simplify

    model = compose_form(form, kit["graphs"], kit["plan"], (3, 32, 32))
    slimmed = simplify(model)
    assert not slimmed.error
    lstms = [node for node in slimmed.model.graph.node if node.op_type == "LSTM"]
    producer = {output: node for node in slimmed.model.graph.node for output in node.output}
    if "rnn" in kit["name"]:
        assert len(lstms) == sum(1 for node in model.graph.node if node.op_type == "LSTM") > 1
        for index, lstm in enumerate(lstms):
            assert producer[lstm.input[0]].op_type == "Reshape"  # the pooled feature, no conv, no Unsqueeze
            assert producer[producer[lstm.input[0]].input[0]].op_type == "GlobalAveragePool"
            if index:  # initial h and c: the previous step's Y_h / Y_c themselves (the first starts at zeros)
                assert [producer[state].op_type for state in lstm.input[5:7]] == ["LSTM", "LSTM"]
        gate_nodes = slimmed.ops_after.get("Slice", 0) + slimmed.ops_after.get("Unsqueeze", 0)
        assert gate_nodes < slimmed.ops_before.get("Slice", 0) + slimmed.ops_before.get("Unsqueeze", 0) - 3 * len(lstms)
    else:
        assert not lstms
    with OrtRunner(slimmed.model.SerializeToString(), threads=1) as runner:
        for batch in (8, 1):
            out = run_in_batches(runner, kit["input"], batch)
            np.testing.assert_array_equal(out["gates"], kit["executed"])
            np.testing.assert_allclose(out["logits"], kit["logits"], atol=1e-4, rtol=0)
            np.testing.assert_allclose(out["gate_probs"], kit["p_execute"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_imagenet_recurrent_gate_forms_match_pytorch() -> None:
    """ImageNet SkipNet (7x7 stem + maxpool, Conv2d proj): forms agree with the reference."""
    from slimdeploy.models import get_arch

    torch.manual_seed(0)
    model = get_arch("imagenet_rnn_gate_18").build().eval()
    with torch.no_grad():
        model.control.proj.weight.mul_(20)  # spread the probabilities so decisions differ
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits, gates, _ = model(x)
    assert 0 < int(gates.sum()) < gates.numel()
    graphs, plan = gated_pieces(model, (3, 224, 224))
    meta = TensorMeta("input", np.dtype(np.float32), ("batch", 3, 224, 224))
    sources = {name: graph.SerializeToString() for name, graph in graphs.items()}
    runners = [
        OrtRunner(compose_form("compact", graphs, plan, (3, 224, 224)).SerializeToString(), threads=1),
        StagedGatedRunner(lambda name: OrtRunner(sources[name], threads=1), plan.to_dict(), meta),
    ]
    for runner in runners:
        with runner:
            out = runner.infer({"input": x.numpy()})
        np.testing.assert_array_equal(out["gates"], gates.numpy())
        np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-4, rtol=0)


def test_bench_accounts_loop_as_if(kit: dict[str, Any]) -> None:
    """A Loop iteration runs its block on the whole batch when any sample needs it, as ``if`` does."""
    from slimdeploy.bench import gated_macs

    plan, gates = kit["plan"].to_dict(), kit["executed"]
    for batch in (1, 4, 8):
        assert gated_macs(plan, gates, "loop", batch) == gated_macs(plan, gates, "if", batch)
    assert gated_macs(plan, gates, "ideal", 1) <= gated_macs(plan, gates, "loop", 1) < gated_macs(plan, gates, "mask", 1)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["cifar10_feedforward_110", "imagenet_rnn_gate_50"])
def test_loop_form_of_ffgate2_and_bottleneck_skipnets(arch: str) -> None:
    """The registered FFGate-II SkipNet (CIFAR, 110 layers) and bottleneck SkipNet (ImageNet,
    ResNet-50): one Loop per stage over its blocks after the first, exact decisions against
    PyTorch at batch 3 and 1, logits as close as ``if``'s (random weights: logits reach 1e4, so
    the tolerance is relative too)."""
    from slimdeploy.models import get_arch

    torch.manual_seed(0)
    info = get_arch(arch)
    model = info.build().eval()
    with torch.no_grad():  # spread the probabilities so that decisions differ
        if model.control is not None:
            model.control.proj.weight.mul_(20)
        else:
            for k in range(model.n_blocks):
                model.gate_module(k).linear_layer.weight.mul_(20)
    size = tuple(info.input_size)
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits, gates, _ = model(x)
    assert 0 < int(gates.sum()) < gates.numel()
    graphs, plan = gated_pieces(model, size)
    starts = np.cumsum([0, *model.layers[:-1]])
    assert loop_runs(graphs, plan) == [list(range(start + 1, start + count)) for start, count in zip(starts, model.layers)]
    for form in ("loop", "if"):
        with OrtRunner(compose_form(form, graphs, plan, size).SerializeToString(), threads=1) as runner:
            for batch in (3, 1):
                out = run_in_batches(runner, x.numpy(), batch)
                np.testing.assert_array_equal(out["gates"], gates.numpy())
                np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-4, rtol=1e-5)
