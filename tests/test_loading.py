"""Checkpoint loading: every supported format, and every kind of bad checkpoint."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from slimdeploy.errors import ArchitectureError, CheckpointError, StateDictMismatchError
from slimdeploy.loading import (
    FORMAT_NAME,
    Preprocessing,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from slimdeploy.models import get_arch

ARCH = "spconv_resnet20_cifar"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    module = get_arch(ARCH).build().eval()
    # Non-trivial BN statistics, so a wrongly loaded buffer changes the output.
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 1.5)
    return module


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return torch.equal(a(x), b(x))


def test_own_format_roundtrip(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "m.pt"
    prep = Preprocessing((3, 32, 32), (0.3,) * 3, (0.4,) * 3)
    save_checkpoint(path, model, ARCH, {}, prep, {"dataset": "digits"})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT_NAME and raw["arch"] == ARCH
    loaded = load_checkpoint(path)
    assert loaded.arch == ARCH and loaded.preprocessing == prep and loaded.meta == {"dataset": "digits"}
    assert not loaded.module.training
    assert _same_outputs(model, loaded.module)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel"])
def test_foreign_state_dicts(tmp_path: Path, model: torch.nn.Module, wrap: str) -> None:
    state = model.state_dict()
    if wrap == "dataparallel":
        obj = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    elif wrap == "plain":
        obj = state
    else:
        obj = {wrap: state, "epoch": 1}
    path = tmp_path / "foreign.pth.tar"
    torch.save(obj, path)
    loaded = load_checkpoint(path, arch=ARCH)
    assert _same_outputs(model, loaded.module)
    assert loaded.preprocessing.input_size == (3, 32, 32)
    if wrap == "dataparallel":
        assert any("module." in note for note in loaded.notes)


def test_legacy_container_without_num_batches_tracked(tmp_path: Path, model: torch.nn.Module) -> None:
    # As the official SkipNet releases were written by PyTorch 0.3: legacy (non-zip) file, no
    # num_batches_tracked buffers.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "legacy.pth.tar"
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=False)
    import zipfile

    assert not zipfile.is_zipfile(path)
    loaded = load_checkpoint(path, arch=ARCH)
    assert _same_outputs(model, loaded.module)
    assert any("num_batches_tracked" in note for note in loaded.notes)


def test_arch_args_from_explicit_option(tmp_path: Path) -> None:
    module = get_arch("mobilenet_v1").build(width_mult=0.25, resolution=32, num_classes=10)
    path = tmp_path / "mb.pt"
    torch.save(module.state_dict(), path)
    loaded = load_checkpoint(path, arch="mobilenet_v1", arch_args={"width_mult": 0.25, "resolution": 32, "num_classes": 10})
    assert loaded.preprocessing.input_size == (3, 32, 32)
    assert loaded.arch_args["width_mult"] == 0.25


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all", os.urandom(4096)],
    ids=["empty", "text", "random-bytes"],
)
def test_unreadable_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(path)


def test_truncated_checkpoint(tmp_path: Path, model: torch.nn.Module) -> None:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    path = tmp_path / "truncated.pt"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path, arch=ARCH)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", arch=ARCH)


def test_unknown_arch_suggests(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ArchitectureError, match="spconv_resnet20_cifar"):
        load_checkpoint(path, arch="spconv_resnet20_cifr")


def test_checkpoint_without_arch_needs_option(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ArchitectureError, match="--arch"):
        load_checkpoint(path)


def test_wrong_arch_lists_keys_with_counts(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(path, arch="spconv_resnet56_cifar")
    message = str(info.value)
    assert "missing" in message and "more" in message  # first few keys, then a count


def test_unexpected_and_wrong_shape_keys(tmp_path: Path, model: torch.nn.Module) -> None:
    state = dict(model.state_dict())
    state["extra.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(5, 64)
    path = tmp_path / "m.pt"
    torch.save(state, path)
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(path, arch=ARCH)
    message = str(info.value)
    assert "1 unexpected: extra.weight" in message
    assert "fc.weight (5, 64) vs (10, 64)" in message


def test_no_state_dict_inside(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"epoch": 3, "note": "hello"}, path)
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_checkpoint(path, arch=ARCH)


def test_pickled_module_needs_trust(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, trust_pickle=True)
    assert _same_outputs(model, loaded.module)


def test_torchscript_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_checkpoint(path, arch=ARCH)
