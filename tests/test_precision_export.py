"""Reduced-precision bundles end to end: ``export --precision int8|fp16`` of zoo models pass
parity with the precision's criteria and then ``check`` from the manifest alone; calibration
ranges stored in the bundle are reused without recalibrating; INT8 of the ``if`` form is
refused; gated models keep their gate heads FP32 and each staged piece is calibrated on the
rows that reach it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_clean_error, run_cli
from onnx import numpy_helper

from slimdeploy.zoo import zoo_checkpoint_path

# The export's own INT8/FP16 speed check is tested in test_precision_speed.py; off here (5-7 s each).
FAST = ["--samples", "40", "--batch-sizes", "8", "--no-speed-check"]


def _scales(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith(("_scale", "_zero_point"))}


@pytest.mark.slow
def test_int8_bundle_passes_check_and_its_ranges_are_reused(tmp_path: Path) -> None:
    bundle = tmp_path / "int8"
    result = run_cli("export", "zoo:spconv_resnet20_digits", "--out", str(bundle), "--precision", "int8",
                     "--calib", "digits", "--calib-size", "60", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    calibration = manifest["calibration"]
    # --calib-method auto (the default): both methods tried, the one closer to FP32 on the
    # calibration images kept and named.
    choice = calibration["method_choice"]
    assert {"MinMax", "Percentile"} <= set(choice["candidates"]) and choice["chosen"] in choice["candidates"]
    assert calibration["method"] == choice["chosen"].split(",")[0]
    if choice["chosen"] in ("MinMax", "Percentile"):  # full placement kept: the closer of the two
        full = {m: choice["candidates"][m]["logits_error"] for m in ("MinMax", "Percentile")}
        assert choice["chosen"] == min(full, key=full.get) and calibration["op_types"] == "all"
    assert "U8S8" in result.stdout and f"calibrated with {calibration['method']} on 60 samples" in result.stdout
    # What decided the verdict is shown; ONNX Runtime's calibration prints and NumPy's warnings are not.
    assert "parity PASSED on the int8 criteria: top-1 agreement >= 97 %" in result.stdout
    for chatter in ("Collecting tensor data", "histogram", "RuntimeWarning", "invalid value encountered"):
        assert chatter not in result.stdout + result.stderr, chatter
    # Its TensorRT lint: one screen, and the fix is the TensorRT export, not quantize_static by hand.
    lint = run_cli("lint", str(bundle), env={"COLUMNS": "100"})
    assert lint.returncode == 1 and "Traceback" not in lint.stderr
    assert len(lint.stdout.splitlines()) <= 40 and "quantize_static" not in lint.stdout
    assert f"--precision int8 --target trt --calib {bundle}/calibration.json" in lint.stdout
    assert "ONNX Runtime INT8 bundle" in lint.stdout
    assert manifest["precision"] == "int8" and calibration["source"] == "digits:calib[:60]"
    assert calibration["size"] == 60 and calibration["synthetic"] is False
    assert calibration["vs_fp32"]["top1"] >= 0.95
    assert manifest["parity"]["criteria"]["top1_agreement"] == 0.97
    assert manifest["tolerances"][""] == [0.25, 0.1]
    model = onnx.load(bundle / "model.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 10
    assert "calibration.json" in manifest["files"]
    check = run_cli("check", str(bundle), "--json", "-")
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report["precision"] == "int8" and report["criteria"]["decision_agreement"] == 0.98
    # --atol alone keeps the INT8 default rtol (not the FP32 one).
    loose = run_cli("check", str(bundle), "--atol", "0.5", "--json", "-")
    assert json.loads(loose.stdout)["tolerances"][""] == [0.5, 0.1]
    # A second export from the stored ranges: no calibration data read, identical scales.
    again = tmp_path / "again"
    result = run_cli("export", "zoo:spconv_resnet20_digits", "--out", str(again), "--precision", "int8",
                     "--calib", str(bundle / "calibration.json"), *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reusing stored calibration ranges" in result.stderr
    first, second = _scales(bundle / "model.onnx"), _scales(again / "model.onnx")
    assert first.keys() == second.keys() and len(first) > 20
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # The ranges name the checkpoint they belong to; another checkpoint refuses them up front.
    stored = json.loads((bundle / "calibration.json").read_text())["data"]["model"]
    assert stored["arch"] == "spconv_resnet20_cifar" and len(stored["weights_sha256"]) == 64
    foreign = run_cli("export", "zoo:mobilenet_v1_digits", "--out", str(tmp_path / "foreign"), "--precision", "int8",
                      "--calib", str(bundle), *FAST)
    assert_clean_error(foreign, 2, "collected on another model (spconv_resnet20_cifar")
    assert not (tmp_path / "foreign").exists()
    sized = run_cli("export", "zoo:spconv_resnet20_digits", "--out", str(tmp_path / "sized"), "--precision", "int8",
                    "--calib", str(bundle), "--calib-size", "10", *FAST)
    assert_clean_error(sized, 2, "--calib-size applies when calibrating")


@pytest.mark.slow
def test_fp16_bundle_passes_check(tmp_path: Path) -> None:
    bundle = tmp_path / "fp16"
    result = run_cli("export", "zoo:mobilenet_v1_digits", "--out", str(bundle), "--precision", "fp16", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["tolerances"][""] == [0.05, 0.01]
    assert "calibration.json" not in manifest["files"]
    model = onnx.load(bundle / "model.onnx")
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert run_cli("check", str(bundle)).returncode == 0


@pytest.mark.parametrize(("form", "precision"), [("if", "int8"), ("loop", "int8"), ("loop", "fp16")])
@pytest.mark.slow
def test_reduced_precision_of_subgraph_forms_is_refused(form: str, precision: str) -> None:
    result = run_cli("export", "zoo:skipnet38_digits", "--out", "/nonexistent/never", "--precision", precision, "--dynamic", form)
    assert_clean_error(result, 2, f"--precision {precision}", f"'{form}' form", "compact, staged or mask")


def test_int8_of_a_model_without_known_data_asks_for_calib(tmp_path: Path) -> None:
    from slimdeploy.calibration.stage import read_calibration
    from slimdeploy.errors import BadInputError
    from slimdeploy.loading import Preprocessing

    prep = Preprocessing((3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(BadInputError, match="--calib"):
        read_calibration(None, None, prep, {"dataset": "imagenet"})
    synthetic = read_calibration("synthetic", 10, prep, {})
    assert synthetic.synthetic and len(synthetic) == 10


@pytest.fixture(scope="module")
def skipnet_pieces() -> tuple:
    """The trained SkipNet demo's pieces, plan and preprocessing (one torch.export)."""
    from slimdeploy.exporters import gated
    from slimdeploy.loading import load_checkpoint

    loaded = load_checkpoint(zoo_checkpoint_path("skipnet38_digits"))
    pieces, plan = gated.gated_pieces(loaded.module, loaded.preprocessing.input_size)
    return pieces, plan, loaded.preprocessing


