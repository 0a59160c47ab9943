"""OpenVINO against ONNX Runtime on the CPU: the same bundles, side by side.

    python benchmarks/openvino_vs_ort.py            # full run, writes benchmarks/results/openvino_vs_ort.json
    python benchmarks/openvino_vs_ort.py --quick    # smoke run: few calls, same fields
    python benchmarks/openvino_vs_ort.py --models mobilenet_v1_digits --no-large --out /tmp/ov.json

In one run:

1. Every demo model in the form ``slimdeploy export`` gives it for ONNX Runtime (MobileNet,
   SPConv ResNet-20, CondenseNet folded, SkipNet-38 ``compact``, S2D ResNet-20 ``staged``), as
   an FP32 and an INT8 bundle (``export()`` with the CLI's defaults; INT8 ``--calib digits``,
   U8S8 Q/DQ). Each bundle is checked on OpenVINO (``check_bundle(device="openvino")``: the
   parity ``slimdeploy check --device openvino`` runs) and then timed on both runtimes: the two
   runners (``bundle_runner`` with ``device="cpu"`` and ``"openvino"``, ``--threads`` threads
   each) stay loaded and take turns in rounds (``slimdeploy.bench.compare_runners``); a time is
   the median over rounds of the mean call time, at batch 1 (8 held-out digits in turn) and 32.
   The export's own choice of the bundle's default CPU runtime (manifest ``runtime``: a shorter
   timing on the parity samples, OpenVINO only if 1.1x faster at batch 1 and 32 and passing
   parity) is recorded beside it.
2. The CondenseNet-86-sized model of ``condensenet.py`` (random weights and masks, BatchNorm
   statistics re-estimated on digits) in four graphs: masked-dense, condensed, folded (3x3 dense,
   what ``--target ort`` exports) and folded with the 3x3 convolutions kept grouped (what
   ``--target trt`` exports), each on both runtimes, all eight runners taking turns: the
   realised speed-up of each over masked-dense on the same runtime, against the MACs ratio.

``OtherLoad`` records the cores other processes used during each timed block; above 0.2 the
run is marked noisy. Results go to ``benchmarks/results/openvino_vs_ort.json``; a table is printed.
(Not named ``openvino.py``: the script's folder comes first on ``sys.path``, so that name would
shadow the ``openvino`` package.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OtherLoad, benchmark_arguments, machine_facts, save_json  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "openvino_vs_ort.json"
DEMO_MODELS = ("mobilenet_v1_digits", "spconv_resnet20_digits", "condensenet_digits", "skipnet38_digits", "s2d_resnet20_digits")
PRECISIONS = ("fp32", "int8")
BATCHES = (1, 32)
NOISY_CORES = 0.2
# Kept short (about 8 minutes on 2 shared cores, most of it the ten exports): 3 rounds.
FULL = {"rounds": 3, "warmup": 5, "calls": {1: 32, 32: 4}, "heldout": 256}
QUICK = {"rounds": 2, "warmup": 1, "calls": {1: 4, 32: 1}, "heldout": 64}


def say(message: str) -> None:
    print(f"[openvino bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def feeds_for(x: np.ndarray, batch: int) -> list[dict[str, np.ndarray]]:
    count = 8 if batch == 1 else max(1, min(2, len(x) // batch))
    return [{"input": np.ascontiguousarray(x[i * batch:(i + 1) * batch])} for i in range(count)]


def timed_rows(runners: dict[str, Any], x: np.ndarray, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Active runners side by side at each batch size: mean ms per runner and the load."""
    from slimdeploy.bench import compare_runners

    rows = []
    for batch in BATCHES:
        with OtherLoad() as other:
            timed = compare_runners(runners, feeds_for(x, batch), warmup=plan["warmup"], rounds=plan["rounds"],
                                    calls_per_round=plan["calls"][batch])
        rows.append({"batch": batch, "other_processes_cpu_cores": other.cores,
                     **{label: round(result.mean_ms, 4) for label, result in timed.items()}})
    return rows


