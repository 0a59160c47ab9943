"""The TensorRT target on a machine without TensorRT or a GPU (issue 7 parts 1, 2, 4).

- ``export --target trt``: the bundle is written and checked in ONNX Runtime, records the build
  (``slimdeploy build DIR``, one trtexec line per graph with min/opt/max shapes, BUILD.md,
  build.sh), and the command exits 3 saying so (0 with ``--prepare-only``); ``compact`` is
  refused (exit 2); nothing imports tensorrt or cuda.
- ``slimdeploy build``: exit 3 without TensorRT; with the stand-ins of ``tests/fakes`` (ONNX
  Runtime behind TensorRT's documented Python API) the whole path runs: engines built per
  graph with their profiles, written atomically with their sha256, timing cache kept and
  reused, then ``check --device tensorrt`` through ``TrtRunner`` and the staged controller.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from slimdeploy.bundle import load_bundle
from slimdeploy.engines.trt_build import (
    BuildSpec,
    build_plan,
    profile_shapes,
    trtexec_command,
)
from slimdeploy.errors import BadInputError
from tests.conftest import REPO, assert_clean_error, run_cli
from tests.test_no_torch import BLOCKER

FAKES = REPO / "tests" / "fakes"
FAKE_ENV = {"PYTHONPATH": f"{FAKES}:{REPO}"}


# Records the modules a process ended with (torch may *try* cuda.bindings: only successes count).
MODULE_RECORDER = """
import atexit, json, os, sys

atexit.register(lambda: open(os.environ["RECORD_MODULES"], "w").write(json.dumps(sorted(sys.modules))))
"""


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def static_trt_bundle(tmp_path_factory: pytest.TempPathFactory, zoo_resnet_checkpoint: Path) -> Path:
    """The trained SPConv ResNet-20 exported for TensorRT from the command line, where TensorRT
    is missing: exit 3, bundle written. The modules it ended with prove tensorrt/cuda stayed out."""
    root = tmp_path_factory.mktemp("trt")
    out, record = root / "r20", root / "modules.json"
    (root / "sitecustomize.py").write_text(MODULE_RECORDER)
    result = run_cli("export", str(zoo_resnet_checkpoint), "--target", "trt", "--out", str(out), "--samples", "16",
                     "--batch-sizes", "1,8", env={"PYTHONPATH": f"{root}:{REPO}", "RECORD_MODULES": str(record)})
    loaded = json.loads(record.read_text())
    assert "torch" in loaded  # the recorder works: export imports torch
    assert not [name for name in loaded if name.split(".")[0] in ("tensorrt", "cuda")], "export imported tensorrt/cuda"
    assert_clean_error(result, 3, "TensorRT is not available here", f"slimdeploy build {out}", "--prepare-only")
    assert "parity PASSED" in result.stdout
    return out


@pytest.fixture(scope="module")
def staged_trt_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo SkipNet (recurrent gates) for TensorRT: staged by default, --prepare-only exits 0."""
    out = tmp_path_factory.mktemp("trt") / "skipnet"
    result = run_cli("export", "zoo:skipnet38_digits", "--target", "trt", "--prepare-only", "--out", str(out),
                     "--samples", "16", "--batch-sizes", "1,8", "--min-batch", "2", "--opt-batch", "4",
                     "--max-batch", "16", "--workspace", "256")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trtexec --onnx=stages/stem.onnx" in result.stdout
    return out


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """The stand-in tensorrt and cuda-python importable in this process, removed afterwards."""
    monkeypatch.syspath_prepend(str(FAKES))
    import tensorrt

    yield tensorrt
    for name in [m for m in sys.modules if m.split(".")[0] in ("tensorrt", "cuda")]:
        del sys.modules[name]


def _timing_cache(bundle: Path) -> dict:
    """The fields of the stand-in's timing cache in a bundle: version, device, builds."""
    data = (bundle / "trt" / "timing.cache").read_bytes()
    magic = b"FAKETRT-TIMING-CACHE\n"
    assert data.startswith(magic), data[:40]
    return json.loads(data[len(magic):])


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / bundle.name
    shutil.copytree(bundle, target)
    return target


