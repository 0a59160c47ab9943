"""The default FP32 parity tolerance on large ImageNet-size models: correct exports pass, defects fail.

    python benchmarks/tolerance.py            # full run (a few minutes per model), writes benchmarks/results/tolerance.json
    python benchmarks/tolerance.py --quick    # smoke run: 8 samples, the small-logit ResNet-50 only

For each model, random weights at 224x224 with every BatchNorm's statistics re-estimated on the
digits calibration split (so activations stay in range through the deep stack), and the
classifier scaled so that the largest |logit| on the parity images is the target (``MODELS``):

- ``spconv_resnet50_large``: SPConv ResNet-50, logits of magnitude ~60 (an ImageNet model's);
- ``spconv_resnet50_small``: the same network, logits ~0.25;
- ``condensenetv2_a_small``: CondenseNetV2 config A, learned form with its condensation schedule
  run to the end (as a trained checkpoint has it; condensed at export), logits ~0.25.

Each is saved with ``save_checkpoint`` and exported with ``export()`` and the default tolerances
(32 held-out digits at batch 1 and 16, as the CLI). Measured, per model: the logits' scale
(max |r|, RMS), PyTorch's own float32 noise (max |ref32 - ref64|, a ``.double()`` copy on the
same samples), the exported graph's error against PyTorch (max |c - r|, ONNX Runtime), its
ratio to the noise, and the verdicts of the old fixed rule (|c - r| <= 1e-4 + 1e-3 |r|) and of
the measured rule (``slimdeploy.tolerance``). Then the defect side: one convolution's weights in
the exported graph are scaled by 1.01 and by 1.02 (the first convolution, and the one nearest the
middle whose output reaches the logits at all), and the perturbed graph is checked with the
bundle's stored tolerances: each must fail.

``--models a,b`` measures only those and replaces their rows in an existing results file.
"""

from __future__ import annotations

import json
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

from common import benchmark_arguments, estimate_batchnorm, machine_facts, save_json  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "tolerance.json"
INPUT_SIZE = (3, 224, 224)
# Model label → (architecture, arch args, classifier attribute, target max |logit|).
MODELS: dict[str, tuple[str, dict[str, Any], str, float]] = {
    "spconv_resnet50_large": ("spconv_resnet50", {}, "fc", 60.0),
    "spconv_resnet50_small": ("spconv_resnet50", {}, "fc", 0.25),
    "condensenetv2_a_small": ("condensenetv2", {"config": "A"}, "classifier", 0.25),
}
QUICK_MODELS = ("spconv_resnet50_small",)
PERTURBATIONS = (1.01, 1.02)
OLD_RULE = {"": (1e-4, 1e-3)}


def make_checkpoint(label: str, folder: Path, calib_count: int, samples: int) -> Path:
    """Random weights, BatchNorm re-estimated on digits, classifier scaled so that the largest
    |logit| on the ``samples`` parity images (the held-out split's first) is the target."""
    import torch

    from slimdeploy.data import digits_inputs
    from slimdeploy.loading import Preprocessing, save_checkpoint
    from slimdeploy.models.registry import get_arch

    arch, args, classifier_name, target = MODELS[label]
    torch.manual_seed(0)
    model = get_arch(arch).build(**args)
    finish_condensation(model)
    prep = Preprocessing.default_for(INPUT_SIZE)
    images, _ = digits_inputs("calib", INPUT_SIZE, prep.mean, prep.std, count=calib_count)
    estimate_batchnorm(model, images, batch_size=16)
    heldout, _ = digits_inputs("heldout", INPUT_SIZE, prep.mean, prep.std, count=samples)
    with torch.inference_mode():
        logits = torch.cat([model(torch.from_numpy(heldout[i:i + 16])) for i in range(0, len(heldout), 16)])
    classifier = getattr(model, classifier_name)
    factor = target / float(logits.abs().max())
    with torch.no_grad():
        classifier.weight.mul_(factor)
        classifier.bias.mul_(factor)
    path = folder / f"{label}.pt"
    save_checkpoint(path, model, arch, args, prep, {"dataset": "random+bn-on-digits", "logit_target": target})
    return path


