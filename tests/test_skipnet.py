"""SkipNet reference architectures against the official code (issue 3, parts 1 and 2).

The upstream fixtures (tests/fixtures/upstream) hold checkpoints written by the official
ucbdrive/skipnet code with its outputs on a fixed input; the architectures must load them by
key (the checkpoint names its arch) and reproduce every decision, probability and logit. The
registry sweep builds every official factory name, and the key layout of the ones without a kit
checkpoint is checked against the rules of docs/upstream-formats.md, written out independently of
the builders here.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from slimdeploy.loading import load_checkpoint
from slimdeploy.models import get_arch, list_models
from slimdeploy.models.skipnet import SkipNet
from slimdeploy.nn import (
    FeedforwardGateI,
    FeedforwardGateII,
    GatedResidual,
    RecurrentGate,
    RecurrentGateEmbedding,
)
from tests.conftest import UPSTREAM, require_fixture

KIT = UPSTREAM
KIT_MODELS = ["skipnet_cifar10_feedforward_38", "skipnet_cifar10_rnn_gate_38"]
# The kit was produced with more than one thread; on one thread some convolutions round
# differently in the last bit, so probabilities agree to ~1e-6 (logits came out identical).
ATOL = 1e-5

# Every factory of the official cifar/models.py and imagenet/models.py that builds a SkipNet,
# spelt as upstream spells it: (name, gate, stage, depth, classes).
_CIFAR = [
    ("{}_feedforward_38", "ffgate1", "sp", 38),
    ("{}_feedforward_74", "ffgate1", "sp", 74),
    ("{}_feedforward_110", "ffgate2", "sp", 110),
    ("{}_rnn_gate_38", "rnn", "sp", 38),
    ("{}_rnn_gate_74", "rnn", "sp", 74),
    ("{}_rnn_gate_110", "rnn", "sp", 110),
    ("{}_rnn_gate_152", "rnn", "sp", 152),
    ("{}_feedforward_rl_38", "ffgate1", "rl", 38),
    ("{}_feedforward_rl_74", "ffgate1", "rl", 74),
    ("{}_feedforward_rl_110", "ffgate2", "rl", 110),
    ("{}_rnn_gate_rl_38", "rnn", "rl", 38),
    ("{}_rnn_gate_rl_74", "rnn", "rl", 74),
    ("{}_rnn_gate_rl_110", "rnn", "rl", 110),
]
_MISSPELT = {
    "cifar10_feedforward_rl_38": "cifar10_feedfoward_rl_38",
    "cifar100_feedforward_38": "cifar100_feeforward_38",
    "cifar100_feedforward_rl_38": "cifar100_feedford_rl_38",
}
OFFICIAL: dict[str, tuple[str, str, int, int]] = {}
for _prefix, _classes in (("cifar10", 10), ("cifar100", 100)):
    for _pattern, _gate, _stage, _depth in _CIFAR:
        _name = _pattern.format(_prefix)
        OFFICIAL[_MISSPELT.get(_name, _name)] = (_gate, _stage, _depth, _classes)
for _depth in (18, 34, 50, 101, 152):
    OFFICIAL[f"imagenet_rnn_gate_{_depth}"] = ("rnn", "sp", _depth, 1000)
    OFFICIAL[f"imagenet_rnn_gate_rl_{_depth}"] = ("rnn", "rl", _depth, 1000)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kit(name: str) -> dict:
    folder = require_fixture(KIT / name)
    return {
        "checkpoint": folder / "checkpoint.pth.tar",
        "input": torch.load(folder / "input.pt", weights_only=True),
        "ref": torch.load(folder / "ref_outputs.pt", weights_only=True),
        "meta": json.loads((folder / "meta.json").read_text()),
        "keys": [
            line.rstrip("\n").split("\t")
            for line in (folder / "keys.txt").read_text().splitlines(keepends=True)
            if not line.startswith("#")
        ],
    }


@pytest.fixture(scope="module", params=KIT_MODELS)
def kit(request: pytest.FixtureRequest) -> dict:
    data = _kit(request.param)
    loaded = load_checkpoint(data["checkpoint"])  # no arch: the checkpoint's `arch` names it
    data["loaded"] = loaded
    data["model"] = loaded.module
    return data


# --- the kit: official checkpoints and outputs ---------------------------------------------


def test_kit_checkpoint_names_its_architecture(kit: dict) -> None:
    factory = kit["meta"]["factory"].removesuffix("()")
    assert kit["loaded"].arch == factory
    assert isinstance(kit["model"], SkipNet) and not kit["model"].training
    assert kit["loaded"].preprocessing.input_size == (3, 32, 32)
    assert any("module." in note for note in kit["loaded"].notes)


def test_kit_outputs_and_decisions(kit: dict) -> None:
    model, x, ref = kit["model"], kit["input"], kit["ref"]
    with torch.no_grad():
        logits, gates, probs = model(x)
    n_gated = kit["meta"]["n_masks"]
    assert model.n_blocks == kit["meta"]["n_blocks"] and model.n_gated == n_gated
    assert logits.dtype == probs.dtype == torch.float32 and gates.dtype == torch.uint8
    assert gates.shape == probs.shape == (x.shape[0], n_gated)
    torch.testing.assert_close(logits, ref["logits"], atol=ATOL, rtol=0)
    assert torch.equal(gates.T.bool(), ref["executed"])
    torch.testing.assert_close(probs.T, ref["p_execute"], atol=ATOL, rtol=0)
    # The kit's inputs open and close gates: at least one block is mixed across the batch.
    assert ((gates.float().mean(0) > 0) & (gates.float().mean(0) < 1)).any()


def test_kit_official_forward(kit: dict) -> None:
    model, x, ref = kit["model"], kit["input"], kit["ref"]
    with torch.no_grad():
        logits, masks, gprobs = model.official_forward(x)
    torch.testing.assert_close(logits, ref["logits"], atol=ATOL, rtol=0)
    assert len(masks) == len(ref["masks"]) == kit["meta"]["n_masks"]
    assert len(gprobs) == len(ref["gprobs"]) == kit["meta"]["n_gprobs"]
    for mine, theirs in zip(masks, ref["masks"]):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    for mine, theirs in zip(gprobs, ref["gprobs"]):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)


def test_kit_batch_of_one_gives_the_batch_rows(kit: dict) -> None:
    # The official code fails at batch size 1 (a bare squeeze()); this one must not.
    model, x = kit["model"], kit["input"]
    with torch.no_grad():
        logits, gates, probs = model(x)
        for i in range(x.shape[0]):
            one_logits, one_gates, one_probs = model(x[i : i + 1])
            assert one_gates.shape == (1, model.n_gated)
            assert torch.equal(one_gates[0], gates[i])
            torch.testing.assert_close(one_logits[0], logits[i], atol=ATOL, rtol=0)
            torch.testing.assert_close(one_probs[0], probs[i], atol=ATOL, rtol=0)
        official_one = model.official_forward(x[:1])
    assert official_one[0].shape == (1, 10) and official_one[1][0].shape == (1,)


def test_kit_keys_equal_the_built_model(kit: dict) -> None:
    built = get_arch(kit["loaded"].arch).build().state_dict()
    rows = kit["keys"]
    assert len(rows) == kit["meta"]["n_state_dict_keys"]
    expected = [key.removeprefix("module.") for key, _, _ in rows]
    assert list(built) == expected  # same keys, in the official registration order
    for key, dtype, shape in rows:
        tensor = built[key.removeprefix("module.")]
        assert str(tensor.dtype) == f"torch.{dtype}", key
        assert list(tensor.shape) == json.loads(shape), key


def test_kit_duplicate_downsample_keys_load(kit: dict) -> None:
    model = kit["model"]
    state = torch.load(kit["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    duplicated = [k for k in state if ".downsample." in k]
    assert len(duplicated) == kit["meta"]["n_duplicate_downsample_keys"]
    for key in duplicated:
        group_layer, rest = key.removeprefix("module.").split(".downsample.")
        alias = group_layer.replace("_layer", "_ds") + "." + rest
        assert "module." + alias in state
        assert torch.equal(model.state_dict()[alias], state[key])
    assert model.group2_ds0 is model.group2_layer0.downsample
    assert model.group3_ds0 is model.group3_layer0.downsample


def test_kit_legacy_checkpoint_without_num_batches_tracked(kit: dict, tmp_path: Path) -> None:
    # As the released checkpoints were written (PyTorch 0.2/0.3): legacy container, no
    # num_batches_tracked; the arch field still selects the architecture.
    obj = torch.load(kit["checkpoint"], map_location="cpu", weights_only=True)
    obj["state_dict"] = {
        k: v for k, v in obj["state_dict"].items() if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "legacy.pth.tar"
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    loaded = load_checkpoint(path)
    assert loaded.arch == obj["arch"]
    with torch.no_grad():
        assert torch.equal(loaded.module(kit["input"])[0], kit["model"](kit["input"])[0])


def test_kit_gate_threshold(kit: dict) -> None:
    model, x = kit["model"], kit["input"]
    with torch.no_grad():
        _, gates, _probs = model(x)
        _, gates_t, _ = model(x, torch.tensor(0.5))
        _, gates_0, probs_0 = model(x, gate_threshold=0.0)
        _, gates_1, probs_1 = model(x, gate_threshold=torch.tensor(1.0))
    assert torch.equal(gates, gates_t)
    # Strictly greater: at 0 every block whose probability has not underflowed to 0 runs (most
    # of them), at 1 none can.
    assert torch.equal(gates_0.bool(), probs_0 > 0)
    assert gates_0.float().mean() > max(0.8, gates.float().mean())
    assert not gates_1.any()
    # Decisions move the features, so the probabilities downstream change with them.
    assert not torch.equal(probs_0, probs_1)


def test_kit_explicit_lstm_cell_agrees() -> None:
    # The written-out LSTM step (plain operators) against the nn.LSTM call the official code
    # makes: same decisions, probabilities within float rounding.
    data = _kit("skipnet_cifar10_rnn_gate_38")
    model, x = load_checkpoint(data["checkpoint"]).module, data["input"]
    assert model.control is not None
    with torch.no_grad():
        logits, gates, probs = model(x)
        model.control.explicit_cell = True
        try:
            logits_e, gates_e, probs_e = model(x)
        finally:
            model.control.explicit_cell = False
    assert torch.equal(gates, gates_e)
    torch.testing.assert_close(probs_e, probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits_e, logits, atol=1e-5, rtol=0)


# --- the decomposed API the export forms build on -------------------------------------------


@pytest.mark.parametrize("name", ["cifar10_feedforward_38", "cifar10_rnn_gate_38"])
def test_forward_is_its_pieces(name: str) -> None:
    torch.manual_seed(3)
    model = get_arch(name).build().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, _gates, probs = model(x, 0.5)
        features = model.stem(x)
        state = model.gate_init_state(features)
        if model.control is None:
            assert state == ()
        else:
            assert len(state) == 2 and all(t.shape == (3, 10) and not t.any() for t in state)
        features = model.run_block(0, features)
        for k in range(1, model.n_blocks):
            prob, state = model.gate(k - 1, features, state)
            assert prob.shape == (3,) and prob.dtype == torch.float32
            torch.testing.assert_close(prob, probs[:, k - 1], atol=0, rtol=0)
            run, skipped = model.run_block(k, features), model.skip(k, features)
            block = model.block(k)
            assert isinstance(block, GatedResidual)
            if block.downsample is None:
                assert skipped is features
            else:
                assert torch.equal(skipped, block.downsample(features))
            features = torch.where((prob > 0.5)[:, None, None, None], run, skipped)
        assert torch.equal(model.head(features), logits)
    assert model.n_gated == model.n_blocks - 1 == 17


def test_first_block_always_runs_and_a_tie_skips() -> None:
    model = get_arch("cifar10_feedforward_38").build().eval()
    with torch.no_grad():
        for k in range(model.n_blocks):
            gate = model.gate_module(k)
            gate.linear_layer.weight.zero_()
            gate.linear_layer.bias.zero_()  # softmax of equal logits: exactly 0.5
        x = torch.randn(2, 3, 32, 32)
        logits, gates, probs = model(x)
        assert torch.equal(probs, torch.full_like(probs, 0.5))
        assert not gates.any()
        # Only block 0 ran: the rest are skip paths.
        features = model.run_block(0, model.stem(x))
        for k in range(1, model.n_blocks):
            features = model.skip(k, features)
        assert torch.equal(model.head(features), logits)


def test_gate_modules() -> None:
    torch.manual_seed(4)
    x = torch.randn(1, 16, 32, 32)
    for gate in (FeedforwardGateI(16, 32).eval(), FeedforwardGateII(16, 32).eval()):
        logits = gate.logits(x)
        assert logits.shape == (1, 2)
        torch.testing.assert_close(gate(x), torch.softmax(logits, 1)[:, 1])
    assert FeedforwardGateI(16, 32).avg_layer.kernel_size == 8
    assert FeedforwardGateI(32, 16).avg_layer.kernel_size == 4
    assert FeedforwardGateI(64, 8).avg_layer.kernel_size == 2
    sizes = ((16, 32), (32, 16), (64, 8))
    kernels = [FeedforwardGateII(c, p).avg_layer.kernel_size for c, p in sizes]
    assert kernels == [16, 8, 4]
    embedding = RecurrentGateEmbedding(16, 32)
    assert set(embedding.state_dict()) == {"1.weight", "1.bias"}
    assert embedding.embed(x).shape == (1, 10)
    for proj in ("linear", "conv"):
        control = RecurrentGate(proj=proj).eval()
        h, c = control.init_state(x)
        assert h.shape == c.shape == (1, 10)
        prob, (h1, c1) = control(torch.randn(1, 10), (h, c))
        assert prob.shape == (1,) and h1.shape == c1.shape == (1, 10)
    with pytest.raises(ValueError, match="proj"):
        RecurrentGate(proj="mlp")  # type: ignore[arg-type]


def test_recurrent_state_is_carried_and_reset() -> None:
    torch.manual_seed(5)
    model = get_arch("cifar10_rnn_gate_38").build().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model(x)
        second = model(x)  # a fresh zero state each forward: identical results
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        # Each gate sees the state its predecessors left: resetting it mid-way changes the
        # probabilities after that point.
        features = model.run_block(0, model.stem(x))
        state = model.gate_init_state(features)
        prob0, state = model.gate(0, features, state)
        prob0_fresh, _ = model.gate(0, features, model.gate_init_state(features))
        prob0_again, _ = model.gate(0, features, state)
    assert torch.equal(prob0, prob0_fresh) and torch.equal(prob0, first[2][:, 0])
    assert not torch.equal(prob0_again, prob0)


# --- the registry: every official factory name ---------------------------------------------


def test_registered_names_are_the_official_factories() -> None:
    assert set(list_models("skipnet")) == set(OFFICIAL)
    for name, (_, _, _, classes) in OFFICIAL.items():
        info = get_arch(name)
        assert info.name == name and info.family == "skipnet" and info.dynamic
        assert info.input_size == ((3, 224, 224) if name.startswith("imagenet") else (3, 32, 32))
        assert info.default_args() == {"num_classes": classes}
    # Upstream's misspellings are names in their own right; the corrected spellings are not
    # official and resolve to nothing.
    for correct, misspelt in _MISSPELT.items():
        assert get_arch(misspelt).name == misspelt
        assert correct not in set(list_models())


def _expected_keys(name: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official model ``name``, from the rules of docs/upstream-formats.md."""
    gate, _, depth, classes = OFFICIAL[name]
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for stat in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{stat}"] = (channels,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    if name.startswith("imagenet"):
        per_group = {
            18: (2, 2, 2, 2),
            34: (3, 4, 6, 3),
            50: (3, 4, 6, 3),
            101: (3, 4, 23, 3),
            152: (3, 8, 36, 3),
        }[depth]
        widths, expansion, stem = (64, 128, 256, 512), (1 if depth < 50 else 4), (64, 3, 7, 7)
    else:
        per_group = {38: (6,) * 3, 74: (12,) * 3, 110: (18,) * 3, 152: (25,) * 3}[depth]
        widths, expansion, stem = (16, 32, 64), 1, (16, 3, 3, 3)
    keys["conv1.weight"] = stem
    bn("bn1", stem[0])
    channels = stem[0]
    for g, (width, blocks) in enumerate(zip(widths, per_group), 1):
        out = width * expansion
        for i in range(blocks):
            layer = f"group{g}_layer{i}"
            stride = 2 if g > 1 and i == 0 else 1
            downsample = stride != 1 or channels != out
            for prefix in ([f"group{g}_ds{i}", f"{layer}.downsample"] if downsample else []):
                keys[f"{prefix}.0.weight"] = (out, channels, 1, 1)
                bn(f"{prefix}.1", out)
            if expansion == 1:
                keys[f"{layer}.conv1.weight"] = (width, channels, 3, 3)
                keys[f"{layer}.conv2.weight"] = (width, width, 3, 3)
                bn(f"{layer}.bn1", width)
                bn(f"{layer}.bn2", width)
            else:
                keys[f"{layer}.conv1.weight"] = (width, channels, 1, 1)
                keys[f"{layer}.conv2.weight"] = (width, width, 3, 3)
                keys[f"{layer}.conv3.weight"] = (out, width, 1, 1)
                bn(f"{layer}.bn1", width)
                bn(f"{layer}.bn2", width)
                bn(f"{layer}.bn3", out)
            gate_prefix = f"group{g}_gate{i}"
            if gate == "rnn":
                keys[f"{gate_prefix}.1.weight"] = (10, out, 1, 1)
                keys[f"{gate_prefix}.1.bias"] = (10,)
            else:
                keys[f"{gate_prefix}.conv1.weight"] = (out, out, 3, 3)
                bn(f"{gate_prefix}.bn1", out)
                if gate == "ffgate1":
                    keys[f"{gate_prefix}.conv2.weight"] = (out, out, 3, 3)
                    bn(f"{gate_prefix}.bn2", out)
                keys[f"{gate_prefix}.linear_layer.weight"] = (2, out, 1, 1)
                keys[f"{gate_prefix}.linear_layer.bias"] = (2,)
            channels = out
    if gate == "rnn":
        for part in ("ih", "hh"):
            keys[f"control.rnn.weight_{part}_l0"] = (40, 10)
            keys[f"control.rnn.bias_{part}_l0"] = (40,)
        imagenet = name.startswith("imagenet")
        keys["control.proj.weight"] = (1, 10, 1, 1) if imagenet else (1, 10)
        keys["control.proj.bias"] = (1,)
    keys["fc.weight"] = (classes, channels)
    keys["fc.bias"] = (classes,)
    return keys


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_key_layout(name: str) -> None:
    with torch.device("meta"):  # shapes only: the 152-layer ImageNet model builds instantly
        model = get_arch(name).build()
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == _expected_keys(name)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_every_skipnet_runs_at_batch_one_and_two(name: str) -> None:
    gate, stage, _, classes = OFFICIAL[name]
    torch.manual_seed(6)
    model = get_arch(name).build().eval()
    assert (model.gate_type, model.stage, model.num_classes) == (gate, stage, classes)
    x = torch.randn(2, *model.input_size)
    with torch.no_grad():
        logits, gates, probs = model(x)
        one_logits, one_gates, one_probs = model(x[:1])
        official = model.official_forward(x[:1])
    n = model.n_blocks
    assert logits.shape == (2, classes) and one_logits.shape == (1, classes)
    assert gates.shape == probs.shape == (2, n - 1) and gates.dtype == torch.uint8
    assert set(gates.unique().tolist()) <= {0, 1} and ((probs >= 0) & (probs <= 1)).all()
    assert torch.equal(gates.bool(), probs > 0.5)
    assert torch.equal(one_gates[0], gates[0])
    torch.testing.assert_close(one_logits[0], logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one_probs[0], probs[0], atol=ATOL, rtol=0)

    # The official return signature (see SkipNet.official_forward), at batch 1.
    imagenet = name.startswith("imagenet")
    assert len(official) == (4 if imagenet else 3)
    torch.testing.assert_close(official[0], one_logits, atol=0, rtol=0)
    masks, gprobs = official[1], official[2]
    assert len(masks) == n - 1 and all(m.shape == (1,) for m in masks)
    assert torch.equal(torch.stack(masks, 1), one_gates.float())
    if imagenet:
        assert len(gprobs) == n - 1 and all(p.shape == (1,) for p in gprobs)
        h, c = official[3]
        assert h.shape == c.shape == (1, 1, 10)
    elif gate == "rnn" and stage == "rl":
        assert len(gprobs) == n - 1 and all(p.shape == (1, 2) for p in gprobs)
    elif gate == "rnn":
        assert len(gprobs) == n and all(p.shape == (1, 1) for p in gprobs)
    else:
        assert len(gprobs) == n and all(p.shape == (1, 2) for p in gprobs)
        total = gprobs[0].exp().sum() if stage == "sp" else gprobs[0].sum()
        torch.testing.assert_close(total, torch.tensor(1.0))


