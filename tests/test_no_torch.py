"""The runtime side runs where torch cannot be imported, as on the edge images.

A ``sitecustomize`` placed first on PYTHONPATH installs an import hook that refuses torch (and
tensorrt), then the real CLI runs ``check``, ``run``, ``bench``, ``inspect`` and ``env``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (
    DIGITS_FOLDER_IMAGES,
    REPO,
    assert_clean_error,
    assert_one_line_error,
    run_cli,
)

BLOCKER = '''
import sys

class _Refuse:
    """Import hook: these modules are not installed on the edge image."""

    BLOCKED = ("torch", "tensorrt", "cuda", "onnxscript", "onnxslim", "sklearn")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"No module named '{name}' (blocked by the no-torch test)")
        return None

sys.meta_path.insert(0, _Refuse())
'''


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("notorch")
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": f"{site}:{REPO}"}


def test_blocker_really_blocks(no_torch_env: dict[str, str]) -> None:
    import os

    result = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, **no_torch_env},
                            capture_output=True, text=True)
    assert result.returncode != 0 and "blocked" in result.stderr


def test_runtime_modules_import_without_torch(no_torch_env: dict[str, str]) -> None:
    import os

    code = (
        "import sys, slimdeploy, slimdeploy.cli, slimdeploy.engines, slimdeploy.bundle, slimdeploy.parity, "
        "slimdeploy.bench, slimdeploy.describe, slimdeploy.exporters, slimdeploy.export, slimdeploy.loading, "
        "slimdeploy.models.registry, slimdeploy.zoo, slimdeploy.build, slimdeploy.engines.trt_runner, "
        "slimdeploy.engines.trt_build, slimdeploy.dataset, slimdeploy.dataset.job, slimdeploy.dataset.references, "
        "slimdeploy.dataset.progress;"
        "bad = [m for m in ('torch', 'tensorrt', 'onnxslim') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **no_torch_env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_run_bench_inspect_without_torch(tmp_path: Path, exported_bundle: Path, no_torch_env: dict[str, str]) -> None:
    result = run_cli("check", str(exported_bundle), "--json", "-", env=no_torch_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["passed"] is True

    with np.load(exported_bundle / "golden.npz") as golden:
        np.savez(tmp_path / "in.npz", input=golden["input"][:2])
    result = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "o.npz"), env=no_torch_env)
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "o.npz")["logits"].shape == (2, 10)

    result = run_cli("bench", str(exported_bundle), "--batch", "1", "--warmup", "1", "--iterations", "3", "--json", "-", env=no_torch_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["runner"] for r in report["results"]] == ["onnxruntime"]
    assert "not timed" in report["notes"][0]

    result = run_cli("inspect", str(exported_bundle), "--json", "-", env=no_torch_env)
    assert result.returncode == 0 and json.loads(result.stdout)["arch"] == "spconv_resnet20_cifar"


def test_env_and_export_without_torch(tmp_path: Path, zoo_resnet_checkpoint: Path, no_torch_env: dict[str, str]) -> None:
    result = run_cli("env", "--json", "-", env=no_torch_env)
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["torch"]["available"] is False and "torch==2.13.0" in rows["torch"]["reason"]
    result = run_cli("export", str(zoo_resnet_checkpoint), "--out", str(tmp_path / "b"), env=no_torch_env)
    assert_clean_error(result, 3, "torch is needed")
    assert not (tmp_path / "b").exists()


def test_check_data_without_reference_needs_torch(tmp_path: Path, exported_bundle: Path, no_torch_env: dict[str, str]) -> None:
    with np.load(exported_bundle / "golden.npz") as golden:
        np.savez(tmp_path / "fresh.npz", input=golden["input"][:2])
    result = run_cli("check", str(exported_bundle), "--data", str(tmp_path / "fresh.npz"), env=no_torch_env)
    assert_clean_error(result, 3, "torch is needed")


def test_dataset_check_reads_reference_shards_without_torch(exported_bundle: Path, digits_image_folder: Path,
                                                           digits_references: Path, no_torch_env: dict[str, str]) -> None:
    """Where torch is missing, an image folder is checked against reference shards written
    elsewhere (``slimdeploy reference``); without them the check names the command that writes
    them. ``--json -`` prints the report alone: no progress on stderr."""
    result = run_cli("check", str(exported_bundle), "--data", str(digits_image_folder), "--references", str(digits_references),
                     "--workers", "2", "--json", "-", env=no_torch_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["dataset"]["samples"] == DIGITS_FOLDER_IMAGES
    assert report["dataset"]["mode"] == "processes"
    assert "samples/s" not in result.stderr and "checking" not in result.stderr, result.stderr

    result = run_cli("check", str(exported_bundle), "--data", str(digits_image_folder), env=no_torch_env)
    assert_one_line_error(result, 3, "torch is not installed", "slimdeploy reference")
