"""The zoo: shipped checkpoints exist, load, and reproduce their recorded held-out accuracy;
``zoo_listing()`` covers every architecture and checkpoint; unknown names fail helpfully."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slimdeploy.errors import BadInputError
from slimdeploy.zoo import (
    INDEX_PATH,
    LISTING_KEYS,
    UnknownZooEntryError,
    get_zoo_entry,
    list_zoo,
    zoo_checkpoint_path,
    zoo_listing,
)

MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024
ENTRIES = list_zoo()
ENTRY_NAMES = [e.name for e in ENTRIES]


def test_zoo_ships_the_demo_checkpoints() -> None:
    assert {"spconv_resnet20_digits", "mobilenet_v1_digits"} <= set(ENTRY_NAMES)


def test_index_is_a_list_of_complete_entries() -> None:
    data = json.loads(INDEX_PATH.read_text(encoding="utf-8"))
    assert isinstance(data, list)
    required = {"name", "arch", "arch_args", "checkpoint", "dataset", "accuracy", "params",
                "train_command", "description"}
    for item in data:
        assert required <= set(item), item.get("name")
        # Ten classes: chance is 0.1; every shipped demo is trained to the high nineties.
        assert item["accuracy"] >= 0.95, (item["name"], item["accuracy"])
        assert item["dataset"] == "digits"
    assert len({item["name"] for item in data}) == len(data)


@pytest.mark.parametrize("name", ENTRY_NAMES)
def test_checkpoint_file_exists_and_is_small(name: str) -> None:
    path = zoo_checkpoint_path(name)
    assert path.is_absolute()
    assert path.is_file()
    assert path.stat().st_size < MAX_CHECKPOINT_BYTES


@pytest.mark.parametrize("name", ENTRY_NAMES)
def test_checkpoint_loads_and_reproduces_accuracy(name: str) -> None:
    torch = pytest.importorskip("torch")
    from slimdeploy.data import digits_inputs
    from slimdeploy.loading import load_checkpoint, read_checkpoint
    from slimdeploy.models.registry import get_arch

    entry = get_zoo_entry(name)
    # Tensors and plain containers only: loadable with weights_only=True.
    raw = read_checkpoint(entry.path)
    assert raw["format"] == "slimdeploy.checkpoint"
    assert raw["meta"]["dataset"] == "digits"
    assert raw["meta"]["accuracy"] == pytest.approx(entry.accuracy)
    floats = [v for v in raw["state_dict"].values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 for v in floats)

    loaded = load_checkpoint(entry.path)
    assert loaded.arch == entry.arch == get_arch(entry.arch).name
    assert loaded.arch_args == entry.arch_args
    assert isinstance(loaded.module, type(get_arch(entry.arch).build(**entry.arch_args)))
    assert sum(p.numel() for p in loaded.module.parameters()) == entry.params
    assert list(loaded.preprocessing.input_size) == entry.input_size

    pre = loaded.preprocessing
    inputs, labels = digits_inputs("heldout", pre.input_size, pre.mean, pre.std)
    assert len(labels) == 500
    with torch.no_grad():
        output = loaded.module(torch.from_numpy(inputs))
    # Gated and early-exit models return a tuple or dict whose first entry / "logits" is the answer.
    logits = output["logits"] if isinstance(output, dict) else output
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    predicted = logits.argmax(1).numpy()
    accuracy = float((predicted == labels).mean())
    assert accuracy == pytest.approx(entry.accuracy, abs=0.005)


def test_listing_covers_architectures_and_checkpoints() -> None:
    pytest.importorskip("torch")
    from slimdeploy.models.registry import list_models

    rows = zoo_listing()
    for row in rows:
        assert set(LISTING_KEYS) <= set(row), row["name"]
    json.dumps(rows)  # the `zoo list --json -` contract: plain JSON values only

    architectures = {r["name"]: r for r in rows if r["kind"] == "architecture"}
    checkpoints = {r["name"]: r for r in rows if r["kind"] == "checkpoint"}
    assert set(architectures) == set(list_models())
    assert set(checkpoints) == set(ENTRY_NAMES)
    for row in architectures.values():
        assert row["checkpoint"] is None
        assert row["dataset"] is None
        assert row["accuracy"] is None
        assert row["family"]
    for name, row in checkpoints.items():
        assert row["checkpoint"] == str(zoo_checkpoint_path(name))
        assert row["dataset"] == "digits"
        assert row["accuracy"] == get_zoo_entry(name).accuracy
        assert row["arch"] in architectures
        assert row["family"] == architectures[row["arch"]]["family"]


def test_listing_and_import_work_without_torch() -> None:
    # Block torch's import in a fresh interpreter: the zoo lists its checkpoints regardless.
    code = (
        "import sys, json\n"
        "sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
        "import slimdeploy.zoo as z\n"
        "rows = z.zoo_listing()\n"
        "assert rows and all(r['kind'] == 'checkpoint' for r in rows), rows\n"
        "assert all(r['family'] for r in rows)\n"
        "print(json.dumps([r['name'] for r in rows]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == set(ENTRY_NAMES)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownZooEntryError, match="did you mean spconv_resnet20_digits") as info:
        zoo_checkpoint_path("spconv_resnet20_digit")
    assert isinstance(info.value, BadInputError)
    assert info.value.exit_code == 2
    assert "zoo list" in str(info.value)


def test_architecture_name_points_at_its_checkpoints() -> None:
    with pytest.raises(UnknownZooEntryError, match="mobilenet_v1_digits"):
        zoo_checkpoint_path("mobilenet_v1")


def test_train_unknown_recipe_raises() -> None:
    pytest.importorskip("torch")
    from slimdeploy.zoo.train import train_zoo_entry

    with pytest.raises(UnknownZooEntryError, match="did you mean mobilenet_v1_digits"):
        train_zoo_entry("mobilenet_v1_digit")


def test_every_entry_has_a_recipe() -> None:
    pytest.importorskip("torch")
    from slimdeploy.zoo.train import RECIPES
    from slimdeploy.zoo.training import recipe_command

    try:  # gated entries (SkipNet) are trained by their own module, with their own recipes
        from slimdeploy.zoo.train_gated import GATED_RECIPES
    except ImportError:
        GATED_RECIPES = {}  # noqa: N806
    try:  # CondenseNets too (condensation schedule and group lasso)
        from slimdeploy.zoo.train_condensenet import CONDENSE_RECIPES
    except ImportError:
        CONDENSE_RECIPES = {}  # noqa: N806
    try:  # S2D early-exit networks (multi-exit loss, thresholds chosen after training)
        from slimdeploy.zoo.train_s2d import S2D_RECIPES
    except ImportError:
        S2D_RECIPES = {}  # noqa: N806
    for entry in ENTRIES:
        assert entry.name in RECIPES or entry.name in GATED_RECIPES \
            or entry.name in CONDENSE_RECIPES or entry.name in S2D_RECIPES, entry.name
        if entry.name in RECIPES:
            recipe = RECIPES[entry.name]
            assert recipe.arch == entry.arch
            assert dict(recipe.arch_args) == entry.arch_args
            assert entry.train_command == recipe_command(entry.name)


@pytest.mark.slow
def test_train_demo_writes_a_loadable_checkpoint(tmp_path) -> None:
    pytest.importorskip("torch")
    from slimdeploy.loading import load_checkpoint
    from slimdeploy.zoo.train import train_demo
    from slimdeploy.zoo.training import TrainSettings

    lines: list[str] = []
    args = {"num_classes": 10, "width_mult": 0.25, "resolution": 32}
    # 8 epochs on 512 images: enough to learn (0.90 held-out accuracy when written; chance is 0.1).
    result = train_demo("mobilenet_v1", args, tmp_path / "sub" / "tiny.pt", epochs=8, seed=0,
                        settings=TrainSettings(batch_size=32), train_count=512,
                        train_command="test", progress=lines.append)
    assert len(lines) == 9 and lines[0].startswith("epoch   1/8")
    assert result.path.is_file()
    assert result.accuracy >= 0.6
    loaded = load_checkpoint(result.path)
    assert loaded.arch == "mobilenet_v1"
    assert loaded.arch_args == args
    assert loaded.meta["epochs"] == 8
    assert loaded.meta["train_images"] == 512
    assert loaded.meta["accuracy"] == result.accuracy
    assert list(tmp_path.joinpath("sub").iterdir()) == [result.path]  # no temporary left behind


@pytest.mark.slow
def test_train_zoo_entry_to_out_dir_leaves_index_alone(tmp_path) -> None:
    pytest.importorskip("torch")
    from slimdeploy.zoo.train import train_zoo_entry

    before = INDEX_PATH.read_bytes()
    entry = train_zoo_entry("mobilenet_v1_digits", tmp_path, epochs=1, progress=None)
    assert INDEX_PATH.read_bytes() == before
    assert entry.path == (tmp_path / "mobilenet_v1_digits.pt").resolve()
    assert entry.path.is_file()
    assert entry.train_command.endswith("--epochs 1")
