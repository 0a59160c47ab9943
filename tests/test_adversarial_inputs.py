"""Hostile and unlucky inputs: checkpoints, feeds and options that once passed, crashed or hung.

Each case runs the real command line and asserts the exit code, one error line naming what was
wrong, no traceback and nothing written; property tests (hypothesis) cover feeds and
tolerances in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimdeploy.errors import BadInputError, InputValidationError
from slimdeploy.parity import check_parity, check_rows, compare_values
from slimdeploy.tolerance import check_tolerances
from tests.conftest import DEMO_EXPORT, REPO, SharedBundles, assert_clean_error, run_cli

ARCH = "spconv_resnet20_cifar"


# -- hostile checkpoints ------------------------------------------------------------------------
def _own(zoo_resnet_checkpoint: Path) -> dict:
    return torch.load(zoo_resnet_checkpoint, weights_only=True)


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _flip_tensor_byte(source: Path, target: Path) -> Path:
    """Flip one byte inside a tensor member (``archive/data/N``) of a torch.save zip."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data[start + member.file_size // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def _corrupt_central_directory(source: Path, target: Path) -> Path:
    data = bytearray(source.read_bytes())
    entry = data.rfind(b"PK\x01\x02")
    data[entry + 20:entry + 28] = b"\xff" * 8  # sizes of the last member's entry
    target.write_bytes(bytes(data))
    return target


