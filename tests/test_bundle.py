"""Bundles: atomic writes, refusal to overwrite, what ``--force`` may replace, the swap that never
leaves the name empty (and its recovery), write errors, sha256 verification.

These are plumbing tests: the graph is a few bytes no runner opens, the manifest the smallest
one the schema accepts. Real exported bundles are attacked in test_adversarial_bundle.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slimdeploy.bundle import MANIFEST, SCHEMA_VERSION, load_bundle, sha256_file, write_bundle
from slimdeploy.bundle import swap as bundle_swap
from slimdeploy.errors import BadInputError, BundleError, OutputExistsError
from tests.conftest import REPO, in_ci

FILES = {"model.onnx": b"graph bytes", "golden.npz": {"input": np.arange(6, dtype=np.float32)}}


def manifest_fields() -> dict[str, Any]:
    """The smallest manifest the schema accepts for FILES (write_bundle adds version and files)."""
    return {
        "created": "2026-01-01T00:00:00Z", "versions": {"slimdeploy": "0.1.0"},
        "model": {"arch": "a", "arch_args": {}, "deployed_arch": "a", "transforms": [], "folds": {}, "family": "f",
                  "dynamic": False, "source": "a.pt", "params": 1, "macs": 1, "graph_macs": 1, "meta": {}},
        "preprocessing": {"input_size": [6], "mean": [0.0], "std": [1.0]},
        "target": "ort", "dynamic": None, "precision": "fp32", "calibration": None, "opset": 18,
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 6]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 2]}],
        "graphs": [{"name": "model", "file": "model.onnx"}],
        "decisions": {"outputs": [], "thresholds": {}}, "gating": {}, "exits": {}, "stages": [],
        "golden": {"file": "golden.npz", "samples": 1, "batch_sizes": [1], "source": "test", "labels": False,
                   "reference": "torch"},
        "tolerances": {"": [1e-4, 1e-3]},
        "parity": {"passed": True, "reference": "torch", "candidate": "onnxruntime", "samples": 1, "batch_sizes": [1],
                   "failures": 0},
        "export": {}, "reference_weights": None,
    }


def test_write_then_load(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "b", FILES, manifest_fields())
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert set(manifest["files"]) == {"model.onnx", "golden.npz"}
    assert manifest["files"]["model.onnx"] == sha256_file(out / "model.onnx")
    bundle = load_bundle(out)
    np.testing.assert_array_equal(bundle.golden()["input"], np.arange(6, dtype=np.float32))
    assert bundle.graph_path("model").read_bytes() == b"graph bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging directory left behind


def test_writer_refuses_an_invalid_manifest_and_paths_outside(tmp_path: Path) -> None:
    fields = manifest_fields()
    fields["golden"]["batch_sizes"] = [0]
    with pytest.raises(BundleError, match=r"golden\.batch_sizes\[0\]"):
        write_bundle(tmp_path / "b", FILES, fields)
    with pytest.raises(BundleError, match="inside the bundle"):
        write_bundle(tmp_path / "c", {**FILES, "../escape.txt": b"x"}, manifest_fields())
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no staging left


def test_existing_directory_refused_and_untouched(tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        write_bundle(out, FILES, manifest_fields())
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "b"
    write_bundle(out, {**FILES, "model.onnx": b"old"}, manifest_fields())
    with pytest.raises(OutputExistsError, match="--force"):  # a bundle too is replaced only when asked
        write_bundle(out, {**FILES, "model.onnx": b"new"}, manifest_fields())
    assert (out / "model.onnx").read_bytes() == b"old"
    write_bundle(out, {**FILES, "model.onnx": b"new"}, manifest_fields(), force=True)
    assert (out / "model.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_bundle(empty, FILES, manifest_fields(), force=True)  # an empty directory may be replaced
    assert load_bundle(empty).graph_path().read_bytes() == b"graph bytes"


@pytest.mark.parametrize("case", ["project", "unlisted-file", "file", "symlink", "cwd", "parent-of-cwd"])
def test_force_replaces_nothing_but_a_bundle(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    if case == "project":  # `--out . --force` inside a project must not delete its sources
        out.mkdir()
        (out / "train.py").write_text("print('mine')\n")
        (out / "manifest.json").write_text("[]")
    elif case == "unlisted-file":  # a bundle the user added a file to
        write_bundle(out, FILES, manifest_fields())
        (out / "notes.txt").write_text("mine")
    elif case == "file":
        out.write_text("mine")
    elif case == "symlink":
        target = tmp_path / "real"
        write_bundle(target, FILES, manifest_fields())
        out.symlink_to(target)
    else:
        write_bundle(out, FILES, manifest_fields())
        monkeypatch.chdir(out)
        if case == "parent-of-cwd":
            (out / "sub").mkdir()
            monkeypatch.chdir(out / "sub")
    before = {p.relative_to(tmp_path): (p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")}
    with pytest.raises(OutputExistsError) as raised:
        write_bundle(out, {**FILES, "model.onnx": b"new"}, manifest_fields(), force=True)
    message = str(raised.value)
    assert "\n" not in message and "Fix:" in message
    after = {p.relative_to(tmp_path): (p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")}
    assert after == before  # nothing lost, nothing added


def test_failure_mid_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    write_bundle(out, {**FILES, "model.onnx": b"old"}, manifest_fields())

    class Boom(dict):
        # Fails after the first file, while the staging directory is being filled.
        def items(self):
            yield "model.onnx", b"new"
            raise RuntimeError("disk full")

        def values(self):
            return [b"new"]

    with pytest.raises(RuntimeError, match="disk full"):
        write_bundle(out, Boom(), manifest_fields(), force=True)
    assert (out / "model.onnx").read_bytes() == b"old"  # the old bundle survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with pytest.raises(RuntimeError):
        write_bundle(tmp_path / "fresh", Boom(), manifest_fields())
    assert not (tmp_path / "fresh").exists()


def test_full_disk_is_exit_2_naming_the_bundle_and_keeps_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "b"
    write_bundle(out, {**FILES, "model.onnx": b"old"}, manifest_fields())
    real = np.savez_compressed

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    with pytest.raises(BadInputError, match=re.escape(f"cannot write '{out}': No space left on device | Fix: free some space")):
        write_bundle(out, {**FILES, "model.onnx": b"new"}, manifest_fields(), force=True)
    monkeypatch.setattr(np, "savez_compressed", real)
    assert load_bundle(out).graph_path().read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_not_enough_free_space_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10))
    with pytest.raises(BadInputError, match="MB are free"):
        write_bundle(tmp_path / "b", FILES, manifest_fields())
    assert list(tmp_path.iterdir()) == []


def test_the_swap_is_atomic_where_linux_offers_it(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a").write_text("1")
    (second / "b").write_text("2")
    if not bundle_swap.exchange(first, second):
        # Linux has offered it since 3.15 on ext4, xfs, btrfs and tmpfs: where CI runs, a False
        # here is a broken exchange (a wrong flag reads as "not offered"), not a missing feature.
        if in_ci() and sys.platform.startswith("linux"):
            pytest.fail("renameat2 RENAME_EXCHANGE failed on Linux under CI")
        pytest.skip("this system or file system offers no renameat2 RENAME_EXCHANGE")
    assert [p.name for p in first.iterdir()] == ["b"] and [p.name for p in second.iterdir()] == ["a"]


# A process replacing a bundle that dies between the fallback's two renames (no exchange).
INTERRUPTED_SWAP = """
import json, os, sys
import numpy as np
from pathlib import Path
from slimdeploy.bundle import swap, writer
from tests.test_bundle import FILES, manifest_fields

