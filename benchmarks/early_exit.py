"""S2D early exits: what really exiting buys, form by form, against what the exits predict.

    python benchmarks/early_exit.py            # full run (a few minutes on 2 cores)
    python benchmarks/early_exit.py --quick    # smoke run: few samples and rounds, same fields

The trained demo model (``zoo:s2d_resnet20_digits``, 3 stages) on held-out digits. Every form
is composed from the same exported stage pieces and simplified with onnxslim, exactly as
``slimdeploy export --dynamic FORM`` builds it, then run with ONNX Runtime (``--threads``
intra-op threads). Runners stay loaded and take turns in rounds (``slimdeploy.bench.
compare_runners``); a figure is the median over rounds of the mean time per call, because
every call holds different images with their own exits.

Predicted speed-up = MACs per sample of ``mask`` (every stage) / MACs per sample of the form for
the exits actually taken (``slimdeploy.bench.exit_macs``: ``staged`` runs each sample up to its
exit; ``if`` runs a stage on the whole batch when any sample reaches it). Realised speed-up =
mean time of ``mask`` / mean time of the form.

1. batch 32: ``staged`` (and ``if``) vs ``mask``; batch 1: ``if`` (and ``staged``) vs ``mask``.
2. The staged controller's overhead: wall time of its calls minus the time inside the stage
   graphs, per call and per stage run.
3. A threshold sweep (one threshold for stages 0 and 1) on the held-out split with the ``if``
   form at batch 1: accuracy, average MACs and measured latency, drawn as a PNG.

Writes ``benchmarks/results/early_exit.json`` and ``benchmarks/results/early_exit.png``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OtherLoad, benchmark_arguments, machine_facts, write_results  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "early_exit.json"
DEMO = "s2d_resnet20_digits"
FORMS = ("mask", "if", "staged")
SWEEP = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.01)
TARGETS = {
    "staged_vs_mask_batch32_realised_over_predicted": 0.8,
    "if_vs_mask_batch1_realised_over_predicted": 0.8,
}
FULL = {"samples_b1": 96, "batches_b32": 8, "rounds": 5, "warmup": 5, "sweep_samples": 500, "sweep_latency_samples": 96}
QUICK = {"samples_b1": 6, "batches_b32": 1, "rounds": 2, "warmup": 1, "sweep_samples": 64, "sweep_latency_samples": 6}


def say(message: str) -> None:
    print(f"[early-exit bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def form_runners(module: Any, input_size: tuple[int, ...], threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Active ONNX Runtime runners of every form (as export builds them) and the exit plan."""
    from slimdeploy import exporters
    from slimdeploy.engines.base import TensorMeta
    from slimdeploy.engines.factory import make_runner
    from slimdeploy.exporters.early_exit import compose_form, exit_pieces

    pieces, plan = exit_pieces(module, input_size)
    meta = TensorMeta("input", np.dtype(np.float32), ("batch", *input_size))
    defaults = {"exit_thresholds": plan.thresholds}
    runners = {}
    for form in FORMS:
        graphs = pieces if form == "staged" else {"model": compose_form(form, pieces, plan, input_size)}
        sources = {name: exporters.simplify(graph).model.SerializeToString() for name, graph in graphs.items()}
        runner = make_runner(sources, form, meta, plan=plan.to_dict(), decision_defaults=defaults, threads=threads)
        runner.name = form
        runners[form] = runner.activate()
    return runners, plan.to_dict()


def feeds(x: np.ndarray, batch: int, count: int) -> list[dict[str, np.ndarray]]:
    return [{"input": np.ascontiguousarray(x[i:i + batch])} for i in range(0, batch * count, batch)]