class _RunsCode:
    """Unpickling this calls os.system: the weights-only loader must refuse it unrun."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _nan_weight(obj: dict, value: float) -> dict:
    obj["state_dict"]["conv1.weight"].view(-1)[3] = value
    return obj


HOSTILE_CHECKPOINTS = {
    "flipped-tensor-byte": (lambda ckpt, tmp: _flip_tensor_byte(ckpt, tmp / "c.pt"), "fails its CRC check"),
    "truncated-zip": (lambda ckpt, tmp: (tmp / "c.pt").write_bytes(ckpt.read_bytes()[:4000]) and tmp / "c.pt", "truncated or corrupt"),
    "corrupt-central-directory": (lambda ckpt, tmp: _corrupt_central_directory(ckpt, tmp / "c.pt"), "corrupt zip archive"),
    "arch-not-a-string": (lambda ckpt, tmp: _save({**_own(ckpt), "arch": 5}, tmp / "c.pt"), "arch: Input should be a valid string"),
    "arch-args-a-list": (lambda ckpt, tmp: _save({**_own(ckpt), "arch_args": [1, 2]}, tmp / "c.pt"), "arch_args: Input should be a valid dictionary"),
    "std-zero": (lambda ckpt, tmp: _save({**_own(ckpt), "preprocessing": {"input_size": [3, 32, 32], "mean": [0, 0, 0], "std": [0.0, 1, 1]}}, tmp / "c.pt"),
                 "preprocessing.std.0: Input should be greater than 0"),
    "mean-nan": (lambda ckpt, tmp: _save({**_own(ckpt), "preprocessing": {"input_size": [3, 32, 32], "mean": [float("nan")] * 3, "std": [1, 1, 1]}}, tmp / "c.pt"),
                 "preprocessing.mean.0: Input should be a finite number"),
    "input-size-absurd": (lambda ckpt, tmp: _save({**_own(ckpt), "preprocessing": {"input_size": [3, 10**9, 32], "mean": [0] * 3, "std": [1] * 3}}, tmp / "c.pt"),
                          "preprocessing.input_size.1"),
    "meta-a-list": (lambda ckpt, tmp: _save({**_own(ckpt), "meta": [1]}, tmp / "c.pt"), "meta: Input should be a valid dictionary"),
    "newer-format": (lambda ckpt, tmp: _save({**_own(ckpt), "format_version": 9}, tmp / "c.pt"), "upgrade slimdeploy"),
    "nan-weight": (lambda ckpt, tmp: _save(_nan_weight(_own(ckpt), float("nan")), tmp / "c.pt"), "non-finite value(s) (NaN/inf) in 'conv1.weight'"),
    "inf-weight": (lambda ckpt, tmp: _save(_nan_weight(_own(ckpt), float("inf")), tmp / "c.pt"), "non-finite value(s) (NaN/inf) in 'conv1.weight'"),
    "blocked-global": (lambda ckpt, tmp: _save({"w": _RunsCode(tmp / "ran")}, tmp / "c.pt"), "refused global posix.system"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CHECKPOINTS))
def test_hostile_checkpoint_is_refused_and_nothing_is_written(tmp_path: Path, zoo_resnet_checkpoint: Path, case: str) -> None:
    make, fragment = HOSTILE_CHECKPOINTS[case]
    work = tmp_path / "work"
    work.mkdir()
    checkpoint = make(zoo_resnet_checkpoint, work)
    out = tmp_path / "bundle"
    result = run_cli("export", str(checkpoint), "--arch", ARCH, "--out", str(out))
    assert_clean_error(result, 2, fragment)
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert not (work / "ran").exists()  # the blocked global never ran
    if case == "blocked-global":
        assert "--trust-pickle would run code" in result.stderr


@pytest.mark.slow
def test_a_model_computing_nan_fails_parity(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    """Finite weights, broken numbers: a negative BatchNorm variance makes the model output NaN.
    The export fails parity (exit 1, the bundle and its report kept for inspection) instead of
    passing it as NaN comparisons once did."""
    checkpoint = _own(zoo_resnet_checkpoint)
    checkpoint["state_dict"]["bn1.running_var"][0] = -1.0
    path = _save(checkpoint, tmp_path / "negative_var.pt")
    out = tmp_path / "bundle"
    result = run_cli("export", str(path), "--out", str(out), "--samples", "4", "--batch-sizes", "2")
    assert_clean_error(result, 1, "parity failed")
    assert "parity PASSED" not in result.stdout
    report = json.loads((out / "report.json").read_text())
    logits = [o for o in report["outputs"] if o["name"] == "logits"]
    assert logits and all(not o["passed"] and o["nonfinite_reference"] == o["elements"] for o in logits)
    assert "non-finite values (NaN/inf)" in report["failures"][0]
    assert "float32 noise not measured" in report["tolerance_rule"]["note"]


@pytest.mark.slow
def test_absurd_arch_args_are_refused_before_allocating(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    out = tmp_path / "bundle"
    result = run_cli("export", str(zoo_resnet_checkpoint), "--arch-args", '{"num_classes": 1000000000000}', "--out", str(out))
    assert_clean_error(result, 2, "sized on the meta device before allocating", "parameters")
    assert not out.exists()
    result = run_cli("inspect", str(zoo_resnet_checkpoint), "--arch-args", '{"num_classes": -3}')
    assert_clean_error(result, 2, "cannot build 'spconv_resnet20_cifar'", "negative dimension")


def test_model_sizes_are_read_on_the_meta_device() -> None:
    from slimdeploy.flops import count_macs
    from slimdeploy.limits import check_model_fits, estimate_model
    from slimdeploy.models.registry import get_arch

    info = get_arch("spconv_resnet50")
    _, estimate = estimate_model(lambda: info.build(), info.input_size)
    real = info.build().eval()
    counted = count_macs(real, info.input_size)
    assert (estimate.params, estimate.macs) == (counted.params, counted.macs)
    assert estimate.activation_bytes == 64 * 112 * 112 * 4  # the stem's output is the largest
    check_model_fits(estimate, info.name, batch=64, memory=4 * 2**30)  # fits in 4 GiB
    with pytest.raises(BadInputError, match="GiB available"):
        check_model_fits(estimate, info.name, batch=64, memory=2**28)


@pytest.mark.slow
def test_safetensors_state_dict_loads_with_arch(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    from safetensors.torch import save_file

    from slimdeploy.loading import load_checkpoint

    state = _own(zoo_resnet_checkpoint)["state_dict"]
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_checkpoint(path, arch=ARCH)
    for name, tensor in loaded.module.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    result = run_cli("inspect", str(path))
    assert_clean_error(result, 2, "does not say which architecture", "--arch")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:200])
    result = run_cli("inspect", str(broken), "--arch", ARCH)
    assert_clean_error(result, 2, "cannot read", "as safetensors")


# -- hostile feeds ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden(exported_bundle: Path) -> dict[str, np.ndarray]:
    with np.load(exported_bundle / "golden.npz") as data:
        return {key: data[key] for key in data.files}


def _feed_cases(golden: dict[str, np.ndarray]) -> dict[str, tuple[dict[str, np.ndarray], str]]:
    x, refs = golden["input"], golden["ref_logits"]
    nan_x = x.copy()
    nan_x[2, 0, 5, 5] = np.nan
    inf_ref = refs.copy()
    inf_ref[1, 3] = np.inf
    return {
        "nan-input": ({"input": nan_x, "ref_logits": refs}, "non-finite"),
        "inf-reference": ({"input": x, "ref_logits": inf_ref}, "non-finite"),
        "zero-rows": ({"input": x[:0], "ref_logits": refs[:0]}, "no samples (0 rows)"),
        "labels-rows-differ": ({"input": x, "ref_logits": refs, "labels": golden["labels"][:3]}, "one row per sample"),
        "references-rows-differ": ({"input": x, "ref_logits": refs[:-1]}, "one row per sample"),
        "float-labels": ({"input": x, "ref_logits": refs, "labels": golden["labels"].astype(np.float32)}, "labels must be integers"),
    }


@pytest.mark.parametrize("case", ["nan-input", "inf-reference", "zero-rows", "labels-rows-differ", "references-rows-differ", "float-labels"])
def test_hostile_check_data_is_refused(tmp_path: Path, exported_bundle: Path, golden: dict[str, np.ndarray], case: str) -> None:
    arrays, fragment = _feed_cases(golden)[case]
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    report = tmp_path / "report.json"
    result = run_cli("check", str(exported_bundle), "--data", str(data), "--json", str(report))
    assert_clean_error(result, 2, fragment)
    assert not report.exists()


@pytest.mark.parametrize("case", ["nan-input", "labels-rows-differ"])
@pytest.mark.slow
def test_hostile_export_data_is_refused_before_the_export(tmp_path: Path, zoo_resnet_checkpoint: Path, golden: dict[str, np.ndarray],
                                                          case: str) -> None:
    arrays, fragment = _feed_cases(golden)[case]
    data = tmp_path / "data.npz"
    np.savez(data, **{k: v for k, v in arrays.items() if not k.startswith("ref_")})
    out = tmp_path / "bundle"
    result = run_cli("export", str(zoo_resnet_checkpoint), "--data", str(data), "--out", str(out))
    assert_clean_error(result, 2, fragment)
    assert "exporting with torch.export" not in result.stderr  # refused before the long work
    assert not out.exists()


def test_nan_golden_file_is_refused(tmp_path: Path, exported_bundle: Path, golden: dict[str, np.ndarray]) -> None:
    """A bundle whose golden file holds NaN (digest updated to match, as a hostile bundle would)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundle, bundle)
    arrays = dict(golden)
    arrays["input"] = arrays["input"].copy()
    arrays["input"][0, 0, 0, 0] = np.nan
    with open(bundle / "golden.npz", "wb") as handle:
        np.savez_compressed(handle, **arrays)
    from slimdeploy.bundle import sha256_file

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["golden.npz"] = sha256_file(bundle / "golden.npz")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("check", str(bundle))
    assert_clean_error(result, 2, "golden file", "non-finite")