# -- export --target trt ---------------------------------------------------------------------------
@pytest.mark.slow
def test_static_bundle_records_the_build(static_trt_bundle: Path) -> None:
    manifest = _manifest(static_trt_bundle)
    assert manifest["target"] == "trt" and manifest["dynamic"] is None and manifest["parity"]["passed"]
    plan = manifest["trt"]
    assert plan["tensorrt"] == ">=10.3,<12" and plan["strongly_typed"] is True
    assert plan["batch"] == {"min": 1, "opt": 8, "max": 32}
    assert plan["build_command"] == "slimdeploy build r20"
    assert plan["engines"] is None and plan["built"] is None
    assert plan["trtexec"] == [
        "trtexec --onnx=model.onnx --saveEngine=trt/model.engine --stronglyTyped --skipInference "
        "--minShapes=input:1x3x32x32 --optShapes=input:8x3x32x32 --maxShapes=input:32x3x32x32 "
        "--memPoolSize=workspace:1024M --timingCacheFile=trt/timing.cache --noTF32"
    ]
    for flag in ("--fp16", "--int8", "--best"):  # 11.x rejects them: precision lives in the ONNX
        assert flag not in plan["trtexec"][0]
    assert "lint" in plan
    # BUILD.md and build.sh ride along, hashed like every file of the bundle.
    assert {"BUILD.md", "build.sh"} <= set(manifest["files"])
    script = (static_trt_bundle / "build.sh").read_text()
    assert plan["trtexec"][0] in script and 'cd "$(dirname "$0")"' in script
    assert "slimdeploy build r20" in (static_trt_bundle / "BUILD.md").read_text()
    load_bundle(static_trt_bundle)  # every hash verifies


@pytest.mark.slow
def test_staged_bundle_has_one_trtexec_line_per_piece(staged_trt_bundle: Path) -> None:
    manifest = _manifest(staged_trt_bundle)
    assert manifest["dynamic"] == "staged"  # the TensorRT default for gated models
    plan = manifest["trt"]
    assert plan["batch"] == {"min": 2, "opt": 4, "max": 16} and plan["spec"]["workspace_mb"] == 256
    assert [g["name"] for g in plan["graphs"]] == manifest["stages"]
    assert len(plan["trtexec"]) == len(manifest["stages"])
    by_name = {g["name"]: g for g in plan["graphs"]}
    # Pieces that see every row start at --min-batch; routed pieces get any subset, down to 1.
    assert by_name["stem"]["shapes"]["x"]["min"][0] == 2
    assert by_name["exec1"]["shapes"]["x"]["min"][0] == 1
    assert by_name["exec1"]["shapes"]["x"]["max"][0] == 16
    gate = by_name["gate0"]
    assert set(gate["shapes"]) == {"x", "h", "c"}
    width = manifest["gating"]["state_width"]
    assert f"--minShapes=x:2x16x32x32,h:2x{width},c:2x{width}" in gate["trtexec"]
    assert "--memPoolSize=workspace:256M" in gate["trtexec"]
    assert gate["engine"] == "trt/gate0.engine" and gate["onnx"] == "stages/gate0.onnx"


@pytest.mark.slow
def test_compact_is_refused_for_tensorrt(tmp_path: Path) -> None:
    result = run_cli("export", "zoo:skipnet38_digits", "--target", "trt", "--dynamic", "compact", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "compact", "--dynamic staged")
    assert not (tmp_path / "b").exists()


def test_batch_options_need_trt_target_and_an_ordered_range(tmp_path: Path, zoo_resnet_checkpoint: Path) -> None:
    result = run_cli("export", str(zoo_resnet_checkpoint), "--max-batch", "4", "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "--target trt")
    result = run_cli("export", str(zoo_resnet_checkpoint), "--target", "trt", "--min-batch", "8", "--opt-batch", "4",
                     "--out", str(tmp_path / "b"))
    assert_clean_error(result, 2, "not ordered")
    assert not (tmp_path / "b").exists()


def test_profile_and_trtexec_helpers() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[helper.make_tensor("t", TensorProto.FLOAT, [], [0.5])],
    )
    model = helper.make_model(graph)
    spec = BuildSpec(min_batch=2, opt_batch=3, max_batch=5)
    assert profile_shapes(model, spec) == {"x": {"min": [2, 4], "opt": [3, 4], "max": [5, 4]}}  # 't' has a default
    assert profile_shapes(model, spec, min_batch=1)["x"]["min"] == [1, 4]
    line = trtexec_command("a b.onnx", "trt/m.engine", profile_shapes(model, spec), BuildSpec(tf32=True))
    assert line.startswith("trtexec '--onnx=a b.onnx' ") and "--noTF32" not in line
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "width"
    with pytest.raises(BadInputError, match="dynamic axis 1"):
        profile_shapes(model, spec)
    with pytest.raises(BadInputError, match="compact"):
        build_plan({"model": ("model.onnx", model)}, spec, "compact")
    with pytest.raises(BadInputError, match="not ordered"):
        BuildSpec(min_batch=4, opt_batch=2, max_batch=8)
    # An opt batch that was not given follows the range; one that was given is kept (and checked).
    assert BuildSpec.resolve({}, {"max_batch": 4}) == BuildSpec(min_batch=1, opt_batch=4, max_batch=4)
    assert BuildSpec.resolve({"min_batch": 2, "opt_batch": 8, "max_batch": 32}, {"min_batch": 16}).opt_batch == 16
    with pytest.raises(BadInputError, match="not ordered"):
        BuildSpec.resolve({}, {"opt_batch": 64})


