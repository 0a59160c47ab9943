"""Shared fixtures: small checkpoints in every supported format, an exported bundle, and a
``run_cli`` helper that runs the real command line in a subprocess (real exit codes, real
stderr, so "no traceback" can be asserted).

Test data files (``tests/fixtures/``) are reached through ``require_fixture`` or the
``needs_fixture`` marker: a missing file skips the test on a developer's machine but fails it
where the ``CI`` environment variable is set, so that a moved fixture cannot leave CI green
without the tests that need it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Tests run small tensors, where a second intra-op thread costs more than it saves (and CI
    machines have two cores shared with ONNX Runtime)."""
    import torch

    torch.set_num_threads(1)


UPSTREAM = REPO / "tests" / "fixtures" / "upstream"
"""Checkpoints, inputs and reference outputs made by the official SkipNet and CondenseNet code
(``tests/fixtures/upstream/README.md``)."""


def in_ci() -> bool:
    """True when the ``CI`` environment variable is set to anything but "", "0" or "false"."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def require_fixture(path: Path) -> Path:
    """``path`` when it exists. When it does not, the calling test fails under CI (``in_ci``)
    and is skipped elsewhere, with a message naming the missing file."""
    if path.exists():
        return path
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    if in_ci():
        pytest.fail(f"test fixture {shown} is missing; CI is set, where every test that needs a "
                    "fixture must run (restore the file, see tests/fixtures/upstream/README.md)", pytrace=False)
    pytest.skip(f"test fixture {shown} is missing")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_fixture(*paths): the test reads these fixture files or "
                            "folders (require_fixture: fails under CI when one is missing, skips elsewhere)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply ``@pytest.mark.needs_fixture(path, ...)`` before the test and its fixtures run."""
    for marker in item.iter_markers("needs_fixture"):
        for path in marker.args:
            require_fixture(Path(path))


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m slimdeploy ARGS`` and return the completed process (text output)."""
    base = {key: value for key, value in os.environ.items() if key != "SLIMDEPLOY_DEBUG"}
    full_env = {**base, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "slimdeploy", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=600,
    )


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """The process exited with ``code``, printed one error line naming ``fragments``, and no
    traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """``assert_clean_error``, and the error is one line that says how to fix it."""
    assert_clean_error(result, code, *fragments)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Fix:" in lines[0], result.stderr


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` (files by content, links by target, folders): what a test
    compares to show that nothing was written, changed or removed."""
    found: dict[str, object] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(directory) / name
            key = str(path.relative_to(root))
            found[key] = ("link", os.readlink(path)) if path.is_symlink() else (path.read_bytes() if path.is_file() else "dir")
    return found


@pytest.fixture(scope="session")
def zoo_resnet_checkpoint() -> Path:
    """The shipped trained SPConv ResNet-20 demo checkpoint."""
    from slimdeploy.zoo import zoo_checkpoint_path

    return zoo_checkpoint_path("spconv_resnet20_digits")


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory: pytest.TempPathFactory, zoo_resnet_checkpoint: Path) -> Path:
    """One bundle of the trained SPConv ResNet-20, exported once for the whole session."""
    from slimdeploy.export import export

    out = tmp_path_factory.mktemp("bundles") / "resnet20"
    result = export(zoo_resnet_checkpoint, out, samples=16, batch_sizes=(1, 8))
    assert result.passed
    return out


DIGITS_FOLDER_IMAGES = 240
"""Images in ``digits_image_folder``: enough for several shards, few enough for a fast test."""
DIGITS_FOLDER_SHARD = 60
"""Shard size of the dataset tests on ``digits_image_folder`` (four shards)."""


@pytest.fixture(scope="session")
def digits_image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ``DIGITS_FOLDER_IMAGES`` images of the digits held-out split as an image folder:
    8x8 grey PNGs under one sub-folder per class (``0``..``9``), as torchvision's ImageFolder reads."""
    import numpy as np
    from PIL import Image

    from slimdeploy.data import digits_split

    root = tmp_path_factory.mktemp("datasets") / "digits"
    grey, labels = digits_split("heldout")
    for index, (image, label) in enumerate(zip(grey[:DIGITS_FOLDER_IMAGES], labels[:DIGITS_FOLDER_IMAGES])):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / f"{index:05d}.png")
    return root


@pytest.fixture(scope="session")
def digits_references(tmp_path_factory: pytest.TempPathFactory, exported_bundle: Path, digits_image_folder: Path) -> Path:
    """Reference shards of ``digits_image_folder`` for ``exported_bundle`` (``slimdeploy
    reference``), so that dataset checks run without torch in their workers."""
    from slimdeploy.dataset import DatasetOptions, write_references

    out = tmp_path_factory.mktemp("references") / "digits"
    summary = write_references(exported_bundle, str(digits_image_folder), out, DatasetOptions(shard_size=DIGITS_FOLDER_SHARD))
    assert summary.samples == DIGITS_FOLDER_IMAGES
    return out


def folder_inputs(folder: Path, input_size: tuple[int, int, int], mean: Any, std: Any) -> tuple[Any, Any]:
    """The folder's images read here with Pillow and prepared as the digits are (not through
    ``slimdeploy.dataset``), in ImageFolder order, with their labels."""
    import numpy as np
    from PIL import Image

    from slimdeploy.data import prepare_images

    classes = sorted(p.name for p in folder.iterdir())
    files = [(path, label) for label, name in enumerate(classes) for path in sorted((folder / name).iterdir())]
    grey = np.stack([np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0 for path, _ in files])
    return prepare_images(grey, input_size, mean, std), np.asarray([label for _, label in files], dtype=np.int64)