@pytest.mark.parametrize(
    ("field", "value", "fragments"),
    [
        # The manifest schema refuses them when the bundle is read, before parity sees them.
        ("tolerances", {"": [float("nan"), 0.001]}, ("manifest.json field 'tolerances[''][0]'", "finite number (got nan)")),
        ("tolerances", {"": [1e-4, -0.5]}, ("manifest.json field 'tolerances[''][1]'", "(got -0.5)")),
        ("criteria", {"top1_agreement": float("nan")}, ("manifest.json field 'parity.criteria", "(got nan)")),
    ],
    ids=["nan-atol", "negative-rtol", "nan-criterion"],
)
def test_broken_numbers_stored_in_a_manifest_are_refused(tmp_path: Path, exported_bundle: Path, field: str, value: dict,
                                                         fragments: tuple[str, ...]) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if field == "criteria":
        manifest["parity"]["criteria"] = value
    else:
        manifest[field] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))  # json writes NaN, and reads it back
    result = run_cli("check", str(bundle))
    assert_clean_error(result, 2, *fragments)


@pytest.mark.slow
def test_empty_batches_run_on_every_form(tmp_path: Path, skipnet_bundles: dict[str, Path], exported_bundle: Path) -> None:
    """A 0-row batch once aborted ONNX Runtime on a compact gated bundle: now empty outputs with
    the shapes and dtypes a full batch has."""
    empty = tmp_path / "empty.npz"
    np.savez(empty, input=np.zeros((0, 3, 32, 32), np.float32))
    for name, bundle in [*skipnet_bundles.items(), ("static", exported_bundle)]:
        with np.load(bundle / "golden.npz") as data:
            np.savez(tmp_path / "two.npz", input=data["input"][:2])
        full, out = tmp_path / f"{name}_full.npz", tmp_path / f"{name}_empty.npz"
        assert run_cli("run", str(bundle), "--inputs", str(tmp_path / "two.npz"), "--out", str(full)).returncode == 0
        result = run_cli("run", str(bundle), "--inputs", str(empty), "--out", str(out), "--batch", "4")
        assert result.returncode == 0, (name, result.stderr)
        with np.load(full) as expected, np.load(out) as got:
            assert sorted(got.files) == sorted(expected.files)
            for key in expected.files:
                assert got[key].shape == (0, *expected[key].shape[1:]) and got[key].dtype == expected[key].dtype, (name, key)


