"""Checkpoints from elsewhere (issue 17 part 5): the architecture the keys point to when --arch is
missing, for every family; --input-size/--mean/--std chosen, recorded and printed, with a note
when a foreign checkpoint gets the default normalisation; check/run --device tensorrt without
TensorRT; run's threshold options and its float64 cast. (run --gate-threshold and
--exit-thresholds on gated and early-exit bundles are in tests/test_gated_cli.py and
tests/test_s2d_cli.py; the warning for decisions never seen both ways in
tests/test_readable_output.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from slimdeploy.errors import ArchitectureError, BadInputError
from slimdeploy.loading import CIFAR_MEAN, choose_preprocessing, load_checkpoint
from slimdeploy.zoo import list_zoo, zoo_checkpoint_path
from tests.conftest import UPSTREAM, assert_clean_error, assert_one_line_error, run_cli


def _plain_state_dict(name: str, path: Path) -> Path:
    """A shipped checkpoint's weights saved as a bare state_dict: a checkpoint from elsewhere
    that names no architecture and records no preprocessing."""
    torch.save(torch.load(zoo_checkpoint_path(name), weights_only=True)["state_dict"], path)
    return path


@pytest.mark.parametrize("entry", list_zoo(), ids=lambda entry: entry.name)
def test_a_checkpoint_without_arch_is_told_the_architecture_its_keys_point_to(entry, tmp_path: Path) -> None:
    path = _plain_state_dict(entry.name, tmp_path / "weights.pt")
    with pytest.raises(ArchitectureError, match=rf"\| Fix: pass --arch {entry.arch}$"):
        load_checkpoint(path)


@pytest.mark.needs_fixture(UPSTREAM / "condensenet_cifar10_small" / "converted_checkpoint.pth.tar")
@pytest.mark.slow
def test_a_converted_condensenet_is_told_condensenet_converted(tmp_path: Path) -> None:
    result = run_cli("export", str(UPSTREAM / "condensenet_cifar10_small" / "converted_checkpoint.pth.tar"),
                     "--out", str(tmp_path / "b"))
    assert_one_line_error(result, 2, "its keys match condensenet_converted", "Fix: pass --arch condensenet_converted")


def test_keys_that_match_nothing_still_say_pass_arch(tmp_path: Path) -> None:
    torch.save({"encoder.block.weight": torch.zeros(3, 3)}, tmp_path / "odd.pt")
    with pytest.raises(ArchitectureError, match="its keys match none registered"):
        load_checkpoint(tmp_path / "odd.pt")


def test_preprocessing_options_and_the_default_note(tmp_path: Path) -> None:
    loaded = load_checkpoint(_plain_state_dict("spconv_resnet20_digits", tmp_path / "w.pt"), arch="spconv_resnet20_cifar")
    assert loaded.preprocessing_source == {"input_size": "default", "mean": "default", "std": "default"}
    default = choose_preprocessing(loaded)
    assert default.preprocessing.mean == CIFAR_MEAN
    (note,) = default.notes
    assert "'w.pt' records no normalisation: using the CIFAR mean/std" in note and "Fix: pass --mean and --std" in note

    chosen = choose_preprocessing(loaded, (24,), (0.5,), (0.25, 0.2, 0.2))
    assert chosen.preprocessing.input_size == (3, 24, 24) and chosen.preprocessing.mean == (0.5, 0.5, 0.5)
    assert chosen.preprocessing.std == (0.25, 0.2, 0.2) and chosen.notes == ()
    assert chosen.sources == {"input_size": "option", "mean": "option", "std": "option"}
    with pytest.raises(BadInputError, match="one value or one per channel"):
        choose_preprocessing(loaded, mean=(0.1, 0.2))
    with pytest.raises(BadInputError, match="cannot run on inputs of this size"):
        choose_preprocessing(loaded, (1, 32, 32))  # one channel into a three-channel stem
    own = load_checkpoint(zoo_checkpoint_path("spconv_resnet20_digits"))
    assert choose_preprocessing(own).notes == () and own.preprocessing_source["mean"] == "checkpoint"


@pytest.mark.parametrize(("options", "fragment"), [
    ({"std": (0.2, 0)}, "--std [0.2, 0]: expected finite numbers above 0"),
    ({"mean": (float("nan"),)}, "--mean [nan]: expected finite numbers"),
    ({"input_size": (3, 0, 32)}, "--input-size [3, 0, 32]"),
    ({"input_size": (3, 32, 32, 1)}, "--input-size [3, 32, 32, 1]"),
    ({"input_size": (3, 10**6, 32)}, "sides up to 16,384"),
])
def test_bad_preprocessing_options_are_refused(options: dict, fragment: str) -> None:
    from slimdeploy.export import ExportOptions

    with pytest.raises(BadInputError, match=re.escape(fragment)):
        ExportOptions(**options)


def test_preprocessing_options_are_refused_before_the_work(tmp_path: Path) -> None:
    result = run_cli("export", "zoo:spconv_resnet20_digits", "--out", str(tmp_path / "b"), "--std", "0.2,0")
    assert_one_line_error(result, 2, "--std [0.2, 0.0]: expected finite numbers above 0")
    assert "loading checkpoint" not in result.stderr and not (tmp_path / "b").exists()
    result = run_cli("export", "zoo:spconv_resnet20_digits", "--out", str(tmp_path / "b"), "--mean", "a,b")
    assert_one_line_error(result, 2, "--mean takes comma-separated numbers")


@pytest.mark.slow
def test_a_foreign_checkpoint_exported_with_its_own_preprocessing(tmp_path: Path) -> None:
    """One export covers the chain: the options reach the held-out inputs, the graph and the
    manifest, the defaulted part is noted, and 8 samples are checked at batch 8, not 16."""
    from slimdeploy.data import digits_inputs

    weights = _plain_state_dict("spconv_resnet20_digits", tmp_path / "foreign.pt")
    std = (0.3, 0.3, 0.3)
    images, labels = digits_inputs("heldout", (3, 24, 24), CIFAR_MEAN, std, count=8)
    np.savez(tmp_path / "eight.npz", input=images, labels=labels)
    out = tmp_path / "bundle"
    result = run_cli("export", str(weights), "--arch", "spconv_resnet20_cifar", "--input-size", "3,24,24",
                     "--std", "0.3", "--data", str(tmp_path / "eight.npz"), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"] == {"input_size": [3, 24, 24], "mean": list(CIFAR_MEAN), "std": list(std),
                                         "source": {"input_size": "option", "mean": "default", "std": "option"}}
    assert manifest["inputs"][0]["shape"] == ["batch", 3, 24, 24]
    assert manifest["golden"]["batch_sizes"] == [1, 8] and "batch 16" not in result.stdout
    assert "note: 'foreign.pt' records no normalisation: using the CIFAR mean (3x24x24" in result.stderr
    assert "inputs: 3x24x24, mean 0.491/0.482/0.447, std 0.3/0.3/0.3 (input size/std given; mean defaults" in result.stdout


def test_tensorrt_device_without_tensorrt_says_so(exported_bundle: Path, tmp_path: Path) -> None:
    from slimdeploy.engines.trt_build import is_available

    if is_available():
        pytest.skip("TensorRT is installed here")
    check = run_cli("check", str(exported_bundle), "--device", "tensorrt")
    assert_one_line_error(check, 3, "--device tensorrt: TensorRT is not installed here")
    assert "build them on this machine" not in check.stderr
    np.save(tmp_path / "x.npy", np.load(exported_bundle / "golden.npz")["input"][:2])
    run = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npz"),
                  "--device", "tensorrt")
    assert_clean_error(run, 3, "TensorRT is not installed here")


def test_run_casts_float64_inputs_with_a_note(exported_bundle: Path, tmp_path: Path) -> None:
    golden = np.load(exported_bundle / "golden.npz")
    np.savez(tmp_path / "x64.npz", input=golden["input"][:4].astype(np.float64))
    result = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "x64.npz"), "--out", str(tmp_path / "y.npz"))
    assert result.returncode == 0, result.stderr
    assert "note: cast 'input' from float64 to float32" in result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["logits"], golden["ref_logits"][:4], atol=1e-3)
    np.savez(tmp_path / "huge.npz", input=np.full_like(golden["input"][:1], 1e300, dtype=np.float64))
    huge = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "huge.npz"), "--out", str(tmp_path / "h.npz"))
    assert_one_line_error(huge, 2, "beyond float32's range")


def test_threshold_options_need_the_threshold_input(exported_bundle: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.load(exported_bundle / "golden.npz")["input"][:2])
    for option, value in (("--gate-threshold", "0.7"), ("--exit-thresholds", "0.9,0.9,0")):
        result = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npz"),
                         option, value)
        assert_one_line_error(result, 2, f"{option} applies to bundles with a")
