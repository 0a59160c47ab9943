"""ONNX Runtime INT8 against FP32 on the trained demo models: speed, and agreement with FP32.

    python benchmarks/precision.py             # full run, writes benchmarks/results/precision.json
    python benchmarks/precision.py --quick     # smoke run: few calls, 64 held-out images
    python benchmarks/precision.py --models spconv_resnet20_digits --out /tmp/p.json

In one run, for each zoo model (``mobilenet_v1_digits``, ``spconv_resnet20_digits``,
``skipnet38_digits`` in the ``compact`` form, ``condensenet_digits``, ``s2d_resnet20_digits`` in
the ``staged`` form):

1. export three bundles with ``export()``, as a user would: FP32, INT8 for ONNX Runtime
   (``--precision int8 --calib digits``: the 100-image calibration split, ``--calib-method
   auto``, U8S8, bias correction, gate and exit heads FP32) and INT8 for TensorRT (the same with
   ``--target trt``: S8S8 symmetric, zero points 0, TensorRT's Q/DQ placement; run here in ONNX
   Runtime, as ``check`` does);
2. on the digits held-out split: top-1 agreement of each INT8 form with FP32, gate agreement
   (gated models) or exit agreement (early-exit models), accuracy of each against the labels;
3. time FP32 and U8S8 INT8 (``OrtRunner``, intra-op threads ``--threads``) at batch 1 and 32,
   both sessions loaded, taking turns in rounds (``runtime.py``'s schedule); the ratio of p50s
   is the figure. The S8S8 form's speed belongs to TensorRT on a GPU: not timed here.

Targets (issue 6): INT8 >= 1.8x faster than FP32 at batch 32 on the ResNet-class models
(``spconv_resnet20_digits``, ``skipnet38_digits``, ``s2d_resnet20_digits``), top-1 agreement
with FP32 >= 99 %, gate and exit agreement >= 98 %. Results go to ``benchmarks/results/precision.json``; a table is printed.
"""

from __future__ import annotations

import argparse
import json
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
from runtime import summarise, timed_calls  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "precision.json"
DEMO_MODELS = ("mobilenet_v1_digits", "spconv_resnet20_digits", "skipnet38_digits", "condensenet_digits", "s2d_resnet20_digits")
RESNET_CLASS = ("spconv_resnet20_digits", "skipnet38_digits", "s2d_resnet20_digits")
BATCH_SIZES = (1, 32)
NOISY_CORES = 0.2
TARGETS = {"int8_speedup_batch32": 1.8, "top1_agreement": 0.99, "gate_agreement": 0.98, "exit_agreement": 0.98}
# Per-sample decisions each kind of model outputs, and the name of its agreement figure.
DECISIONS = {"gates": "gate_agreement", "exit_stage": "exit_agreement"}
FULL = {"rounds": 5, "first_warmup": 10, "settle_s": 0.2, "round_warmup": 3,
        "iterations": {1: 60, 32: 10}, "heldout": None}
QUICK = {"rounds": 2, "first_warmup": 2, "settle_s": 0.02, "round_warmup": 1,
         "iterations": {1: 5, 32: 2}, "heldout": 64}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_bundles(name: str, tmp: Path, quick: bool) -> dict[str, Path]:
    """FP32, INT8 (ONNX Runtime form) and INT8 (TensorRT form) bundles of a zoo model, exported
    in this process with the CLI's defaults."""
    from slimdeploy.export import export
    from slimdeploy.zoo import zoo_checkpoint_path

    checkpoint = zoo_checkpoint_path(name)
    # The export's own speed check (INT8 against FP32, a few seconds) is off: this benchmark
    # times both forms itself, side by side and at more batch sizes.
    fast = {"samples": 40, "batch_sizes": (16,), "speed_check": False} if quick else {"speed_check": False}
    bundles = {}
    for label, precision, target in (("fp32", "fp32", "ort"), ("int8", "int8", "ort"), ("int8_trt", "int8", "trt")):
        out = tmp / f"{name}-{label}"
        extra = {"calib": "digits"} if precision == "int8" else {}
        result = export(checkpoint, out, precision=precision, target=target, **extra, **fast)
        if not result.passed:
            say(f"[{name}] note: the {label} bundle failed its parity check: {result.report.failures[:2]}")
        bundles[label] = out
    return bundles


