"""The shipped demo CondenseNet (``condensenet_digits``, issue 4 part 6): it exists, is small,
loads without --arch, its masks keep exactly 1/C of each group's 1x1 inputs (the end of the
condensation schedule), its recorded held-out accuracy is what the model gives (>= 95 %), and
the condensed deploy form (exact classifier) predicts the same classes."""

from __future__ import annotations

import pytest

from slimdeploy.zoo import get_zoo_entry

torch = pytest.importorskip("torch")

NAME = "condensenet_digits"
MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024
TOLERANCE = 0.005  # half a point


@pytest.fixture(scope="module")
def entry():
    return get_zoo_entry(NAME)


@pytest.fixture(scope="module")
def loaded(entry):
    from slimdeploy.loading import load_checkpoint

    return load_checkpoint(entry.path)  # no arch given: the checkpoint names it


@pytest.fixture(scope="module")
def heldout(loaded):
    from slimdeploy.data import digits_inputs

    pre = loaded.preprocessing
    inputs, labels = digits_inputs("heldout", pre.input_size, pre.mean, pre.std)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def test_entry_is_listed_with_its_metrics(entry) -> None:
    from slimdeploy.zoo.train_condensenet import CONDENSE_RECIPES
    from slimdeploy.zoo.training import recipe_command

    recipe = CONDENSE_RECIPES[NAME]
    assert entry.arch == recipe.arch == "condensenet"
    assert entry.arch_args == dict(recipe.arch_args)
    assert entry.dataset == "digits"
    assert entry.family == "condensenet"
    assert entry.input_size == [3, 32, 32]
    assert entry.train_command == recipe_command(NAME, trainer="train_condensenet")
    metrics = entry.metrics
    assert metrics["epochs"] == recipe.epochs
    assert metrics["lasso"] == recipe.lasso > 0
    assert metrics["condensed_accuracy"] == entry.accuracy
    assert metrics["same_predictions"] is True
    assert metrics["kept_fraction_1x1"] == pytest.approx(1 / recipe.arch_args["condense_factor"])
    assert metrics["params_learned"] == entry.params > metrics["params_condensed"]
    assert entry.accuracy >= 0.95


def test_checkpoint_is_small_and_loads_without_arch(entry, loaded) -> None:
    from slimdeploy.loading import read_checkpoint
    from slimdeploy.models.condensenet import CondenseNet

    assert entry.path.is_file()
    assert entry.path.stat().st_size < MAX_CHECKPOINT_BYTES
    raw = read_checkpoint(entry.path)
    assert raw["format"] == "slimdeploy.checkpoint"
    assert raw["meta"]["dataset"] == "digits"
    assert raw["meta"]["accuracy"] == pytest.approx(entry.accuracy)
    assert loaded.arch == entry.arch
    assert loaded.arch_args == entry.arch_args
    assert isinstance(loaded.module, CondenseNet) and not loaded.module.converted
    assert sum(p.numel() for p in loaded.module.parameters()) == entry.params


def test_masks_keep_one_over_c_per_group(loaded) -> None:
    from slimdeploy.nn.learned_group_conv import LearnedGroupConv

    layers = [m for m in loaded.module.modules() if isinstance(m, LearnedGroupConv)]
    assert layers
    for layer in layers:
        groups, factor = layer.groups, layer.condense_factor
        assert int(layer._stage[0]) == factor - 1
        rows = layer._mask.flatten(1)  # [out, in] (1x1 kernels)
        assert set(rows.unique().tolist()) <= {0.0, 1.0}
        for i in range(groups):
            group = rows[i::groups]
            assert torch.equal(group, group[:1].expand_as(group))  # one mask row per group
            assert int(group[0].sum()) == layer.in_channels // factor


def test_recorded_accuracy_and_condensed_predictions(entry, loaded, heldout) -> None:
    from slimdeploy.transforms.condense import condense

    inputs, labels = heldout
    model = loaded.module.eval()
    with torch.no_grad():
        logits = model(inputs)
        deploy = condense(model)
        condensed = deploy(inputs)
    accuracy = float((logits.argmax(1) == labels).float().mean())
    assert accuracy == pytest.approx(entry.accuracy, abs=TOLERANCE)
    assert accuracy >= 0.95
    assert torch.equal(condensed.argmax(1), logits.argmax(1))
    assert torch.allclose(condensed, logits, atol=1e-4)
    assert sum(p.numel() for p in deploy.parameters()) == entry.metrics["params_condensed"]


@pytest.mark.slow
def test_short_training_run_writes_a_condensed_checkpoint(tmp_path) -> None:
    from slimdeploy.loading import load_checkpoint
    from slimdeploy.zoo import INDEX_PATH
    from slimdeploy.zoo.train_condensenet import kept_fraction, train_condensenet_zoo_entry

    index_before = INDEX_PATH.read_bytes()
    lines: list[str] = []
    entry = train_condensenet_zoo_entry(NAME, tmp_path, epochs=1, train_count=192,
                                        progress=lines.append)
    assert INDEX_PATH.read_bytes() == index_before  # an out_dir run leaves zoo.json alone
    assert entry.path == (tmp_path / f"{NAME}.pt").resolve() and entry.path.is_file()
    assert any("epoch   1/1" in line for line in lines)
    loaded = load_checkpoint(entry.path)
    assert kept_fraction(loaded.module) == pytest.approx(0.25)
    assert entry.metrics["same_predictions"] is True
    assert entry.metrics["condensed_accuracy"] == entry.accuracy


def test_schedule_advances_one_stage_at_a_time() -> None:
    from slimdeploy.nn.learned_group_conv import LearnedGroupConv
    from slimdeploy.zoo.train_condensenet import advance_schedule

    torch.manual_seed(0)
    skipped = LearnedGroupConv(16, 8, groups=4, condense_factor=4)
    skipped.condense_step(1.0)  # one call straight to the last stage drops in/C once
    assert int(skipped._mask[0].sum()) == 12
    layer = LearnedGroupConv(16, 8, groups=4, condense_factor=4)
    advance_schedule(layer, 0.1)
    assert int(layer._stage[0]) == 0 and int(layer._mask.sum()) == layer._mask.numel()
    advance_schedule(layer, 1.0)  # stages 1, 2, 3: in/C dropped at each
    assert int(layer._stage[0]) == 3
    assert [int(layer._mask[i].sum()) for i in range(4)] == [4, 4, 4, 4]