@pytest.mark.slow
def test_cpu_paths_import_no_tensorrt_or_cuda(static_trt_bundle: Path) -> None:
    import subprocess

    code = (
        "import sys, slimdeploy, slimdeploy.cli, slimdeploy.build, slimdeploy.export, slimdeploy.engines.trt_runner;"
        "from slimdeploy.engines import trt_build;"
        "from slimdeploy.bundle import bundle_runner, load_bundle;"
        "from slimdeploy.parity import check_bundle;"
        f"b = load_bundle({str(static_trt_bundle)!r});"
        "trt_build.is_available(); trt_build.build_readme(b.manifest['trt'], None);"
        f"assert check_bundle({str(static_trt_bundle)!r}).passed;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cuda')]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


# -- slimdeploy build ------------------------------------------------------------------------------
def test_build_without_tensorrt_exits_3(tmp_path: Path, static_trt_bundle: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)  # as on a machine without TensorRT
    bundle = _copy(static_trt_bundle, tmp_path)
    before = (bundle / "manifest.json").read_text()
    result = run_cli("build", str(bundle), env={"PYTHONPATH": f"{site}:{REPO}"})
    assert_clean_error(result, 3, "tensorrt", "pip install 'slimdeploy[trt]'", "comes with JetPack")
    assert (bundle / "manifest.json").read_text() == before and not (bundle / "trt").exists()
    # Checking engines needs TensorRT first: without it, that is what the error says (exit 3),
    # not "build them on this machine", which would fail the same way.
    result = run_cli("check", str(bundle), "--device", "tensorrt", env={"PYTHONPATH": f"{site}:{REPO}"})
    assert_clean_error(result, 3, "TensorRT is not installed here", "it holds no engines yet")
    assert "build them on this machine" not in result.stderr
    # With TensorRT (the stand-in) and no engines yet, the fix is to build them.
    result = run_cli("check", str(bundle), "--device", "tensorrt", env=FAKE_ENV)
    assert_clean_error(result, 2, "no TensorRT engines", "slimdeploy build")


@pytest.mark.slow
def test_build_and_check_with_stand_in_tensorrt(tmp_path: Path, static_trt_bundle: Path) -> None:
    bundle = _copy(static_trt_bundle, tmp_path)
    result = run_cli("build", str(bundle), "--json", "-", env=FAKE_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)
    assert out["report"]["passed"] and out["report"]["candidate"] == "tensorrt"
    manifest = _manifest(bundle)
    plan = manifest["trt"]
    assert plan["engines"] == {"model": "trt/model.engine"}
    assert plan["built"]["tensorrt"] == "10.3.0" and plan["built"]["parity"]["passed"] is True
    assert plan["built"]["parity"]["batch_sizes"] == [1, 8]
    assert {"trt/model.engine", "trt/timing.cache"} <= set(manifest["files"])
    load_bundle(bundle)  # the engine and cache hashes were recorded
    engine = (bundle / "trt" / "model.engine").read_bytes()
    header = json.loads(engine.split(b"\n")[1])
    # The engine was built as recorded: one profile from the batch range, workspace, no TF32.
    assert header["profile"] == {"input": [[1, 3, 32, 32], [8, 3, 32, 32], [32, 3, 32, 32]]}
    assert header["workspace"] == 1024 << 20 and header["tf32"] is False
    assert _timing_cache(bundle) == {"version": "10.3.0", "device": "fake-gpu sm_87", "builds": 1}
    result = run_cli("inspect", str(bundle), "--json", "-")
    assert json.loads(result.stdout)["tensorrt"] == {
        "batch": {"min": 1, "opt": 8, "max": 32}, "engines": 1, "built_with": "10.3.0", "engines_passed": True,
        "build_command": "slimdeploy build r20"}

    # check through the engine; its outputs are not ONNX Runtime's (the stand-in rounds
    # differently, as TensorRT does) but within the bundle's tolerance of them.
    result = run_cli("check", str(bundle), "--device", "tensorrt", "--batch-sizes", "3,16", env=FAKE_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(bundle / "golden.npz") as golden:
        np.savez(tmp_path / "in.npz", input=golden["input"][:5])
    for device in ("tensorrt", "cpu"):
        result = run_cli("run", str(bundle), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / f"{device}.npz"),
                         "--device", device, env=FAKE_ENV)
        assert result.returncode == 0, result.stderr
    engine_logits, ort_logits = np.load(tmp_path / "tensorrt.npz")["logits"], np.load(tmp_path / "cpu.npz")["logits"]
    atol, rtol = manifest["tolerances"].get("logits") or manifest["tolerances"][""]
    assert not np.array_equal(engine_logits, ort_logits)
    np.testing.assert_allclose(engine_logits, ort_logits, rtol=rtol, atol=atol)
    result = run_cli("bench", str(bundle), "--device", "tensorrt", "--batch", "2", "--warmup", "1", "--iterations", "2",
                     "--no-torch", "--json", "-", env=FAKE_ENV)
    assert result.returncode == 0, result.stderr
    assert [(r["runner"], r["batch_size"]) for r in json.loads(result.stdout)["results"]] == [("tensorrt", 2)]

    # A rebuild with a narrower range reuses the timing cache and refuses batches outside it.
    result = run_cli("build", str(bundle), "--max-batch", "8", env=FAKE_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _manifest(bundle)["trt"]["batch"] == {"min": 1, "opt": 8, "max": 8}
    assert _timing_cache(bundle)["builds"] == 2
    result = run_cli("check", str(bundle), "--device", "tensorrt", "--batch-sizes", "16", env=FAKE_ENV)
    assert_clean_error(result, 2, "TensorRT refused shape [16, 3, 32, 32]", "batch 1 to 8")
    result = run_cli("build", str(bundle), "--trt-version", "11.1", env=FAKE_ENV)
    assert_clean_error(result, 2, "TensorRT 10.3.0 is installed but --trt-version 11.1")


def test_trt_version_is_the_loaded_modules_and_compared_in_full(tmp_path: Path, static_trt_bundle: Path, fake_trt: object,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from slimdeploy import versions
    from slimdeploy.build import build_bundle
    from slimdeploy.engines.trt_build import trt_version, version_matches

    # Metadata of another install (a pip wheel beside the image's TensorRT) does not win over
    # the bindings that run.
    monkeypatch.setattr(versions, "package_version", lambda component: "10.16.0.1")
    assert trt_version(fake_trt) == "10.3.0" and trt_version() == "10.16.0.1"
    assert version_matches("10.3.0.30", "10.3") and version_matches("10.3.0.30", "10.3.0.30")
    assert not version_matches("10.3.0.30", "10.3.0.26") and not version_matches("10.30.1", "10.3")
    # Same major.minor, another build: refused before anything is written.
    bundle = _copy(static_trt_bundle, tmp_path)
    with pytest.raises(BadInputError, match=r"TensorRT 10\.3\.0 is installed but --trt-version 10\.3\.1 was asked for"):
        build_bundle(bundle, trt_version_expected="10.3.1", check=False)
    assert not (bundle / "trt").exists()
    result = build_bundle(bundle, trt_version_expected="10.3", check=False)
    assert result.manifest["trt"]["built"]["tensorrt"] == "10.3.0"


def test_static_batch_graph_is_checked_at_its_own_batch(tmp_path: Path, static_trt_bundle: Path, fake_trt: object) -> None:
    """A graph with a fixed batch gets a profile fixed at that batch, whatever the batch range:
    build checks (and the runner reports) the engine's range, not the plan's."""
    from slimdeploy.build import build_bundle
    from slimdeploy.bundle import update_bundle
    from slimdeploy.engines.trt_build import engine_batch_range

    bundle = _copy(static_trt_bundle, tmp_path)
    model = onnx.load(str(bundle / "model.onnx"))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    update_bundle(bundle, {"model.onnx": model.SerializeToString()}, _manifest(bundle))
    result = build_bundle(bundle, overrides={"max_batch": 16})  # a new range: the plan is made again
    plan = result.manifest["trt"]
    assert plan["batch"] == {"min": 1, "opt": 8, "max": 16}
    assert plan["graphs"][0]["shapes"] == {"input": {key: [1, 3, 32, 32] for key in ("min", "opt", "max")}}
    assert engine_batch_range(plan) == (1, 1)
    assert result.passed and plan["built"]["parity"]["batch_sizes"] == [1]  # the golden batch 8 is outside
    with pytest.raises(BadInputError, match="batch 1 to 1"):
        from slimdeploy.bundle import bundle_runner, load_bundle

        with bundle_runner(load_bundle(bundle), device="tensorrt") as runner:
            runner.infer({"input": np.zeros((2, 3, 32, 32), np.float32)}, check_inputs=False)


@pytest.mark.slow
def test_staged_build_runs_one_engine_per_piece(tmp_path: Path, staged_trt_bundle: Path) -> None:
    bundle = _copy(staged_trt_bundle, tmp_path)
    result = run_cli("build", str(bundle), "--json", "-", env=FAKE_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["passed"] and all(g["agreement"] == 1.0 for g in report["decisions"]["gates"])
    manifest = _manifest(bundle)
    assert set(manifest["trt"]["engines"]) == set(manifest["stages"])
    assert _timing_cache(bundle)["builds"] == len(manifest["stages"])
    # exec pieces were built from batch 1 (rows routed to them), the stem from --min-batch.
    header = json.loads((bundle / "trt" / "exec1.engine").read_bytes().split(b"\n")[1])
    assert header["profile"]["x"][0][0] == 1
    header = json.loads((bundle / "trt" / "stem.engine").read_bytes().split(b"\n")[1])
    assert header["profile"]["x"][0][0] == 2


@pytest.mark.slow
def test_if_form_warns_and_builds_with_its_threshold_folded(tmp_path: Path) -> None:
    out = tmp_path / "if"
    result = run_cli("export", "zoo:skipnet38_digits", "--target", "trt", "--dynamic", "if", "--prepare-only",
                     "--out", str(out), "--samples", "16", "--batch-sizes", "1,8")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prefer --dynamic staged" in " ".join(result.stderr.split())
    manifest = _manifest(out)
    assert any("IIfConditional" in note for note in manifest["trt"]["notes"])
    assert "Note: the 'if' form" in (out / "BUILD.md").read_text()
    # gate_threshold has a default initializer: it is not part of the profile.
    assert list(manifest["trt"]["graphs"][0]["shapes"]) == ["input"]
    result = run_cli("build", str(out), env=FAKE_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    # The stand-in parser folds initializer-backed inputs into the engine, as weights: the
    # default threshold is accepted, another one is refused with the fix.
    with np.load(out / "golden.npz") as golden:
        x = golden["input"][:2]
    np.savez(tmp_path / "same.npz", input=x, gate_threshold=np.array(0.5, np.float32))
    np.savez(tmp_path / "other.npz", input=x, gate_threshold=np.array(0.9, np.float32))
    result = run_cli("run", str(out), "--inputs", str(tmp_path / "same.npz"), "--out", str(tmp_path / "o.npz"), "--device", "tensorrt", env=FAKE_ENV)
    assert result.returncode == 0, result.stderr
    result = run_cli("run", str(out), "--inputs", str(tmp_path / "other.npz"), "--out", str(tmp_path / "p.npz"), "--device", "tensorrt", env=FAKE_ENV)
    assert_clean_error(result, 2, "'gate_threshold' is fixed at 0.5", "staged")


@pytest.mark.slow
def test_loop_form_warns_for_tensorrt(tmp_path: Path) -> None:
    out = tmp_path / "loop"
    result = run_cli("export", "zoo:skipnet38_digits", "--target", "trt", "--dynamic", "loop", "--prepare-only",
                     "--out", str(out), "--samples", "8", "--batch-sizes", "1,4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prefer --dynamic staged" in " ".join(result.stderr.split())
    manifest = _manifest(out)
    assert manifest["dynamic"] == "loop"
    assert any("ILoop" in note and "multi-input convolutions" in note for note in manifest["trt"]["notes"])
    assert manifest["trt"]["lint"]["passed"]


def test_parser_errors_are_reported_in_full(tmp_path: Path, fake_trt: object) -> None:
    from slimdeploy.engines.trt_build import ParseError, build_engine

    nodes = [helper.make_node("Compress", ["x", "keep"], ["a"], name="first", axis=0),
             helper.make_node("Unique", ["a"], ["y"], name="second")]
    graph = helper.make_graph(
        nodes, "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"]), helper.make_tensor_value_info("keep", TensorProto.BOOL, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ParseError) as caught:
        build_engine(path, {}, BuildSpec())
    message = str(caught.value)
    assert "2 error(s)" in message and "In node first" in message and "op: Compress" in message and "op: Unique" in message
    assert caught.value.exit_code == 1


def _threshold_graph(folder: Path) -> Path:
    """A graph ``y = uint8(x > t)`` (x [batch, 3], t a 0-D input), saved in ``folder``."""
    graph = helper.make_graph(
        [helper.make_node("Greater", ["x", "t"], ["g"]), helper.make_node("Cast", ["g"], ["y"], to=TensorProto.UINT8)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]), helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, ["batch", 3])],
    )
    path = folder / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_runner_with_cuda_python_buffers(tmp_path: Path, fake_trt: object) -> None:
    """TrtRunner directly: engine from a lazy builder, named I/O, dynamic batch, cuda-python
    buffers, optional threshold input that the engine keeps as a real input."""
    from slimdeploy.engines.trt_build import EngineFromOnnx
    from slimdeploy.engines.trt_runner import TrtRunner

    path = _threshold_graph(tmp_path)
    spec = BuildSpec(opt_batch=2, max_batch=4)
    shapes = profile_shapes(onnx.load(str(path)), spec)
    runner = TrtRunner(EngineFromOnnx(path, shapes, spec), defaults={"t": np.float32(0.5)},
                       batch_range=(1, 4), buffers="cuda-python")
    with runner:
        meta = runner.input_metadata()
        assert meta["x"].shape == ("batch", 3) and meta["t"].optional and runner.output_names() == ["y"]
        x = np.array([[0.1, 0.6, 0.5], [0.9, 0.2, 0.7]], np.float32)
        np.testing.assert_array_equal(runner.infer({"x": x})["y"], (x > 0.5).astype(np.uint8))
        np.testing.assert_array_equal(runner.infer({"x": x[:1], "t": np.array(0.05, np.float32)})["y"], np.ones((1, 3), np.uint8))
        with pytest.raises(BadInputError, match="batch 1 to 4"):
            runner.infer({"x": np.zeros((5, 3), np.float32)})
        # A 0-row batch (below the engine's batch 1) gets empty outputs shaped by the engine.
        empty = runner.infer({"x": np.zeros((0, 3), np.float32)})["y"]
        assert empty.shape == (0, 3) and empty.dtype == np.uint8
    import cuda.bindings.runtime as fake_cudart

    assert fake_cudart.ALLOCATIONS == {} and not fake_cudart.STREAMS  # buffers and stream freed on deactivate


def test_runner_refuses_foreign_engines_and_missing_buffers(tmp_path: Path, fake_trt: object) -> None:
    from slimdeploy.engines.trt_runner import TrtRunner
    from slimdeploy.errors import BackendUnavailableError, BundleError

    # An engine from another TensorRT version or GPU does not deserialise: the fix is a rebuild.
    with pytest.raises(BundleError, match="rebuild on this machine"):
        TrtRunner(b"an engine built elsewhere").activate()
    import cuda.bindings.runtime as fake_cudart

    assert not fake_cudart.STREAMS  # the stream made before deserialising was not leaked
    with pytest.raises(BundleError, match="does not exist"):
        TrtRunner(tmp_path / "missing.engine").activate()
    # torch buffers need a CUDA device, which this machine lacks.
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        TrtRunner(b"", buffers="torch").activate()
    with pytest.raises(BadInputError, match="unknown buffers"):
        TrtRunner(b"", buffers="pycuda")


def test_auto_buffers_need_cuda_python_not_the_cuda_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cuda`` alone is a namespace (cuda-core and others install into it): "auto" buffers
    then come from torch, and only cuda-python's runtime bindings select cuda-python."""
    from slimdeploy.engines import trt_runner
    from slimdeploy.engines.trt_build import cuda_python_available
    from slimdeploy.errors import BackendUnavailableError

    (tmp_path / "cuda" / "core").mkdir(parents=True)  # a namespace package, as cuda-core leaves it
    (tmp_path / "cuda" / "core" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert not cuda_python_available()
        with pytest.raises(BackendUnavailableError, match="torch sees no CUDA GPU"):  # torch chosen; no GPU here
            trt_runner._device_memory("auto")
        monkeypatch.syspath_prepend(str(FAKES))  # cuda-python's bindings (the stand-in)
        assert cuda_python_available()
        assert not [name for name in sys.modules if name.split(".")[0] == "cuda"]  # looked up, not imported
        memory = trt_runner._device_memory("auto")
        assert isinstance(memory, trt_runner._CudaPythonMemory)
        memory.release()
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "cuda"]:
            del sys.modules[name]


def test_export_lints_every_graph_for_tensorrt() -> None:
    """The lint's verdict at export: every graph linted by name, one bad graph fails the bundle."""
    from slimdeploy.export import ExportResult
    from slimdeploy.exporters.trt_lint import lint_graphs

    def graph(name: str, op: str) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        return helper.make_model(helper.make_graph([helper.make_node(op, ["x"], ["y"], name=f"{name}_{op}")], name, [x], [y]),
                                 opset_imports=[helper.make_opsetid("", 18)])

    # Relu is in TensorRT's operator matrix; an op from a made-up domain-less name is not.
    good, bad = graph("stem", "Relu"), graph("head", "NoSuchOperator")
    lint = lint_graphs({"stem": good, "head": bad})
    assert lint["ran"] is True and lint["passed"] is False
    assert lint["graphs"]["stem"]["findings"] == [] or all(f["severity"] != "error" for f in lint["graphs"]["stem"]["findings"])
    errors = [f for f in lint["graphs"]["head"]["findings"] if f["severity"] == "error"]
    assert any(f["node"] == "head_NoSuchOperator" for f in errors)
    result = ExportResult(Path("b"), {"trt": {"lint": lint}}, report=None)  # type: ignore[arg-type]
    assert result.lint_passed is False
    assert lint_graphs({"stem": good})["passed"] is True


# -- the stand-ins refuse what TensorRT and CUDA refuse (issue 19 part 3) -------------------------
def _one_node_model(op: str, opset: int = 18, domain: str = "", **attributes: object) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    node = helper.make_node(op, ["x"], ["y"], name=f"the_{op}", domain=domain, **attributes)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], op, [x], [y]), opset_imports=opsets)


