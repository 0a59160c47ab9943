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


LONGEST_FIRST = [
    "test_trt_cpu", "test_own_network_cli", "test_precision_export", "test_benchmarks_precision",
    "test_gated_forms", "test_gated_cli", "test_cli", "test_s2d_cli", "test_adversarial_inputs",
    "test_benchmarks_loop", "test_benchmarks", "test_benchmarks_condensenet", "test_examples",
    "test_condensenet_cli", "test_trt_lint", "test_bias_correction", "test_readme", "test_spconv_fold", "test_s2d",
    "test_adversarial_bundle", "test_models", "test_skipnet", "test_outputs", "test_foreign_checkpoints",
]
"""Test files that take longest (``pytest --durations=0``, 2026-12-05), longest first. xdist
hands whole files to its workers in collection order (``--no-loadscope-reorder`` in
pyproject.toml), so these start first and the workers finish together instead of one worker
running a long file alone at the end."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the ``LONGEST_FIRST`` files first, in that order, then the rest as collected."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a file kept


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply ``@pytest.mark.needs_fixture(path, ...)`` before the test and its fixtures run."""
    for marker in item.iter_markers("needs_fixture"):
        for path in marker.args:
            require_fixture(Path(path))


CLI_TIMEOUT_S = 600
"""Seconds a command may run before ``run_cli`` stops it (a hang is a failure, not a wait)."""


def _cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment commands run in: the test's, wide output without colour, no debug traces."""
    base = {key: value for key, value in os.environ.items() if key != "SLIMDEPLOY_DEBUG"}
    return {**base, "COLUMNS": "200", "NO_COLOR": "1", **(extra or {})}


def _without_test_name(env: dict[str, str]) -> dict[str, str]:
    """``env`` less the variable pytest sets to the running test's name."""
    return {key: value for key, value in env.items() if key != "PYTEST_CURRENT_TEST"}


class _WarmCli:
    """One ``tests/cli_zygote.py`` process per test worker: it imports torch and slimdeploy once
    and forks a child per command (a real process, with its own exit code and output)."""

    def __init__(self) -> None:
        env = _cli_env()
        self.imported_under = _without_test_name(env)
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_zygote.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)

    def serves(self, env: dict[str, str]) -> bool:
        """True when ``env`` is the one this process imported under (module-level settings such
        as the consoles' width were read then); the test's name may differ."""
        return _without_test_name(env) == self.imported_under

    def run(self, args: tuple[str, ...], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
        import json
        import signal
        import tempfile
        import threading

        assert self.process.stdin is not None and self.process.stdout is not None
        with tempfile.TemporaryDirectory(prefix="slimdeploy-cli-") as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {"args": list(args), "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = json.loads(self.process.stdout.readline())["pid"]
            fired = threading.Event()

            def stop() -> None:
                fired.set()
                os.kill(pid, signal.SIGKILL)

            watchdog = threading.Timer(CLI_TIMEOUT_S, stop)
            watchdog.start()
            try:
                code = json.loads(self.process.stdout.readline())["code"]
            finally:
                watchdog.cancel()
            if fired.is_set():
                raise subprocess.TimeoutExpired(["slimdeploy", *args], CLI_TIMEOUT_S)
            stdout, stderr = (path.read_text(errors="replace") for path in (out, err))
        return subprocess.CompletedProcess([sys.executable, "-m", "slimdeploy", *args], code, stdout, stderr)


_warm_cli: list[_WarmCli] = []


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m slimdeploy ARGS`` and return the completed process (text output).

    Commands in the suite's own environment are forked from a warm parent (``_WarmCli``; the
    imports are paid once per worker); one with ``env`` changes, or run while the test has
    changed the environment the parent started in, runs as a plain subprocess."""
    full_env = _cli_env(env)
    if not env:
        if not _warm_cli or _warm_cli[0].process.poll() is not None:
            _warm_cli[:] = [_WarmCli()]
        if _warm_cli[0].serves(full_env):
            return _warm_cli[0].run(args, full_env, cwd or REPO)
    return subprocess.run(
        [sys.executable, "-m", "slimdeploy", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=CLI_TIMEOUT_S,
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


class SharedBundles:
    """Zoo bundles exported once per test run and shared by every test file and every xdist
    worker: several files read the same bundle (the demo SkipNet's staged form, the SPConv
    baseline, ...), and an export costs 5-30 s of ``torch.export``.

    ``get(name, **options)`` returns the bundle ``export(zoo_checkpoint_path(name), out,
    **options)`` wrote, made by whichever worker asks first (a file lock keeps the others
    waiting). A test must not change a shared bundle: copy it first (``shutil.copytree``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, name: str, **options: Any) -> Path:
        """The passed export of zoo model ``name`` with ``options`` (keyword arguments of
        ``slimdeploy.export.export``), made now if no worker has made it yet."""
        import hashlib

        from filelock import FileLock

        # The export's own timings stay off unless asked: they are tested where they are the
        # subject (test_precision_speed.py, test_runtime_choice.py), and a shared bundle must
        # run on ONNX Runtime by default whichever extras (OpenVINO) this machine has.
        options = {"speed_check": False, **options}
        key = hashlib.sha256(repr((name, sorted(options.items()))).encode()).hexdigest()[:16]
        out, done = self.root / f"{name}-{key}", self.root / f"{name}-{key}.done"
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{name}-{key}.lock")):
            if not done.exists():
                import shutil

                from slimdeploy.export import export
                from slimdeploy.zoo import zoo_checkpoint_path

                shutil.rmtree(out, ignore_errors=True)  # a failed attempt's files: start clean
                result = export(zoo_checkpoint_path(name), out, **options)
                assert result.passed, (name, options)
                done.touch()  # only a passed, complete export is reused
        return out


@pytest.fixture(scope="session")
def shared_bundles(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> SharedBundles:
    """The run's ``SharedBundles``: under xdist in the folder all workers of this run share
    (the parent of each worker's own base folder), else in this session's base folder."""
    base = tmp_path_factory.getbasetemp()
    return SharedBundles((base.parent if worker_id != "master" else base) / "shared-bundles")


DEMO_EXPORT = {"samples": 8, "batch_sizes": (1, 4), "threads": 1}
"""The export options of the shared demo bundles: few samples, two batch sizes, one thread
(two xdist workers share two cores)."""


@pytest.fixture(scope="session")
def exported_bundle(shared_bundles: SharedBundles) -> Path:
    """One bundle of the trained SPConv ResNet-20 (shipped demo), exported once for the whole
    run; tests that change it copy it first."""
    return shared_bundles.get("spconv_resnet20_digits", samples=16, batch_sizes=(1, 8))


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
