"""ONNX Runtime FP32 against PyTorch eager on the trained demo models, and the cost of ``export``.

    python benchmarks/runtime.py                 # full run (about a minute on 2 idle cores)
    python benchmarks/runtime.py --quick         # smoke run: few iterations, same fields
    python benchmarks/runtime.py --out results.json

In one run, for each trained zoo model (``mobilenet_v1_digits``, ``spconv_resnet20_digits``):

1. export the zoo checkpoint to a temporary bundle with ``python -m slimdeploy export`` in a
   child process; its wall time and peak RSS are read from the child's own resource usage
   (``os.wait4``), so the figures are those of the command a user runs;
2. time ONNX Runtime (the bundle's graph, intra-op threads = ``--threads``) against PyTorch
   eager (the same weights from the bundle's ``reference.pt``, ``torch.set_num_threads``) at
   batch 1 and 32 on held-out digits prepared at the model's preprocessing. Both runners stay
   loaded and take turns in rounds (the first one alternating); each turn starts with a short
   pause, so the other runtime's worker threads stop spinning, and a few untimed calls. The
   figures are percentiles over every timed call of every round, so that machine noise falls on
   both alike.

Then a ResNet-56-sized model (``spconv_resnet56_cifar``, random weights) is exported the same
way, for the export-time target. Results go to ``benchmarks/results/runtime.json`` (machine
facts, settings, every figure, the targets and pass/fail) and a markdown table is printed.
Absolute times on a shared CPU are noise; the ratios are the figures to read.
"""

from __future__ import annotations

import argparse
import json
import os
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

from common import OtherLoad, benchmark_arguments, machine_facts, save_json  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "runtime.json"
DEMO_MODELS = ("mobilenet_v1_digits", "spconv_resnet20_digits")
EXPORT_SIZED_ARCH = "spconv_resnet56_cifar"
BATCH_SIZES = (1, 32)
# Other processes using more than this many cores during a measured block make the run noisy.
NOISY_CORES = 0.2
TARGETS = {
    "ort_speedup_batch1": 2.0,    # torch_p50 / ort_p50 at batch 1, at least
    "ort_speedup_batch32": 1.3,   # torch_p50 / ort_p50 at batch 32, at least
    "export_seconds_resnet56": 20.0,  # wall time of the export command, under
}
RSS_METHOD = (
    "ru_maxrss of the export child process from os.wait4 (Linux reports KiB; converted to MiB); "
    "the child is `python -m slimdeploy export` itself, so this is the peak resident memory of "
    "the whole command, Python and torch imports included"
)
WALL_METHOD = (
    "time.perf_counter around the child process, from spawn to exit (interpreter start and "
    "imports included)"
)

# rounds; untimed calls before each runner's first round; pause before each turn, so the other
# runtime's worker threads stop spinning; untimed calls at the start of every turn; timed calls
# per turn at batch 1 and at batch 32.
FULL = {"rounds": 5, "first_warmup": 20, "settle_s": 0.2, "round_warmup": 3,
        "iterations": {1: 60, 32: 15}}
QUICK = {"rounds": 2, "first_warmup": 2, "settle_s": 0.02, "round_warmup": 1,
         "iterations": {1: 5, 32: 2}}


# -- export in a child process --------------------------------------------------------------------
def export_in_child(checkpoint: Path, out: Path, log_dir: Path, label: str) -> dict[str, Any]:
    """Run ``python -m slimdeploy export CHECKPOINT --out OUT`` and measure it from outside."""
    command = [sys.executable, "-m", "slimdeploy", "export", str(checkpoint), "--out", str(out)]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log_path = log_dir / f"export-{label}.log"
    with open(log_path, "wb") as log, OtherLoad() as other:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    code = child.returncode
    if code not in (0, 1) or not (out / "manifest.json").is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"export of {label} failed (exit {code}):\n{tail}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "command": "python -m slimdeploy export CHECKPOINT --out BUNDLE",
        "exit_code": code,
        "wall_seconds": round(wall, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "user_cpu_seconds": round(usage.ru_utime, 2),
        "system_cpu_seconds": round(usage.ru_stime, 2),
        # Measured inside export() by the library: imports and interpreter start excluded.
        "pipeline_seconds": manifest["export"]["seconds_total"],
        "torch_export_seconds": manifest["export"]["seconds_torch_export"],
        "parity_passed": code == 0,  # the CLI exits 1 when parity fails
        "simplified": manifest["export"]["simplify"].get("applied"),
        "params": manifest["model"]["params"],
        "macs": manifest["model"]["macs"],
        "other_processes_cpu_cores": other.cores,
    }


