"""The worked examples of "Deploy your own dynamic network": accuracy, decisions, and predicted
against realised speed-ups of every deployed form over ``mask``.

    python benchmarks/examples.py            # full run (about 8 minutes on 2 busy cores)
    python benchmarks/examples.py --quick    # smoke run: one epoch, few calls, same fields

For each example in ``examples/`` (``gated_mobilenet_v2``: gated inverted residuals;
``early_exit_resnet``: exits after stages 1 and 2), what the README tells a user to do:

1. **Train** with ``python examples/train.py NAME --out CHECKPOINT`` (its default epochs, 6;
   ``--threads``), in a child process. Recorded: wall seconds and the held-out accuracy it
   prints (PyTorch, the digits held-out split).
2. **Export** ``mask``, ``if`` and ``compact`` (gated) or ``staged`` (both) through
   ``slimdeploy.export.export`` with ``arch=examples/NAME.py:NAME`` (its defaults: 32 held-out
   samples, parity at batch 1 and 16). Recorded per form: parity passed, export seconds.
3. **Decide.** The ``mask`` bundle runs the whole digits held-out split: accuracy of the
   deployed model, and the share of gated-block runs skipped (gated) or of samples answered at
   each exit (early exit). The golden inputs' decisions are those ``bench`` reports.
4. **Bench.** ``slimdeploy.bench.bench_bundle`` times each form against the ``mask`` bundle
   (``baseline``) at batch 1 and 32 (``--threads`` intra-op threads, no PyTorch column),
   ``rounds`` times, the forms in turn (order reversed every other round). Each call of
   ``bench_bundle`` warms both runners up and then times ``iterations`` calls of each on the
   golden inputs tiled to the batch (at batch 1 the first golden input, every call).
   *Realised* speed-up = p50 of ``mask`` / p50 of the form (what ``bench`` reports), median over
   the rounds; *predicted* = MACs per sample of ``mask`` / of the form for the decisions on the
   golden inputs (``bench``'s ``predicted_speedup``); for batch 1 the prediction for the one
   input timed is recorded beside it (``predicted_timed_input``). The cores other processes
   used during the timings are recorded (``other_load_cores``); above ``NOISY_OTHER_CORES`` (0.2) the run is noisy.

Writes ``benchmarks/results/examples.json``.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
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

from common import benchmark_arguments, machine_facts, write_results  # noqa: E402

from slimdeploy.machine import NOISY_OTHER_CORES  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "examples.json"
# The deployed forms of each example, timed against its mask bundle.
EXAMPLES = {
    "gated_mobilenet_v2": ("compact", "staged", "if"),
    "early_exit_resnet": ("staged", "if"),
}
BATCH_SIZES = (1, 32)
FULL = {"epochs": 6, "export_samples": 32, "export_batch_sizes": (1, 16), "rounds": 3, "warmup": 20, "iterations": 200}
QUICK = {"epochs": 1, "export_samples": 8, "export_batch_sizes": (1, 8), "rounds": 1, "warmup": 2, "iterations": 5}


def say(message: str) -> None:
    print(f"[examples bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def train(name: str, checkpoint: Path, epochs: int, threads: int) -> dict[str, Any]:
    """Run ``examples/train.py`` as a user does; its wall time and the held-out accuracy it prints."""
    say(f"{name}: python examples/train.py {name} --epochs {epochs} --threads {threads}")
    started = time.perf_counter()
    # The package from this checkout, installed or not.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "examples/train.py", name, "--out", str(checkpoint), "--epochs", str(epochs),
                           "--threads", str(threads)], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"examples/train.py {name} failed:\n{done.stderr[-3000:]}")
    printed = [line for line in done.stdout.splitlines() if "held-out accuracy" in line]
    accuracy = re.search(r"held-out accuracy ([0-9.]+)%", printed[-1]) if printed else None
    return {"command": f"python examples/train.py {name} --epochs {epochs} --threads {threads}",
            "wall_seconds": round(time.perf_counter() - started, 1),
            "heldout_accuracy_printed": float(accuracy.group(1)) / 100 if accuracy else None,
            "report_line": printed[-1] if printed else None}


def export_forms(name: str, checkpoint: Path, root: Path, settings: dict[str, Any], threads: int) -> dict[str, Any]:
    """Export ``mask`` and every deployed form of ``name`` through ``export``."""
    from slimdeploy.export import export

    rows = {}
    for form in ("mask", *EXAMPLES[name]):
        say(f"{name}: exporting --dynamic {form}")
        started = time.perf_counter()
        result = export(checkpoint, root / form, arch=f"examples/{name}.py:{name}", dynamic=form, threads=threads,
                        samples=settings["export_samples"], batch_sizes=settings["export_batch_sizes"])
        rows[form] = {"passed": result.passed, "wall_seconds": round(time.perf_counter() - started, 2),
                      "seconds_total": result.manifest["export"]["seconds_total"],
                      "parity_batch_sizes": list(settings["export_batch_sizes"]), "parity_samples": settings["export_samples"]}
    return rows


def heldout_decisions(mask_bundle: Path, threads: int) -> dict[str, Any]:
    """Accuracy and decisions of the ``mask`` bundle over the whole digits held-out split."""
    from slimdeploy.bundle import bundle_runner, load_bundle
    from slimdeploy.data import digits_inputs

    bundle = load_bundle(mask_bundle)
    prep = bundle.manifest["preprocessing"]
    images, labels = digits_inputs("heldout", tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"]))
    with bundle_runner(bundle, threads=threads) as runner:
        outputs = [runner.infer({"input": images[i:i + 64]}) for i in range(0, len(images), 64)]
    logits = np.concatenate([o["logits"] for o in outputs])
    row: dict[str, Any] = {"samples": len(images), "accuracy": round(float((logits.argmax(1) == labels).mean()), 4)}
    if bundle.manifest.get("gating"):
        gates = np.concatenate([o["gates"] for o in outputs])
        row["skip_rate"] = round(float(1 - gates.mean()), 4)
        row["skip_rate_per_block"] = [round(float(v), 4) for v in 1 - gates.mean(axis=0)]
    else:
        stage = np.concatenate([o["exit_stage"] for o in outputs])
        row["exit_share_per_stage"] = [round(float((stage == j).mean()), 4) for j in range(bundle.manifest["exits"]["n_stages"])]
    return row


def predicted_for_first_input(bundle_path: Path, threads: int) -> float:
    """The MACs speed-up over ``mask`` that the first golden input's decisions predict (what
    ``bench_bundle`` times at batch 1)."""
    from slimdeploy.bench import exit_macs, gated_macs
    from slimdeploy.bundle import bundle_runner, load_bundle

    bundle = load_bundle(bundle_path)
    form = bundle.manifest["dynamic"]
    with bundle_runner(bundle, threads=threads) as runner:
        outputs = runner.infer({"input": bundle.golden()["input"][:1]})
    if bundle.manifest.get("gating"):
        plan = bundle.manifest["gating"]
        return gated_macs(plan, outputs["gates"], "mask", 1) / gated_macs(plan, outputs["gates"], form, 1)
    macs = [int(bundle.manifest["exits"]["macs"][f"stage{j}"]) for j in range(bundle.manifest["exits"]["n_stages"])]
    stage = np.asarray(outputs["exit_stage"])
    return exit_macs(macs, stage, "mask", 1) / exit_macs(macs, stage, form, 1)


def bench_forms(name: str, root: Path, settings: dict[str, Any], threads: int) -> dict[str, Any]:
    """``bench_bundle`` of every deployed form against the mask bundle, ``rounds`` times."""
    from slimdeploy.bench import bench_bundle

    forms = EXAMPLES[name]
    reports: dict[str, list[Any]] = {form: [] for form in forms}
    for round_index in range(settings["rounds"]):
        for form in forms if round_index % 2 == 0 else forms[::-1]:
            say(f"{name}: round {round_index + 1}/{settings['rounds']}, bench {form} against mask")
            reports[form].append(bench_bundle(root / form, batch_sizes=BATCH_SIZES, warmup=settings["warmup"],
                                              iterations=settings["iterations"], threads=threads, torch_reference=False,
                                              baseline=root / "mask"))
    rows = {}
    for form, runs in reports.items():
        stats = runs[0].decisions or runs[0].exits
        row: dict[str, Any] = {"predicted": {}, "realised": {}, "realised_per_round": {}, "p50_ms": {}, "mask_p50_ms": {}}
        for batch in BATCH_SIZES:
            per_round = [run.speedups[f"vs_baseline_mask_batch{batch}"] for run in runs]
            row["predicted"][str(batch)] = round(stats.predicted_speedup[str(batch)], 3)
            row["realised"][str(batch)] = round(statistics.median(per_round), 3)
            row["realised_per_round"][str(batch)] = [round(value, 3) for value in per_round]
            row["p50_ms"][str(batch)] = round(statistics.median(
                [r.p50_ms for run in runs for r in run.results if r.runner == form and r.batch_size == batch]), 4)
            row["mask_p50_ms"][str(batch)] = round(statistics.median(
                [r.p50_ms for run in runs for r in run.results if r.runner == "baseline:mask" and r.batch_size == batch]), 4)
        row["predicted_timed_input"] = {"1": round(predicted_for_first_input(root / form, threads), 3)}
        row["golden_decisions"] = ({"samples": stats.samples, "skip_rate": round(stats.skip_rate, 4)} if runs[0].decisions
                                   else {"samples": stats.samples, "exit_share_per_stage": [round(v, 4) for v in stats.exit_share_per_stage],
                                         "accuracy": stats.accuracy, "thresholds": stats.thresholds})
        row["other_load_cores"] = max((run.other_load_cores or 0.0) for run in runs)
        row["notes"] = runs[0].notes
        rows[form] = row
    return rows


def describe_decisions(row: dict[str, Any]) -> str:
    if "skip_rate" in row:
        return f"{row['skip_rate']:.0%} of gated-block runs skipped"
    shares = " / ".join(f"{share:.0%}" for share in row["exit_share_per_stage"])
    return f"{shares} answer at exits {' / '.join(str(j + 1) for j in range(len(row['exit_share_per_stage'])))}"


def markdown(result: dict[str, Any]) -> str:
    """The README's table: realised speed-ups are the median over rounds (range in brackets)."""
    lines = ["| example (held-out accuracy) | decisions (held-out split) | form | parity | predicted (MACs), batch 1 / 32 "
             "| predicted for the input timed at batch 1 | realised, batch 1 | realised, batch 32 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, example in result["examples"].items():
        first = True
        for form, row in example["forms"].items():
            head = (f"| {name} ({example['heldout']['accuracy']:.1%}) | {describe_decisions(example['heldout'])} "
                    if first else "| | ")
            realised = [f"{row['realised'][b]:.2f}x ({min(row['realised_per_round'][b]):.2f}-{max(row['realised_per_round'][b]):.2f})"
                        for b in ("1", "32")]
            lines.append(head + f"| `{form}` | {'passed' if example['exports'][form]['passed'] else 'FAILED'} | "
                         f"{row['predicted']['1']:.2f}x / {row['predicted']['32']:.2f}x | {row['predicted_timed_input']['1']:.2f}x | "
                         f"{realised[0]} | {realised[1]} |")
            first = False
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = benchmark_arguments(__doc__.splitlines()[0], DEFAULT_OUT).parse_args(argv)
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "examples", "quick": args.quick, "machine": machine_facts(),
                              "settings": {**settings, "threads": args.threads, "quick": args.quick, "batch_sizes": list(BATCH_SIZES),
                                           "forms": {name: list(forms) for name, forms in EXAMPLES.items()}},
                              "examples": {}}
    with tempfile.TemporaryDirectory() as work:
        for name in EXAMPLES:
            root = Path(work) / name
            root.mkdir()
            checkpoint = root / f"{name}.pt"
            example: dict[str, Any] = {"train": train(name, checkpoint, settings["epochs"], args.threads)}
            example["exports"] = export_forms(name, checkpoint, root, settings, args.threads)
            example["heldout"] = heldout_decisions(root / "mask", args.threads)
            example["forms"] = bench_forms(name, root, settings, args.threads)
            result["examples"][name] = example
    measured = [row["other_load_cores"] for example in result["examples"].values() for row in example["forms"].values()]
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["machine"]["other_load_cores_max"] = max(measured)
    result["machine"]["noisy"] = max(measured) > NOISY_OTHER_CORES
    result["checks"] = []  # no target: the figures back the README's table
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, args.out, markdown(result))
    if result["machine"]["noisy"]:
        print(f"NOISY: other processes used up to {max(measured):.2f} cores during timing; rerun on an idle machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