# --- the `mask` form baseline: the reference forward as one ONNX graph ------------------------


@pytest.mark.slow
def test_mask_form_onnx_export_matches_onnxruntime(tmp_path: Path) -> None:
    # The `mask` form baseline: the reference forward exported whole, with a dynamic batch and
    # gate_threshold as a 0-D float32 graph input. (The recurrent kit model exports the same
    # way, its LSTM step as one ONNX LSTM node; left out here to keep this file fast.)
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    data = _kit("skipnet_cifar10_feedforward_38")
    model = load_checkpoint(data["checkpoint"]).module
    x = data["input"]
    program = torch.onnx.export(
        model,
        (x[:2], torch.tensor(0.5)),
        dynamo=True,
        opset_version=18,
        input_names=["input", "gate_threshold"],
        output_names=["logits", "gates", "gate_probs"],
        dynamic_shapes=({0: torch.export.Dim("batch")}, None),
    )
    path = tmp_path / "skipnet_mask.onnx"
    program.save(str(path))

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    assert isinstance(inputs["input"].shape[0], str), "batch dimension was specialised"
    assert inputs["gate_threshold"].shape == [] and inputs["gate_threshold"].type == "tensor(float)"
    assert [o.name for o in session.get_outputs()] == ["logits", "gates", "gate_probs"]
    for batch in (1, 8):
        seen = {}
        for threshold in (0.5, 0.1, 1.0):
            feed = {"input": x[:batch].numpy(), "gate_threshold": np.array(threshold, np.float32)}
            logits, gates, probs = session.run(None, feed)
            with torch.no_grad():
                expected = [t.numpy() for t in model(x[:batch], torch.tensor(threshold))]
            assert gates.dtype == np.uint8 and gates.shape == expected[1].shape
            # Decisions agree wherever the reference is not within float noise of the threshold
            # (the kit keeps every probability 5e-3 away from 0.5, so at 0.5 that is all of them).
            clear = np.abs(expected[2] - threshold) > 1e-4
            assert np.array_equal(gates[clear], expected[1][clear])
            if (gates == expected[1]).all():
                np.testing.assert_allclose(logits, expected[0], atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(probs, expected[2], atol=ATOL, rtol=0)
            seen[threshold] = gates
        reference = data["ref"]["executed"][:, :batch].numpy()
        assert np.array_equal(seen[0.5].T.astype(bool), reference)
        assert seen[0.1].sum() >= seen[0.5].sum() and not seen[1.0].any()
    assert seen[0.1].sum() > seen[0.5].sum()  # at batch 8: the threshold is a live input