def warm_imports() -> None:
    """Import the heavy libraries once in a throwaway child, so the first timed export does not
    also pay for a cold file cache."""
    imports = "import torch, onnx, onnxruntime, onnxslim, sklearn"
    subprocess.run([sys.executable, "-c", imports], check=True)


# -- latency --------------------------------------------------------------------------------------
def timed_calls(
    runner: Any, feed: dict[str, np.ndarray], warmup: int, iterations: int
) -> list[float]:
    """Seconds per call of ``iterations`` calls after ``warmup`` untimed ones (the loop of
    ``slimdeploy.bench.time_runner``, keeping every time so rounds can be pooled)."""
    for _ in range(warmup):
        runner.infer(feed, check_inputs=False)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        runner.infer(feed, check_inputs=False)
        times.append(time.perf_counter() - start)
    return times


def summarise(times: list[float], rounds: list[list[float]]) -> dict[str, Any]:
    ms = np.asarray(times) * 1e3
    return {
        "calls": len(times),
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "min_ms": round(float(ms.min()), 4),
        "round_p50_ms": [round(float(np.median(r)) * 1e3, 4) for r in rounds],
    }


def time_bundle(bundle_path: Path, threads: int, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """ORT against PyTorch eager on one bundle, both runners alive, taking turns."""
    import torch

    from slimdeploy.bundle import bundle_runner, load_bundle, reference_runner
    from slimdeploy.data import digits_inputs

    torch.set_num_threads(threads)
    bundle = load_bundle(bundle_path)
    prep = bundle.manifest["preprocessing"]
    heldout, _ = digits_inputs(
        "heldout", tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"])
    )
    runners = {
        "onnxruntime": bundle_runner(bundle, threads=threads),
        "torch": reference_runner(bundle, threads=threads),
    }
    for runner in runners.values():
        runner.activate()
    results = []
    try:
        for batch in BATCH_SIZES:
            feed = {"input": np.ascontiguousarray(heldout[:batch])}
            # Both answer the same held-out batch alike before anything is timed.
            outs = {name: r.infer(feed)["logits"] for name, r in runners.items()}
            max_diff = float(np.abs(outs["onnxruntime"] - outs["torch"]).max())
            for runner in runners.values():
                timed_calls(runner, feed, plan["first_warmup"], 0)
            per_round: dict[str, list[list[float]]] = {name: [] for name in runners}
            order = list(runners)
            with OtherLoad() as other:
                for round_index in range(plan["rounds"]):
                    turn = order if round_index % 2 == 0 else order[::-1]
                    for name in turn:
                        time.sleep(plan["settle_s"])
                        times = timed_calls(
                            runners[name], feed, plan["round_warmup"], plan["iterations"][batch]
                        )
                        per_round[name].append(times)
            stats = {
                name: summarise([t for r in rounds for t in r], rounds)
                for name, rounds in per_round.items()
            }
            speedup = stats["torch"]["p50_ms"] / stats["onnxruntime"]["p50_ms"]
            results.append({
                "batch": batch,
                "onnxruntime": stats["onnxruntime"],
                "torch": stats["torch"],
                "speedup_torch_over_ort_p50": round(speedup, 3),
                "max_abs_diff_logits": max_diff,
                "other_processes_cpu_cores": other.cores,
            })
    finally:
        for runner in runners.values():
            runner.deactivate()
    return results


# -- the run --------------------------------------------------------------------------------------
def random_resnet56_checkpoint(path: Path) -> None:
    """A ResNet-56-sized checkpoint (random weights, seed 0) at the demo models' preprocessing."""
    import torch

    from slimdeploy.data import digits_statistics
    from slimdeploy.loading import Preprocessing, save_checkpoint
    from slimdeploy.models.registry import get_arch

    torch.manual_seed(0)
    info = get_arch(EXPORT_SIZED_ARCH)
    module = info.build(num_classes=10).eval()
    mean, std = digits_statistics()
    prep = Preprocessing(tuple(info.input_size), mean, std)
    save_checkpoint(path, module, EXPORT_SIZED_ARCH, {"num_classes": 10}, prep,
                    {"weights": "random (seed 0)"})


def settings(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any]:
    threads = args.threads
    return {
        "threads": threads,
        "ort": f"OrtRunner over the bundle's model.onnx, intra_op_num_threads={threads}, "
               "inter_op_num_threads=1, full graph optimisation",
        "torch": "TorchRunner over the bundle's reference.pt (same weights), eager, "
                 f"inference_mode, torch.set_num_threads({threads})",
        "batch_sizes": list(BATCH_SIZES),
        "data": "digits held-out split (slimdeploy.data.digits_inputs), first N images, at the "
                "preprocessing in the bundle's manifest",
        "rounds": plan["rounds"],
        "first_warmup_calls": plan["first_warmup"],
        "round_warmup_calls": plan["round_warmup"],
        "settle_seconds_before_each_turn": plan["settle_s"],
        "timed_calls_per_round": {str(k): v for k, v in plan["iterations"].items()},
        "schedule": "both runners loaded; per batch size, rounds in which each runner in turn "
                    "pauses (settle), makes its warm-up calls, then its timed calls, the first "
                    "runner alternating between rounds; percentiles over all timed calls",
        "timer": "time.perf_counter around each infer() call (feed validation off)",
        "export_wall_method": WALL_METHOD,
        "export_peak_rss_method": RSS_METHOD,
        "export_settings": "CLI defaults: 32 held-out samples, parity at batch 1 and 16, "
                           "onnxslim on, threads chosen by torch and ORT",
    }


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimdeploy.zoo import get_zoo_entry, zoo_checkpoint_path

    plan = QUICK if args.quick else FULL
    overrides = dict(item.split("=", 1) for item in args.checkpoint)
    checkpoints = {
        name: Path(overrides[name]) if name in overrides else zoo_checkpoint_path(name)
        for name in DEMO_MODELS
    }  # fail before any work when a checkpoint is missing
    result: dict[str, Any] = {
        "benchmark": "runtime",
        "quick": args.quick,
        "machine": machine_facts(),
        "settings": settings(args, plan),
        "targets": {
            "ort_speedup_batch1": f">= {TARGETS['ort_speedup_batch1']}x (torch p50 / ORT p50)",
            "ort_speedup_batch32": f">= {TARGETS['ort_speedup_batch32']}x (torch p50 / ORT p50)",
            "export_seconds_resnet56": f"< {TARGETS['export_seconds_resnet56']:g} s "
                                       "(wall time of the export command)",
        },
        "models": [],
    }
    if not args.quick:
        warm_imports()
    with tempfile.TemporaryDirectory(prefix="slimdeploy-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for name, checkpoint in checkpoints.items():
            say(f"[{name}] exporting in a child process ...")
            export = export_in_child(checkpoint, tmp / name, tmp, name)
            say(f"[{name}] timing onnxruntime against torch ...")
            manifest = json.loads((tmp / name / "manifest.json").read_text())
            result["models"].append({
                "name": name,
                "checkpoint": "zoo" if name not in overrides else str(checkpoint),
                "arch": manifest["model"]["arch"],
                "arch_args": manifest["model"]["arch_args"],
                "input_size": manifest["preprocessing"]["input_size"],
                "accuracy_heldout": get_zoo_entry(name).accuracy if name not in overrides else None,
                "export": export,
                "latency": time_bundle(tmp / name, args.threads, plan),
            })
        say(f"[{EXPORT_SIZED_ARCH}] exporting in a child process ...")
        checkpoint = tmp / f"{EXPORT_SIZED_ARCH}.pt"
        random_resnet56_checkpoint(checkpoint)
        result["export_sized"] = {
            "name": EXPORT_SIZED_ARCH,
            "weights": "random (seed 0), saved with save_checkpoint",
            "export": export_in_child(checkpoint, tmp / EXPORT_SIZED_ARCH, tmp, EXPORT_SIZED_ARCH),
        }
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    others = [row["other_processes_cpu_cores"] for m in result["models"] for row in m["latency"]]
    others += [m["export"]["other_processes_cpu_cores"] for m in result["models"]]
    others.append(result["export_sized"]["export"]["other_processes_cpu_cores"])
    measured = [c for c in others if c is not None]
    result["machine"]["other_processes_cpu_cores_max"] = max(measured) if measured else None
    result["machine"]["noisy"] = bool(measured) and max(measured) > NOISY_CORES
    result["checks"] = checks(result)
    result["passed"] = all(c["passed"] for c in result["checks"])
    return result


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target against its measured figure."""
    found = []
    for model in result["models"]:
        for row in model["latency"]:
            key = f"ort_speedup_batch{row['batch']}"
            if key in TARGETS:
                measured = row["speedup_torch_over_ort_p50"]
                found.append({"check": f"{model['name']} {key}", "target": f">= {TARGETS[key]}",
                              "measured": measured, "passed": measured >= TARGETS[key]})
    seconds = result["export_sized"]["export"]["wall_seconds"]
    limit = TARGETS["export_seconds_resnet56"]
    found.append({"check": f"{EXPORT_SIZED_ARCH} export_seconds", "target": f"< {limit:g}",
                  "measured": seconds, "passed": seconds < limit})
    return found


def markdown(result: dict[str, Any]) -> str:
    """The results as two markdown tables and a line of context."""
    verdict = {True: "pass", False: "FAIL", None: ""}
    machine = result["machine"]
    lines = [
        f"{machine['cpu_model']}, {machine['cores']} cores, "
        f"{result['settings']['threads']} threads each, torch {machine['versions'].get('torch')}, "
        f"onnxruntime {machine['versions'].get('onnxruntime')}"
        + (" (--quick: smoke figures, not to quote)" if result["quick"] else ""),
        "",
        "| model | batch | ORT p50 / p90 ms | PyTorch p50 / p90 ms | PyTorch / ORT (p50) "
        "| target | |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for model in result["models"]:
        for row in model["latency"]:
            ort, ref = row["onnxruntime"], row["torch"]
            speedup = row["speedup_torch_over_ort_p50"]
            target = TARGETS.get(f"ort_speedup_batch{row['batch']}")
            lines.append(
                f"| {model['name']} | {row['batch']} | {ort['p50_ms']:.3f} / {ort['p90_ms']:.3f} "
                f"| {ref['p50_ms']:.3f} / {ref['p90_ms']:.3f} | {speedup:.2f}x "
                f"| ≥ {target}x | {verdict[speedup >= target if target else None]} |"
            )
    lines += [
        "",
        "| export (child process) | params | wall s | in export() s | peak RSS MiB | parity "
        "| target | |",
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    limit = TARGETS["export_seconds_resnet56"]
    rows = [(m["name"], m["export"], None) for m in result["models"]]
    rows.append((f"{EXPORT_SIZED_ARCH} (random weights)", result["export_sized"]["export"], limit))
    for name, export, bound in rows:
        ok = export["wall_seconds"] < bound if bound else None
        lines.append(
            f"| {name} | {export['params']:,} | {export['wall_seconds']:.1f} "
            f"| {export['pipeline_seconds']:.1f} | {export['peak_rss_mb']:.0f} "
            f"| {'pass' if export['parity_passed'] else 'FAIL'} "
            f"| {f'< {bound:g} s' if bound else ''} | {verdict[ok]} |"
        )
    start, end = machine["load_average_at_start"][0], machine["load_average_at_end"][0]
    lines += ["", f"1-minute load average {start:.2f} at start, {end:.2f} at end; other processes "
                  f"used up to {machine['other_processes_cpu_cores_max']} cores during a measured "
                  f"block; targets: {'all met' if result['passed'] else 'not all met'}"]
    if machine["noisy"]:
        lines.append("NOISY: other processes were running; rerun on an idle machine before "
                     "quoting these figures")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], DEFAULT_OUT)
    parser.add_argument("--checkpoint", action="append", default=[], metavar="ZOO_NAME=PATH",
                        help="time this checkpoint in place of a zoo one (e.g. a retrained copy)")
    args = parser.parse_args(argv)
    for item in args.checkpoint:
        if item.split("=", 1)[0] not in DEMO_MODELS or "=" not in item:
            parser.error(f"--checkpoint takes ZOO_NAME=PATH, ZOO_NAME one of {DEMO_MODELS}")
    result = run(args)
    save_json(result, args.out)
    print(markdown(result))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
