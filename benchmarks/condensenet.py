"""CondenseNet: what condensing buys in ONNX Runtime, against what the MACs predict.

    python benchmarks/condensenet.py            # full run (under a minute on 2 idle cores)
    python benchmarks/condensenet.py --quick    # smoke run: few samples and rounds, same fields

Three exports of the same learned model are compared side by side:

- ``masked_dense``: the training form exported as it is. Its forward multiplies every dense 1x1
  ``LearnedGroupConv`` weight by its 0/1 mask, so the graph runs dense 1x1 convolutions over all
  input channels (the export folds ``weight * mask``, and the BN after it, into one constant
  weight, zeros included);
- ``condensed``: ``slimdeploy.transforms.condense.condense(model)`` (exact classifier): each 1x1
  layer gathers its kept inputs (index), runs a grouped convolution and shuffles the outputs;
- ``folded``: the condensed model after ``slimdeploy.transforms.fold.fold_condensed`` (what
  ``slimdeploy export --target ort`` writes): conv_2's BN folded into the 1x1 convolution, the
  ReLU moved before the shuffle, and the shuffle folded into the 3x3 weights, stored dense (more
  MACs, but ONNX Runtime's CPU kernels run these small grouped 3x3 convolutions slower than dense).

All are exported with ``export_onnx`` and simplified with onnxslim, as ``slimdeploy export``
builds them, and run with ONNX Runtime (``OrtRunner``, ``--threads`` intra-op threads). Before
timing, all answer the same held-out images and the largest logit differences are recorded. The
runners stay loaded and take turns in rounds (``slimdeploy.bench.compare_runners``); a figure is
the median over rounds of the mean time per call. ``OtherLoad`` records the cores other
processes used during each timed block (above 0.2: noisy, rerun on an idle machine).

MACs: Conv and Linear MACs per sample (``slimdeploy.flops.count_macs``; for the masked-dense
form the dense 1x1 convolutions of the ``LearnedGroupConv`` layers; for the folded form the
dense-stored 3x3 convolutions). Predicted speed-up = masked-dense MACs / condensed MACs;
realised = masked-dense time / condensed (or folded) time.

1. The demo model: ``zoo:condensenet_digits`` (shipped in the package, the learned training
   form), on held-out digits.
2. A CondenseNet-86-sized model (official CIFAR configuration: stages 14-14-14, growth 8-16-32,
   bottleneck 4, group_1x1 4, group_3x3 4, condense factor 4) with random weights and random masks
   as the condensation schedule ends them (each group keeps in/C random inputs; group i owns
   outputs i, i+G, ...), BatchNorm statistics re-estimated on digits train images.

Writes ``benchmarks/results/condensenet.json``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OtherLoad, benchmark_arguments, estimate_batchnorm, machine_facts, write_results  # noqa: E402

from slimdeploy.machine import NOISY_OTHER_CORES  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "condensenet.json"
DEMO = "condensenet_digits"
LARGE_CONFIG = {"stages": (14, 14, 14), "growth": (8, 16, 32), "bottleneck": 4, "group_1x1": 4,
                "group_3x3": 4, "condense_factor": 4, "data": "cifar10", "num_classes": 10}
TARGET_SPEEDUP = 2.0
NOISY_CORES = NOISY_OTHER_CORES  # the threshold slimdeploy bench flags too
BATCHES = (1, 32)
FULL = {"samples_b1": 48, "batches_b32": 4, "rounds": 5, "warmup": 5}
QUICK = {"samples_b1": 4, "batches_b32": 1, "rounds": 2, "warmup": 1}


def say(message: str) -> None:
    print(f"[condensenet bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def export(module: Any, input_size: tuple[int, ...]) -> Any:
    """The simplified ONNX graph of ``module``, as ``slimdeploy export`` builds it."""
    import torch

    from slimdeploy.exporters import ExportSpec, export_onnx, simplify
    from slimdeploy.exporters.onnx_export import EXAMPLE_BATCH

    example = torch.zeros(EXAMPLE_BATCH, *input_size)
    return simplify(export_onnx(module, (example,), ExportSpec())).model


def initializer_elements(model: Any) -> int:
    return int(sum(int(np.prod(init.dims)) for init in model.graph.initializer))


def conv_ops(model: Any) -> int:
    return sum(1 for node in model.graph.node if node.op_type == "Conv")


def compare(name: str, learned: Any, x: np.ndarray, settings: dict[str, Any], threads: int) -> dict[str, Any]:
    """Export both forms of ``learned``, check their logits agree, count and time them."""
    import copy

    import torch

    from slimdeploy.engines import OrtRunner
    from slimdeploy.flops import count_macs
    from slimdeploy.transforms.condense import condense
    from slimdeploy.transforms.fold import fold_condensed

    learned = learned.eval()
    input_size = tuple(learned.input_size)
    condensed = condense(learned)
    folded, _ = fold_condensed(copy.deepcopy(condensed), expand_3x3=True)
    modules = {"masked_dense": learned, "condensed": condensed, "folded": folded}
    forms: dict[str, dict[str, Any]] = {}
    runners = {}
    try:
        for form, module in modules.items():
            say(f"{name}: exporting {form}")
            started = time.perf_counter()
            graph = export(module, input_size)
            if settings.get("save_graphs"):  # for benchmarks/op_profile.py
                Path(settings["save_graphs"]).mkdir(parents=True, exist_ok=True)
                (Path(settings["save_graphs"]) / f"{name}_{form}.onnx").write_bytes(graph.SerializeToString())
            forms[form] = {
                "export_s": round(time.perf_counter() - started, 2),
                "onnx_initializer_elements": initializer_elements(graph),
                "onnx_conv_nodes": conv_ops(graph),
                "onnx_bytes": graph.ByteSize(),
                "torch_params": int(sum(p.numel() for p in module.parameters())),
                "macs": count_macs(module, input_size).macs,
            }
            runners[form] = OrtRunner(graph.SerializeToString(), threads=threads, name=form).activate()
        check = np.ascontiguousarray(x[:64])
        logits = {form: runner.infer({"input": check})["logits"] for form, runner in runners.items()}
        with torch.no_grad():
            eager = learned(torch.from_numpy(check)).numpy()
        agreement = {
            "samples": len(check),
            "max_abs_diff_logits_condensed_vs_masked_dense": float(np.abs(logits["condensed"] - logits["masked_dense"]).max()),
            "max_abs_diff_logits_folded_vs_masked_dense": float(np.abs(logits["folded"] - logits["masked_dense"]).max()),
            "max_abs_diff_logits_masked_dense_vs_torch": float(np.abs(logits["masked_dense"] - eager).max()),
            "same_predictions": bool(all((logits[f].argmax(1) == logits["masked_dense"].argmax(1)).all() for f in logits)),
        }
        from slimdeploy.bench import compare_runners

        timings = []
        for batch in BATCHES:
            count = settings["samples_b1"] if batch == 1 else settings["batches_b32"]
            feeds = [{"input": np.ascontiguousarray(x[i:i + batch])} for i in range(0, batch * count, batch)]
            say(f"{name}: timing batch {batch} ({len(feeds)} feeds x {settings['rounds']} rounds)")
            with OtherLoad() as other:
                timed = compare_runners(runners, feeds, warmup=settings["warmup"], rounds=settings["rounds"])
            row: dict[str, Any] = {"batch": batch, "calls_per_round": len(feeds), "other_processes_cpu_cores": other.cores}
            for form, result in timed.items():
                row[form] = {"mean_ms": round(result.mean_ms, 4), "p50_ms": round(result.p50_ms, 4),
                             "p90_ms": round(result.p90_ms, 4), "iterations": result.iterations}
            row["realised_speedup"] = round(timed["masked_dense"].mean_ms / timed["condensed"].mean_ms, 3)
            row["realised_speedup_folded"] = round(timed["masked_dense"].mean_ms / timed["folded"].mean_ms, 3)
            timings.append(row)
    finally:
        for runner in runners.values():
            runner.deactivate()
    macs_ratio = forms["masked_dense"]["macs"] / forms["condensed"]["macs"]
    for row in timings:
        row["predicted_speedup_macs"] = round(macs_ratio, 3)
        row["realised_over_predicted"] = round(row["realised_speedup"] / macs_ratio, 3)
        row["realised_folded_over_predicted"] = round(row["realised_speedup_folded"] / macs_ratio, 3)
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in learned.config.items()},
        "forms": forms,
        "params_ratio_onnx": round(forms["masked_dense"]["onnx_initializer_elements"] / forms["condensed"]["onnx_initializer_elements"], 3),
        "macs_ratio": round(macs_ratio, 3),
        "agreement": agreement,
        "timings": timings,
    }


def demo_model(settings: dict[str, Any], threads: int) -> dict[str, Any]:
    from slimdeploy.data import digits_inputs
    from slimdeploy.loading import load_checkpoint
    from slimdeploy.zoo import zoo_checkpoint_path

    source, note = f"zoo:{DEMO}", "trained on digits"
    path = zoo_checkpoint_path(DEMO)
    loaded = load_checkpoint(path)
    if getattr(loaded.module, "converted", True):
        # The comparison starts from the masked dense training form; a converted model has none.
        raise SystemExit(f"zoo:{DEMO} is not a learned (training-form) CondenseNet: retrain it with "
                         f"`slimdeploy zoo train {DEMO}`")
    prep = loaded.preprocessing
    x, _ = digits_inputs("heldout", prep.input_size, prep.mean, prep.std)
    result = compare("demo", loaded.module, x, settings, threads)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"model": source, "note": note, "arch": loaded.arch, "checkpoint_sha256": digest, **result}


def random_masks(model: Any, generator: Any) -> None:
    """Each LearnedGroupConv's mask as the condensation schedule ends it: group i (outputs i,
    i+G, ...) keeps in/C randomly chosen inputs; ``_stage`` C-1 and ``_count`` in - in/C."""
    import torch

    from slimdeploy.nn.learned_group_conv import LearnedGroupConv

    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, LearnedGroupConv):
                continue
            keep = layer.in_channels // layer.condense_factor
            layer._mask.zero_()
            for i in range(layer.groups):
                kept = torch.randperm(layer.in_channels, generator=generator)[:keep]
                layer._mask[i::layer.groups, kept] = 1
            layer._stage.fill_(layer.condense_factor - 1)
            layer._count.fill_(layer.in_channels - keep)


def large_model(settings: dict[str, Any], threads: int) -> dict[str, Any]:
    import torch

    from slimdeploy.data import digits_inputs, digits_statistics
    from slimdeploy.models.condensenet import condensenet

    torch.manual_seed(0)
    model = condensenet(**LARGE_CONFIG)
    random_masks(model, torch.Generator().manual_seed(0))
    mean, std = digits_statistics()
    train, _ = digits_inputs("train", (3, 32, 32), mean, std, count=256)
    # Random weights, BatchNorm statistics re-estimated on real images with the masks in place,
    # so activations stay in range through 42 dense layers.
    estimate_batchnorm(model, train)
    x, _ = digits_inputs("heldout", (3, 32, 32), mean, std)
    result = compare("condensenet86", model, x, settings, threads)
    return {"model": "CondenseNet-86 (random weights seed 0, random masks at kept fraction 1/condense_factor)",
            "kept_fraction": 1 / LARGE_CONFIG["condense_factor"], **result}


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for part in ("demo", "large"):
        for row in result[part]["timings"]:
            # The form `slimdeploy export --target ort` writes: condensed, then folded.
            value = row["realised_speedup_folded"]
            out.append({"name": f"{part}_folded_over_masked_dense_batch{row['batch']}", "value": value,
                        "target": f">= {TARGET_SPEEDUP}", "met": value >= TARGET_SPEEDUP})
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | batch | masked-dense ms | condensed ms | folded ms | speed-up condensed | speed-up folded | MACs ratio | folded / MACs | other cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part, label in (("demo", "demo"), ("large", "CondenseNet-86")):
        for row in result[part]["timings"]:
            lines.append(
                f"| {label} | {row['batch']} | {row['masked_dense']['mean_ms']:.3f} | {row['condensed']['mean_ms']:.3f} | "
                f"{row['folded']['mean_ms']:.3f} | {row['realised_speedup']:.2f}x | {row['realised_speedup_folded']:.2f}x | "
                f"{row['predicted_speedup_macs']:.2f}x | {row['realised_folded_over_predicted']:.2f} | "
                f"{row['other_processes_cpu_cores']:.2f} |")
    lines += ["", "| model | form | ONNX initializer elements | torch params | MACs / sample | Conv nodes |",
              "|---|---|---|---|---|---|"]
    for part, label in (("demo", "demo"), ("large", "CondenseNet-86")):
        for form, facts in result[part]["forms"].items():
            lines.append(f"| {label} | {form} | {facts['onnx_initializer_elements']:,} | {facts['torch_params']:,} | "
                         f"{facts['macs'] / 1e6:.2f} M | {facts['onnx_conv_nodes']} |")
    lines += ["", f"demo: {result['demo']['model']}; max |logits condensed - masked-dense| = "
              f"{result['demo']['agreement']['max_abs_diff_logits_condensed_vs_masked_dense']:.2e} (demo), "
              f"{result['large']['agreement']['max_abs_diff_logits_condensed_vs_masked_dense']:.2e} (CondenseNet-86)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.splitlines()[0], DEFAULT_OUT)
    parser.add_argument("--save-graphs", type=Path, default=None,
                        help="also write each form's ONNX graph here (NAME_FORM.onnx), e.g. to profile them with op_profile.py")
    args = parser.parse_args(argv)
    settings = {**(QUICK if args.quick else FULL), "save_graphs": str(args.save_graphs) if args.save_graphs else None}
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "condensenet", "machine": machine_facts(),
        "settings": {**settings, "threads": args.threads, "quick": args.quick,
                     "runner": f"OrtRunner, intra_op_num_threads={args.threads}, inter_op_num_threads=1, full graph optimisation",
                     "timing": "slimdeploy.bench.compare_runners: runners alternate in rounds; mean_ms = median over rounds of the mean call time"},
    }
    result["demo"] = demo_model(settings, args.threads)
    result["large"] = large_model(settings, args.threads)
    result["checks"] = checks(result)
    measured = [row["other_processes_cpu_cores"] for part in ("demo", "large") for row in result[part]["timings"]]
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["machine"]["noisy"] = max(measured) > NOISY_CORES
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, args.out, markdown(result))
    if result["machine"]["noisy"]:
        print(f"NOISY: other processes used up to {max(measured):.2f} cores during timing; rerun on an idle machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
