"""The shipped demo SkipNet (``skipnet38_digits``): it exists, is small, loads without --arch,
its recorded held-out accuracy and skip rates are what the reference forward gives, and they
meet issue 3's bar (>= 30 % of gated blocks skipped, accuracy within 1 point of the same
network without gates). The straight-through training forward agrees with the reference."""

from __future__ import annotations

import pytest

from slimdeploy.zoo import INDEX_PATH, UnknownZooEntryError, get_zoo_entry, zoo_listing

torch = pytest.importorskip("torch")

NAME = "skipnet38_digits"
MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024
TOLERANCE = 0.005  # half a point


@pytest.fixture(scope="module")
def entry():
    return get_zoo_entry(NAME)


@pytest.fixture(scope="module")
def heldout(entry):
    """(gates [N, n_gated] uint8, correct [N] bool) of the shipped model on held-out digits."""
    from slimdeploy.data import digits_inputs
    from slimdeploy.loading import load_checkpoint

    loaded = load_checkpoint(entry.path)  # no arch given: the checkpoint names it
    pre = loaded.preprocessing
    inputs, labels = digits_inputs("heldout", pre.input_size, pre.mean, pre.std)
    with torch.no_grad():
        logits, gates, probs = loaded.module(torch.from_numpy(inputs), 0.5)
    assert torch.equal(gates, (probs > 0.5).to(torch.uint8))
    return gates, logits.argmax(1).numpy() == labels


def test_entry_is_listed_with_its_metrics(entry) -> None:
    from slimdeploy.zoo.train_gated import GATED_RECIPES
    from slimdeploy.zoo.training import recipe_command

    recipe = GATED_RECIPES[NAME]
    assert entry.arch == recipe.arch == "cifar10_rnn_gate_38"
    assert entry.arch_args == dict(recipe.arch_args) == {"num_classes": 10}
    assert entry.dataset == "digits"
    assert entry.family == "skipnet"
    assert entry.input_size == [3, 32, 32]
    assert entry.train_command == recipe_command(NAME, trainer="train_gated")
    metrics = entry.metrics
    assert metrics["lambda"] == recipe.penalty
    assert metrics["epochs"] == recipe.epochs
    assert metrics["gate_threshold"] == 0.5
    assert len(metrics["skip_rate_per_block"]) == len(metrics["gated_blocks"]) == 17
    row = next(r for r in zoo_listing() if r["name"] == NAME and r["kind"] == "checkpoint")
    assert row["accuracy"] == entry.accuracy
    assert row["metrics"]["skip_rate"] == metrics["skip_rate"]
    assert row["metrics"]["baseline_accuracy"] == metrics["baseline_accuracy"]


def test_checkpoint_is_small_and_loads_without_arch(entry) -> None:
    from slimdeploy.loading import load_checkpoint, read_checkpoint
    from slimdeploy.models.skipnet import SkipNet

    assert entry.path.is_file()
    assert entry.path.stat().st_size < MAX_CHECKPOINT_BYTES
    raw = read_checkpoint(entry.path)
    assert raw["format"] == "slimdeploy.checkpoint"
    assert raw["meta"]["dataset"] == "digits"
    assert raw["meta"]["accuracy"] == pytest.approx(entry.accuracy)
    assert raw["meta"]["skip_rate"] == pytest.approx(entry.metrics["skip_rate"])
    loaded = load_checkpoint(entry.path)
    assert loaded.arch == entry.arch
    assert loaded.arch_args == entry.arch_args
    assert isinstance(loaded.module, SkipNet)
    assert sum(p.numel() for p in loaded.module.parameters()) == entry.params
    assert list(loaded.module.block_names[1:]) == entry.metrics["gated_blocks"]


def test_recorded_figures_match_the_reference_forward(entry, heldout) -> None:
    gates, correct = heldout
    assert len(correct) == entry.metrics["heldout_images"] == 500
    assert float(correct.mean()) == pytest.approx(entry.accuracy, abs=TOLERANCE)
    skipped = 1.0 - gates.double()
    assert float(skipped.mean()) == pytest.approx(entry.metrics["skip_rate"], abs=TOLERANCE)
    per_block = skipped.mean(0).tolist()
    assert per_block == pytest.approx(entry.metrics["skip_rate_per_block"], abs=TOLERANCE)


