"""SkipNet `loop` form against `if`: graph size, export time, latency, speed-up over `mask`.

    python benchmarks/loop.py            # full run: cifar10_rnn_gate_110 (tens of minutes on 2 cores)
    python benchmarks/loop.py --quick    # smoke run: cifar10_rnn_gate_38, few samples and rounds, same fields

The model is a ResNet-110-sized recurrent-gate SkipNet (``cifar10_rnn_gate_110``: 54 blocks in
three stages of 18, 53 gated) with random weights whose BatchNorm statistics are re-estimated on
digits (``common.sized_skipnet``), saved with ``save_checkpoint``. Then:

1. **Export.** ``if`` and ``loop`` are each exported by ``slimdeploy.export.export`` (the whole
   pipeline a user runs: torch.export of the pieces, composition, parity, onnxslim, parity
   again) into a bundle. Recorded per form: export's own seconds (``seconds_total``, and the
   torch.export part), whether parity passed, the bundle's ``model.onnx`` size in bytes, its
   node count (main graph, and with every ``If`` branch and ``Loop`` body) and its ``Loop`` and
   ``If`` nodes. Separately, on pieces exported once in-process, the seconds that composing the
   form (``compose_form``) and simplifying it (onnxslim) take: what the form itself costs.
2. **Latency.** The ``if`` and ``loop`` bundles' runners (ONNX Runtime, ``--threads`` intra-op
   threads) and ``mask`` (composed from the same pieces and simplified, as export builds it) take
   turns in rounds (``slimdeploy.bench.compare_runners``) at batch 1 (each call another held-out
   digit) and batch 32, with the gates biased through ``gate_threshold`` to skip 25/50/75 % of
   the gated blocks (as ``benchmarks/skipnet.py`` does). A figure is the median over rounds of
   the mean time per call. *Predicted* speed-up over ``mask`` = MACs per sample of ``mask`` / of
   the form for the decisions made (``slimdeploy.bench.gated_macs``; ``loop`` is accounted as
   ``if``: a block runs on the whole batch when any sample needs it); *realised* = mean time of
   ``mask`` / mean time of the form. The CPU time other processes used during each timed block
   is recorded (``common.OtherLoad``); above 0.2 cores the run is marked noisy.

Writes ``benchmarks/results/loop.json``.
"""

from __future__ import annotations

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

from common import (  # noqa: E402
    OtherLoad,
    benchmark_arguments,
    gated_speedups,
    machine_facts,
    sized_skipnet,
    write_results,
)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "loop.json"
FORMS = ("if", "loop")
SKIP_TARGETS = (0.25, 0.5, 0.75)
NOISY_CORES = 0.2
FULL = {"arch": "cifar10_rnn_gate_110", "export_samples": 16, "samples_b1": 24, "batches_b32": 3, "rounds": 5, "warmup": 3}
QUICK = {"arch": "cifar10_rnn_gate_38", "export_samples": 8, "samples_b1": 4, "batches_b32": 1, "rounds": 2, "warmup": 1}


