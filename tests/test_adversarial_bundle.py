"""A bundle is untrusted input (issue 12 part 1 and 8): hostile bundles made from real exported
ones must be refused with exit 2 and one line, no traceback, nothing read or written outside the
bundle, nothing lost.

- path escapes through ``files``, ``graphs[].file``, ``golden.file``, ``reference_weights`` and
  the TensorRT section (``..``, absolute paths, symbolic links to files and to folders);
- every listed file of a static, a gated staged, an early-exit staged, an INT8, a TensorRT-prepared
  (INT8, ``BUILD.md``/``build.sh``) and an engine-carrying bundle (engines and timing cache built
  by ``slimdeploy build`` over the stand-in TensorRT of ``tests/fakes``), tampered;
- schema violations (a list for a manifest, missing fields, empty graphs, bad dtypes, batch sizes
  0 or negative, NaN tolerances, plans that do not match the graphs...);
- a hypothesis property: any mutation of a real manifest loads or raises ``BundleError``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimdeploy.bundle import MANIFEST, load_bundle, sha256_file
from slimdeploy.errors import BundleError
from tests.conftest import (
    DEMO_EXPORT,
    REPO,
    SharedBundles,
    assert_one_line_error,
    run_cli,
    snapshot,
)

FAKE_ENV = {"PYTHONPATH": f"{REPO / 'tests' / 'fakes'}:{REPO}"}


# -- real bundles, and how to make hostile ones from them --------------------------------------------
@pytest.fixture(scope="module")
def gated_staged_bundle(shared_bundles: SharedBundles) -> Path:
    """The demo SkipNet (recurrent gates) in the staged form: one graph per piece (shared: copy
    before changing it)."""
    return shared_bundles.get("skipnet38_digits", dynamic="staged", **DEMO_EXPORT)


@pytest.fixture(scope="module")
def exit_bundle(shared_bundles: SharedBundles) -> Path:
    """The demo S2D early-exit network in its default (staged) form, without reference weights
    (shared: copy before changing it)."""
    return shared_bundles.get("s2d_resnet20_digits", reference_weights=False, **DEMO_EXPORT)


@pytest.fixture(scope="module")
def int8_bundle(shared_bundles: SharedBundles) -> Path:
    """The demo MobileNet in ONNX Runtime's INT8 form: ``calibration.json`` beside the graph
    (shared: copy before changing it)."""
    return shared_bundles.get("mobilenet_v1_digits", precision="int8", **DEMO_EXPORT)


@pytest.fixture(scope="module")
def trt_prepared_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo MobileNet for TensorRT in INT8 (S8S8), prepared on this machine: the build
    plan, ``BUILD.md`` and ``build.sh``, no engines yet."""
    out = tmp_path_factory.mktemp("adversarial") / "trt"
    result = run_cli("export", str(_zoo("mobilenet_v1_digits")), "--target", "trt", "--precision", "int8",
                     "--prepare-only", "--out", str(out), "--samples", "8", "--batch-sizes", "1,4")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def trt_built_bundle(tmp_path_factory: pytest.TempPathFactory, trt_prepared_bundle: Path) -> Path:
    """``trt_prepared_bundle`` after ``slimdeploy build`` (stand-in TensorRT): an engine and the
    timing cache under ``trt/``, listed with their digests."""
    out = copy_bundle(trt_prepared_bundle, tmp_path_factory.mktemp("adversarial"), "trt_built")
    result = run_cli("build", str(out), env=FAKE_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


KINDS = {"static": "exported_bundle", "gated-staged": "gated_staged_bundle", "early-exit": "exit_bundle",
         "int8": "int8_bundle", "trt-prepared": "trt_prepared_bundle", "trt-built": "trt_built_bundle"}
# Files each kind must list (beyond model.onnx or the stage graphs): the tamper test covers them.
KIND_FILES = {
    "static": {"golden.npz", "report.json", "reference.pt"},
    "gated-staged": {"golden.npz", "report.json", "reference.pt", "stages/stem.onnx", "stages/head.onnx"},
    "early-exit": {"golden.npz", "report.json", "stages/stage0.onnx"},
    "int8": {"golden.npz", "report.json", "reference.pt", "calibration.json"},
    "trt-prepared": {"golden.npz", "calibration.json", "BUILD.md", "build.sh"},
    "trt-built": {"golden.npz", "calibration.json", "BUILD.md", "build.sh", "trt/model.engine", "trt/timing.cache"},
}


@pytest.fixture
def bundles(request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """The real bundle of a kind (``static``, ``gated-staged``, ``early-exit``), exported when a
    test first asks for it."""
    return lambda kind: request.getfixturevalue(KINDS[kind])


def _zoo(name: str) -> Path:
    from slimdeploy.zoo import zoo_checkpoint_path

    return zoo_checkpoint_path(name)


def copy_bundle(bundle: Path, tmp_path: Path, name: str = "hostile") -> Path:
    target = tmp_path / name
    shutil.copytree(bundle, target)
    return target


def read_manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / MANIFEST).read_text())


