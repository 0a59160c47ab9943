"""SkipNet: what really skipping buys, form by form, against what the decisions predict.

    python benchmarks/skipnet.py            # full run (several minutes on 2 cores)
    python benchmarks/skipnet.py --quick    # smoke run: few samples and rounds, same fields

Every form is composed from the same exported pieces and simplified with onnxslim, exactly as
``slimdeploy export --dynamic FORM`` builds it, then run with ONNX Runtime (``--threads``
intra-op threads). Runners stay loaded and take turns in rounds (``slimdeploy.bench.
compare_runners``); a figure is the median over rounds of the mean time per call, because at
batch 1 every call is a different held-out image with its own decisions.

Predicted speed-up = MACs per sample of ``mask`` / MACs per sample of the form for the
decisions actually made (``slimdeploy.bench.gated_macs``: Conv and Linear MACs of every piece,
gate cost included; ``if`` runs a block on the whole batch when any sample needs it; ``compact``
runs skip paths on every row). Realised speed-up = mean time of ``mask`` / mean time of the form.

1. The trained demo model (``zoo:skipnet38_digits``) on held-out digits: ``if`` vs ``mask`` at
   batch 1, ``compact`` vs ``mask`` at batch 32, ``staged`` against ``compact`` at batch 32, and
   ``if`` at batch 1 against PyTorch eager running the model the official way (every block
   computed, outputs selected).
2. A ResNet-110-sized recurrent-gate SkipNet (``cifar10_rnn_gate_110``, random weights with
   BatchNorm statistics re-estimated on digits) with its gates biased to skip 25/50/75 % of
   blocks: realised vs predicted for every form at batch 1 and 32, as a table and a PNG. The
   bias is applied through ``gate_threshold``: the recurrent gate's decision ``sigmoid(z) > t``
   is the decision ``sigmoid(z - logit(t)) > 0.5`` of a gate whose output bias is shifted by
   ``-logit(t)``, so one export serves every level.

Writes ``benchmarks/results/skipnet.json`` and ``benchmarks/results/skipnet.png``.
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

from common import (  # noqa: E402
    benchmark_arguments,
    gated_speedups,
    machine_facts,
    sized_skipnet,
    write_results,
)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "skipnet.json"
DEMO = "skipnet38_digits"
LARGE_ARCH = "cifar10_rnn_gate_110"
SKIP_TARGETS = (0.25, 0.5, 0.75)
FORMS = ("mask", "if", "compact", "staged")
TARGETS = {
    "if_vs_mask_batch1_realised_over_predicted": 0.8,
    "compact_vs_mask_batch32_realised_over_predicted": 0.7,
    "if_batch1_vs_torch_masked": 2.0,
}
FULL = {"samples_b1": 48, "batches_b32": 4, "rounds": 5, "warmup": 5}
QUICK = {"samples_b1": 6, "batches_b32": 1, "rounds": 2, "warmup": 1}


def say(message: str) -> None:
    print(f"[skipnet bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def form_runners(module: Any, input_size: tuple[int, ...], threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Active ONNX Runtime runners of every form (as export builds them) and the gating plan."""
    from slimdeploy import exporters
    from slimdeploy.engines.base import TensorMeta
    from slimdeploy.engines.factory import make_runner
    from slimdeploy.exporters.gated import compose_form, gated_pieces

    pieces, plan = gated_pieces(module, input_size)
    meta = TensorMeta("input", np.dtype(np.float32), ("batch", *input_size))
    runners = {}
    for form in FORMS:
        graphs = pieces if form == "staged" else {"model": compose_form(form, pieces, plan, input_size)}
        sources = {name: exporters.simplify(graph).model.SerializeToString() for name, graph in graphs.items()}
        runner = make_runner(sources, form, meta, plan=plan.to_dict(), decision_defaults={"gate_threshold": 0.5}, threads=threads)
        runner.name = form
        runners[form] = runner.activate()
    return runners, plan.to_dict()


def demo_model(settings: dict[str, Any], threads: int) -> dict[str, Any]:
    from slimdeploy.data import digits_inputs
    from slimdeploy.engines import TensorMeta, TorchRunner
    from slimdeploy.loading import load_checkpoint
    from slimdeploy.zoo import zoo_checkpoint_path

    loaded = load_checkpoint(zoo_checkpoint_path(DEMO))
    prep = loaded.preprocessing
    x, _ = digits_inputs("heldout", prep.input_size, prep.mean, prep.std)
    say(f"{DEMO}: exporting the pieces and composing the forms")
    runners, plan = form_runners(loaded.module, prep.input_size, threads)
    meta = {"input": TensorMeta("input", np.dtype(np.float32), ("batch", *prep.input_size))}
    torch_runner = TorchRunner(loaded.module, meta, ["logits", "gates", "gate_probs"], threads=threads, name="torch").activate()
    try:
        say("batch 1: mask, if and PyTorch eager (masked, as the official code runs)")
        batch1 = gated_speedups({"mask": runners["mask"], "if": runners["if"], "torch": torch_runner}, plan, x, 1, settings["samples_b1"], settings)
        say("batch 32: every form")
        batch32 = gated_speedups(runners, plan, x, 32, settings["batches_b32"], settings)
    finally:
        torch_runner.deactivate()
        for runner in runners.values():
            runner.deactivate()
    return {"model": DEMO, "arch": loaded.arch, "batch1": batch1, "batch32": batch32,
            "staged_over_compact_batch32": round(batch32["forms"]["staged"]["mean_ms"] / batch32["forms"]["compact"]["mean_ms"], 3),
            "if_batch1_vs_torch": round(batch1["forms"]["torch"]["mean_ms"] / batch1["forms"]["if"]["mean_ms"], 3)}