swap.exchange = lambda first, second: False
renames = []
real_rename = os.rename

def dying_rename(src, dst):
    renames.append((src, dst))
    if len(renames) == 2:  # the old bundle is aside, the new one not yet in place
        os._exit(9)
    real_rename(src, dst)

swap.os.rename = dying_rename
writer.write_bundle(sys.argv[1], {**FILES, "model.onnx": b"new"}, manifest_fields(), force=True)
"""


def test_interrupted_swap_is_recovered_on_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "b"
    write_bundle(out, {**FILES, "model.onnx": b"old"}, manifest_fields())
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_SWAP, str(out)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert not out.exists()  # the name is empty: the old bundle waits beside it
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith(".b.old-")]
    assert len(aside) == 1
    # The next run (a read here) puts the old bundle back, complete and verified.
    assert load_bundle(out).graph_path().read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.old-")]
    # And a write after another interruption starts from the restored bundle.
    subprocess.run([sys.executable, "-c", INTERRUPTED_SWAP, str(out)], cwd=REPO, capture_output=True, text=True)
    assert not out.exists()
    write_bundle(out, {**FILES, "model.onnx": b"newer"}, manifest_fields(), force=True)
    assert load_bundle(out).graph_path().read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".b.tmp-")) == ["b"]


def test_tampered_file_detected(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "b", FILES, manifest_fields())
    (out / "model.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(out)


def test_missing_file_and_missing_manifest(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "b", FILES, manifest_fields())
    (out / "golden.npz").unlink()
    with pytest.raises(BundleError, match=r"lacks 'golden\.npz'"):
        load_bundle(out)
    (out / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_bundle(out)
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "nowhere")


def test_other_schema_versions_say_what_to_do(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "b", FILES, manifest_fields())
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["schema_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"schema 99, newer than .* \| Fix: upgrade slimdeploy") as raised:
        load_bundle(out)
    assert "re-export" not in str(raised.value)
    manifest["schema_version"] = 0
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"schema 0, older .* \| Fix: re-export"):
        load_bundle(out)


def test_manifest_size_limit_is_exactly_64_mib(tmp_path: Path) -> None:
    """A manifest of 64 MiB is read; one byte more is refused before it is read whole."""
    from slimdeploy.bundle.reader import read_manifest

    limit = 64 << 20
    document = b'{"padded": true}'
    (tmp_path / MANIFEST).write_bytes(document + b" " * (limit - len(document)))
    assert read_manifest(tmp_path) == {"padded": True}
    with open(tmp_path / MANIFEST, "r+b") as handle:  # sparse: no more disk used
        handle.truncate(limit + 1)
    with pytest.raises(BundleError, match="larger than 64 MiB"):
        read_manifest(tmp_path)


def test_thresholds_are_optional_inputs_outside_the_batch(tmp_path: Path) -> None:
    """A threshold input (no batch axis, optional) is neither split into batches nor required
    in the golden file; the image input is both."""
    fields = manifest_fields()
    fields["inputs"].append({"name": "gate_threshold", "dtype": "float32", "shape": [], "optional": True})
    bundle = load_bundle(write_bundle(tmp_path / "b", FILES, fields))
    assert bundle.input_names == ["input", "gate_threshold"] and bundle.batch_inputs == ["input"]
    assert set(bundle.golden()) == {"input"}
    fields["inputs"][1]["optional"] = False
    required = load_bundle(write_bundle(tmp_path / "c", FILES, fields))
    with pytest.raises(BundleError, match=r"lacks the input array\(s\) \['gate_threshold'\]"):
        required.golden()


@pytest.mark.parametrize(("code", "outcome"), [
    (None, False),                 # no renameat2 in the C library
    (errno.ENOSYS, False),         # the kernel lacks it
    (errno.EINVAL, False),         # the file system lacks RENAME_EXCHANGE
    (errno.EACCES, OSError),       # any other failure is an error, not "not offered"
])
def test_exchange_reports_what_the_system_lacks_and_raises_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int | None, outcome: Any) -> None:
    class FakeLibc:
        @property
        def renameat2(self) -> Any:
            if code is None:
                raise AttributeError("renameat2")
            return lambda *args: -1

    monkeypatch.setattr(bundle_swap.sys, "platform", "linux")
    monkeypatch.setattr(bundle_swap.ctypes, "CDLL", lambda *args, **kwargs: FakeLibc())
    monkeypatch.setattr(bundle_swap.ctypes, "get_errno", lambda: code)
    if outcome is OSError:
        with pytest.raises(OSError) as caught:
            bundle_swap.exchange(tmp_path / "a", tmp_path / "b")
        assert caught.value.errno == code
    else:
        assert bundle_swap.exchange(tmp_path / "a", tmp_path / "b") is False