def agreement_rows(bundles: dict[str, Path], heldout: np.ndarray, labels: np.ndarray, threads: int) -> dict[str, Any]:
    """Top-1 and decision (gate or exit) agreement of each INT8 form with FP32, and accuracies,
    on ``heldout``."""
    from slimdeploy.bundle import bundle_runner, load_bundle
    from slimdeploy.parity import run_batches

    runners = {
        "fp32": bundle_runner(load_bundle(bundles["fp32"]), threads=threads),
        "int8_ort": bundle_runner(load_bundle(bundles["int8"]), threads=threads),
        "int8_trt_form": bundle_runner(load_bundle(bundles["int8_trt"]), threads=threads),
    }
    outputs = {}
    for label, runner in runners.items():
        with runner:
            outputs[label] = run_batches(runner, {"input": heldout}, 32, ["input"])
    reference = outputs["fp32"]
    rows: dict[str, Any] = {"samples": len(heldout), "accuracy_fp32": float((reference["logits"].argmax(1) == labels).mean())}
    for label in ("int8_ort", "int8_trt_form"):
        out = outputs[label]
        row = {
            "top1_agreement": float((out["logits"].argmax(1) == reference["logits"].argmax(1)).mean()),
            "accuracy": float((out["logits"].argmax(1) == labels).mean()),
            "max_abs_logits_vs_fp32": float(np.abs(out["logits"] - reference["logits"]).max()),
        }
        for output, figure in DECISIONS.items():
            if output in reference and reference[output].size:
                row[figure] = float((out[output] == reference[output]).mean())
        rows[label] = row
    return rows


