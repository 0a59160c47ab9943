"""The ``slimdeploy`` command line: thin typer commands over the library functions.

Exit codes (docs/design.md §8): 0 success; 1 a check failed (parity, lint); 2 bad invocation or bad
input; 3 a backend is not available here. Domain errors (``SlimDeployError``) print one line
without a traceback; ``SLIMDEPLOY_DEBUG=1`` shows it. Anything else is a bug and shows its
traceback. Progress goes to stderr; results to stdout (or ``--json FILE|-``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from slimdeploy.errors import BadInputError, CheckFailedError, SlimDeployError
from slimdeploy.files import atomic_output, check_output_file, check_writable_location, write_json

app = typer.Typer(
    name="slimdeploy",
    help="Deploy slim and dynamic CNNs to ONNX Runtime and TensorRT, with parity checks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="Architectures and shipped demo checkpoints.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

out_console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)



def _result_file(option: str) -> Any:
    """An option callback: the file the option names can be written (checked when the command
    line is read, before any work; ``-`` and None pass)."""

    def check(value: Any) -> Any:
        check_output_file(value, option)
        return value

    return check


# Shared options, defined once.
JsonOpt = Annotated[str | None, typer.Option("--json", help="Write the result as JSON to FILE, or '-' for stdout.", callback=_result_file("--json"))]
ThreadsOpt = Annotated[int, typer.Option(help="Intra-op threads; 0 lets the backend choose.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda (ONNX Runtime), openvino (the same graphs on OpenVINO's CPU plugin: pip install 'slimdeploy[openvino]'), or tensorrt (the engines slimdeploy build made).")]
MinBatchOpt = Annotated[int | None, typer.Option("--min-batch", help="TensorRT: smallest batch the engines accept (export: 1; build: the bundle's).")]
OptBatchOpt = Annotated[int | None, typer.Option("--opt-batch", help="TensorRT: batch the kernels are tuned for (export: 8; build: the bundle's).")]
MaxBatchOpt = Annotated[int | None, typer.Option("--max-batch", help="TensorRT: largest batch the engines accept (export: 32; build: the bundle's).")]
WorkspaceOpt = Annotated[int | None, typer.Option("--workspace", help="TensorRT: workspace memory limit in MiB (export: 1024; build: the bundle's).")]
ArchArgsOpt = Annotated[str | None, typer.Option("--arch-args", help="Constructor arguments as a JSON object (default: the checkpoint's, and what its keys and shapes determine).")]
AtolOpt = Annotated[float | None, typer.Option(help="Absolute tolerance for every output, used as given (default by precision: fp32 1e-4, raised per output to 10x PyTorch's float32 noise measured at export; fp16 5e-2, int8 0.25).")]
RtolOpt = Annotated[float | None, typer.Option(help="Relative tolerance for every output (default by precision: fp32 1e-3, fp16 1e-2, int8 0.1).")]
# check: the bundle's stored tolerances unless overridden; one given alone pairs with the precision's default.
CheckAtolOpt = Annotated[float | None, typer.Option(help="Absolute tolerance for every output (default: the bundle's; given without --rtol, rtol is the precision's default).")]
CheckRtolOpt = Annotated[float | None, typer.Option(help="Relative tolerance for every output (default: the bundle's; given without --atol, atol is the precision's default).")]


def _tolerances(atol: float | None, rtol: float | None, precision: str = "fp32") -> dict[str, tuple[float, float]] | None:
    """Override the precision's default tolerances with --atol/--rtol where given (used as
    given, no scaling); non-finite or negative values are bad input (exit 2)."""
    if atol is None and rtol is None:
        return None
    from slimdeploy.parity import DEFAULT_TOLERANCES
    from slimdeploy.tolerance import check_tolerances

    default_atol, default_rtol = DEFAULT_TOLERANCES[precision][""]
    given = {"": (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)}
    return check_tolerances(given, "--atol/--rtol")


def _bundle_precision(bundle: Path) -> str:
    """The precision a bundle's manifest states (for the defaults --atol/--rtol complete);
    fp32 when it cannot be read here (check_bundle then says what is wrong with the bundle)."""
    from slimdeploy.bundle.reader import read_manifest
    from slimdeploy.parity import DEFAULT_TOLERANCES

    try:
        precision = read_manifest(Path(bundle)).get("precision", "fp32")
    except (SlimDeployError, AttributeError):
        return "fp32"
    return precision if precision in DEFAULT_TOLERANCES else "fp32"


class StepPrinter:
    """Progress on stderr: one line per step with the elapsed time, readable in CI logs."""

    def __init__(self, quiet: bool = False) -> None:
        self.started = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            err_console.print(f"[dim]{time.perf_counter() - self.started:6.1f}s[/dim] {escape(message)}")


def _parse_json_arg(text: str | None, option: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{option} is not valid JSON ({exc}) | Fix: e.g. {option} '{{\"width_mult\": 0.5}}'") from exc
    if not isinstance(value, dict):
        raise BadInputError(f"{option} must be a JSON object, got {type(value).__name__}")
    return value


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise BadInputError(f"{option} takes comma-separated integers, got '{text}'") from exc
    if not values or any(v < 1 for v in values):
        raise BadInputError(f"{option} takes positive integers, got '{text}'")
    return values


def _emit_json(data: Any, target: str | None) -> None:
    if target is not None:
        write_json(data, target)


def _resolve_checkpoint(checkpoint: str) -> Path:
    """A path, or ``zoo:NAME`` for a shipped demo checkpoint."""
    if checkpoint.startswith("zoo:"):
        from slimdeploy.zoo import zoo_checkpoint_path

        return zoo_checkpoint_path(checkpoint[len("zoo:"):])
    return Path(checkpoint)


def _parity_table(report: Any) -> Table:
    table = Table(title=f"parity: {report.candidate} vs {report.reference} ({report.samples} samples)")
    for column in ("output", "batch", "max abs", "mean abs", "max rel", "atol / rtol", "result"):
        table.add_column(column)
    for result in report.outputs:
        table.add_row(
            result.name, str(result.batch_size), f"{result.max_abs:.2e}", f"{result.mean_abs:.2e}",
            f"{result.max_rel:.2e}", f"{result.atol:g} / {result.rtol:g}",
            "[green]pass[/green]" if result else "[red]FAIL[/red]",
        )
    return table


def _print_parity(report: Any, json_target: str | None) -> None:
    quiet = json_target == "-"
    if not quiet:
        out_console.print(_parity_table(report))
        if report.task is not None:
            task = report.task
            line = f"top-1 agreement {task.top1_agreement:.1%}, top-5 {task.top5_agreement:.1%}"
            if task.accuracy_reference is not None:
                line += f"; accuracy reference {task.accuracy_reference:.1%}, candidate {task.accuracy_candidate:.1%}"
            out_console.print(line)
        for name, results in report.decisions.items():
            for result in results:
                out_console.print(
                    f"{name} at batch {result.batch_size}: agreement {result.agreement:.2%} over "
                    f"{result.decisions} decisions, {result.near_threshold} near-threshold flip(s), "
                    f"{result.defects} defect(s)"
                )
            first = results[0]
            if first.kind == "exit":
                out_console.print(f"{name}: reference exits per stage {first.reference_open}")
                unseen = [j for j, count in enumerate(first.reference_open) if not count]
                if unseen:
                    out_console.print(f"[yellow]note:[/yellow] {name}: no sample exits at stage(s) {unseen} in these samples")
                continue
            never = [i + 1 for i, (o, c) in enumerate(zip(first.reference_open, first.reference_closed)) if not o or not c]
            if never:
                out_console.print(f"[yellow]note:[/yellow] {name}: blocks {never} were seen only open or only closed in these samples")
        for batch, count in report.excluded_samples.items():
            out_console.print(f"numeric parity at batch {batch} left out {count} sample(s) whose decisions differ")
        rule = report.tolerance_rule
        if rule:
            out_console.print(f"tolerance: {escape(rule['description'])}" + (f" ({escape(rule['note'])})" if rule.get("note") else ""), soft_wrap=True)
        for failure in report.failures:
            out_console.print(f"[red]failed:[/red] {escape(failure)}")
        verdict = "[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]"
        out_console.print(f"parity {verdict}")


def _print_precision(precision: str, calibration: dict[str, Any]) -> None:
    """How a reduced-precision bundle was made and how it agrees with the FP32 graphs."""
    line = f"{precision}"
    if precision == "int8":
        line += f" ({calibration['form']}), calibrated with {calibration['method']} on {calibration['size']} samples of {calibration['source']}"
        if calibration.get("synthetic"):
            line += " [yellow](synthetic data: ranges are not those of real inputs)[/yellow]"
        correction = calibration.get("bias_correction")
        if correction:
            line += f"; biases of {correction['layers']} layers corrected"
    line += "; decision heads " + ("FP32" if calibration["decisions_fp32"] else "reduced too")
    vs = calibration["vs_fp32"]
    line += f"; vs FP32: top-1 agreement {vs['top1']:.1%}" + (f", gate agreement {vs['gates']:.1%}" if "gates" in vs else "")
    speed = calibration.get("speed_vs_fp32") or {}
    if speed.get("measured"):
        line += "; speed vs FP32 on this CPU: " + ", ".join(f"{row['speedup']:.2f}x at batch {row['batch']}" for row in speed["batches"])
    out_console.print(line)


@app.command()
def export(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint file, or zoo:NAME for a shipped demo model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create.")] = Path("bundle"),
    arch: Annotated[str | None, typer.Option(help="Architecture (needed when the checkpoint does not name one).")] = None,
    arch_args: ArchArgsOpt = None,
    target: Annotated[str, typer.Option(help="Deployment target: ort (ONNX Runtime) or trt (TensorRT: engines built on the target with slimdeploy build).")] = "ort",
    dynamic: Annotated[str | None, typer.Option(help="Form of a gated model: mask, if, compact, staged or loop (default for ort: compact; for trt: staged); of an early-exit model: mask, if or staged (default: staged).")] = None,
    condense_classifier: Annotated[bool, typer.Option("--condense-classifier", help="CondenseNet: prune the classifier as the official converter does (lossy).")] = False,
    no_fold: Annotated[bool, typer.Option("--no-fold", help="Export the layers as they are: CondenseNet without BN/shuffle folding; CondenseNetV2 keeping the 0/1 index matrices; SPConv ResNets (INT8) without folding BN, pooling, split and attention.")] = False,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a pickled nn.Module checkpoint (runs code from the file).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    data: Annotated[Path | None, typer.Option(help=".npz/.npy of parity inputs (keys: input, labels). Default: digits held-out split.")] = None,
    samples: Annotated[int | None, typer.Option(help="Held-out samples for parity and the golden file (default 32; 100 for fp16/int8).")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Batch sizes to check parity at, comma-separated.")] = "1,16",
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default 18).")] = None,
    no_simplify: Annotated[bool, typer.Option("--no-simplify", help="Skip onnxslim simplification.")] = False,
    no_reference_weights: Annotated[bool, typer.Option("--no-reference-weights", help="Do not store the PyTorch weights in the bundle.")] = False,
    precision: Annotated[str, typer.Option(help="fp32, fp16 (decision heads, softmax, normalisations kept FP32) or int8 (explicit Q/DQ in the target's form).")] = "fp32",
    calib: Annotated[str | None, typer.Option(help="INT8 calibration data: digits, an image folder, an .npy/.npz of inputs, synthetic (random, flagged), or a calibration.json/bundle whose ranges are reused. Default: digits for digits-trained models.")] = None,
    calib_size: Annotated[int | None, typer.Option("--calib-size", help="Calibration samples (default 100, the digits calibration split).")] = None,
    calib_method: Annotated[str, typer.Option("--calib-method", help="Calibration method: auto (MinMax and Percentile tried, the closer to FP32 on the calibration images kept; if it misses the INT8 criteria, Q/DQ on Conv/Gemm/MatMul only is tried too), MinMax, Entropy or Percentile.")] = "auto",
    quantize_decisions: Annotated[bool, typer.Option("--quantize-decisions", help="Also reduce the precision of gate and exit heads (kept FP32 by default).")] = False,
    no_bias_correction: Annotated[bool, typer.Option("--no-bias-correction", help="INT8: keep the quantized layers' biases as trained (by default each is shifted by its mean output error against FP32 on the calibration images).")] = False,
    no_speed_check: Annotated[bool, typer.Option("--no-speed-check", help="FP16/INT8 for ort: skip timing the reduced graph against FP32 on this CPU (by default a few seconds; a reduced graph slower than FP32 is a warning naming its costliest layers).")] = False,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    threads: ThreadsOpt = 0,
    min_batch: MinBatchOpt = None,
    opt_batch: OptBatchOpt = None,
    max_batch: MaxBatchOpt = None,
    workspace: WorkspaceOpt = None,
    prepare_only: Annotated[bool, typer.Option("--prepare-only", help="trt: write the TensorRT-ready bundle and exit 0 without building engines.")] = False,
    json_out: JsonOpt = None,
) -> None:
    """Export a checkpoint to a parity-checked bundle (exit 1 if parity fails; the bundle is still written).

    With --target trt the bundle also records the engine build. Where TensorRT is installed the
    engines are built and checked right away; elsewhere the command prints the build command and
    exits 3 (0 with --prepare-only).
    """
    from slimdeploy.export import ExportOptions
    from slimdeploy.export import export as run_export

    build_options = _build_options(min_batch, opt_batch, max_batch, workspace)
    if build_options and target != "trt":
        raise BadInputError("--min-batch/--opt-batch/--max-batch/--workspace apply to --target trt | Fix: add --target trt")
    build_spec = None
    if build_options:
        from slimdeploy.engines.trt_build import BuildSpec

        build_spec = BuildSpec.resolve({}, build_options)
    options = ExportOptions(
        arch=arch,
        arch_args=_parse_json_arg(arch_args, "--arch-args"),
        target=target,
        dynamic=dynamic,
        condense_classifier=condense_classifier,
        fold=not no_fold,
        trust_pickle=trust_pickle,
        force=force,
        data=data,
        samples=samples,
        batch_sizes=_parse_ints(batch_sizes, "--batch-sizes"),
        opset=opset,
        simplify=not no_simplify,
        tolerances=_tolerances(atol, rtol, precision) if precision in ("fp32", "fp16", "int8") else None,
        threads=threads,
        reference_weights=not no_reference_weights,
        build_spec=build_spec,
        precision=precision,
        calib=calib,
        calib_size=calib_size,
        calib_method=calib_method,
        quantize_decisions=quantize_decisions,
        bias_correction=not no_bias_correction,
        speed_check=not no_speed_check,
    )
    result = run_export(_resolve_checkpoint(checkpoint), out, options, progress=StepPrinter())
    _print_parity(result.report, json_out)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}")
    for warning in result.warnings:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(warning)}", soft_wrap=True)
    calibration = result.manifest.get("calibration")
    if calibration and json_out != "-":
        _print_precision(result.manifest["precision"], calibration)
    if json_out != "-":
        model = result.manifest["model"]
        out_console.print(
            f"bundle [bold]{escape(str(result.bundle))}[/bold]: {model['arch']}, {model['params']:,} parameters, "
            f"{model['macs'] / 1e6:.1f} M MACs, exported in {result.manifest['export']['seconds_total']:.1f}s"
        )
    _emit_json({"bundle": str(result.bundle), "manifest": result.manifest, "report": result.report.to_dict()}, json_out)
    if not result.passed:
        raise CheckFailedError(f"parity failed for '{result.bundle}' (report.json has the details)")
    if target == "trt":
        _after_trt_export(result, out, prepare_only, json_out)


def _build_options(min_batch: int | None, opt_batch: int | None, max_batch: int | None, workspace: int | None) -> dict[str, int]:
    """The TensorRT build options given on the command line, as ``BuildSpec`` fields."""
    given = {"min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch, "workspace_mb": workspace}
    return {key: value for key, value in given.items() if value is not None}


def _print_macs(stats: Any, every: str, alone: str) -> None:
    """The MACs per sample of a gated or early-exit bench (computing ``every`` block or stage,
    the decisions ``alone``, the form at each batch) and the speed-up they predict over mask."""
    out_console.print(
        f"MACs per sample: {every} {stats.macs_mask / 1e6:.2f} M, {alone} {stats.macs_ideal / 1e6:.2f} M, "
        + ", ".join(f"{stats.form} at batch {b} {v / 1e6:.2f} M" for b, v in stats.macs_form.items())
    )
    out_console.print("predicted speed-up over mask: " + ", ".join(
        f"batch {b} {v:.2f}x" for b, v in stats.predicted_speedup.items()))


def _after_trt_export(result: Any, out: Path, prepare_only: bool, json_out: str | None) -> None:
    """A TensorRT bundle: report the lint, then build here, or say how to build on the target."""
    from slimdeploy.engines.trt_build import is_available

    plan = result.manifest["trt"]
    lint = plan.get("lint") or {}
    if not result.lint_passed:
        raise CheckFailedError(f"the TensorRT lint found errors in '{result.bundle}' (manifest.json trt.lint lists them) | Fix: slimdeploy lint {out}")
    build_command = f"slimdeploy build {out}"
    if json_out != "-":
        if not lint.get("ran"):
            err_console.print(f"[yellow]note:[/yellow] TensorRT lint not run: {escape(str(lint.get('reason')))}", soft_wrap=True)
        out_console.print(f"TensorRT build (on the target, TensorRT {plan['tensorrt']}): [bold]{escape(build_command)}[/bold]", soft_wrap=True)
        out_console.print(f"or with trtexec, in the bundle directory ({len(plan['trtexec'])} engine(s), see {escape(str(out))}/build.sh):", soft_wrap=True)
        out_console.print(escape(plan["trtexec"][0]), soft_wrap=True)
    if prepare_only:
        return
    if not is_available():
        from slimdeploy.errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"the TensorRT-ready bundle '{result.bundle}' is written and checked in ONNX Runtime, but TensorRT "
            f"is not available here to build its engines | Fix: on the target run {build_command} "
            "(or pass --prepare-only to exit 0 here)"
        )
    _build_and_report(out, None, None, json_out if json_out == "-" else None)


def _build_and_report(bundle: Path, trt_version: str | None, overrides: dict[str, int] | None, json_out: str | None) -> None:
    from slimdeploy.build import build_bundle

    result = build_bundle(bundle, trt_version_expected=trt_version, overrides=overrides, progress=StepPrinter(quiet=json_out == "-"))
    if result.report is not None:
        _print_parity(result.report, json_out)
    built = result.manifest["trt"]["built"]
    if json_out != "-":
        engines = result.manifest["trt"]["engines"]
        out_console.print(f"{len(engines)} engine(s) built with TensorRT {built['tensorrt']} in {built['seconds']:.1f}s into "
                          f"{escape(str(result.bundle))}/trt/", soft_wrap=True)
    _emit_json({"bundle": str(result.bundle), "trt": result.manifest["trt"],
                "report": result.report.to_dict() if result.report else None}, json_out)
    if not result.passed:
        raise CheckFailedError(f"parity of the TensorRT engines failed for '{bundle}'")


@app.command()
def build(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (exported with --target trt, or any non-compact bundle).")],
    trt_version: Annotated[str | None, typer.Option("--trt-version", help="TensorRT version the engines are for (e.g. 10.3, or 10.3.0.30 for one exact build); refuse another installed one (default: build with the installed one).")] = None,
    min_batch: MinBatchOpt = None,
    opt_batch: OptBatchOpt = None,
    max_batch: MaxBatchOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Build the bundle's TensorRT engines on this machine, record them in it, and check them.

    Exit 1 if the engines fail parity (they stay in the bundle), 3 without TensorRT.
    """
    _build_and_report(bundle, trt_version, _build_options(min_batch, opt_batch, max_batch, workspace), json_out)