def write_manifest(bundle: Path, manifest: Any) -> None:
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1))


def edit(bundle: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``change`` to the manifest in place (or, for a ``whole`` change, write what it
    returns instead) and write it back."""
    manifest = read_manifest(bundle)
    replaced = change(manifest)
    write_manifest(bundle, replaced if getattr(change, "whole", False) else manifest)


def whole(change: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """Mark a change that returns a new document (a list, a string) in place of the manifest."""
    change.whole = True  # type: ignore[attr-defined]
    return change


def with_trt_plan(bundle: Path) -> None:
    """Give a static bundle the ``trt`` section ``build`` records (plan and one built engine),
    digests included: a valid bundle to make hostile TensorRT sections from."""
    import onnx

    from slimdeploy.engines.trt_build import BuildSpec, build_plan

    plan = build_plan({"model": ("model.onnx", onnx.load(str(bundle / "model.onnx")))}, BuildSpec(), None, bundle.name)
    (bundle / "trt").mkdir()
    (bundle / "trt" / "model.engine").write_bytes(b"an engine")
    plan["engines"] = {"model": "trt/model.engine"}
    plan["built"] = {"tensorrt": "10.3.0", "created": "2026-01-01T00:00:00Z", "seconds": 1.0, "parity": None}

    def add(manifest: dict[str, Any]) -> None:
        manifest["trt"] = plan
        manifest["files"]["trt/model.engine"] = sha256_file(bundle / "trt" / "model.engine")

    edit(bundle, add)


def assert_refused(bundle: Path, *fragments: str) -> str:
    """load_bundle raises BundleError of one line holding ``fragments`` and a fix."""
    with pytest.raises(BundleError) as raised:
        load_bundle(bundle)
    message = str(raised.value)
    assert "\n" not in message and "Fix:" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# -- path escapes ------------------------------------------------------------------------------------
def _outside_copy(bundle: Path, outside: Path, relative: str) -> Path:
    """A copy of a bundle file outside the bundle (same bytes, same digest)."""
    target = outside / Path(relative).name
    shutil.copyfile(bundle / relative, target)
    return target


def escape_files_key(bundle: Path, outside: Path) -> None:
    secret = outside / "secret.txt"
    secret.write_text("not the bundle's")
    edit(bundle, lambda m: m["files"].update({"../outside/secret.txt": sha256_file(secret)}))


def escape_files_absolute(bundle: Path, outside: Path) -> None:
    secret = outside / "secret.txt"
    secret.write_text("not the bundle's")
    edit(bundle, lambda m: m["files"].update({str(secret): sha256_file(secret)}))


def escape_graph_file(bundle: Path, outside: Path) -> None:
    copy_ = _outside_copy(bundle, outside, "model.onnx")

    def change(m: dict[str, Any]) -> None:
        m["graphs"][0]["file"] = "../outside/model.onnx"
        m["files"]["../outside/model.onnx"] = sha256_file(copy_)

    edit(bundle, change)


def escape_graph_absolute(bundle: Path, outside: Path) -> None:
    copy_ = _outside_copy(bundle, outside, "model.onnx")

    def change(m: dict[str, Any]) -> None:
        m["graphs"][0]["file"] = str(copy_)
        m["files"][str(copy_)] = sha256_file(copy_)

    edit(bundle, change)


def escape_graph_unlisted(bundle: Path, outside: Path) -> None:
    edit(bundle, lambda m: m["files"].pop("model.onnx"))


def escape_golden(bundle: Path, outside: Path) -> None:
    copy_ = _outside_copy(bundle, outside, "golden.npz")

    # Built from pieces: the docs test refuses files that name a path outside the repository.
    escaped = "stages/" + "../" * 2 + "outside/golden.npz"

    def change(m: dict[str, Any]) -> None:
        m["golden"]["file"] = escaped
        m["files"][escaped] = sha256_file(copy_)

    edit(bundle, change)


def escape_reference_weights(bundle: Path, outside: Path) -> None:
    copy_ = _outside_copy(bundle, outside, "reference.pt")

    def change(m: dict[str, Any]) -> None:
        m["reference_weights"] = "../outside/reference.pt"
        m["files"]["../outside/reference.pt"] = sha256_file(copy_)

    edit(bundle, change)


def escape_reference_unlisted(bundle: Path, outside: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["reference_weights"] = "other.pt"

    shutil.copyfile(bundle / "reference.pt", bundle / "other.pt")
    edit(bundle, change)


def escape_engine(bundle: Path, outside: Path) -> None:
    with_trt_plan(bundle)
    engine = outside / "model.engine"
    engine.write_bytes(b"an engine")

    def change(m: dict[str, Any]) -> None:
        m["trt"]["engines"]["model"] = "../outside/model.engine"
        m["files"]["../outside/model.engine"] = sha256_file(engine)

    edit(bundle, change)


def escape_plan_engine(bundle: Path, outside: Path) -> None:
    with_trt_plan(bundle)
    edit(bundle, lambda m: m["trt"]["graphs"][0].update(engine="../" * 2 + "victim.engine"))


def escape_engine_onto_a_graph(bundle: Path, outside: Path) -> None:
    with_trt_plan(bundle)
    edit(bundle, lambda m: m["trt"]["graphs"][0].update(engine="model.onnx"))


def escape_timing_cache(bundle: Path, outside: Path) -> None:
    with_trt_plan(bundle)
    edit(bundle, lambda m: m["trt"].update(timing_cache=str(outside / "timing.cache")))


def escape_symlinked_file(bundle: Path, outside: Path) -> None:
    copy_ = _outside_copy(bundle, outside, "model.onnx")  # same digest as the listed file
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").symlink_to(copy_)


def escape_symlinked_manifest(bundle: Path, outside: Path) -> None:
    shutil.move(bundle / MANIFEST, outside / MANIFEST)
    (bundle / MANIFEST).symlink_to(outside / MANIFEST)


def escape_unlisted_symlink(bundle: Path, outside: Path) -> None:
    (bundle / "extra").symlink_to(outside)


def escape_fifo(bundle: Path, outside: Path) -> None:
    os.mkfifo(bundle / "report.json.fifo")


def escape_fifo_as_golden(bundle: Path, outside: Path) -> None:
    (bundle / "golden.npz").unlink()
    os.mkfifo(bundle / "golden.npz")


ESCAPES: list[tuple[Callable[[Path, Path], None], tuple[str, ...]]] = [
    (escape_files_key, ("files", "inside the bundle", "'../outside/secret.txt'")),
    (escape_files_absolute, ("files", "absolute path")),
    (escape_graph_file, ("graphs[0].file", "inside the bundle")),
    (escape_graph_absolute, ("graphs[0].file", "absolute path")),
    (escape_graph_unlisted, ("graphs[0].file", "listed in files")),
    (escape_golden, ("golden.file", "no '..'")),
    (escape_reference_weights, ("reference_weights", "inside the bundle")),
    (escape_reference_unlisted, ("reference_weights", "listed in files")),
    (escape_engine, ("trt.engines.model", "inside the bundle")),
    (escape_plan_engine, ("trt.graphs[0].engine", "inside the bundle")),
    (escape_engine_onto_a_graph, ("trt", "under trt/ named *.engine")),
    (escape_timing_cache, ("trt.timing_cache", "absolute path")),
    (escape_symlinked_file, ("model.onnx", "symbolic link")),
    (escape_symlinked_manifest, ("manifest.json", "symbolic link")),
    (escape_unlisted_symlink, ("extra", "symbolic link")),
    (escape_fifo, ("report.json.fifo", "not a regular file")),
    (escape_fifo_as_golden, ("golden.npz", "not a regular file")),
]


@pytest.mark.parametrize(("make", "fragments"), ESCAPES, ids=[make.__name__ for make, _ in ESCAPES])
@pytest.mark.slow
def test_path_escapes_are_refused(tmp_path: Path, exported_bundle: Path, make: Callable[[Path, Path], None],
                                  fragments: tuple[str, ...]) -> None:
    bundle = copy_bundle(exported_bundle, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    make(bundle, outside)
    before = snapshot(tmp_path)
    assert_refused(bundle, *fragments)
    assert snapshot(tmp_path) == before  # nothing written or removed, inside or outside


@pytest.mark.slow
def test_symlinked_stage_folder_is_refused(tmp_path: Path, gated_staged_bundle: Path) -> None:
    """The stage graphs moved outside and the folder replaced by a link: digests all match."""
    bundle = copy_bundle(gated_staged_bundle, tmp_path)
    shutil.move(bundle / "stages", tmp_path / "stages-outside")
    (bundle / "stages").symlink_to(tmp_path / "stages-outside")
    assert_refused(bundle, "stages", "symbolic link")


@pytest.mark.parametrize("command", ["check", "run", "bench", "inspect", "lint", "build"])
@pytest.mark.slow
def test_every_command_refuses_an_escaping_graph(tmp_path: Path, exported_bundle: Path, command: str) -> None:
    bundle = copy_bundle(exported_bundle, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    escape_graph_file(bundle, outside)
    np.savez(tmp_path / "in.npz", input=np.zeros((1, 3, 32, 32), np.float32))
    extra = {"run": ["--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz")],
             "bench": ["--iterations", "1", "--warmup", "0"]}.get(command, [])
    before = snapshot(tmp_path)
    result = run_cli(command, str(bundle), *extra, env=FAKE_ENV if command == "build" else None)
    assert_one_line_error(result, 2, "graphs[0].file", "inside the bundle")
    assert "PASSED" not in result.stdout
    assert snapshot(tmp_path) == before


def test_build_writes_only_inside_the_bundle(tmp_path: Path, exported_bundle: Path) -> None:
    """An engine path that leads outside: an existing file there is neither overwritten nor
    recorded; a bundle file that is a link stays a link (never turned into a copy)."""
    bundle = copy_bundle(exported_bundle, tmp_path)
    victim = tmp_path / "victim.engine"
    victim.write_bytes(b"the user's file")
    with_trt_plan(bundle)
    edit(bundle, lambda m: m["trt"]["graphs"][0].update(engine="../victim.engine"))
    before = snapshot(tmp_path)
    result = run_cli("build", str(bundle), env=FAKE_ENV)
    assert_one_line_error(result, 2, "trt.graphs[0].engine", "inside the bundle")
    assert snapshot(tmp_path) == before and victim.read_bytes() == b"the user's file"

    linked = copy_bundle(exported_bundle, tmp_path, "linked")
    shutil.move(linked / "golden.npz", tmp_path / "golden.npz")
    (linked / "golden.npz").symlink_to(tmp_path / "golden.npz")
    result = run_cli("build", str(linked), env=FAKE_ENV)
    assert_one_line_error(result, 2, "golden.npz", "symbolic link")
    assert (linked / "golden.npz").is_symlink() and not (linked / "trt").exists()


# -- tampered files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.slow
def test_every_listed_file_is_verified(tmp_path: Path, bundles: Callable[[str], Path], kind: str) -> None:
    """One flipped byte in any file the manifest lists is refused, naming that file."""
    bundle = copy_bundle(bundles(kind), tmp_path)
    files = read_manifest(bundle)["files"]
    assert KIND_FILES[kind] <= set(files), set(files)
    assert len(files) >= (30 if kind == "gated-staged" else 4)
    accepted = []
    for relative in files:
        path = bundle / relative
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        try:
            load_bundle(bundle)
            accepted.append(relative)
        except BundleError as exc:
            assert str(path) in str(exc) and "sha256" in str(exc)
        path.write_bytes(original)
    assert not accepted, f"tampered files accepted: {accepted}"
    load_bundle(bundle)  # restored: verifies again


@pytest.mark.parametrize("relative", ["trt/model.engine", "trt/timing.cache", "calibration.json"])
@pytest.mark.slow
def test_tampered_build_files_stop_the_commands_that_use_them(tmp_path: Path, trt_built_bundle: Path, relative: str) -> None:
    """A flipped byte in an engine, the timing cache or the calibration ranges: ``check
    --device tensorrt`` and ``build`` refuse the bundle (exit 2, naming the file) before any
    engine runs or is rebuilt; nothing in the bundle changes."""
    bundle = copy_bundle(trt_built_bundle, tmp_path)
    path = bundle / relative
    flipped = bytearray(path.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    before = snapshot(tmp_path)
    for command in (["check", "--device", "tensorrt"], ["build"]):
        result = run_cli(command[0], str(bundle), *command[1:], env=FAKE_ENV)
        assert_one_line_error(result, 2, relative, "sha256")
        assert "PASSED" not in result.stdout
    assert snapshot(tmp_path) == before


def test_tampered_digest_and_bad_digest_format(tmp_path: Path, exported_bundle: Path) -> None:
    bundle = copy_bundle(exported_bundle, tmp_path)
    edit(bundle, lambda m: m["files"].update({"golden.npz": "0" * 64}))
    assert_refused(bundle, "golden.npz", "differs from the sha256")
    edit(bundle, lambda m: m["files"].update({"golden.npz": "not-a-digest"}))
    assert_refused(bundle, "files['golden.npz']", "pattern")


def test_corrupt_golden_with_a_matching_digest_is_exit_2(tmp_path: Path, exported_bundle: Path) -> None:
    """A golden file that is not an archive, listed with its own digest (as an edit would)."""
    bundle = copy_bundle(exported_bundle, tmp_path)
    (bundle / "golden.npz").write_bytes(b"PK\x03\x04 not really a zip")
    edit(bundle, lambda m: m["files"].update({"golden.npz": sha256_file(bundle / "golden.npz")}))
    result = run_cli("check", str(bundle))
    assert_one_line_error(result, 2, "cannot read the golden file")
    np.savez(bundle / "golden.npz", ref_logits=np.zeros((2, 10), np.float32))  # an archive without inputs
    edit(bundle, lambda m: m["files"].update({"golden.npz": sha256_file(bundle / "golden.npz")}))
    for command in (["check"], ["bench", "--iterations", "1", "--warmup", "0", "--no-torch"]):
        result = run_cli(command[0], str(bundle), *command[1:])
        assert_one_line_error(result, 2, "golden file", "lacks the input array(s) ['input']")


# -- schema violations --------------------------------------------------------------------------------
def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set a dotted path (``golden.batch_sizes.0``) of the manifest."""

    def change(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[int(last) if isinstance(node, list) else last]

    return change


VIOLATIONS: list[tuple[str, str, Callable[[dict[str, Any]], Any], tuple[str, ...]]] = [
    ("list", "static", whole(lambda m: [m]), ("holds a JSON list",)),
    ("string", "static", whole(lambda m: "manifest"), ("holds a JSON str",)),
    ("missing-graphs", "static", _delete("graphs"), ("field 'graphs'", "Field required")),
    ("missing-inputs-dtype", "static", _delete("inputs.0.dtype"), ("inputs[0].dtype", "Field required")),
    ("empty-graphs", "static", _set("graphs", []), ("field 'graphs'", "at least 1")),
    ("bad-dtype", "static", _set("inputs.0.dtype", "float128"), ("inputs[0].dtype", "'float32'")),
    ("batch-zero", "static", _set("golden.batch_sizes", [0]), ("golden.batch_sizes[0]", "greater than or equal to 1")),
    ("batch-negative", "static", _set("golden.batch_sizes", [-3, 1]), ("golden.batch_sizes[0]",)),
    ("batch-string", "static", _set("golden.batch_sizes", ["1"]), ("golden.batch_sizes[0]", "valid integer")),
    ("batch-huge", "static", _set("golden.batch_sizes", [10**30]), ("golden.batch_sizes[0]",)),
    ("batch-float", "static", _set("golden.batch_sizes", [1.5]), ("golden.batch_sizes[0]",)),
    ("nan-tolerance", "static", _set("tolerances", {"": [math.nan, 1e-3]}), ("tolerances[''][0]", "finite")),
    ("inf-tolerance", "static", _set("tolerances", {"": [1e-4, math.inf]}), ("tolerances[''][1]", "finite")),
    ("negative-tolerance", "static", _set("tolerances", {"": [-1e-4, 1e-3]}), ("tolerances[''][0]", "greater than or equal to 0")),
    ("tolerance-shape", "static", _set("tolerances", {"": [1e-4]}), ("tolerances['']", "at least 2")),
    ("tolerance-no-default", "static", _set("tolerances", {"other": [1e-4, 1e-3]}), ("default entry",)),
    ("nan-criteria", "static", _set("parity.criteria", {"top1_agreement": math.nan}), ("parity.criteria.top1_agreement",)),
    ("schema-string", "static", _set("schema_version", "1"), ("schema_version",)),
    ("shape-not-list", "static", _set("inputs.0.shape", "batch"), ("inputs[0].shape", "valid list")),
    ("no-batch-axis", "static", _set("inputs.0.shape", [1, 3, 32, 32]), ("'input' whose first axis is 'batch'",)),
    ("no-logits", "static", _set("outputs.0.name", "scores"), ("'logits'",)),
    ("extra-nesting", "static", _set("golden", {"golden": {"file": "golden.npz"}}), ("golden.file", "Field required")),
    ("unknown-precision", "static", _set("precision", "int4"), ("precision", "'fp32'")),
    ("unknown-form", "static", _set("dynamic", "turbo"), ("dynamic",)),
    ("staged-without-plan", "static", _set("dynamic", "staged"), ("plan for the dynamic form",)),
    ("graph-name-path", "static", _set("graphs.0.name", "../model"), ("graphs[0].name", "pattern")),
    ("graph-not-onnx", "static", _set("graphs.0.file", "golden.npz"), ("graphs[0].file", ".onnx")),
    ("manifest-listed", "static", lambda m: m["files"].update({MANIFEST: "0" * 64}), ("without manifest.json",)),
    ("missing-piece", "gated-staged", lambda m: m.update(graphs=[g for g in m["graphs"] if g["name"] != "head"]),
     ("every piece", "head")),
    ("huge-n-blocks", "gated-staged", _set("gating.n_blocks", 10**30), ("gating", "MACs for every piece")),
    ("skip-out-of-range", "gated-staged", _set("gating.skips", [99]), ("gating", "skips")),
    ("gates-and-exits", "gated-staged", lambda m: m.update(exits={**m["gating"], "kind": "early_exit"}), ("exits",)),
    ("decision-extra-key", "gated-staged", lambda m: m["decisions"]["outputs"][0].update(evil=1),
     ("decisions.outputs[0].evil", "Extra inputs")),
    ("decision-unknown-output", "gated-staged", _set("decisions.outputs.0.probs", "nothing"), ("among the outputs",)),
    ("threshold-nan", "gated-staged", _set("decisions.thresholds.gate_threshold", math.nan), ("gate_threshold", "finite")),
    ("threshold-extra-input", "gated-staged", lambda m: m["decisions"]["thresholds"].update(rm_rf=1.0), ("thresholds.rm_rf",)),
    ("exit-thresholds-length", "early-exit", _set("decisions.thresholds.exit_thresholds", [0.5]), ("one per stage",)),
    ("exit-needs-unknown", "early-exit", _set("exits.needs.1", ["s9_l9"]), ("features earlier stages provide",)),
    ("exit-rule", "early-exit", _set("exits.exit_rule", "coin_flip"), ("exits.exit_rule",)),
    ("exit-macs-missing", "early-exit", _set("exits.macs", {}), ("MACs for every stage",)),
]


@pytest.mark.parametrize(("kind", "change", "fragments"), [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS])
@pytest.mark.slow
def test_schema_violations_are_one_line_exit_2(tmp_path: Path, bundles: Callable[[str], Path], kind: str,
                                                change: Callable[[dict[str, Any]], Any], fragments: tuple[str, ...]) -> None:
    bundle = copy_bundle(bundles(kind), tmp_path)
    edit(bundle, change)
    assert_refused(bundle, *fragments)


def test_schema_violation_on_the_command_line(tmp_path: Path, exported_bundle: Path) -> None:
    bundle = copy_bundle(exported_bundle, tmp_path)
    edit(bundle, _set("golden.batch_sizes", [0, 8]))
    result = run_cli("check", str(bundle))
    assert_one_line_error(result, 2, "golden.batch_sizes[0]", "greater than or equal to 1", "(got 0)", "re-export")
    edit(bundle, whole(lambda m: [m]))
    assert_one_line_error(run_cli("inspect", str(bundle)), 2, "holds a JSON list")


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe not utf-8", b"[" * 100000 + b"]" * 100000, b"NaN"],
                         ids=["empty", "truncated", "not-utf8", "deeply-nested", "nan"])
def test_unreadable_manifests(tmp_path: Path, exported_bundle: Path, content: bytes) -> None:
    bundle = copy_bundle(exported_bundle, tmp_path)
    (bundle / MANIFEST).write_bytes(content)
    assert_refused(bundle, MANIFEST)


def test_oversized_manifest_is_not_read_whole(tmp_path: Path, exported_bundle: Path) -> None:
    bundle = copy_bundle(exported_bundle, tmp_path)
    with open(bundle / MANIFEST, "r+b") as handle:  # sparse: no real disk used
        handle.truncate(1 << 30)
    assert_refused(bundle, "larger than 64 MiB")


# -- property: any mutation loads or is a BundleError --------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indices) into a JSON document, the root included."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node[:6]):
            found += _paths(value, (*prefix, index))
    return found


def _mutate(manifest: Any, path: tuple, how: str, value: Any) -> Any:
    """The manifest with the node at ``path`` replaced, deleted, nested one level deeper, or given
    an extra key."""
    if not path:
        return value if how == "replace" else [manifest] if how == "nest" else manifest
    document = copy.deepcopy(manifest)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "replace":
        parent[last] = value
    elif how == "nest":
        parent[last] = {"value": parent[last]} if isinstance(value, dict) else [parent[last]]
    elif isinstance(parent[last], dict):
        parent[last]["extra"] = value
    else:
        parent[last] = value
    return document


@pytest.mark.parametrize("kind", ["static", "gated-staged", "early-exit"])
def test_any_manifest_mutation_loads_or_is_a_bundle_error(tmp_path_factory: pytest.TempPathFactory,
                                                          bundles: Callable[[str], Path], kind: str) -> None:
    bundle = copy_bundle(bundles(kind), tmp_path_factory.mktemp("property"))
    original = read_manifest(bundle)
    paths = _paths(original)
    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(index=st.integers(0, len(paths) - 1), how=st.sampled_from(["replace", "delete", "nest", "extra"]),
           value=JSON_VALUES)
    def mutation_is_handled(index: int, how: str, value: Any) -> None:
        write_manifest(bundle, _mutate(original, paths[index], how, value))
        try:
            load_bundle(bundle)
            outcomes["loaded"] += 1
        except BundleError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1

    mutation_is_handled()
    assert outcomes["refused"] > 0  # the mutations reach the schema
    write_manifest(bundle, original)
    load_bundle(bundle)
