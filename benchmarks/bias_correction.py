"""What INT8 bias correction buys in the TensorRT INT8 form, measured against PyTorch.

    python benchmarks/bias_correction.py             # full run, writes benchmarks/results/bias_correction.json
    python benchmarks/bias_correction.py --quick     # smoke run: two models, 64 held-out images
    python benchmarks/bias_correction.py --models s2d_resnet20_digits --out /tmp/b.json

For each zoo demo model (``mobilenet_v1_digits``, ``spconv_resnet20_digits``, ``skipnet38_digits``
in its TensorRT default form ``staged``, ``condensenet_digits``, ``s2d_resnet20_digits``, also
``staged``), two TensorRT INT8 bundles are exported with ``export()`` as ``slimdeploy export CKPT
--target trt --precision int8 --calib digits`` makes them (S8S8 Q/DQ, TensorRT's placement, run
here in ONNX Runtime as ``check`` does): one with bias correction (the default), one with
``--no-bias-correction``. Each is compared with the PyTorch model (the bundle's
``reference.pt``):

- on the bundle's own parity samples (``report.json``, what ``export`` and ``check`` judge):
  gate or exit agreement;
- on the digits held-out split (500 images; ``--quick``: 64): mean and max |logits - PyTorch|,
  top-1 agreement, gate or exit agreement, accuracy.

The figure read is the ratio of mean |logits - PyTorch| without over with correction, and the
exit agreement of the S2D bundle. Threads (``--threads``, default 2) and the date are recorded.
No timing: the results do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_arguments, machine_facts, save_json  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "bias_correction.json"
DEMO_MODELS = ("mobilenet_v1_digits", "spconv_resnet20_digits", "skipnet38_digits", "condensenet_digits", "s2d_resnet20_digits")
QUICK_MODELS = ("mobilenet_v1_digits", "s2d_resnet20_digits")
DECISIONS = {"gates": "gate_agreement", "exit_stage": "exit_agreement"}
QUICK_HELDOUT = 64


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_pair(name: str, tmp: Path, quick: bool) -> dict[str, Path]:
    """The TensorRT INT8 bundles of a zoo model with and without bias correction."""
    from slimdeploy.export import export
    from slimdeploy.zoo import zoo_checkpoint_path

    fast = {"samples": 40, "batch_sizes": (16,)} if quick else {}
    bundles = {}
    for label, correct in (("corrected", True), ("uncorrected", False)):
        out = tmp / f"{name}-{label}"
        result = export(zoo_checkpoint_path(name), out, target="trt", precision="int8", calib="digits",
                        bias_correction=correct, **fast)
        say(f"[{name}] {label}: parity {'passed' if result.passed else 'FAILED'}")
        bundles[label] = out
    return bundles


def parity_figures(bundle: Path) -> dict[str, Any]:
    """What the bundle's own parity check measured on its parity samples."""
    report = json.loads((bundle / "report.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    row: dict[str, Any] = {"passed": bool(report["passed"]), "samples": manifest["golden"].get("samples")}
    for output, figure in DECISIONS.items():
        entries = (report.get("decisions") or {}).get(output)
        if entries:
            row[figure] = min(float(entry["agreement"]) for entry in entries)
    correction = (manifest.get("calibration") or {}).get("bias_correction") or {}
    row["layers_corrected"] = correction.get("layers")
    return row


def heldout_figures(bundle: Path, heldout: np.ndarray, labels: np.ndarray, threads: int) -> dict[str, Any]:
    """The bundle against PyTorch on held-out digits."""
    from slimdeploy.bundle import bundle_runner, load_bundle, reference_runner
    from slimdeploy.parity import run_batches

    loaded = load_bundle(bundle)
    outputs = {}
    for label, runner in (("int8", bundle_runner(loaded, threads=threads)), ("torch", reference_runner(loaded, threads=threads))):
        with runner:
            outputs[label] = run_batches(runner, {"input": heldout}, 32, ["input"])
    ours, torch_out = outputs["int8"], outputs["torch"]
    error = np.abs(ours["logits"] - torch_out["logits"])
    row: dict[str, Any] = {
        "samples": len(heldout),
        "mean_abs_logits_vs_torch": float(error.mean()),
        "max_abs_logits_vs_torch": float(error.max()),
        "top1_agreement": float((ours["logits"].argmax(1) == torch_out["logits"].argmax(1)).mean()),
        "accuracy": float((ours["logits"].argmax(1) == labels).mean()),
        "accuracy_torch": float((torch_out["logits"].argmax(1) == labels).mean()),
    }
    for output, figure in DECISIONS.items():
        if output in torch_out and torch_out[output].size:
            row[figure] = float((ours[output] == torch_out[output]).mean())
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimdeploy.data import digits_inputs

    count = QUICK_HELDOUT if args.quick else None
    result: dict[str, Any] = {
        "benchmark": "bias_correction",
        "quick": args.quick,
        "machine": machine_facts(),
        "settings": {
            "threads": args.threads,
            "export": "export(CKPT, target='trt', precision='int8', calib='digits', bias_correction=True / False): "
                      "S8S8 Q/DQ, --calib-method auto, gate and exit heads FP32, default forms (SkipNet and S2D staged)",
            "reference": "the bundle's reference.pt in PyTorch",
            "data": "digits held-out split" + (f", first {count}" if count else " (500 images)"),
        },
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="slimdeploy-bias-") as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models:
            bundles = export_pair(name, tmp, args.quick)
            prep = json.loads((bundles["corrected"] / "manifest.json").read_text())["preprocessing"]
            heldout, labels = digits_inputs("heldout", tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"]), count=count)
            row: dict[str, Any] = {"name": name}
            for label, bundle in bundles.items():
                say(f"[{name}] {label}: against PyTorch on {len(heldout)} held-out digits ...")
                row[label] = {"parity_samples": parity_figures(bundle), "heldout": heldout_figures(bundle, heldout, labels, args.threads)}
            row["mean_abs_logits_ratio_uncorrected_over_corrected"] = (
                row["uncorrected"]["heldout"]["mean_abs_logits_vs_torch"] / row["corrected"]["heldout"]["mean_abs_logits_vs_torch"])
            result["models"].append(row)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    ratios = [m["mean_abs_logits_ratio_uncorrected_over_corrected"] for m in result["models"]]
    result["summary"] = {"mean_abs_logits_ratio_min": min(ratios), "mean_abs_logits_ratio_max": max(ratios)}
    return result


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        f"{machine['date']}, {machine['cpu_model']}, {result['settings']['threads']} threads"
        + (" (--quick: smoke figures, not to quote)" if result["quick"] else ""),
        "",
        "| model | mean \\|logits - PyTorch\\| uncorrected / corrected (ratio) | top-1 vs PyTorch | gates or exits vs PyTorch, held-out | gates or exits, parity samples |",
        "|---|---|---|---|---|",
    ]
    for model in result["models"]:
        before, after = model["uncorrected"], model["corrected"]
        figure = next((f for f in DECISIONS.values() if f in after["heldout"]), None)
        decisions = f"{before['heldout'][figure]:.1%} / {after['heldout'][figure]:.1%}" if figure else ""
        parity = f"{before['parity_samples'][figure]:.1%} / {after['parity_samples'][figure]:.1%}" if figure else ""
        lines.append(
            f"| {model['name']} | {before['heldout']['mean_abs_logits_vs_torch']:.4f} / {after['heldout']['mean_abs_logits_vs_torch']:.4f} "
            f"({model['mean_abs_logits_ratio_uncorrected_over_corrected']:.2f}x) "
            f"| {before['heldout']['top1_agreement']:.1%} / {after['heldout']['top1_agreement']:.1%} | {decisions} | {parity} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], DEFAULT_OUT)
    parser.add_argument("--models", nargs="+", default=None, choices=DEMO_MODELS, help="zoo models (default all five; --quick: two)")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = list(QUICK_MODELS if args.quick else DEMO_MODELS)
    result = run(args)
    save_json(result, args.out)
    print(markdown(result))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