def large_model(settings: dict[str, Any], threads: int) -> dict[str, Any]:
    from slimdeploy.data import digits_inputs, digits_statistics

    # Random weights, BatchNorm statistics re-estimated on real images, so activations stay in
    # range through 54 blocks.
    model = sized_skipnet(LARGE_ARCH)
    x, _ = digits_inputs("heldout", (3, 32, 32), *digits_statistics())
    say(f"{LARGE_ARCH}: exporting the pieces and composing the forms")
    runners, plan = form_runners(model, (3, 32, 32), threads)
    probs = np.concatenate([runners["mask"].infer({"input": x[i:i + 64]})["gate_probs"] for i in range(0, 256, 64)])
    levels = []
    try:
        for target in SKIP_TARGETS:
            # Decisions skip iff prob <= threshold: the target quantile of the probabilities.
            threshold = float(np.quantile(probs, target))
            say(f"skip target {target:.0%} (gate_threshold {threshold:.4f})")
            levels.append({
                "skip_target": target, "gate_threshold": threshold,
                "batch1": gated_speedups(runners, plan, x, 1, max(2, settings["samples_b1"] // 2), settings, threshold),
                "batch32": gated_speedups(runners, plan, x, 32, settings["batches_b32"], settings, threshold),
            })
    finally:
        for runner in runners.values():
            runner.deactivate()
    return {"arch": LARGE_ARCH, "n_gated": plan["n_blocks"] - 1, "levels": levels}


def checks(demo: dict[str, Any]) -> list[dict[str, Any]]:
    figures = {
        "if_vs_mask_batch1_realised_over_predicted": demo["batch1"]["forms"]["if"]["realised_over_predicted"],
        "compact_vs_mask_batch32_realised_over_predicted": demo["batch32"]["forms"]["compact"]["realised_over_predicted"],
        "if_batch1_vs_torch_masked": demo["if_batch1_vs_torch"],
    }
    return [{"name": name, "value": value, "target": f">= {TARGETS[name]}", "met": value >= TARGETS[name]}
            for name, value in figures.items()]


def plot(large: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, batch in zip(axes, ("batch1", "batch32")):
        skip = [level[batch]["skip_rate"] for level in large["levels"]]
        for form, colour in zip(("if", "compact", "staged"), ("tab:blue", "tab:orange", "tab:green")):
            axis.plot(skip, [lv[batch]["forms"][form]["predicted"] for lv in large["levels"]], "--", color=colour, label=f"{form} predicted")
            axis.plot(skip, [lv[batch]["forms"][form]["realised"] for lv in large["levels"]], "o-", color=colour, label=f"{form} realised")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_title(f"{large['arch']}, {batch.replace('batch', 'batch ')}")
        axis.set_xlabel("share of gated blocks skipped")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over mask (ONNX Runtime, CPU)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def markdown(result: dict[str, Any]) -> str:
    demo, large = result["demo"], result["large"]
    lines = [
        f"Demo `{demo['model']}` on held-out digits (skip rate {demo['batch1']['skip_rate']:.0%} at batch 1):",
        "",
        "| comparison | predicted | realised | realised / predicted |",
        "|---|---|---|---|",
    ]
    for batch, form in (("batch1", "if"), ("batch32", "compact"), ("batch32", "staged"), ("batch32", "if")):
        row = demo[batch]["forms"][form]
        lines.append(f"| {form} vs mask, {batch.replace('batch', 'batch ')} | {row['predicted']:.2f}x | {row['realised']:.2f}x | {row['realised_over_predicted']:.2f} |")
    lines += ["", f"staged / compact time at batch 32: {demo['staged_over_compact_batch32']:.2f}; "
              f"`if` at batch 1 vs PyTorch eager (masked): {demo['if_batch1_vs_torch']:.2f}x", "",
              f"`{large['arch']}` ({large['n_gated']} gated blocks), realised / predicted speed-up over mask:", "",
              "| skipped | batch | " + " | ".join(f for f in FORMS if f != "mask") + " |", "|---|---|---|---|---|"]
    for level in large["levels"]:
        for batch in ("batch1", "batch32"):
            cells = [f"{level[batch]['forms'][f]['realised']:.2f}x / {level[batch]['forms'][f]['predicted']:.2f}x" for f in FORMS if f != "mask"]
            lines.append(f"| {level[batch]['skip_rate']:.0%} | {batch[5:]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = benchmark_arguments(__doc__.splitlines()[0], DEFAULT_OUT).parse_args(argv)
    settings = QUICK if args.quick else FULL
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "skipnet", "machine": machine_facts(), "settings": {**settings, "threads": args.threads, "quick": args.quick}}
    result["demo"] = demo_model(settings, args.threads)
    result["large"] = large_model(settings, args.threads)
    result["checks"] = checks(result["demo"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(result["large"], args.out.with_suffix(".png"))
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, args.out, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