def _qdq_model(zero_point: np.ndarray) -> onnx.ModelProto:
    """x → QuantizeLinear → DequantizeLinear → y with the given zero point (scale 0.1)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="quantize"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dequantize")]
    initializers = [onnx.numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
                    onnx.numpy_helper.from_array(zero_point, "zero")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _uint8_inside_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Cast", ["x"], ["bytes"], name="to_uint8", to=TensorProto.UINT8),
             helper.make_node("Cast", ["bytes"], ["y"], name="back", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "u8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_stand_in_parser_refuses_what_the_operator_matrix_refuses(tmp_path: Path, fake_trt: object) -> None:
    """The stand-in parses with the packaged matrix (TensorRT 10.3 → the 10.1 matrix, opsets
    9 to 20): unsupported or unknown operators, other domains, opsets outside the range, UINT8
    inside the network and asymmetric or UINT8 Q/DQ are parser errors, as on TensorRT."""
    from slimdeploy.engines.trt_build import ParseError, build_engine

    facts = json.loads((REPO / "slimdeploy" / "exporters" / "trt_lint" / "trt_ops.json").read_text())
    assert facts["operators_10_1"]["Det"]["supported"] is False and "Relu" in facts["operators_10_1"]
    assert "opset 9 to opset 20" in facts["_meta"]["secondary_source"]["header_text"]
    refused = {
        "unsupported": (_one_node_model("Det"), "op: Det"),
        "unknown": (_one_node_model("NoSuchOperator"), "op: NoSuchOperator"),
        "other-domain": (_one_node_model("FusedGelu", domain="com.microsoft"), "op: FusedGelu"),
        "opset": (_one_node_model("Relu", opset=21), "opset 21 is outside 9 to 20"),
        "uint8-inside": (_uint8_inside_model(), "UINT8 tensor bytes inside the network"),
        "uint8-zero-point": (_qdq_model(np.array(128, np.uint8)), "symmetric quantization"),
        "nonzero-zero-point": (_qdq_model(np.array(3, np.int8)), "symmetric quantization"),
    }
    for label, (model, fragment) in refused.items():
        path = tmp_path / f"{label}.onnx"
        onnx.save(model, str(path))
        with pytest.raises(ParseError) as caught:
            build_engine(path, {"x": {"min": [1, 4], "opt": [1, 4], "max": [2, 4]}}, BuildSpec())
        assert fragment in str(caught.value), (label, str(caught.value))
    for label, model in {"relu": _one_node_model("Relu"), "symmetric-qdq": _qdq_model(np.array(0, np.int8))}.items():
        path = tmp_path / f"{label}.onnx"
        onnx.save(model, str(path))
        assert build_engine(path, {"x": {"min": [1, 4], "opt": [1, 4], "max": [2, 4]}}, BuildSpec()).engine


def test_stand_in_engine_takes_device_memory_after_shapes(tmp_path: Path, fake_trt: Any) -> None:
    """Addresses must come from cudaMalloc (host pointers are refused), an input's address only
    after its shape, and each buffer must hold its tensor at the current shape; a runner handing
    the engine host memory fails to enqueue instead of computing."""
    import cuda.bindings.runtime as cudart

    from slimdeploy.engines import trt_runner
    from slimdeploy.engines.trt_build import EngineFromOnnx
    from slimdeploy.errors import SlimDeployError

    path = _threshold_graph(tmp_path)
    spec = BuildSpec(opt_batch=2, max_batch=4)
    engine_bytes = EngineFromOnnx(path, profile_shapes(onnx.load(str(path)), spec), spec)()
    engine = fake_trt.Runtime(fake_trt.Logger()).deserialize_cuda_engine(engine_bytes)
    context = engine.create_execution_context()
    x = np.array([[0.1, 0.6, 0.5]], np.float32)
    _, device_x = cudart.cudaMalloc(x.nbytes)
    assert not context.set_tensor_address("x", device_x)  # before its shape
    assert context.get_tensor_shape("y") == (-1, 3)  # unknown until every input shape is set
    assert context.set_input_shape("x", x.shape) and context.set_input_shape("t", ())
    assert not context.set_tensor_address("x", x.ctypes.data)  # host memory
    assert context.set_tensor_address("x", device_x)
    _, stream = cudart.cudaStreamCreate()
    assert not context.execute_async_v3(int(stream))  # t and y have no address yet
    cudart.cudaFree(device_x)
    cudart.cudaStreamDestroy(stream)

    # The runner with its upload handing the host array's own pointer: refused, not computed.
    class HostPointers(trt_runner._CudaPythonMemory):
        def upload(self, name: str, array: np.ndarray) -> int:
            super().upload(name, array)
            return int(array.ctypes.data)

    runner = trt_runner.TrtRunner(engine_bytes, defaults={"t": np.float32(0.5)}, buffers="cuda-python")
    with runner:
        runner.memory.release()
        runner.memory = HostPointers()
        with pytest.raises(SlimDeployError, match="failed to enqueue"):
            runner.infer({"x": x})
    assert cudart.ALLOCATIONS == {} and not cudart.STREAMS


def test_stand_in_work_waits_for_the_stream(tmp_path: Path, fake_trt: Any) -> None:
    """Copies and the engine's work are queued on the stream: nothing reaches host memory until
    the stream is synchronised, so a runner that reads its outputs before then reads nothing."""
    import cuda.bindings.runtime as cudart

    from slimdeploy.engines.trt_build import EngineFromOnnx

    path = _threshold_graph(tmp_path)
    spec = BuildSpec(opt_batch=2, max_batch=4)
    engine = fake_trt.Runtime(fake_trt.Logger()).deserialize_cuda_engine(
        EngineFromOnnx(path, profile_shapes(onnx.load(str(path)), spec), spec)())
    context = engine.create_execution_context()
    x, t = np.array([[0.1, 0.6, 0.5], [0.9, 0.2, 0.7]], np.float32), np.array(0.5, np.float32)
    y = np.full((2, 3), 7, np.uint8)
    _, stream = cudart.cudaStreamCreate()
    pointers = {name: cudart.cudaMalloc(max(array.nbytes, 1))[1] for name, array in (("x", x), ("t", t), ("y", y))}
    context.set_input_shape("x", x.shape)
    context.set_input_shape("t", ())
    for name, array in (("x", x), ("t", t)):
        assert cudart.cudaMemcpyAsync(pointers[name], array.ctypes.data, array.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)[0] == 0
    for name in pointers:
        assert context.set_tensor_address(name, pointers[name])
    assert context.execute_async_v3(int(stream))
    assert cudart.cudaMemcpyAsync(y.ctypes.data, pointers["y"], y.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)[0] == 0
    np.testing.assert_array_equal(y, np.full((2, 3), 7, np.uint8))  # queued, not done
    assert cudart.cudaStreamSynchronize(stream)[0] == 0
    np.testing.assert_array_equal(y, (x > t).astype(np.uint8))
    # Another stream's handle, or a destroyed one, takes no work.
    cudart.cudaStreamDestroy(stream)
    assert not context.execute_async_v3(int(stream))
    for pointer in pointers.values():
        cudart.cudaFree(pointer)


def test_stand_in_refuses_a_foreign_timing_cache(tmp_path: Path, fake_trt: Any) -> None:
    """A cache from another GPU or TensorRT version is refused by ``set_timing_cache``, and
    bytes that are no cache by ``create_timing_cache``: the build then starts from an empty
    cache of this machine instead of mixing timings; this machine's own cache is reused."""
    from slimdeploy.engines.trt_build import build_engine

    path = _threshold_graph(tmp_path)
    spec = BuildSpec(opt_batch=2, max_batch=4)
    shapes = profile_shapes(onnx.load(str(path)), spec)
    config = fake_trt.IBuilderConfig()
    own = fake_trt.ITimingCache(fake_trt.__version__, fake_trt.DEVICE, 3).serialize()
    foreign_gpu = fake_trt.ITimingCache(fake_trt.__version__, "another gpu sm_90", 5).serialize()
    foreign_version = fake_trt.ITimingCache("10.4.0", fake_trt.DEVICE, 5).serialize()
    assert not config.set_timing_cache(config.create_timing_cache(foreign_gpu), ignore_mismatch=False)
    assert config.set_timing_cache(config.create_timing_cache(own), ignore_mismatch=False)
    with pytest.raises(RuntimeError, match="corrupt"):
        config.create_timing_cache(b"not a timing cache")
    expected = {"version": fake_trt.__version__, "device": fake_trt.DEVICE}
    for cache, builds in ((own, 4), (foreign_gpu, 1), (foreign_version, 1), (b"not a timing cache", 1), (b"", 1)):
        built = build_engine(path, shapes, spec, timing_cache=cache)
        assert fake_trt.read_timing_cache(built.timing_cache) == {**expected, "builds": builds}, cache[:60]