def demo_bundle(name: str, precision: str, tmp: Path, threads: int, plan: dict[str, Any]) -> dict[str, Any]:
    """Export one bundle, check it on OpenVINO, time it on both runtimes on held-out digits."""
    from slimdeploy.bundle import bundle_runner, load_bundle
    from slimdeploy.data import digits_inputs
    from slimdeploy.export import export
    from slimdeploy.parity import check_bundle
    from slimdeploy.zoo import zoo_checkpoint_path

    out = tmp / f"{name}-{precision}"
    # The export's own timings stay on: its choice of the bundle's default CPU runtime
    # (manifest ``runtime``, OpenVINO against ONNX Runtime on the parity samples) is recorded
    # beside this script's longer timing of the same bundle.
    extra = {"calib": "digits"} if precision == "int8" else {}
    say(f"{name} {precision}: exporting")
    result = export(zoo_checkpoint_path(name), out, precision=precision, **extra)
    say(f"{name} {precision}: checking on OpenVINO")
    report = check_bundle(out, device="openvino", threads=threads)
    bundle = load_bundle(out)
    prep = result.manifest["preprocessing"]
    x, _ = digits_inputs("heldout", tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"]), count=plan["heldout"])
    runners = {"onnxruntime": bundle_runner(bundle, threads=threads), "openvino": bundle_runner(bundle, device="openvino", threads=threads)}
    for runner in runners.values():
        runner.activate()
    try:
        first = {label: runner.infer({"input": np.ascontiguousarray(x[:64])}) for label, runner in runners.items()}
        say(f"{name} {precision}: timing")
        rows = timed_rows(runners, x, plan)
    finally:
        for runner in runners.values():
            runner.deactivate()
    for row in rows:
        row["openvino_speedup_over_onnxruntime"] = round(row["onnxruntime"] / row["openvino"], 3)
    logits = {label: out["logits"] for label, out in first.items()}
    return {
        "model": name, "precision": precision, "dynamic": result.manifest["dynamic"],
        "export_parity_passed": result.passed, "openvino_check_passed": report.passed,
        "default_runtime": result.manifest["runtime"]["default"], "runtime_choice": result.manifest["runtime"],
        "openvino_check_failures": [str(f) for f in report.failures][:3],
        "max_abs_logits_openvino_vs_onnxruntime": float(np.abs(logits["openvino"] - logits["onnxruntime"]).max()),
        "same_top1": float((logits["openvino"].argmax(1) == logits["onnxruntime"].argmax(1)).mean()),
        "timings": rows,
    }


def large_condensenet(threads: int, plan: dict[str, Any]) -> dict[str, Any]:
    """CondenseNet-86-sized: four graphs on both runtimes, speed-up over masked-dense per runtime."""
    import copy

    import torch
    from common import estimate_batchnorm
    from condensenet import LARGE_CONFIG, export, random_masks

    from slimdeploy.data import digits_inputs, digits_statistics
    from slimdeploy.engines.openvino_runner import OpenVinoRunner
    from slimdeploy.engines.ort_runner import OrtRunner
    from slimdeploy.flops import count_macs
    from slimdeploy.models.condensenet import condensenet
    from slimdeploy.transforms.condense import condense
    from slimdeploy.transforms.fold import fold_condensed

    torch.manual_seed(0)
    model = condensenet(**LARGE_CONFIG)
    random_masks(model, torch.Generator().manual_seed(0))
    mean, std = digits_statistics()
    train, _ = digits_inputs("train", (3, 32, 32), mean, std, count=256)
    estimate_batchnorm(model, train)
    x, _ = digits_inputs("heldout", (3, 32, 32), mean, std, count=plan["heldout"])
    condensed = condense(model.eval())
    modules = {
        "masked_dense": model, "condensed": condensed,
        "folded": fold_condensed(copy.deepcopy(condensed), expand_3x3=True)[0],
        "folded_grouped": fold_condensed(copy.deepcopy(condensed), expand_3x3=False)[0],
    }
    macs = {form: count_macs(module, (3, 32, 32)).macs for form, module in modules.items()}
    runners = {}
    for form, module in modules.items():
        say(f"CondenseNet-86: exporting {form}")
        graph = export(module, (3, 32, 32)).SerializeToString()
        runners[f"onnxruntime:{form}"] = OrtRunner(graph, threads=threads, name=form)
        runners[f"openvino:{form}"] = OpenVinoRunner(graph, threads=threads, name=form)
    for runner in runners.values():
        runner.activate()
    try:
        check = {"input": np.ascontiguousarray(x[:32])}
        logits = {label: runner.infer(check)["logits"] for label, runner in runners.items()}
        reference = logits["onnxruntime:masked_dense"]
        say("CondenseNet-86: timing 8 runners")
        rows = timed_rows(runners, x, plan)
    finally:
        for runner in runners.values():
            runner.deactivate()
    ratio = macs["masked_dense"] / macs["condensed"]
    for row in rows:
        for runtime in ("onnxruntime", "openvino"):
            for form in ("condensed", "folded", "folded_grouped"):
                row[f"{runtime}:{form}_speedup"] = round(row[f"{runtime}:masked_dense"] / row[f"{runtime}:{form}"], 3)
    return {
        "model": "CondenseNet-86 (condensenet.py's LARGE_CONFIG, random weights and masks, seed 0)",
        "macs": macs, "macs_ratio": round(ratio, 3),
        "max_abs_logits_vs_onnxruntime_masked_dense": {label: float(np.abs(v - reference).max()) for label, v in logits.items()},
        "timings": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = ["| model | precision | form | OpenVINO check | b1 ORT / OV ms | b1 OV speed-up | b32 ORT / OV ms | b32 OV speed-up | default runtime (export) | other cores |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["demo"]:
        t = {r["batch"]: r for r in row["timings"]}
        lines.append(
            f"| {row['model']} | {row['precision']} | {row['dynamic'] or 'static'} | {'pass' if row['openvino_check_passed'] else 'FAIL'} "
            f"| {t[1]['onnxruntime']:.3f} / {t[1]['openvino']:.3f} | {t[1]['openvino_speedup_over_onnxruntime']:.2f}x "
            f"| {t[32]['onnxruntime']:.2f} / {t[32]['openvino']:.2f} | {t[32]['openvino_speedup_over_onnxruntime']:.2f}x "
            f"| {row['default_runtime']} | {max(t[1]['other_processes_cpu_cores'], t[32]['other_processes_cpu_cores']):.2f} |")
    large = result.get("large")
    if large:
        lines += ["", f"CondenseNet-86, MACs ratio masked-dense / condensed {large['macs_ratio']:.2f}x",
                  "| batch | runtime | masked-dense ms | condensed | folded | folded, 3x3 grouped | other cores |", "|---|---|---|---|---|---|---|"]
        for row in large["timings"]:
            for runtime in ("onnxruntime", "openvino"):
                cells = " | ".join(f"{row[f'{runtime}:{form}']:.2f} ms ({row[f'{runtime}:{form}_speedup']:.2f}x)"
                                   for form in ("condensed", "folded", "folded_grouped"))
                lines.append(f"| {row['batch']} | {runtime} | {row[f'{runtime}:masked_dense']:.2f} | {cells} | {row['other_processes_cpu_cores']:.2f} |")
    if result["machine"]["noisy"]:
        lines.append("NOISY: other processes were running; rerun on an idle machine before quoting these figures")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimdeploy.versions import package_version

    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "openvino", "quick": args.quick, "machine": machine_facts(),
        "settings": {"threads": args.threads, **{k: v for k, v in plan.items() if k != "calls"},
                     "calls_per_round": {str(k): v for k, v in plan["calls"].items()},
                     "openvino": package_version("openvino"),
                     "openvino_config": "CPU plugin, INFERENCE_PRECISION_HINT f32, PERFORMANCE_HINT LATENCY, INFERENCE_NUM_THREADS = threads",
                     "timing": "compare_runners: runners alternate in rounds; a time is the median over rounds of the mean call time"},
        "demo": [],
    }
    with tempfile.TemporaryDirectory(prefix="slimdeploy-openvino-") as tmp:
        for name in args.models:
            for precision in PRECISIONS:
                result["demo"].append(demo_bundle(name, precision, Path(tmp), args.threads, plan))
    if not args.no_large:
        result["large"] = large_condensenet(args.threads, plan)
    loads = [row["other_processes_cpu_cores"] for part in result["demo"] for row in part["timings"]]
    loads += [row["other_processes_cpu_cores"] for row in result.get("large", {}).get("timings", [])]
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["machine"]["other_processes_cpu_cores_max"] = max(loads) if loads else None
    result["machine"]["noisy"] = bool(loads) and max(loads) > NOISY_CORES
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.splitlines()[0], DEFAULT_OUT)
    parser.add_argument("--models", nargs="+", default=list(DEMO_MODELS), choices=DEMO_MODELS, help="zoo models (default all five)")
    parser.add_argument("--no-large", action="store_true", help="leave out the CondenseNet-86-sized model")
    args = parser.parse_args(argv)
    result = run(args)
    save_json(result, args.out)
    print(markdown(result))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
