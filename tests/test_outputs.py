"""Outputs that lose nothing (issue 12 part 6): ``--force`` replaces only a slimdeploy bundle; the
output location of every command that writes (export, build, run --out, --json, --junit,
bench --plot, zoo train --out-dir) is checked before the long work; every write error is exit
2 naming the path, with nothing half-written and nothing lost.

Tests run as root here, where permission bits do not stop a write, so a read-only folder and a
full disk are simulated the way the system reports them: a ``sitecustomize`` makes creating
anything under one folder fail with EROFS, and writing any byte to files under another fail
with ENOSPC (the files themselves can still be created, as on a disk that just filled up).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slimdeploy.bundle import load_bundle
from slimdeploy.errors import BadInputError
from tests.conftest import REPO, assert_one_line_error, run_cli, snapshot

FAULTS = '''
import builtins, errno, io, os

READ_ONLY = os.environ.get("SLIMDEPLOY_TEST_READ_ONLY")
FULL = os.environ.get("SLIMDEPLOY_TEST_FULL")


def _under(path, root):
    try:
        return bool(root) and os.path.abspath(os.fsdecode(path)).startswith(root.rstrip("/") + "/")
    except TypeError:  # a file descriptor
        return False


def _refuse(path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))


_os_open, _os_mkdir = os.open, os.mkdir


def _open(path, flags, *args, **kwargs):
    if flags & os.O_CREAT and _under(path, READ_ONLY):
        _refuse(path)
    return _os_open(path, flags, *args, **kwargs)


def _mkdir(path, *args, **kwargs):
    if _under(path, READ_ONLY):
        _refuse(path)
    return _os_mkdir(path, *args, **kwargs)


class _FullDisk:
    """A file on a full disk: it opens, but no byte can be written."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


_builtin_open = builtins.open


def _file(file, mode="r", *args, **kwargs):
    writing = any(flag in mode for flag in "wax+")
    if writing and _under(file, READ_ONLY):
        _refuse(file)
    handle = _builtin_open(file, mode, *args, **kwargs)
    if writing and _under(file, FULL):
        return _FullDisk(handle)
    return handle


os.open, os.mkdir = _open, _mkdir
builtins.open = io.open = _file

if os.environ.get("SLIMDEPLOY_TEST_FREE_BYTES"):  # a nearly full disk, as disk_usage reports it
    import shutil

    _usage = shutil.disk_usage
    shutil.disk_usage = lambda path: _usage(path)._replace(free=int(os.environ["SLIMDEPLOY_TEST_FREE_BYTES"]))