def measure(runners: dict[str, Any], macs: list[int], x: np.ndarray, batch: int, count: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Realised and predicted speed-up of every runner over ``mask`` at one batch size."""
    from slimdeploy.bench import compare_runners, exit_macs

    used = x[: batch * count]
    stage = runners["mask"].infer({"input": used})["exit_stage"]
    with OtherLoad() as other:
        timed = compare_runners(runners, feeds(x, batch, count), warmup=settings["warmup"], rounds=settings["rounds"])
    mask_macs = exit_macs(macs, stage, "mask", batch)
    rows = {}
    for name, result in timed.items():
        predicted = mask_macs / exit_macs(macs, stage, name, batch)
        realised = timed["mask"].mean_ms / result.mean_ms
        rows[name] = {"mean_ms": round(result.mean_ms, 4), "p50_ms": round(result.p50_ms, 4), "predicted": round(predicted, 3),
                      "realised": round(realised, 3), "realised_over_predicted": round(realised / predicted, 3)}
    return {"batch": batch, "samples": len(used), "exit_share_per_stage": [round(float((stage == j).mean()), 4) for j in range(len(macs))],
            "other_load_cores": other.cores, "forms": rows}


def controller_overhead(runner: Any, x: np.ndarray, batch: int, count: int) -> dict[str, Any]:
    """Time the staged controller spends outside the stage graphs (thresholds, row selection,
    copies), per call and per stage run."""
    runner.reset_counters()
    for feed in feeds(x, batch, count):
        runner.infer(feed, check_inputs=False)
    inside = float(runner.stage_seconds.sum())
    overhead = runner.calls_seconds - inside
    stage_runs = int(runner.stage_calls.sum())
    return {
        "batch": batch, "calls": runner.calls, "stage_runs_per_stage": runner.stage_calls.tolist(),
        "rows_per_stage": runner.stage_rows.tolist(),
        "overhead_ms_per_call": round(overhead / runner.calls * 1e3, 4),
        "overhead_ms_per_stage_run": round(overhead / max(stage_runs, 1) * 1e3, 4),
        "overhead_share_of_call": round(overhead / runner.calls_seconds, 4),
        "stage_ms_per_run": [round(float(s / max(c, 1)) * 1e3, 4) for s, c in zip(runner.stage_seconds, runner.stage_calls)],
    }


def run(settings: dict[str, Any], threads: int) -> dict[str, Any]:
    from slimdeploy.bench import sweep_exits
    from slimdeploy.data import digits_inputs
    from slimdeploy.loading import load_checkpoint
    from slimdeploy.zoo import zoo_checkpoint_path

    loaded = load_checkpoint(zoo_checkpoint_path(DEMO))
    prep = loaded.preprocessing
    x, labels = digits_inputs("heldout", prep.input_size, prep.mean, prep.std)
    say(f"{DEMO}: exporting the pieces and composing the forms")
    runners, plan = form_runners(loaded.module, prep.input_size, threads)
    macs = [int(plan["macs"][f"stage{j}"]) for j in range(plan["n_stages"])]
    try:
        say("batch 1: mask, if, staged")
        batch1 = measure(runners, macs, x, 1, settings["samples_b1"], settings)
        say("batch 32: mask, if, staged")
        batch32 = measure(runners, macs, x, 32, settings["batches_b32"], settings)
        say("staged controller overhead")
        overhead = [controller_overhead(runners["staged"], x, 1, settings["samples_b1"]),
                    controller_overhead(runners["staged"], x, 32, settings["batches_b32"])]
        say(f"threshold sweep ({len(SWEEP)} settings, if form at batch 1)")
        points = sweep_exits(runners["if"], x[: settings["sweep_samples"]], labels[: settings["sweep_samples"]], macs, SWEEP, batch_size=1)
        # Latency over a smaller slice (batch-1 calls are slow to repeat 500 times per setting).
        timed = sweep_exits(runners["if"], x[: settings["sweep_latency_samples"]], None, macs, SWEEP, batch_size=1)
        for point, timing in zip(points, timed):
            point.latency_ms = timing.latency_ms
    finally:
        for runner in runners.values():
            runner.deactivate()
    from dataclasses import asdict

    return {"model": DEMO, "arch": loaded.arch, "thresholds": plan["thresholds"], "macs_per_stage": macs,
            "batch1": batch1, "batch32": batch32, "controller_overhead": overhead,
            "sweep": [asdict(p) for p in points]}


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    figures = {
        "staged_vs_mask_batch32_realised_over_predicted": result["batch32"]["forms"]["staged"]["realised_over_predicted"],
        "if_vs_mask_batch1_realised_over_predicted": result["batch1"]["forms"]["if"]["realised_over_predicted"],
    }
    return [{"name": name, "value": value, "target": f">= {TARGETS[name]}", "met": value >= TARGETS[name]}
            for name, value in figures.items()]


def plot(result: dict[str, Any], path: Path) -> str:
    from slimdeploy.bench import SweepPoint, plot_sweep
    from slimdeploy.errors import BackendUnavailableError

    points = [SweepPoint(**p) for p in result["sweep"]]
    try:
        plot_sweep(points, path, title=f"{result['model']}: exit threshold sweep (if form, ONNX Runtime CPU)")
    except BackendUnavailableError as exc:
        return f"no plot written: {exc}"
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Demo `{result['model']}` on held-out digits, thresholds {[round(t, 4) for t in result['thresholds']]} "
        f"(exits per stage at batch 1: {result['batch1']['exit_share_per_stage']}):",
        "",
        "| comparison | predicted | realised | realised / predicted |",
        "|---|---|---|---|",
    ]
    for batch, form in (("batch32", "staged"), ("batch32", "if"), ("batch1", "if"), ("batch1", "staged")):
        row = result[batch]["forms"][form]
        lines.append(f"| {form} vs mask, {batch.replace('batch', 'batch ')} | {row['predicted']:.2f}x | {row['realised']:.2f}x | {row['realised_over_predicted']:.2f} |")
    lines += ["", "| staged controller | overhead ms / call | ms / stage run | share of call |", "|---|---|---|---|"]
    for row in result["controller_overhead"]:
        lines.append(f"| batch {row['batch']} | {row['overhead_ms_per_call']:.3f} | {row['overhead_ms_per_stage_run']:.3f} | {row['overhead_share_of_call']:.1%} |")
    lines += ["", "| threshold | exits per stage | MMACs / sample | accuracy | latency ms (batch 1, if) |", "|---|---|---|---|---|"]
    for p in result["sweep"]:
        shares = " / ".join(f"{v:.0%}" for v in p["exit_share_per_stage"])
        lines.append(f"| {p['thresholds'][0]:g} | {shares} | {p['macs_average'] / 1e6:.2f} | {p['accuracy']:.1%} | {p['latency_ms']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = benchmark_arguments(__doc__.splitlines()[0], DEFAULT_OUT).parse_args(argv)
    settings = QUICK if args.quick else FULL
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "early_exit", "quick": args.quick, "machine": machine_facts(),
                              "settings": {**settings, "threads": args.threads}}
    result.update(run(settings, args.threads))
    result["checks"] = checks(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(result, args.out.with_suffix(".png"))
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, args.out, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