@app.command()
def check(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    data: Annotated[Path | None, typer.Option(help=".npz with input (and ref_<output>, labels; without ref_ arrays the bundle's PyTorch weights compute them, which needs torch), or an .npy of inputs; default: the bundle's golden file.")] = None,
    batch_sizes: Annotated[str | None, typer.Option("--batch-sizes", help="Comma-separated batch sizes (default: the manifest's).")] = None,
    atol: CheckAtolOpt = None,
    rtol: CheckRtolOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = 0,
    json_out: JsonOpt = None,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report here (for CI).", callback=_result_file("--junit"))] = None,
) -> None:
    """Re-check a bundle's parity from the bundle alone (no torch needed). Exit 1 on failure."""
    from slimdeploy.parity import check_bundle

    report = check_bundle(
        bundle,
        data=data,
        batch_sizes=_parse_ints(batch_sizes, "--batch-sizes") if batch_sizes else None,
        tolerances=_tolerances(atol, rtol, _bundle_precision(bundle)),
        device=device,
        threads=threads,
        progress=StepPrinter(quiet=json_out == "-"),
    )
    _print_parity(report, json_out)
    if json_out:
        report.write_json(json_out)
    if junit:
        report.write_junit(junit)
    if not report.passed:
        raise CheckFailedError(f"parity failed for '{bundle}'")