def say(message: str) -> None:
    print(f"[loop bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def count_nodes(graph: Any) -> tuple[int, dict[str, int]]:
    """Nodes of ``graph`` and of every subgraph in it, and how many of them are Loop and If."""
    import onnx

    total, kinds = 0, {"Loop": 0, "If": 0}
    for node in graph.node:
        total += 1
        if node.op_type in kinds:
            kinds[node.op_type] += 1
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                inner, inner_kinds = count_nodes(attribute.g)
                total += inner
                kinds = {kind: kinds[kind] + inner_kinds[kind] for kind in kinds}
    return total, kinds


def export_bundles(checkpoint: Path, root: Path, settings: dict[str, Any], threads: int) -> dict[str, Any]:
    """Export ``if`` and ``loop`` with the pipeline; size and time of each."""
    import onnx

    from slimdeploy.export import export

    rows = {}
    for form in FORMS:
        say(f"exporting the {form} form with slimdeploy.export.export")
        out = root / form
        with OtherLoad() as other:
            started = time.perf_counter()
            result = export(checkpoint, out, dynamic=form, samples=settings["export_samples"], batch_sizes=(1, 8), threads=threads)
            wall = time.perf_counter() - started
        model = onnx.load(str(out / "model.onnx"))
        total, kinds = count_nodes(model.graph)
        timing = result.manifest["export"]
        rows[form] = {
            "bundle": str(out), "passed": result.passed, "wall_seconds": round(wall, 2),
            "seconds_total": timing["seconds_total"], "seconds_torch_export": timing["seconds_torch_export"],
            "simplified": result.manifest["export"].get("simplify", {}).get("applied"),
            "file_bytes": (out / "model.onnx").stat().st_size, "nodes_main_graph": len(model.graph.node),
            "nodes_with_subgraphs": total, "loop_nodes": kinds["Loop"], "if_nodes": kinds["If"],
            "initializers": len(model.graph.initializer), "other_processes_cpu_cores": other.cores,
        }
    return rows


def composition(model: Any, threads: int) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """Pieces exported once in-process; seconds to compose and simplify each form; the active
    ``mask`` runner (the baseline) and the gating plan."""
    from slimdeploy import exporters
    from slimdeploy.engines.ort_runner import OrtRunner
    from slimdeploy.exporters.gated import compose_form, gated_pieces

    say("exporting the pieces once, to time composing each form")
    started = time.perf_counter()
    pieces, plan = gated_pieces(model, (3, 32, 32))
    rows: dict[str, Any] = {"pieces_seconds": round(time.perf_counter() - started, 2)}
    mask = None
    for form in ("mask", *FORMS):
        started = time.perf_counter()
        composed = compose_form(form, pieces, plan, (3, 32, 32))
        composed_at = time.perf_counter()
        slim = exporters.simplify(composed)
        rows[form] = {"compose_seconds": round(composed_at - started, 3),
                      "simplify_seconds": round(time.perf_counter() - composed_at, 3),
                      "simplified": not slim.error}
        if form == "mask":
            mask = OrtRunner(slim.model.SerializeToString(), threads=threads, name="mask")
    return rows, mask.activate(), plan.to_dict()


def latency(runners: dict[str, Any], plan: dict[str, Any], x: np.ndarray, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Times at batch 1 and 32 for each skip level (the threshold at that quantile of the
    gate probabilities)."""
    probs = np.concatenate([runners["mask"].infer({"input": x[i:i + 64]})["gate_probs"] for i in range(0, 256, 64)])
    levels = []
    for target in SKIP_TARGETS:
        # A block is skipped iff its probability <= threshold: the target quantile.
        threshold = float(np.quantile(probs, target))
        say(f"skip target {target:.0%} (gate_threshold {threshold:.4f})")
        level: dict[str, Any] = {"skip_target": target, "gate_threshold": threshold}
        for batch, count in ((1, settings["samples_b1"]), (32, settings["batches_b32"])):
            with OtherLoad() as other:
                level[f"batch{batch}"] = gated_speedups(runners, plan, x, batch, count, settings, threshold)
            level[f"batch{batch}"]["other_processes_cpu_cores"] = other.cores
            forms = level[f"batch{batch}"]["forms"]
            level[f"batch{batch}"]["loop_over_if_time"] = round(forms["loop"]["mean_ms"] / forms["if"]["mean_ms"], 3)
        levels.append(level)
    return levels


def markdown(result: dict[str, Any]) -> str:
    exported, composed = result["export"], result["composition"]
    lines = [
        f"`{result['settings']['arch']}`: graph and export",
        "",
        "| form | nodes (main graph / with subgraphs) | Loop / If nodes | model.onnx bytes | export s (torch.export) | compose + onnxslim s | parity |",
        "|---|---|---|---|---|---|---|",
    ]
    for form in FORMS:
        row, own = exported[form], composed[form]
        lines.append(f"| {form} | {row['nodes_main_graph']} / {row['nodes_with_subgraphs']} | {row['loop_nodes']} / {row['if_nodes']} | "
                     f"{row['file_bytes']:,} | {row['seconds_total']:.1f} ({row['seconds_torch_export']:.1f}) | "
                     f"{own['compose_seconds']:.2f} + {own['simplify_seconds']:.2f} | {'passed' if row['passed'] else 'FAILED'} |")
    lines += ["", "Latency (mean ms per call) and speed-up over `mask`, realised / predicted:", "",
              "| skipped | batch | mask ms | if ms | loop ms | if | loop | loop / if time |", "|---|---|---|---|---|---|---|---|"]
    for level in result["levels"]:
        for batch in ("batch1", "batch32"):
            row = level[batch]
            forms = row["forms"]
            cells = [f"{forms[f]['realised']:.2f}x / {forms[f]['predicted']:.2f}x" for f in FORMS]
            lines.append(f"| {row['skip_rate']:.0%} | {batch[5:]} | {forms['mask']['mean_ms']:.2f} | {forms['if']['mean_ms']:.2f} | "
                         f"{forms['loop']['mean_ms']:.2f} | " + " | ".join(cells) + f" | {row['loop_over_if_time']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = benchmark_arguments(__doc__.splitlines()[0], DEFAULT_OUT).parse_args(argv)
    settings = QUICK if args.quick else FULL
    import torch

    from slimdeploy.bundle import bundle_runner, load_bundle
    from slimdeploy.data import digits_inputs, digits_statistics
    from slimdeploy.loading import Preprocessing, save_checkpoint

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "loop", "quick": args.quick, "machine": machine_facts(),
                              "settings": {**settings, "threads": args.threads, "quick": args.quick,
                                           "weights": "random (seed 0), BatchNorm statistics re-estimated on 256 digits"}}
    say(f"{settings['arch']}: random weights, BatchNorm statistics re-estimated on digits")
    model = sized_skipnet(settings["arch"]).eval()
    mean, std = digits_statistics()
    x, _ = digits_inputs("heldout", (3, 32, 32), mean, std)
    with tempfile.TemporaryDirectory() as work:
        checkpoint = Path(work) / "model.pt"
        save_checkpoint(checkpoint, model, settings["arch"], {"num_classes": 10}, Preprocessing((3, 32, 32), mean, std),
                        {"weights": result["settings"]["weights"]})
        result["export"] = export_bundles(checkpoint, Path(work), settings, args.threads)
        result["composition"], mask, plan = composition(model, args.threads)
        runners = {"mask": mask, **{form: bundle_runner(load_bundle(result["export"][form]["bundle"]), threads=args.threads) for form in FORMS}}
        for form in FORMS:
            runners[form].name = form
            runners[form].activate()
        try:
            result["levels"] = latency(runners, plan, x, settings)
        finally:
            for runner in runners.values():
                runner.deactivate()
    for form in FORMS:
        result["export"][form]["bundle"] = f"(temporary) {form}"
    result["n_gated"] = plan["n_blocks"] - 1
    measured = [level[batch]["other_processes_cpu_cores"] for level in result["levels"] for batch in ("batch1", "batch32")]
    result["machine"]["noisy"] = max(measured) > NOISY_CORES
    result["checks"] = []  # no target: the figures say when to choose loop
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, args.out, markdown(result))
    if result["machine"]["noisy"]:
        print(f"NOISY: other processes used up to {max(measured):.2f} cores during timing; rerun on an idle machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