def time_pair(bundles: dict[str, Path], heldout: np.ndarray, threads: int, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """FP32 against INT8 (ORT form), both sessions loaded, taking turns."""
    from slimdeploy.bundle import bundle_runner, load_bundle

    runners = {label: bundle_runner(load_bundle(bundles[label]), threads=threads) for label in ("fp32", "int8")}
    for runner in runners.values():
        runner.activate()
    results = []
    try:
        for batch in BATCH_SIZES:
            feed = {"input": np.ascontiguousarray(heldout[:batch])}
            for runner in runners.values():
                timed_calls(runner, feed, plan["first_warmup"], 0)
            per_round: dict[str, list[list[float]]] = {label: [] for label in runners}
            order = list(runners)
            with OtherLoad() as other:
                for index in range(plan["rounds"]):
                    for label in (order if index % 2 == 0 else order[::-1]):
                        time.sleep(plan["settle_s"])
                        per_round[label].append(timed_calls(runners[label], feed, plan["round_warmup"], plan["iterations"][batch]))
            stats = {label: summarise([t for r in rounds for t in r], rounds) for label, rounds in per_round.items()}
            results.append({
                "batch": batch,
                "fp32": stats["fp32"],
                "int8": stats["int8"],
                "speedup_int8_over_fp32_p50": round(stats["fp32"]["p50_ms"] / stats["int8"]["p50_ms"], 3),
                "other_processes_cpu_cores": other.cores,
            })
    finally:
        for runner in runners.values():
            runner.deactivate()
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimdeploy.data import digits_inputs
    from slimdeploy.zoo import get_zoo_entry

    plan = QUICK if args.quick else FULL
    result: dict[str, Any] = {
        "benchmark": "precision",
        "quick": args.quick,
        "machine": machine_facts(),
        "settings": {
            "threads": args.threads,
            "calibration": "digits calibration split (100 images), --calib-method auto, bias correction, per-channel weights, gate and exit heads FP32",
            "int8_ort": "export --precision int8 --calib digits: U8S8 QDQ (QUInt8 activations, QInt8 symmetric per-channel weights)",
            "int8_trt_form": "export --target trt --precision int8 --calib digits: S8S8 QDQ (symmetric, zero points 0, FP32 biases), run in ONNX Runtime",
            "dynamic_forms": "SkipNet compact, S2D staged (the ort defaults)",
            "batch_sizes": list(BATCH_SIZES),
            "rounds": plan["rounds"],
            "timed_calls_per_round": {str(k): v for k, v in plan["iterations"].items()},
            "data": "digits held-out split" + (f", first {plan['heldout']}" if plan["heldout"] else " (500 images)"),
        },
        "targets": {key: f">= {value}" for key, value in TARGETS.items()},
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="slimdeploy-precision-") as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models:
            say(f"[{name}] exporting FP32 and INT8 bundles ...")
            bundles = make_bundles(name, tmp, args.quick)
            manifest = json.loads((bundles["int8"] / "manifest.json").read_text())
            prep = manifest["preprocessing"]
            heldout, labels = digits_inputs("heldout", tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"]), count=plan["heldout"])
            say(f"[{name}] agreement of the INT8 forms with FP32 ...")
            agreement = agreement_rows(bundles, heldout, labels, args.threads)
            say(f"[{name}] timing FP32 against INT8 ...")
            result["models"].append({
                "name": name,
                "arch": manifest["model"]["arch"],
                "dynamic": manifest["dynamic"],
                "zoo_accuracy": get_zoo_entry(name).accuracy,
                "int8_parity_passed": manifest["parity"]["passed"],
                "agreement": agreement,
                "latency": time_pair(bundles, heldout, args.threads, plan),
            })
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    others = [row["other_processes_cpu_cores"] for m in result["models"] for row in m["latency"]]
    result["machine"]["other_processes_cpu_cores_max"] = max(others) if others else None
    result["machine"]["noisy"] = bool(others) and max(others) > NOISY_CORES
    result["checks"] = checks(result)
    result["passed"] = all(c["passed"] for c in result["checks"])
    return result


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target against its measured figure (speed on the ResNet-class models only)."""
    found = []
    for model in result["models"]:
        if model["name"] in RESNET_CLASS:
            row = next(r for r in model["latency"] if r["batch"] == 32)
            measured = row["speedup_int8_over_fp32_p50"]
            found.append({"check": f"{model['name']} int8_speedup_batch32", "target": f">= {TARGETS['int8_speedup_batch32']}",
                          "measured": measured, "passed": measured >= TARGETS["int8_speedup_batch32"]})
        ort_row = model["agreement"]["int8_ort"]
        found.append({"check": f"{model['name']} top1_agreement", "target": f">= {TARGETS['top1_agreement']}",
                      "measured": ort_row["top1_agreement"], "passed": ort_row["top1_agreement"] >= TARGETS["top1_agreement"]})
        for figure in DECISIONS.values():
            if figure in ort_row:
                found.append({"check": f"{model['name']} {figure}", "target": f">= {TARGETS[figure]}",
                              "measured": ort_row[figure], "passed": ort_row[figure] >= TARGETS[figure]})
    return found


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        f"{machine['cpu_model']}, {machine['cores']} cores, {result['settings']['threads']} threads, "
        f"onnxruntime {machine['versions'].get('onnxruntime')}" + (" (--quick: smoke figures, not to quote)" if result["quick"] else ""),
        "",
        "| model | FP32 p50 ms b1 / b32 | INT8 p50 ms b1 / b32 | INT8 speed-up b1 / b32 | top-1 vs FP32 U8S8 / S8S8 | gates or exits vs FP32 U8S8 / S8S8 | accuracy FP32 / U8S8 / S8S8 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model in result["models"]:
        rows = {r["batch"]: r for r in model["latency"]}
        a = model["agreement"]
        ort_row, trt_row = a["int8_ort"], a["int8_trt_form"]
        figure = next((f for f in DECISIONS.values() if f in ort_row), None)
        gates = f"{ort_row[figure]:.1%} / {trt_row[figure]:.1%}" if figure else ""
        lines.append(
            f"| {model['name']} | {rows[1]['fp32']['p50_ms']:.3f} / {rows[32]['fp32']['p50_ms']:.2f} "
            f"| {rows[1]['int8']['p50_ms']:.3f} / {rows[32]['int8']['p50_ms']:.2f} "
            f"| {rows[1]['speedup_int8_over_fp32_p50']:.2f}x / {rows[32]['speedup_int8_over_fp32_p50']:.2f}x "
            f"| {ort_row['top1_agreement']:.1%} / {trt_row['top1_agreement']:.1%} | {gates} "
            f"| {a['accuracy_fp32']:.1%} / {ort_row['accuracy']:.1%} / {trt_row['accuracy']:.1%} |"
        )
    lines += ["", "targets: " + ", ".join(f"{c['check']} {c['measured']:.3g} ({'pass' if c['passed'] else 'FAIL'})" for c in result["checks"])]
    if machine["noisy"]:
        lines.append("NOISY: other processes were running; rerun on an idle machine before quoting these figures")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], DEFAULT_OUT)
    parser.add_argument("--models", nargs="+", default=list(DEMO_MODELS), choices=DEMO_MODELS, help="zoo models (default all five)")
    args = parser.parse_args(argv)
    result = run(args)
    save_json(result, args.out)
    print(markdown(result))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