@pytest.fixture(scope="module")
def skipnet_bundles(shared_bundles: SharedBundles) -> dict[str, Path]:
    """The demo SkipNet's compact and staged bundles (shared with other test files)."""
    return {form: shared_bundles.get("skipnet38_digits", dynamic=form, **DEMO_EXPORT) for form in ("compact", "staged")}


# -- hostile options --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--atol", "nan"], "atol nan"),
        (["--atol", "-1e-4"], "atol -0.0001"),
        (["--rtol", "inf"], "rtol inf"),
        (["--threads", "100000"], "--threads 100000 is out of range"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--batch-sizes", "0"], "positive integers"),
    ],
    ids=["atol-nan", "atol-negative", "rtol-inf", "threads", "device", "batch-zero"],
)
def test_hostile_check_options_are_bad_input(tmp_path: Path, exported_bundle: Path, args: list[str], fragment: str) -> None:
    report = tmp_path / "r.json"
    result = run_cli("check", str(exported_bundle), *args, "--json", str(report))
    assert_clean_error(result, 2, fragment)
    assert not report.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--threads", "100000"], "--threads 100000 is out of range"),
        (["--iterations", "0"], "--iterations 0 is out of range"),
        (["--warmup", "-1"], "--warmup -1 is out of range"),
        (["--batch", "1,0"], "positive integers"),
        (["--device", "gpu0"], "unknown device 'gpu0'"),
        (["--sweep", "nan"], "--sweep"),
    ],
    ids=["threads", "iterations", "warmup", "batch", "device", "sweep-nan"],
)
def test_hostile_bench_options_are_bad_input(exported_bundle: Path, args: list[str], fragment: str) -> None:
    assert_clean_error(run_cli("bench", str(exported_bundle), *args), 2, fragment)


@pytest.mark.slow
def test_hostile_export_and_run_options(tmp_path: Path, exported_bundle: Path, zoo_resnet_checkpoint: Path) -> None:
    out = tmp_path / "b"
    for args, fragment in ((["--threads", "100000"], "--threads 100000"), (["--samples", "0"], "--samples 0"),
                           (["--atol", "nan"], "atol nan"), (["--precision", "int8", "--calib-size", "0"], "--calib-size 0")):
        assert_clean_error(run_cli("export", str(zoo_resnet_checkpoint), "--out", str(out), *args), 2, fragment)
        assert not out.exists()
    np.savez(tmp_path / "in.npz", input=np.zeros((1, 3, 32, 32), np.float32))
    for args, fragment in ((["--threads", "100000"], "--threads 100000"), (["--batch", "-2"], "--batch -2"),
                           (["--device", "npu"], "unknown device 'npu'")):
        result = run_cli("run", str(exported_bundle), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "o.npz"), *args)
        assert_clean_error(result, 2, fragment)
        assert not (tmp_path / "o.npz").exists()