@pytest.mark.slow
def test_gated_int8_keeps_gates_fp32_and_calibrates_each_stage_on_its_rows(skipnet_pieces: tuple) -> None:
    from slimdeploy.calibration import (
        apply_precision,
        decision_nodes,
        load_calibration,
        qdq_violations,
    )
    from slimdeploy.calibration.decisions import entry_pools
    from slimdeploy.calibration.staged import piece_feeds
    from slimdeploy.data import digits_inputs
    from slimdeploy.engines.base import TensorMeta
    from slimdeploy.engines.factory import make_runner
    from slimdeploy.exporters import gated
    from slimdeploy.parity import run_batches

    pieces, plan, prep = skipnet_pieces
    calib = load_calibration("digits", prep.input_size, prep.mean, prep.std, size=100)
    heldout, _ = digits_inputs("heldout", prep.input_size, prep.mean, prep.std, count=200)
    meta = TensorMeta("input", np.dtype(np.float32), ("batch", *prep.input_size))

    # compact: one flat graph, calibrated completely; gate heads stay FP32 and read the INT8
    # feature map only through their quantized pooling.
    compact = gated.compose_form("compact", pieces, plan, prep.input_size)
    result = apply_precision({"model": compact}, "int8", form="compact", calibration=calib)
    quantized = result.graphs["model"]
    # The TensorRT form from the same ranges: every Q/DQ in TensorRT's rules.
    trt = apply_precision({"model": compact}, "int8", target="trt", form="compact", calibration=result.record).graphs["model"]
    assert qdq_violations(trt) == [] and any(n.op_type == "QuantizeLinear" for n in trt.graph.node)
    heads = set(decision_nodes(compact))
    pools = set(entry_pools(compact))
    assert len(pools) == plan.n_blocks - 1 and pools <= heads  # every gate starts with its pooling
    pooled = {out for node in compact.graph.node if node.name in pools for out in node.output}
    producers = {out: node for node in quantized.graph.node for out in node.output}
    gate_nodes = [n for n in quantized.graph.node if n.name in heads - pools]
    dequantized = [producers[i] for n in gate_nodes for i in n.input if producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"]
    assert gate_nodes and len(dequantized) == len(pools)
    assert all(producers[dq.input[0]].op_type == "QuantizeLinear" and producers[dq.input[0]].input[0] in pooled for dq in dequantized)
    assert {n.op_type for n in quantized.graph.node if n.name in pools} == {"GlobalAveragePool"}  # QLinear once fused
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    outputs = {}
    for label, graph in (("fp32", compact), ("int8", quantized), ("trt", trt)):
        with make_runner({"model": graph.SerializeToString()}, "compact", meta) as runner:
            outputs[label] = run_batches(runner, {"input": heldout}, 50, ["input"])
    assert (outputs["fp32"]["logits"].argmax(1) == outputs["int8"]["logits"].argmax(1)).mean() >= 0.97
    assert (outputs["fp32"]["gates"] == outputs["int8"]["gates"]).mean() >= 0.98
    assert (outputs["fp32"]["logits"].argmax(1) == outputs["trt"]["logits"].argmax(1)).mean() >= 0.95

    # staged: every piece sees exactly the rows the controller routes to it.
    plan_dict = plan.to_dict()
    sources = {name: graph.SerializeToString() for name, graph in pieces.items()}
    feeds = piece_feeds(sources, plan_dict, meta, calib.inputs)
    with make_runner(sources, "staged", meta, plan=plan_dict) as runner:
        gates = run_batches(runner, {"input": calib.inputs}, 32, ["input"])["gates"]
    assert len(feeds["stem"]["x"]) == len(calib) and len(feeds["gate0"]["x"]) == len(calib)
    for k in range(1, plan.n_blocks):
        opened = int(gates[:, k - 1].sum())
        assert len(feeds.get(f"exec{k}", {"x": []})["x"]) == opened, k
        if k in plan.skips:
            assert len(feeds.get(f"skip{k}", {"x": []})["x"]) == len(calib) - opened, k
    staged = apply_precision(pieces, "int8", form="staged", plan=plan_dict, input_meta=meta, calibration=calib)
    for name, graph in staged.graphs.items():
        has_qdq = any(n.op_type == "QuantizeLinear" for n in graph.graph.node)
        if name.startswith("gate") or name not in staged.record.graphs:
            assert not has_qdq and graph is pieces[name], name
        else:
            assert has_qdq, name
    assert set(staged.record.graphs) == set(feeds)
    # The blocks no calibration sample executed are the same in both forms, and stay FP32 in both.
    unreached_compact = {b for b in result.info["fp32_unreached"].get("model", []) if b.startswith("exec")}
    assert unreached_compact == {f"exec{k}" for k in range(1, plan.n_blocks) if f"exec{k}" not in feeds}


@pytest.mark.slow
def test_early_exit_int8_keeps_the_deciding_stages_fp32_and_passes(tmp_path: Path) -> None:
    """Full Q/DQ placement flips the S2D demo's exits (thresholds near 1), and so does Q/DQ on
    the convolutions only, a little; auto calibration sees it on the calibration images and keeps
    the stages that decide an exit FP32, with Q/DQ on the last stage's convolutions only: its
    exits are FP32's, and it passes check."""
    bundle = tmp_path / "s2d-int8"
    result = run_cli("export", "zoo:s2d_resnet20_digits", "--out", str(bundle), "--precision", "int8", "--no-speed-check")
    assert result.returncode == 0, result.stdout + result.stderr
    calibration = json.loads((bundle / "manifest.json").read_text())["calibration"]
    candidates = calibration["method_choice"]["candidates"]
    assert all(candidates[m]["decision_agreement"] < 0.98 for m in ("MinMax", "Percentile"))
    chosen = calibration["method_choice"]["chosen"]
    assert chosen.endswith("Q/DQ on Conv/Gemm/MatMul only, stage0/stage1 FP32") and candidates[chosen]["decision_agreement"] == 1.0
    assert calibration["op_types"] == ["Conv", "Gemm", "MatMul"] and calibration["fp32_pieces"] == ["stage0", "stage1"]
    for stage in ("stage0", "stage1"):
        assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(bundle / "stages" / f"{stage}.onnx").graph.node)
    stage2 = onnx.load(bundle / "stages" / "stage2.onnx")
    # Only what convolutions read and write is rounded (full placement rounds every residual sum
    # and pooling): each QuantizeLinear rounds a Conv's output, or a value only Convs read.
    producer = {out: n.op_type for n in stage2.graph.node for out in n.output}
    readers: dict[str, set[str]] = {}
    for node in stage2.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    dequantized = {n.input[0]: n.output[0] for n in stage2.graph.node if n.op_type == "DequantizeLinear"}
    rounds = [n for n in stage2.graph.node if n.op_type == "QuantizeLinear"]
    assert rounds and any(producer.get(n.input[0]) == "Conv" for n in rounds)
    for node in rounds:
        read_by = readers.get(dequantized.get(node.output[0], ""), set())
        assert producer.get(node.input[0]) == "Conv" or read_by == {"Conv"}, (node.name, producer.get(node.input[0]), read_by)
    assert run_cli("check", str(bundle)).returncode == 0


def test_too_few_parity_samples_for_the_criteria_is_noted() -> None:
    from slimdeploy.held_out import few_samples_note

    # INT8 top-1 criterion 97 %: one flip in 33 samples is 96.97 % (fails), in 34 is 97.06 %.
    assert "--samples 34" in few_samples_note("int8", 33)[0]
    assert few_samples_note("int8", 34) == [] and few_samples_note("fp32", 1) == []
    assert "--samples 100" in few_samples_note("fp16", 99)[0]