def finish_condensation(model: Any) -> None:
    """Run a learned CondenseNetV2's condensation schedule to its end, as training does: the
    masks then keep the official fraction, so condensing at export is exact. Entering stage s
    of C takes training progress s / (2 (C - 1)); other models have no such layers."""
    for layer in model.modules():
        if hasattr(layer, "condense_step"):
            stages = layer.condense_factor - 1
            for stage in range(1, stages + 1):
                layer.condense_step(stage / (2 * stages))


def _changes_logits(graph: Any, initializer: Any, inputs: np.ndarray, unperturbed: np.ndarray) -> bool:
    """Whether zeroing this convolution's weights changes the graph's logits at all."""
    from onnx import numpy_helper

    from slimdeploy.engines.ort_runner import OrtRunner

    original = numpy_helper.to_array(initializer).copy()
    initializer.CopyFrom(numpy_helper.from_array(np.zeros_like(original), initializer.name))
    with OrtRunner(graph.SerializeToString(), threads=2) as runner:
        changed = bool(np.abs(runner.infer({"input": inputs})["logits"] - unperturbed).max() > 0)
    initializer.CopyFrom(numpy_helper.from_array(original, initializer.name))
    return changed


def perturbed_verdicts(bundle: Path) -> list[dict[str, Any]]:
    """Scale one Conv's weights in the exported graph and check it with the stored tolerances."""
    import onnx
    from onnx import numpy_helper

    from slimdeploy.bundle import load_bundle
    from slimdeploy.engines.ort_runner import OrtRunner
    from slimdeploy.parity import compare_values

    loaded = load_bundle(bundle)
    golden = loaded.golden()
    stored = {name: tuple(value) for name, value in loaded.manifest["tolerances"].items()}
    atol, rtol = stored.get("logits", stored[""])
    graph = onnx.load(str(loaded.graph_path()))
    initializers = {init.name: init for init in graph.graph.initializer}
    with OrtRunner(graph.SerializeToString(), threads=2) as runner:
        unperturbed = runner.infer({"input": golden["input"]})["logits"]
    convs = [node.input[1] for node in graph.graph.node if node.op_type == "Conv" and node.input[1] in initializers]
    # A convolution whose output never reaches the logits (in a random network, one whose
    # inputs are all cut by ReLU, or zero-initialised) computes the same logits however it is
    # changed: no comparison can see that. The middle one is the live one nearest the middle.
    middle = len(convs) // 2
    by_distance = sorted(range(len(convs)), key=lambda i: (abs(i - middle), i))
    live = next(convs[i] for i in by_distance if _changes_logits(graph, initializers[convs[i]], golden["input"], unperturbed))
    results = []
    for position, name in (("first", convs[0]), ("middle", live)):
        original = numpy_helper.to_array(initializers[name]).copy()
        for factor in PERTURBATIONS:
            initializers[name].CopyFrom(numpy_helper.from_array((original * factor).astype(original.dtype), name))
            with OrtRunner(graph.SerializeToString(), threads=2) as runner:
                logits = runner.infer({"input": golden["input"]})["logits"]
            verdict = compare_values("logits", golden["ref_logits"], logits, atol, rtol, len(logits))
            results.append({"conv": position, "initializer": name, "scale": factor, "max_abs": verdict.max_abs,
                            "change_max_abs": float(np.abs(logits - unperturbed).max()),
                            "mismatched": verdict.mismatched, "elements": verdict.elements, "fails": not verdict.passed})
        initializers[name].CopyFrom(numpy_helper.from_array(original, name))
    return results