def test_bench_refuses_a_baseline_of_another_model(tmp_path: Path, exported_bundle: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(exported_bundle, other)
    result = run_cli("bench", str(exported_bundle), "--baseline", str(other), "--batch", "1", "--iterations", "1",
                     "--warmup", "0", "--no-torch", "--json", "-")
    assert result.returncode == 0, result.stderr  # the same checkpoint: timed side by side
    assert "vs_baseline_onnxruntime_batch1" in json.loads(result.stdout)["speedups"]
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["weights_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("bench", str(exported_bundle), "--baseline", str(other), "--batch", "1", "--iterations", "1", "--warmup", "0")
    assert_clean_error(result, 2, "holds another model", "export the baseline from the same checkpoint")
    assert "x" not in result.stdout  # no speed-up printed


BROKEN_TORCH = '''
import importlib.abc, importlib.machinery, sys

class _BrokenTorch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """torch is installed but its shared library does not load."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("libtorch_cpu.so: cannot open shared object file")

sys.meta_path.insert(0, _BrokenTorch())
'''


def test_broken_torch_does_not_break_zoo_list_or_bench(tmp_path: Path, exported_bundle: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BROKEN_TORCH)
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    result = run_cli("zoo", "list", "--json", "-", env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows and all(row["kind"] == "checkpoint" for row in rows)
    assert "torch is installed but cannot be imported" in result.stderr
    result = run_cli("bench", str(exported_bundle), "--batch", "1", "--warmup", "0", "--iterations", "2", "--json", "-", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["runner"] for r in report["results"]] == ["onnxruntime"]
    assert any("cannot be imported" in note for note in report["notes"])


# -- properties ---------------------------------------------------------------------------------------
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
broken = st.sampled_from([np.nan, np.inf, -np.inf])


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=40), bad=broken, where=st.integers(min_value=0), side=st.sampled_from(["candidate", "reference", "both"]),
       atol=st.floats(min_value=0, max_value=1e9), rtol=st.floats(min_value=0, max_value=1e9))
def test_a_non_finite_value_never_passes(values: list[float], bad: float, where: int, side: str, atol: float, rtol: float) -> None:
    reference = np.asarray(values, dtype=np.float32)
    candidate = reference.copy()
    position = where % len(values)
    if side in ("candidate", "both"):
        candidate[position] = bad
    if side in ("reference", "both"):
        reference[position] = bad
    result = compare_values("logits", reference, candidate, atol, rtol, 1)
    assert not result.passed
    assert result.nonfinite_positions[0] == [position]
    assert "non-finite" in result.message


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=40), atol=st.floats(min_value=0, max_value=1e3), rtol=st.floats(min_value=0, max_value=1))
def test_identical_finite_outputs_always_pass(values: list[float], atol: float, rtol: float) -> None:
    array = np.asarray(values, dtype=np.float32)
    assert compare_values("logits", array, array.copy(), atol, rtol, 1).passed


@settings(max_examples=80, deadline=None)
@given(atol=st.floats(allow_nan=True, allow_infinity=True), rtol=st.floats(allow_nan=True, allow_infinity=True))
def test_tolerances_are_accepted_exactly_when_finite_and_not_negative(atol: float, rtol: float) -> None:
    valid = all(np.isfinite(v) and v >= 0 for v in (atol, rtol))
    if valid:
        assert check_tolerances({"": (atol, rtol)}) == {"": (atol, rtol)}
    else:
        with pytest.raises(BadInputError, match="not a finite number >= 0"):
            check_tolerances({"": (atol, rtol)})


@settings(max_examples=60, deadline=None)
@given(inputs=st.integers(0, 6), references=st.integers(0, 6), labels=st.one_of(st.none(), st.integers(0, 6)))
def test_rows_must_agree(inputs: int, references: int, labels: int | None) -> None:
    feed = {"input": np.zeros((inputs, 3), np.float32)}
    reference = {"logits": np.zeros((references, 10), np.float32)}
    label_array = None if labels is None else np.zeros(labels, np.int64)
    counts = {inputs, references} | ({labels} if labels is not None else set())
    if len(counts) == 1 and inputs > 0:
        assert check_rows(feed, reference, label_array) == inputs
    else:
        with pytest.raises(InputValidationError):
            check_rows(feed, reference, label_array)


@pytest.fixture(scope="module")
def golden_runner(exported_bundle: Path):
    from slimdeploy.engines.ort_runner import OrtRunner

    with OrtRunner(exported_bundle / "model.onnx", threads=1) as runner:
        yield runner


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 6), poison=st.sampled_from([np.nan, np.inf, -np.inf]), where=st.integers(0, 10**6))
def test_non_finite_feeds_are_refused_before_running(golden_runner, golden: dict[str, np.ndarray], rows: int, poison: float, where: int) -> None:
    x = golden["input"][:rows].copy()
    x.reshape(-1)[where % x.size] = poison
    with pytest.raises(InputValidationError, match="non-finite"):
        check_parity(golden_runner, {"input": x}, {"logits": golden["ref_logits"][:rows]}, [1], "golden")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(0, 7), batch=st.integers(1, 9))
def test_batched_runs_match_one_call_for_any_rows(golden_runner, golden: dict[str, np.ndarray], rows: int, batch: int) -> None:
    from slimdeploy.parity import run_batches

    feed = {"input": golden["input"][:rows]}
    whole = golden_runner.infer(feed)["logits"]
    pieces = run_batches(golden_runner, feed, batch)["logits"]
    assert pieces.shape == whole.shape == (rows, 10)
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-5)