def test_runner_refuses_another_value_for_a_folded_threshold(tmp_path: Path, fake_trt: Any) -> None:
    """A threshold whose default initializer the parser folded into the engine: its default may
    be fed, any other value is refused (it would be ignored silently otherwise)."""
    from slimdeploy.engines.trt_build import EngineFromOnnx
    from slimdeploy.engines.trt_runner import TrtRunner

    model = onnx.load(str(_threshold_graph(tmp_path)))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "t"))
    path = tmp_path / "folded.onnx"
    onnx.save(model, str(path))
    spec = BuildSpec(opt_batch=2, max_batch=4)
    runner = TrtRunner(EngineFromOnnx(path, profile_shapes(model, spec), spec), defaults={"t": np.float32(0.5)},
                       buffers="cuda-python")
    x = np.array([[0.1, 0.6, 0.5]], np.float32)
    with runner:
        assert runner.input_metadata()["t"].optional and "t" not in runner._inputs  # folded, listed as optional
        np.testing.assert_array_equal(runner.infer({"x": x, "t": np.array(0.5, np.float32)})["y"], [[0, 1, 0]])
        with pytest.raises(BadInputError, match=r"'t' is fixed at 0\.5"):
            runner.infer({"x": x, "t": np.array(0.9, np.float32)})