'''


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The simulation: a read-only folder, a full folder, and the environment that applies them."""
    root = tmp_path_factory.mktemp("faults")
    site, read_only, full = root / "site", root / "read-only", root / "full"
    for folder in (site, read_only, full):
        folder.mkdir()
    (site / "sitecustomize.py").write_text(FAULTS)
    path = f"{site}:{REPO / 'tests' / 'fakes'}:{REPO}"
    env = {"PYTHONPATH": path, "SLIMDEPLOY_TEST_READ_ONLY": str(read_only), "SLIMDEPLOY_TEST_FULL": str(full)}
    return {"env": env, "read_only": read_only, "full": full}


@pytest.fixture
def inputs(tmp_path: Path, exported_bundle: Path) -> Path:
    with np.load(exported_bundle / "golden.npz") as golden:
        np.savez(tmp_path / "in.npz", input=golden["input"][:2])
    return tmp_path / "in.npz"


def test_the_simulation_really_fails_writes(faults: dict[str, Any]) -> None:
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; p = Path(sys.argv[1]) / 'x'\n"
            "try:\n    p.write_text('x')\nexcept OSError as e:\n    print(e.errno)\n")
    for folder, code_expected in ((faults["read_only"], errno.EROFS), (faults["full"], errno.ENOSPC)):
        result = subprocess.run([sys.executable, "-c", code, str(folder)], env={**os.environ, **faults["env"]},
                                capture_output=True, text=True)
        assert result.stdout.strip() == str(code_expected), result.stderr


# -- --force replaces only a bundle ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["dot-in-a-project", "project-dir", "file", "home"])
def test_force_never_replaces_what_slimdeploy_did_not_make(tmp_path: Path, case: str) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "model.py").write_text("weights = 1\n")
    (project / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    cwd, out, env = tmp_path, str(project), None
    if case == "dot-in-a-project":
        cwd, out = project, "."
    elif case == "file":
        out = str(project / "pyproject.toml")
    elif case == "home":
        env = {"HOME": str(project)}
    before = snapshot(tmp_path)
    result = run_cli("export", "zoo:spconv_resnet20_digits", "--out", out, "--force", env=env, cwd=cwd)
    fragment = {"dot-in-a-project": "current directory", "file": "not a directory", "home": "home folder"}.get(
        case, "not a slimdeploy bundle")
    assert_one_line_error(result, 2, fragment)
    assert "loading checkpoint" not in result.stderr  # refused before any work
    assert snapshot(tmp_path) == before


# -- read-only folders: refused before the long work -------------------------------------------------
def _read_only_cases(ro: Path, bundle: Path, inputs: Path) -> dict[str, list[str]]:
    return {
        "export": ["export", "zoo:spconv_resnet20_digits", "--out", str(ro / "bundle")],
        "run --out": ["run", str(bundle), "--inputs", str(inputs), "--out", str(ro / "out.npz")],
        "check --json": ["check", str(bundle), "--json", str(ro / "report.json")],
        "check --junit": ["check", str(bundle), "--junit", str(ro / "report.xml")],
        "bench --plot": ["bench", str(bundle), "--sweep", "default", "--plot", str(ro / "sweep.png")],
        "inspect --json": ["inspect", str(bundle), "--json", str(ro / "info.json")],
        "zoo train --out-dir": ["zoo", "train", "spconv_resnet20_digits", "--out-dir", str(ro / "checkpoints")],
    }


@pytest.mark.parametrize("command", ["export", "run --out", "check --json", "check --junit", "bench --plot",
                                     "inspect --json", "zoo train --out-dir"])
def test_read_only_output_is_refused_before_the_work(faults: dict[str, Any], exported_bundle: Path, inputs: Path,
                                                     command: str) -> None:
    ro = faults["read_only"]
    args = _read_only_cases(ro, exported_bundle, inputs)[command]
    result = run_cli(*args, env=faults["env"])
    assert_one_line_error(result, 2, f"cannot write '{ro}", "Read-only file system", "write somewhere else")
    assert result.stdout == ""  # nothing ran: no table, no report
    assert "loading checkpoint" not in result.stderr and "epoch" not in result.stderr
    assert list(ro.iterdir()) == []


def test_build_refuses_a_bundle_in_a_read_only_folder_before_building(faults: dict[str, Any], exported_bundle: Path,
                                                                     tmp_path: Path) -> None:
    # The bundle is made outside the simulation, then "mounted" read-only by moving it there.
    bundle = faults["read_only"] / "bundle"
    shutil.copytree(exported_bundle, bundle)
    try:
        before = snapshot(bundle)
        result = run_cli("build", str(bundle), env=faults["env"])
        assert_one_line_error(result, 2, f"cannot write '{bundle}", "Read-only file system")
        assert "building engine" not in result.stderr
        assert snapshot(bundle) == before
    finally:
        shutil.rmtree(bundle)


# -- missing folders ------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--json", "--junit", "run --out", "bench --plot"])
def test_missing_folder_of_a_result_file(tmp_path: Path, exported_bundle: Path, inputs: Path, option: str) -> None:
    target = tmp_path / "missing" / "result"
    args = {
        "--json": ["check", str(exported_bundle), "--json", str(target)],
        "--junit": ["check", str(exported_bundle), "--junit", str(target)],
        "run --out": ["run", str(exported_bundle), "--inputs", str(inputs), "--out", str(target)],
        "bench --plot": ["bench", str(exported_bundle), "--sweep", "default", "--plot", str(target)],
    }[option]
    result = run_cli(*args)
    assert_one_line_error(result, 2, f"cannot write '{target}'", f"the folder '{target.parent}' does not exist", "create it first")
    assert result.stdout == "" and not target.parent.exists()


def test_result_file_that_is_a_folder(tmp_path: Path, exported_bundle: Path, inputs: Path) -> None:
    result = run_cli("run", str(exported_bundle), "--inputs", str(inputs), "--out", str(tmp_path), "--force")
    assert_one_line_error(result, 2, "is a folder")
    result = run_cli("check", str(exported_bundle), "--json", str(tmp_path))
    assert_one_line_error(result, 2, "--json", "is a folder")


# -- full disks: exit 2, nothing half-written, nothing lost --------------------------------------------
@pytest.mark.parametrize("option", ["run --out", "check --json", "check --junit"])
def test_full_disk_while_writing_a_result(faults: dict[str, Any], exported_bundle: Path, inputs: Path, option: str) -> None:
    full = faults["full"] / option.replace(" ", "_").replace("-", "")
    full.mkdir()
    (full / "result").write_bytes(b"the previous result")
    args = {
        "run --out": ["run", str(exported_bundle), "--inputs", str(inputs), "--out", str(full / "result"), "--force"],
        "check --json": ["check", str(exported_bundle), "--json", str(full / "result")],
        "check --junit": ["check", str(exported_bundle), "--junit", str(full / "result")],
    }[option]
    result = run_cli(*args, env=faults["env"])
    assert_one_line_error(result, 2, f"cannot write '{full / 'result'}'", "No space left on device", "free some space")
    assert [p.name for p in full.iterdir()] == ["result"]  # no temporary file left
    assert (full / "result").read_bytes() == b"the previous result"


@pytest.mark.slow
def test_full_disk_during_export_keeps_the_old_bundle(faults: dict[str, Any], exported_bundle: Path) -> None:
    full = faults["full"] / "export"
    full.mkdir()
    shutil.copytree(exported_bundle, full / "bundle")
    before = snapshot(full)
    result = run_cli("export", "zoo:spconv_resnet20_digits", "--out", str(full / "bundle"), "--force", "--samples", "8",
                     "--batch-sizes", "1", env=faults["env"])
    assert_one_line_error(result, 2, f"cannot write '{full / 'bundle'}'", "No space left on device")
    assert snapshot(full) == before  # the old bundle, untouched; no staging directory left
    load_bundle(full / "bundle")


def test_export_to_a_nearly_full_disk_is_refused_before_the_work(faults: dict[str, Any], tmp_path: Path) -> None:
    result = run_cli("export", "zoo:spconv_resnet20_digits", "--out", str(tmp_path / "bundle"),
                     env={**faults["env"], "SLIMDEPLOY_TEST_FREE_BYTES": "100000"})
    assert_one_line_error(result, 2, f"cannot write '{tmp_path / 'bundle'}'", "0.1 MB are free", "free some space")
    assert "loading checkpoint" not in result.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_full_disk_during_build_keeps_the_bundle(faults: dict[str, Any], exported_bundle: Path) -> None:
    full = faults["full"] / "build"
    full.mkdir()
    shutil.copytree(exported_bundle, full / "bundle")
    before = snapshot(full)
    result = run_cli("build", str(full / "bundle"), env=faults["env"])  # the stand-in TensorRT of tests/fakes
    assert_one_line_error(result, 2, f"cannot write '{full / 'bundle'}'", "No space left on device")
    assert snapshot(full) == before
    load_bundle(full / "bundle")


def test_full_disk_while_drawing_a_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from slimdeploy.bench import SweepPoint, plot_sweep

    points = [SweepPoint(thresholds=[t, 0.0], exit_share_per_stage=[t, 1 - t], macs_average=1e6 * (2 - t), accuracy=0.9,
                         latency_ms=1.0, batch_size=1) for t in (0.2, 0.8)]
    assert plot_sweep(points, tmp_path / "ok.png").read_bytes()[:4] == b"\x89PNG"

    def full_disk(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(BadInputError, match=r"cannot write .*sweep\.png.: No space left on device"):
        plot_sweep(points, tmp_path / "sweep.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]


def test_full_disk_while_saving_a_trained_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from slimdeploy.loading import Preprocessing
    from slimdeploy.zoo import train

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)  # torch's C++ writer reports a failed write so
    with pytest.raises(BadInputError, match=r"cannot write .*net\.pt.*file write failed"):
        train.save_zoo_checkpoint(tmp_path / "ckpt" / "net.pt", torch.nn.Linear(2, 2), "mobilenet_v1", {},
                                  Preprocessing((3, 32, 32), (0.0,) * 3, (1.0,) * 3), {})
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_json_results_still_go_to_stdout(exported_bundle: Path) -> None:
    result = run_cli("inspect", str(exported_bundle), "--json", "-")
    assert result.returncode == 0 and json.loads(result.stdout)["kind"] == "bundle"