def test_meets_the_issue_bar(entry, heldout) -> None:
    # Recorded figures (recomputed above) meet issue 3 part 5: >= 30 % of gated blocks skipped,
    # accuracy within 1 point of the same network trained without gates.
    metrics = entry.metrics
    assert metrics["skip_rate"] >= 0.30
    assert entry.accuracy >= metrics["baseline_accuracy"] - 0.01
    gates, _ = heldout
    assert 1.0 - float(gates.double().mean()) >= 0.30 - TOLERANCE
    # The gates decide per sample: some blocks are skipped by some samples and run by others,
    # or at least they are not all open.
    assert int(gates.sum()) < gates.numel()


def test_straight_through_forward_matches_reference_and_trains_gates() -> None:
    from slimdeploy.models.registry import get_arch
    from slimdeploy.zoo.train_gated import _open_gates, straight_through_forward

    torch.manual_seed(0)
    model = get_arch("cifar10_rnn_gate_38").build(num_classes=10).eval()
    with torch.no_grad():  # a bias that leaves some gates open and some closed
        model.control.proj.bias.fill_(0.1)
    inputs = torch.randn(6, 3, 32, 32)
    logits, g = straight_through_forward(model, inputs)
    with torch.no_grad():
        ref_logits, ref_gates, _ = model(inputs, 0.5)
    assert torch.equal(g.detach(), ref_gates.float())  # exactly the hard decisions, forward
    assert 0 < int(ref_gates.sum()) < ref_gates.numel()
    torch.testing.assert_close(logits.detach(), ref_logits, rtol=1e-5, atol=1e-5)
    # The penalty reaches the gates through the straight-through estimator.
    g.mean().backward()
    assert model.control.proj.bias.grad is not None
    assert float(model.control.proj.bias.grad.abs()) > 0
    assert model.gate_module(0)[1].weight.grad is not None

    open_logits, ones = straight_through_forward(model, inputs, gated=False)
    with torch.no_grad():
        all_logits, all_gates, _ = model(inputs, float("-inf"))
    assert bool((ones == 1).all()) and bool((all_gates == 1).all())
    torch.testing.assert_close(open_logits.detach(), all_logits, rtol=1e-5, atol=1e-5)

    _open_gates(torch, model, 5.0)
    with torch.no_grad():
        assert bool((model(inputs, 0.5)[1] == 1).all())


def test_unknown_gated_recipe_raises() -> None:
    from slimdeploy.zoo.train_gated import train_gated_zoo_entry

    with pytest.raises(UnknownZooEntryError, match="did you mean skipnet38_digits"):
        train_gated_zoo_entry("skipnet38_digit")


@pytest.mark.slow
def test_one_epoch_of_the_recipe_to_a_tmp_dir(tmp_path) -> None:
    from slimdeploy.loading import load_checkpoint
    from slimdeploy.zoo.train_gated import train_gated_zoo_entry

    before = INDEX_PATH.read_bytes()
    lines: list[str] = []
    entry = train_gated_zoo_entry(NAME, tmp_path, epochs=1, train_count=64,
                                  progress=lines.append)
    assert INDEX_PATH.read_bytes() == before  # an out_dir leaves the package's zoo alone
    assert entry.path == (tmp_path / f"{NAME}.pt").resolve()
    assert list(tmp_path.iterdir()) == [tmp_path / f"{NAME}.pt"]  # no temporary left behind
    assert entry.train_command.endswith("--epochs 1")
    assert any(line.startswith("base ") for line in lines)
    assert any(line.startswith("gated") for line in lines)
    assert entry.metrics["epochs"] == 1
    loaded = load_checkpoint(entry.path)
    # One epoch on 64 images learns little (a SkipNet-38 needs the recipe's full run to leave
    # chance), so the recorded figures are checked against what the written checkpoint gives.
    from slimdeploy.data import digits_inputs

    pre = loaded.preprocessing
    inputs, labels = digits_inputs("heldout", pre.input_size, pre.mean, pre.std)
    with torch.no_grad():
        logits, gates, _ = loaded.module(torch.from_numpy(inputs), entry.metrics["gate_threshold"])
    assert float((logits.argmax(1).numpy() == labels).mean()) == pytest.approx(entry.accuracy, abs=1e-9)
    assert 1.0 - float(gates.double().mean()) == pytest.approx(entry.metrics["skip_rate"], abs=1e-9)
    assert loaded.arch == "cifar10_rnn_gate_38"
    assert loaded.meta["train_images"] == 64
    assert loaded.meta["accuracy"] == entry.accuracy
    assert loaded.meta["dataset"] == "digits"