@app.command()
def run(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    inputs: Annotated[Path, typer.Option("--inputs", help=".npz keyed by graph input name (or an .npy holding the input array).")],
    out: Annotated[Path, typer.Option("--out", "-o", help=".npz to write, keyed by graph output name.")],
    batch: Annotated[int, typer.Option(help="Run at most this many rows per call; 0 = all at once.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = 0,
) -> None:
    """Run a bundle on inputs from an .npz file and write its outputs to an .npz file."""
    from slimdeploy.bundle import bundle_runner, load_bundle
    from slimdeploy.files import read_arrays
    from slimdeploy.limits import check_device, check_option, check_threads
    from slimdeploy.parity import run_batches

    check_option("run_batch", batch, "--batch")
    check_device(device)
    check_threads(threads)
    check_output_file(out, "--out", force=force)  # before any work
    loaded = load_bundle(bundle)
    feed = read_arrays(inputs)
    with bundle_runner(loaded, device=device, threads=threads) as runner:
        if batch:
            from slimdeploy.engines.base import check_feed

            check_feed(feed, runner.input_metadata())
            outputs = run_batches(runner, feed, batch, batch_inputs=loaded.batch_inputs)
        else:
            outputs = runner.infer(feed)
    with atomic_output(out) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **outputs)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items())
    err_console.print(f"wrote {out}: {shapes}")


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1,32",
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 10,
    iterations: Annotated[int, typer.Option(help="Timed calls per batch size.")] = 50,
    threads: Annotated[int, typer.Option(help="Threads for every runner; 0 = one per CPU core.")] = 0,
    no_torch: Annotated[bool, typer.Option("--no-torch", help="Do not time the PyTorch reference (timed by default where torch and the bundle's reference weights are).")] = False,
    baseline: Annotated[Path | None, typer.Option(help="Another bundle of the same model (e.g. its mask form) to time side by side (default: none).")] = None,
    device: DeviceOpt = "cpu",
    sweep: Annotated[str | None, typer.Option(help="Early-exit bundles: exit thresholds to sweep, comma-separated, or 'default' (0,0.5,0.8,0.9,0.95,0.98,0.99,0.995,0.999,1.01). Default: no sweep.")] = None,
    plot: Annotated[Path | None, typer.Option(help="With --sweep: draw the sweep to this PNG (needs matplotlib).", callback=_result_file("--plot"))] = None,
    json_out: JsonOpt = None,
) -> None:
    """Latency percentiles and throughput on ONNX Runtime (or the TensorRT engines with --device tensorrt), beside PyTorch eager when torch is here; exit shares and threshold sweeps of early-exit bundles."""
    from slimdeploy.bench import DEFAULT_SWEEP, bench_bundle, plot_sweep

    if plot is not None and sweep is None:
        raise BadInputError("--plot draws a threshold sweep | Fix: add --sweep default (or a list of thresholds)")
    sweep_values: list[float] | None = None
    if sweep is not None:
        try:
            sweep_values = list(DEFAULT_SWEEP) if sweep == "default" else [float(v) for v in sweep.split(",") if v.strip()]
        except ValueError:
            raise BadInputError(f"--sweep '{sweep}' is not a comma-separated list of numbers | Fix: e.g. --sweep 0.5,0.9,0.99") from None

    report = bench_bundle(
        bundle,
        batch_sizes=_parse_ints(batch, "--batch"),
        warmup=warmup,
        iterations=iterations,
        threads=threads,
        torch_reference=False if no_torch else None,
        baseline=baseline,
        progress=StepPrinter(quiet=json_out == "-"),
        device=device,
        sweep=sweep_values,
    )
    if plot is not None and report.sweep:
        plot_sweep(report.sweep, plot)
    if json_out != "-":
        table = Table(title=f"latency ({report.threads} threads, {iterations} calls after {warmup} warm-up)")
        for column in ("runner", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s"):
            table.add_column(column)
        for r in report.results:
            table.add_row(r.runner, str(r.batch_size), f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}", f"{r.throughput:,.0f}")
        out_console.print(table)
        for key, value in report.speedups.items():
            out_console.print(f"{key}: {value:.2f}x")
        stats = report.decisions
        if stats is not None:
            rates = " ".join(f"{rate:.0%}" for rate in stats.skip_rate_per_block)
            out_console.print(f"skip rate per gated block ({stats.samples} samples): {rates}; overall {stats.skip_rate:.1%}")
            _print_macs(stats, "mask", "decisions alone")
        exits = report.exits
        if exits is not None:
            shares = " ".join(f"{share:.0%}" for share in exits.exit_share_per_stage)
            out_console.print(f"exits per stage ({exits.samples} samples, thresholds {exits.thresholds}): {shares}")
            _print_macs(exits, "all stages", "exits alone")
        if report.sweep:
            sweep_table = Table(title=f"threshold sweep (batch {report.sweep[0].batch_size})")
            for column in ("threshold", "exits per stage", "MMACs/sample", "accuracy", "latency ms"):
                sweep_table.add_column(column)
            for point in report.sweep:
                accuracy = "-" if point.accuracy is None else f"{point.accuracy:.1%}"
                sweep_table.add_row(f"{point.thresholds[0]:g}", " ".join(f"{v:.0%}" for v in point.exit_share_per_stage),
                                    f"{point.macs_average / 1e6:.2f}", accuracy, f"{point.latency_ms:.3f}")
            out_console.print(sweep_table)
        for note in report.notes:
            out_console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if json_out:
        report.write_json(json_out)


@app.command()
def inspect(
    target: Annotated[str, typer.Argument(help="Bundle directory, checkpoint file, or zoo:NAME.")],
    arch: Annotated[str | None, typer.Option(help="Architecture, for checkpoints that do not name one.")] = None,
    arch_args: ArchArgsOpt = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a pickled nn.Module checkpoint.")] = False,
    json_out: JsonOpt = None,
) -> None:
    """Describe a checkpoint or a bundle: architecture, parameters, MACs, inputs and outputs."""
    from slimdeploy.describe import inspect_bundle, inspect_checkpoint

    path = _resolve_checkpoint(target)
    if path.is_dir():
        info = inspect_bundle(path)
    else:
        info = inspect_checkpoint(path, arch=arch, arch_args=_parse_json_arg(arch_args, "--arch-args"), trust_pickle=trust_pickle)
    if json_out != "-":
        table = Table(show_header=False, title=f"{info['kind']}: {path}")
        table.add_column("field")
        table.add_column("value")
        for key, value in info.items():
            if key in ("kind", "per_layer_macs"):
                continue
            table.add_row(key, escape(value if isinstance(value, str) else json.dumps(value, default=str)))
        out_console.print(table)
    _emit_json(info, json_out)


@app.command()
def env(json_out: JsonOpt = None) -> None:
    """Backends on this machine with their versions, and why a missing one is missing."""
    from slimdeploy.describe import environment

    rows = environment()
    if json_out != "-":
        table = Table(title="slimdeploy environment")
        for column in ("component", "version", "status"):
            table.add_column(column)
        for row in rows:
            status = "[green]ok[/green]" if row["available"] else f"[yellow]{escape(row['reason'])}[/yellow]"
            table.add_row(row["name"], escape(row["version"] or "-"), status)
        out_console.print(table)
    _emit_json(rows, json_out)


@app.command()
def lint(
    target: Annotated[Path, typer.Argument(help="Bundle directory (every graph of its manifest) or .onnx file.")],
    trt_version: Annotated[str | None, typer.Option("--trt-version", help="TensorRT version to lint for, 10.3 to 11.x (default: 10.15, the newest operator matrix read).")] = None,
    json_out: JsonOpt = None,
) -> None:
    """TensorRT compatibility of a bundle or ONNX file, checked on this CPU. Exit 1 on errors."""
    from slimdeploy.exporters.trt_lint import lint_path

    report = lint_path(target, trt_version=trt_version)
    if json_out != "-":
        if report.findings:
            table = Table(title=f"TensorRT {report.trt_version} lint of {target} (operator matrix {report.matrix})")
            for column in ("severity", "rule", "graph", "node", "message", "fix"):
                table.add_column(column, overflow="fold")
            for f in report.findings:
                severity = "[red]error[/red]" if f.severity == "error" else "[yellow]warning[/yellow]"
                table.add_row(severity, f.rule, escape(f.graph), escape(f.node or "-"), escape(f.message), escape(f.fix))
            out_console.print(table)
        verdict = "[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]"
        out_console.print(
            f"lint {verdict}: {len(report.errors)} error(s), {len(report.warnings)} warning(s) in "
            f"{len(report.graphs)} graph(s) for TensorRT {report.trt_version}"
        )
    _emit_json(report.to_dict(), json_out)
    if not report.passed:
        raise CheckFailedError(f"'{target}' has {len(report.errors)} TensorRT lint error(s) (first: {report.errors[0].rule}: {report.errors[0].message})")


@zoo_app.command("list")
def zoo_list(json_out: JsonOpt = None) -> None:
    """Registered architectures and shipped demo checkpoints (with accuracy on held-out digits)."""
    from slimdeploy.zoo import zoo_listing

    notes: list[str] = []
    rows = zoo_listing(notes)
    for note in notes:
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    if json_out != "-":
        table = Table(title="slimdeploy zoo")
        for column in ("name", "arch", "family", "checkpoint", "dataset", "accuracy", "notes"):
            table.add_column(column)
        for row in rows:
            accuracy = f"{row['accuracy']:.1%}" if row.get("accuracy") is not None else "-"
            checkpoint = f"zoo:{row['name']}" if row.get("checkpoint") else "-"
            metrics = row.get("metrics") or {}
            notes = ""
            if "skip_rate" in metrics:  # gated models: what they skip, and the no-gate baseline
                notes = f"skips {metrics['skip_rate']:.0%} of gated blocks; no-gate baseline {metrics['baseline_accuracy']:.1%}"
            elif "exit_share_per_stage" in metrics:  # early exits: where samples leave
                shares = "/".join(f"{v:.0%}" for v in metrics["exit_share_per_stage"])
                notes = f"exits per stage {shares}; last stage alone {metrics['final_stage_accuracy']:.1%}"
            table.add_row(row["name"], row["arch"], row.get("family") or "-", checkpoint, row.get("dataset") or "-", accuracy, notes)
        out_console.print(table)
    _emit_json(rows, json_out)


@zoo_app.command("train")
def zoo_train(
    name: Annotated[str, typer.Argument(help="Zoo entry to retrain (see slimdeploy zoo list).")],
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Write the checkpoint here instead of the package's zoo.")] = None,
) -> None:
    """Retrain a shipped demo model on the digits data from its recorded recipe."""
    from slimdeploy.zoo.train import train_zoo_entry

    if out_dir is not None:
        check_writable_location(out_dir / f"{name}.pt")  # before the training
    entry = train_zoo_entry(name, out_dir=out_dir)
    out_console.print(f"trained {entry.name}: held-out accuracy {entry.accuracy:.1%}")


def main() -> None:
    """Console entry point: runs the app and maps domain errors to exit codes."""
    try:
        app()
    except SlimDeployError as exc:
        if os.environ.get("SLIMDEPLOY_DEBUG"):
            raise
        message = str(exc)
        err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
        if not isinstance(exc, CheckFailedError):
            err_console.print("[dim](set SLIMDEPLOY_DEBUG=1 for the traceback)[/dim]")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
