"""Where an ONNX Runtime CPU session spends its time, per operator type (ORT profiling).

    python benchmarks/op_profile.py BUNDLE_OR_ONNX [...] [--batch 32] [--threads 2] [--runs 20]

For each graph (a bundle folder's ``model.onnx`` or an .onnx file): the optimized graph's node
count per operator type, the time share of each operator type over ``--runs`` profiled runs at
batch ``--batch`` (random normal inputs; the first run is a warm-up and not counted), and the
p50 latency of ``--runs`` plain (unprofiled) runs, and the sum over nodes of each node's fastest
run (a figure other load on a shared machine barely moves; it leaves out the gaps between nodes). Used to find what keeps INT8 graphs slow
(float islands: DequantizeLinear -> Transpose -> float op -> QuantizeLinear -> Transpose).

    python benchmarks/op_profile.py FP32_BUNDLE INT8_BUNDLE --compare [--batch 32] [--threads 1]

compares two graphs of one model layer by layer (each profiled node traced back to its layer,
``slimdeploy.engines.ort_profile``), the layers the second spends most time on beyond the
first listed first: what the export's speed warning names.

``--out FILE.json`` also writes what was printed, with the machine's facts and the settings
(what benchmarks/README.md quotes a profile from, e.g. ``results/op_profile_mobilenet.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def graph_path(target: str) -> Path:
    path = Path(target)
    return path / "model.onnx" if path.is_dir() else path


def random_feed(inputs: list[tuple[str, Any]], batch: int) -> dict[str, np.ndarray]:
    """Random normal float32 arrays for every graph input (a staged piece takes the features
    the previous piece carried as well as the image): axis 0 is the batch, the other axes as
    declared (a dynamic one other than the batch: 1)."""
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((batch, *[d if isinstance(d, int) else 1 for d in shape[1:]])).astype(np.float32)
            for name, shape in inputs}


def profile(path: Path, batch: int, threads: int, runs: int) -> dict[str, Any]:
    """Operator counts and time shares of one graph, and its p50 latency in ms."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        counts = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / "profile")
        profiled = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = random_feed([(meta.name, meta.shape) for meta in profiled.get_inputs()], batch)
        for _ in range(runs + 1):
            profiled.run(None, feed)
        events = json.loads(Path(profiled.end_profiling()).read_text())
        latencies = []
        plain.run(None, feed)
        for _ in range(runs):
            started = time.perf_counter()
            plain.run(None, feed)
            latencies.append(time.perf_counter() - started)
    # Node events carry the op type; skip the warm-up run (the first of each node's events).
    durations: dict[str, list[float]] = defaultdict(list)
    op_of: dict[str, str] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            durations[event["name"]].append(event["dur"])
            op_of[event["name"]] = event["args"]["op_name"]
    spent: dict[str, float] = defaultdict(float)
    quiet: dict[str, float] = defaultdict(float)
    for node, times in durations.items():
        spent[op_of[node]] += sum(times[1:])
        # Each node's fastest run: what a quiet machine would see, robust to other load.
        quiet[op_of[node]] += min(times[1:] or times)
    total = sum(spent.values()) or 1.0
    shares = {op: round(100 * us / total, 1) for op, us in sorted(spent.items(), key=lambda kv: -kv[1])}
    return {"graph": str(path), "p50_ms": round(1000 * float(np.median(latencies)), 2),
            "sum_of_node_minima_ms": round(sum(quiet.values()) / 1000, 2),
            "node_minima_ms": {op: round(us / 1000, 3) for op, us in sorted(quiet.items(), key=lambda kv: -kv[1])},
            "op_counts": dict(counts.most_common()), "time_share_pct": shares}


def compare(baseline: Path, candidate: Path, batch: int, threads: int, runs: int, top: int = 12) -> list[dict[str, Any]]:
    """Layer by layer, the time of ``candidate`` (e.g. an INT8 bundle) against ``baseline``
    (its FP32 bundle), the layers it spends most time on beyond the baseline first
    (``slimdeploy.engines.ort_profile``: profiled nodes traced back to their layers)."""
    import onnx

    from slimdeploy.engines.ort_profile import compare_layers, layer_times
    from slimdeploy.engines.ort_runner import OrtRunner

    times = {}
    for label, path in (("baseline", baseline), ("candidate", candidate)):
        with OrtRunner(path, threads=threads, profile=True) as runner:
            feed = random_feed([(meta.name, meta.shape) for meta in runner.input_metadata().values() if not meta.optional], batch)
            for _ in range(runs + 1):
                runner.infer(feed)
            times[label] = layer_times(runner, {"model": onnx.load(path)}, runs + 1)
    return compare_layers(times["baseline"], times["candidate"])[:top]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+", help="bundle folders or .onnx files")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--compare", action="store_true", help="two graphs (e.g. FP32 then INT8): their layers side by side")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here (with the machine's facts)")
    args = parser.parse_args(argv)
    if args.compare and len(args.graphs) != 2:
        parser.error("--compare takes two graphs: the baseline, then the candidate")
    from common import OtherLoad, machine_facts, save_json

    record: dict[str, Any] = {"benchmark": "op_profile", "machine": machine_facts(),
                              "settings": {"batch": args.batch, "threads": args.threads, "runs": args.runs,
                                           "compare": args.compare, "graphs": args.graphs}}
    with OtherLoad() as load:
        if args.compare:
            record["compare"] = compare(graph_path(args.graphs[0]), graph_path(args.graphs[1]), args.batch, args.threads, args.runs)
        else:
            record["profiles"] = [profile(graph_path(target), args.batch, args.threads, args.runs) for target in args.graphs]
    record["other_processes_cpu_cores"] = load.cores
    if args.out:
        save_json(record, args.out)
    if args.compare:
        print(f"layer: baseline ms -> candidate ms (ops), batch {args.batch}, {args.threads} threads, median of {args.runs} runs")
        for row in record["compare"]:
            print(f"  {row['layer']}: {row['baseline_ms']:.3f} ({'/'.join(row['baseline_ops']) or '-'}) -> "
                  f"{row['candidate_ms']:.3f} ({'/'.join(row['candidate_ops']) or '-'})")
    for result in record.get("profiles", []):
        print(f"{result['graph']}: p50 {result['p50_ms']} ms at batch {args.batch}, {args.threads} threads; "
              f"sum of per-node minima {result['sum_of_node_minima_ms']} ms")
        print("  ops:  " + ", ".join(f"{op} {n}" for op, n in result["op_counts"].items()))
        print("  time: " + ", ".join(f"{op} {pct}%" for op, pct in result["time_share_pct"].items() if pct >= 0.5))
        print("  minima: " + ", ".join(f"{op} {ms} ms" for op, ms in result["node_minima_ms"].items() if ms >= 0.05))


if __name__ == "__main__":
    main()