def measure(label: str, folder: Path, samples: int) -> dict[str, Any]:
    from slimdeploy.bundle import load_bundle
    from slimdeploy.engines.ort_runner import OrtRunner
    from slimdeploy.export import export
    from slimdeploy.parity import compare_values

    started = time.perf_counter()
    checkpoint = make_checkpoint(label, folder, calib_count=64, samples=samples)
    bundle = folder / label
    result = export(checkpoint, bundle, samples=samples, batch_sizes=(1, 16), threads=2)
    golden = load_bundle(bundle).golden()
    reference = golden["ref_logits"]
    with OrtRunner(load_bundle(bundle).graph_path(), threads=2) as runner:
        candidate = runner.infer({"input": golden["input"]})["logits"]
    old = compare_values("logits", reference, candidate, *OLD_RULE[""], len(reference))
    rule = result.report.tolerance_rule
    noise = rule.get("noise", {}).get("logits")
    error = max(r.max_abs for r in result.report.outputs if r.name == "logits")
    return {
        "model": label,
        "arch": MODELS[label][0],
        "arch_args": MODELS[label][1],
        "samples": samples,
        "logits_max_abs": float(np.abs(reference).max()),
        "logits_rms": float(np.sqrt(np.mean(reference.astype(np.float64) ** 2))),
        "fp32_noise_max_abs": noise,
        "export_error_max_abs": error,
        "error_over_noise": error / noise if noise else None,
        "old_rule": {"atol": OLD_RULE[""][0], "rtol": OLD_RULE[""][1], "passed": old.passed,
                     "mismatched": old.mismatched, "elements": old.elements},
        "measured_rule": {"atol": result.manifest["tolerances"].get("logits", result.manifest["tolerances"][""])[0],
                          "rtol": result.manifest["tolerances"][""][1], "passed": result.passed, "rule": rule},
        "top1_agreement": result.report.task.top1_agreement if result.report.task else None,
        "perturbed": perturbed_verdicts(bundle),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.splitlines()[0], DEFAULT_OUT)
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)}; their rows replace those in --out")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    labels = args.models.split(",") if args.models else QUICK_MODELS if args.quick else tuple(MODELS)
    unknown = sorted(set(labels) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected some of {list(MODELS)}")
    samples = 8 if args.quick else 32
    result: dict[str, Any] = {"benchmark": "tolerance", "quick": args.quick, "machine": machine_facts(),
                              "settings": {"threads": args.threads, "onnxruntime_threads": 2, "samples": samples,
                                           "batch_sizes": [1, 16]},
                              "models": []}
    if args.models and args.out.is_file():
        kept = json.loads(args.out.read_text()).get("models", [])
        result["models"] = [row for row in kept if row["model"] not in labels]
    with tempfile.TemporaryDirectory() as tmp:
        for label in labels:
            row = {**measure(label, Path(tmp), samples), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            result["models"] = [r for r in result["models"] if r["model"] != label] + [row]
            save_json(result, args.out)
            print(f"{label}: |logits| max {row['logits_max_abs']:.3g} rms {row['logits_rms']:.3g}; noise "
                  f"{row['fp32_noise_max_abs']:.3g}; export error {row['export_error_max_abs']:.3g} "
                  f"({row['error_over_noise']:.2f}x noise); old rule {'pass' if row['old_rule']['passed'] else 'FAIL'}; "
                  f"measured atol {row['measured_rule']['atol']:.3g} {'pass' if row['measured_rule']['passed'] else 'FAIL'}; "
                  "perturbed: " + ", ".join(f"{p['conv']} x{p['scale']} max {p['max_abs']:.3g} {'fails' if p['fails'] else 'PASSES'}"
                                            for p in row["perturbed"]), flush=True)
    ok = all(row["measured_rule"]["passed"] and all(p["fails"] for p in row["perturbed"]) for row in result["models"])
    result["checks"] = {"correct_exports_pass_and_perturbed_fail": ok}
    save_json(result, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
