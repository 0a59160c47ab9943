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
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from slimdeploy.errors import BadInputError, CheckFailedError, SlimDeployError
from slimdeploy.files import atomic_output, check_output_file, check_writable_location, write_json
from slimdeploy.numbers import format_count, format_macs, format_seconds

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
DeviceOpt = Annotated[str, typer.Option(help="auto (the default: the bundle's default CPU runtime, ONNX Runtime unless its export found OpenVINO faster and OpenVINO is installed here), cpu or cuda (ONNX Runtime), openvino (the same graphs on OpenVINO's CPU plugin: pip install 'slimdeploy[openvino]'), or tensorrt (the engines slimdeploy build made).")]
MinBatchOpt = Annotated[int | None, typer.Option("--min-batch", help="TensorRT: smallest batch the engines accept (export: 1; build: the bundle's).")]
OptBatchOpt = Annotated[int | None, typer.Option("--opt-batch", help="TensorRT: batch the kernels are tuned for (export: 8; build: the bundle's).")]
MaxBatchOpt = Annotated[int | None, typer.Option("--max-batch", help="TensorRT: largest batch the engines accept (export: 32; build: the bundle's).")]
WorkspaceOpt = Annotated[int | None, typer.Option("--workspace", help="TensorRT: workspace memory limit in MiB (export: 1024; build: the bundle's).")]
# check and bench: a bundle of the user's own model records its factory but never imports it.
ReferenceArchOpt = Annotated[str | None, typer.Option("--arch", help="A bundle of your own model (exported with --arch module.path:factory or file.py:factory): that factory, imported to run the PyTorch reference (check --data without ref_ arrays, bench's PyTorch column). Default: not imported.")]
ArchArgsOpt = Annotated[str | None, typer.Option("--arch-args", help="Constructor arguments as a JSON object (default: the checkpoint's, and what its keys and shapes determine).")]
InputSizeOpt = Annotated[str | None, typer.Option("--input-size", help="Image input size C,H,W (or H,W, or one side) (default: the checkpoint's, else the architecture's).")]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="Per-channel mean after scaling pixels to [0, 1], comma-separated, or one for all (default: the checkpoint's; a foreign checkpoint gets CIFAR's up to 64 pixels, else ImageNet's, with a note).")]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std, comma-separated, or one for all (default: as --mean).")]
AtolOpt = Annotated[float | None, typer.Option(help="Absolute tolerance for every output, used as given (default by precision: fp32 1e-4, raised per output to 10x PyTorch's float32 noise measured at export; fp16 5e-2, int8 0.25).")]
RtolOpt = Annotated[float | None, typer.Option(help="Relative tolerance for every output (default by precision: fp32 1e-3, fp16 1e-2, int8 0.1).")]
# Dataset jobs (check/bench/reference --data FOLDER|GLOB): streamed, sharded, resumable, distributed.
WorkersOpt = Annotated[int, typer.Option("--workers", help="Dataset jobs: worker processes (Ray actors with --ray), each holding the bundle; 1 runs in this process.")]
# "\\[ray]": rich would read a bare [ray] in help as markup and drop it.
RayOpt = Annotated[str | None, typer.Option("--ray", help="Dataset jobs: run on Ray (pip install 'slimdeploy\\[ray]'): 'auto' (the cluster Ray finds, else a local one) or a cluster address (ray://HEAD:10001).")]
WorkDirOpt = Annotated[Path | None, typer.Option("--work-dir", help="Dataset jobs: keep each shard's result in this folder, so that an interrupted run continues from the finished shards.")]
OnBadOpt = Annotated[str | None, typer.Option("--on-bad-input", help="Dataset jobs: 'fail' (default: stop at the first bad image or row, naming it) or 'skip' (leave it out; each is listed in the report).")]
ShardSizeOpt = Annotated[int | None, typer.Option("--shard-size", help="Dataset jobs: samples per shard, the unit of work and of resumption (default 1000).")]
RetriesOpt = Annotated[int, typer.Option("--retries", help="Dataset jobs: further tries of a shard whose worker crashed or died.")]
WorkForceOpt = Annotated[bool, typer.Option("--force", help="Dataset jobs: replace the results of another job in --work-dir.")]
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
    """Progress on stderr, one line per finished step: the time since the command started, the
    step, and how long the step took (``  15.5s exporting with torch.export (5.7 s)``).

    The stage functions announce each step (``progress(message)``); a step ends when the next
    one starts or the printer closes (``with StepPrinter() as progress: ...``). In a terminal a
    spinner shows the running step and its time so far, so that a long step (torch.export,
    calibration) shows a sign of life; in a log (stderr not a terminal) only the lines appear.

    Args:
        quiet: print nothing (``--json -`` of the commands whose stdout is the result).
            Defaults to False.
        live: show the spinner when stderr is a terminal. Defaults to True.
        console: where to print. Defaults to stderr.
    """

    def __init__(self, quiet: bool = False, live: bool = True, console: Console | None = None) -> None:
        self.started = time.perf_counter()
        self.quiet = quiet
        self.console = console or err_console
        self.live = live and not quiet and self.console.is_terminal
        self._step: str | None = None
        self._step_started = self.started
        self._status: Any = None

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        self._finish_step()
        self._step, self._step_started = message, time.perf_counter()
        if self.live and self._status is None:
            self._status = self.console.status(_RunningStep(self), spinner="dots")
            self._status.start()

    def _finish_step(self) -> None:
        if self._step is None:
            return
        now = time.perf_counter()
        line = f"[dim]{now - self.started:6.1f}s[/dim] {escape(self._step)} [dim]({format_seconds(now - self._step_started)})[/dim]"
        self.console.print(line, soft_wrap=True)
        self._step = None

    def close(self, finished: bool = True) -> None:
        """End the running step (its line printed when ``finished``) and stop the spinner."""
        if self._status is not None:
            self._status.stop()
            self._status = None
        if finished:
            self._finish_step()
        self._step = None

    def __enter__(self) -> StepPrinter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        # A failed step prints no line: the error that follows says what went wrong.
        self.close(finished=kind is None)


class _RunningStep:
    """The spinner's text: the running step and its time so far (rendered at every refresh)."""

    def __init__(self, printer: StepPrinter) -> None:
        self.printer = printer

    def __rich__(self) -> Text:
        step = self.printer._step or ""
        return Text(f"{step} ({time.perf_counter() - self.printer._step_started:.0f} s)")


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


def _parse_floats(text: str | None, option: str) -> list[float] | None:
    """Comma-separated numbers (``--mean 0.485,0.456,0.406``); None when not given. Ranges are
    checked where the option is used (``ExportOptions``)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInputError(f"{option} takes comma-separated numbers, got '{text}' | Fix: e.g. {option} 0.485,0.456,0.406") from None


def _parse_size(text: str | None) -> list[int] | None:
    """``--input-size C,H,W`` (or ``H,W``, or one side; ``x`` separates as well as ``,``)."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        raise BadInputError(f"--input-size takes C,H,W (or H,W, or one side), got '{text}' | Fix: e.g. --input-size 3,224,224") from None


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
    allowed = report.criteria.get("mismatch_fraction")
    for result in report.outputs:
        table.add_row(
            result.name, str(result.batch_size), f"{result.max_abs:.2e}", f"{result.mean_abs:.2e}",
            f"{result.max_rel:.2e}", f"{result.atol:g} / {result.rtol:g}", _parity_verdict(result, allowed),
        )
    return table


def _parity_verdict(result: Any, allowed: float | None) -> str:
    """``pass``; for reduced precision, the criterion that passed elements outside tolerance
    (``pass (0.6 % outside, within the 10 % mismatch criterion)``)."""
    if not result:
        return "[red]FAIL[/red]"
    if allowed is not None and result.mismatched and result.elements:
        return (f"[green]pass[/green] ({100 * result.mismatched / result.elements:.1f} % outside, "
                f"within the {100 * allowed:g} % mismatch criterion)")
    return "[green]pass[/green]"


def _print_parity(report: Any, json_target: str | None) -> None:
    """The parity table and what decided the verdict on stdout (nothing with ``--json -``);
    warnings about what the samples could not show on stderr."""
    _warn_unseen_decisions(report)
    if json_target == "-":
        return
    out_console.print(_parity_table(report))
    criteria = report.criteria
    if report.task is not None:
        task = report.task
        line = f"top-1 agreement {task.top1_agreement:.1%}"
        if "top1_agreement" in criteria:
            line += f" (criterion >= {100 * criteria['top1_agreement']:g} %)"
        line += f", top-5 {task.top5_agreement:.1%}"
        if task.accuracy_reference is not None:
            line += f"; accuracy reference {task.accuracy_reference:.1%}, candidate {task.accuracy_candidate:.1%}"
        out_console.print(line)
    for name, results in report.decisions.items():
        for result in results:
            line = (f"{name} at batch {result.batch_size}: agreement {result.agreement:.2%} over "
                    f"{result.decisions} decisions, {result.near_threshold} near-threshold flip(s), "
                    f"{result.defects} defect(s)")
            if result.min_agreement is not None:  # reduced precision: the rate decides, not the defects
                line += f" (criterion: agreement >= {100 * result.min_agreement:g} %)"
            out_console.print(line)
        if results[0].kind == "exit":
            out_console.print(f"{name}: reference exits per stage {results[0].reference_open}")
    for batch, count in report.excluded_samples.items():
        out_console.print(f"numeric parity at batch {batch} left out {count} sample(s) whose decisions differ")
    rule = report.tolerance_rule
    if rule:
        out_console.print(f"tolerance: {escape(rule['description'])}" + (f" ({escape(rule['note'])})" if rule.get("note") else ""), soft_wrap=True)
    for failure in report.failures:
        out_console.print(f"[red]failed:[/red] {escape(failure)}", soft_wrap=True)
    verdict = "[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]"
    decided = ""
    if criteria:
        decided = f" on the {report.precision} criteria: " + ", ".join(_criterion_words(key, value) for key, value in criteria.items())
    out_console.print(f"parity {verdict}{decided}", soft_wrap=True)


def _criterion_words(key: str, value: float) -> str:
    words = {"top1_agreement": "top-1 agreement >= {} %", "decision_agreement": "decision agreement >= {} %",
             "mismatch_fraction": "<= {} % of elements outside tolerance"}
    return words.get(key, key + " {}").format(f"{100 * value:g}")


def _warn_unseen_decisions(report: Any) -> None:
    """A warning (stderr) for every gate never seen both open and closed, and every exit stage no
    sample took, in the parity samples: parity could not check those decisions both ways."""
    fix = "pass --data with in-domain images (an .npz whose 'input' holds preprocessed images like the model's training data)"
    for name, results in report.decisions.items():
        first = results[0]
        if first.kind == "exit":
            unseen = [j for j, count in enumerate(first.reference_open) if not count]
            what = f"no sample exits at stage(s) {unseen} of {len(first.reference_open)}"
        else:
            unseen = [i + 1 for i, (o, c) in enumerate(zip(first.reference_open, first.reference_closed)) if not o or not c]
            what = f"gated block(s) {unseen} ({len(unseen)} of {len(first.reference_open)}) were never seen both open and closed"
        if unseen:
            err_console.print(f"[yellow]warning:[/yellow] {name}: {what} in these {report.samples} samples, so parity did not "
                              f"check those decisions both ways | Fix: {fix}", soft_wrap=True)


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
    arch: Annotated[str | None, typer.Option(help="Architecture (needed when the checkpoint does not name one): a registered name, or your own code as module.path:factory or path/to/file.py:factory (the checkpoint is then a state_dict).")] = None,
    arch_args: ArchArgsOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
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
    no_speed_check: Annotated[bool, typer.Option("--no-speed-check", help="For ort: skip the export's timings on this CPU (by default a few seconds each): FP16/INT8 against FP32 (a reduced graph slower than FP32 is a warning naming its costliest layers), and, where OpenVINO is installed, OpenVINO against ONNX Runtime (the faster one, if it passes parity, becomes the bundle's default runtime).")] = False,
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
        input_size=_parse_size(input_size),
        mean=_parse_floats(mean, "--mean"),
        std=_parse_floats(std, "--std"),
        speed_check=not no_speed_check,
    )
    with StepPrinter(live=json_out != "-") as progress:
        result = run_export(_resolve_checkpoint(checkpoint), out, options, progress=progress)
    _print_parity(result.report, json_out)
    _print_notes(result.notes)
    for warning in result.warnings:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(warning)}", soft_wrap=True)
    calibration = result.manifest.get("calibration")
    if calibration and json_out != "-":
        _print_precision(result.manifest["precision"], calibration)
    if json_out != "-":
        model, prep = result.manifest["model"], result.manifest["preprocessing"]
        out_console.print(
            f"bundle [bold]{escape(str(result.bundle))}[/bold]: {model['arch']}, {format_count(model['params'])} parameters, "
            f"{format_macs(model['macs'])} MACs, exported in {format_seconds(result.manifest['export']['seconds_total'])}",
            soft_wrap=True,
        )
        out_console.print(f"inputs: {escape(_describe_preprocessing(prep))}", soft_wrap=True)
    _emit_json({"bundle": str(result.bundle), "manifest": result.manifest, "report": result.report.to_dict()}, json_out)
    if not result.passed:
        raise CheckFailedError(f"parity failed for '{result.bundle}' (report.json has the details)")
    if target == "trt":
        _after_trt_export(result, out, prepare_only, json_out)


def _describe_preprocessing(prep: dict[str, Any]) -> str:
    """``3x32x32, mean 0.491/0.482/0.447, std 0.247/0.243/0.262 (from the checkpoint)``."""
    from slimdeploy.loading import Preprocessing

    sources = prep.get("source") or {}
    words = {"checkpoint": "from the checkpoint", "default": "defaults: the checkpoint records none",
             "option": "given"}
    by_source: dict[str, list[str]] = {}
    for name in ("input_size", "mean", "std"):
        by_source.setdefault(words.get(sources.get(name, ""), "from the checkpoint"), []).append(name.replace("_", " "))
    origin = "; ".join(f"{'/'.join(names)} {word}" for word, names in by_source.items())
    return f"{Preprocessing.from_dict(prep).describe()} ({origin})"


def _print_notes(notes: list[str]) -> None:
    """Notes on stderr, one line each."""
    for note in notes:
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)


def _build_options(min_batch: int | None, opt_batch: int | None, max_batch: int | None, workspace: int | None) -> dict[str, int]:
    """The TensorRT build options given on the command line, as ``BuildSpec`` fields."""
    given = {"min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch, "workspace_mb": workspace}
    return {key: value for key, value in given.items() if value is not None}


def _print_macs(stats: Any, every: str, alone: str) -> None:
    """The MACs per sample of a gated or early-exit bench (computing ``every`` block or stage,
    the decisions ``alone``, the form at each batch) and the speed-up they predict over mask."""
    out_console.print(
        f"MACs per sample: {every} {format_macs(stats.macs_mask, 2)}, {alone} {format_macs(stats.macs_ideal, 2)}, "
        + ", ".join(f"{stats.form} at batch {b} {format_macs(v, 2)}" for b, v in stats.macs_form.items())
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

    with StepPrinter(quiet=json_out == "-") as progress:
        result = build_bundle(bundle, trt_version_expected=trt_version, overrides=overrides, progress=progress)
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
    data: Annotated[str | None, typer.Option(help="An image folder (one sub-folder per class), a folder or glob ('shards/*.npz') of .npz/.npy shards, or one .npz (input, labels, ref_<output>) or .npy file; folders and globs are streamed. Without stored references the bundle's PyTorch weights compute them (needs torch), or pass --references. Default: the bundle's golden file.")] = None,
    batch_sizes: Annotated[str | None, typer.Option("--batch-sizes", help="Comma-separated batch sizes (default: the manifest's).")] = None,
    atol: CheckAtolOpt = None,
    rtol: CheckRtolOpt = None,
    device: DeviceOpt = "auto",
    threads: Annotated[int, typer.Option(help="Intra-op threads (per worker for a dataset); 0 lets the backend choose, for a dataset 1 per worker, which keeps the figures the same in every mode.")] = 0,
    references: Annotated[Path | None, typer.Option("--references", help="Dataset jobs: reference shards written by 'slimdeploy reference' (no torch needed here).")] = None,
    workers: WorkersOpt = 1,
    ray: RayOpt = None,
    work_dir: WorkDirOpt = None,
    on_bad_input: OnBadOpt = None,
    shard_size: ShardSizeOpt = None,
    retries: RetriesOpt = 2,
    force: WorkForceOpt = False,
    json_out: JsonOpt = None,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report here (for CI).", callback=_result_file("--junit"))] = None,
    arch: ReferenceArchOpt = None,
) -> None:
    """Re-check a bundle's parity from the bundle alone (no torch needed), or over a whole dataset. Exit 1 on failure.

    A folder or glob given to --data (or any of --workers, --ray, --work-dir, --references, --on-bad-input, --shard-size) streams the data shard by shard, a batch at a time, with the report's figures added up exactly across shards and workers.
    """
    from slimdeploy.parity import check_bundle

    _print_device_note(bundle, device)
    parsed_batches = _parse_ints(batch_sizes, "--batch-sizes") if batch_sizes else None
    tolerances = _tolerances(atol, rtol, _bundle_precision(bundle))
    streamed = _dataset_job(data, workers, ray, work_dir, references, on_bad_input, shard_size, retries, force)
    if streamed is not None and arch is not None and references is None:
        # Dataset workers build their references from reference.pt or reference shards; they do
        # not import user code (yet).
        raise BadInputError("--arch is not supported with a dataset source (a folder, glob or --workers/--ray) | "
                            "Fix: write reference shards with `slimdeploy reference` on a machine with the factory, "
                            "then check with --references")
    if streamed is not None:
        from slimdeploy.dataset import check_dataset

        assert data is not None
        options = _dataset_options(streamed, parsed_batches, tolerances, device, threads, references, on_bad_input, shard_size)
        with _dataset_progress("checking", json_out) as progress:
            report = check_dataset(bundle, data, options, progress=progress)
    else:
        with StepPrinter(quiet=json_out == "-") as progress:
            report = check_bundle(
                bundle,
                data=data,
                batch_sizes=parsed_batches,
                tolerances=tolerances,
                device=device,
                threads=threads,
                progress=progress,
                arch=arch,
            )
    _print_parity(report, json_out)
    if report.dataset is not None:
        _print_dataset(report, json_out)
    if json_out:
        report.write_json(json_out)
    if junit:
        report.write_junit(junit)
    if not report.passed:
        raise CheckFailedError(f"parity failed for '{bundle}'")


def _print_device_note(bundle: Any, device: str) -> None:
    """Say which runtime ``--device auto`` runs on where the bundle's default is not ONNX
    Runtime (``bundle.device_note``). ``bundle``: a loaded ``Bundle`` or its path (read
    without verifying its files, which the command does; one that does not load is left to it)."""
    from slimdeploy.bundle import Bundle, device_note, load_bundle
    from slimdeploy.errors import SlimDeployError

    if device != "auto":
        return
    try:
        note = device_note(bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=False), device)
    except SlimDeployError:
        return
    if note:
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)


def _dataset_job(data: str | None, workers: int, ray: str | None, work_dir: Path | None, references: Path | None,
                 on_bad: str | None, shard_size: int | None, retries: int, force: bool) -> Any:
    """The ``Execution`` of a streamed dataset job, or None for the in-memory check of one file:
    a folder or glob streams, and so does any dataset option (refused without --data)."""
    from slimdeploy.dataset import Execution, is_dataset

    given = [flag for flag, value in (("--workers", workers != 1), ("--ray", ray is not None), ("--work-dir", work_dir),
                                      ("--references", references), ("--on-bad-input", on_bad), ("--shard-size", shard_size),
                                      ("--force", force)) if value]
    if data is None:
        if given:
            raise BadInputError(f"{'/'.join(given)}: options of a dataset job | Fix: add --data FOLDER (or a glob of .npz shards)")
        return None
    if not given and not is_dataset(data):
        return None
    return Execution(workers=workers, ray=ray, work_dir=str(work_dir) if work_dir else None, force=force, retries=retries)


def _dataset_options(execution: Any, batch_sizes: list[int] | None, tolerances: Any, device: str, threads: int,
                     references: Path | None, on_bad: str | None, shard_size: int | None) -> Any:
    from slimdeploy.dataset import DatasetOptions

    return DatasetOptions(batch_sizes=batch_sizes, tolerances=tolerances, device=device, threads=threads,
                          shard_size=shard_size, on_bad=on_bad or "fail", references=str(references) if references else None,
                          execution=execution)


def _dataset_progress(what: str, json_out: str | None) -> Any:
    from slimdeploy.dataset.progress import DatasetProgress

    return DatasetProgress(err_console, what, quiet=json_out == "-")


def _print_dataset(report: Any, json_out: str | None) -> None:
    """What a streamed check read and what it cost (stdout), and the inputs it left out (stderr)."""
    summary = report.dataset
    _warn_skipped(summary)
    if json_out == "-":
        return
    out_console.print(f"data: {escape(summary.source)}: {format_count(summary.samples)} of {format_count(summary.listed)} "
                      f"samples checked in {summary.shards} shard(s)", soft_wrap=True)
    largest = max(report.batch_sizes)
    for result in report.outputs:
        if result.batch_size == largest and result.percentiles:
            out_console.print(f"{result.name} |error| at batch {largest}: " + ", ".join(
                f"{key} {value:.2e}" for key, value in result.percentiles.items()) + f", max {result.max_abs:.2e}",
                              soft_wrap=True)
    compute = summary.compute
    if compute.get("exit_share_per_stage"):
        out_console.print("exits per stage: " + " ".join(f"{v:.1%}" for v in compute["exit_share_per_stage"])
                          + " (reference " + " ".join(f"{v:.1%}" for v in compute["reference_exit_share_per_stage"]) + ")")
    if compute.get("skip_rate_per_block"):
        out_console.print("skip rate per gated block: " + " ".join(f"{v:.0%}" for v in compute["skip_rate_per_block"]))
    if compute.get("macs_per_sample"):
        out_console.print("MACs per sample: " + ", ".join(f"{key} {format_macs(value, 2)}" for key, value in compute["macs_per_sample"].items()))
    out_console.print(f"[dim]{escape(summary.note)}[/dim]", soft_wrap=True)
    _print_run(summary)


def _warn_skipped(summary: Any) -> None:
    if summary.skipped:
        first = summary.skipped_items[0]
        where = first["path"] if first["row"] is None else f"{first['path']} row {first['row']}"
        err_console.print(f"[yellow]warning:[/yellow] {format_count(summary.skipped)} bad input(s) left out "
                          f"(--on-bad-input skip); first: {escape(where)}: {escape(first['reason'])} (--json lists "
                          f"the first {len(summary.skipped_items)})", soft_wrap=True)


def _print_run(summary: Any) -> None:
    how = {"in-process": "in this process", "processes": f"on {summary.workers} local processes",
           "ray": f"on Ray, {summary.workers} actor(s)"}[summary.mode]
    line = (f"ran {how}, {summary.threads} thread(s) each: {format_count(summary.samples)} samples in "
            f"{format_seconds(summary.seconds)} ({format_count(summary.samples_per_second)} samples/s)")
    if summary.resumed_shards:
        line += f"; {summary.resumed_shards} shard(s) taken from an earlier run"
    if summary.retried_shards:
        line += f"; {summary.retried_shards} shard(s) retried"
    out_console.print(line, soft_wrap=True)


@app.command()
def reference(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (with its PyTorch reference weights).")],
    data: Annotated[str, typer.Option(help="The dataset: an image folder, or a folder or glob of .npz/.npy shards.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the reference shards (new, or one this command made: it continues where it stopped).")],
    threads: Annotated[int, typer.Option(help="Intra-op threads per worker; 0 means 1.")] = 0,
    workers: WorkersOpt = 1,
    ray: RayOpt = None,
    on_bad_input: OnBadOpt = None,
    shard_size: ShardSizeOpt = None,
    retries: RetriesOpt = 2,
    force: Annotated[bool, typer.Option("--force", help="Replace reference shards of another bundle or data in --out.")] = False,
    json_out: JsonOpt = None,
) -> None:
    """Write PyTorch reference shards of a dataset (needs torch), so that 'check --data SOURCE --references DIR' runs where torch is not installed."""
    from slimdeploy.dataset import Execution, write_references

    execution = Execution(workers=workers, ray=ray, work_dir=str(out), force=force, retries=retries)
    options = _dataset_options(execution, None, None, "cpu", threads, None, on_bad_input, shard_size)
    with _dataset_progress("reference", json_out) as progress:
        summary = write_references(bundle, data, out, options, progress=progress)
    _warn_skipped(summary)
    if json_out != "-":
        out_console.print(f"wrote PyTorch references of {format_count(summary.samples)} samples ({escape(summary.source)}) "
                          f"in {summary.shards} shard(s) to {escape(str(out))}", soft_wrap=True)
        out_console.print(f"check anywhere: slimdeploy check {escape(str(bundle))} --data {escape(data)} --references {escape(str(out))}",
                          soft_wrap=True)
        _print_run(summary)
    from dataclasses import asdict

    _emit_json(asdict(summary), json_out)


@app.command()
def run(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    inputs: Annotated[Path, typer.Option("--inputs", help=".npz keyed by graph input name (or an .npy holding the input array); float64 arrays are cast to the graph's float32, with a note.")],
    out: Annotated[Path, typer.Option("--out", "-o", help=".npz to write, keyed by graph output name.")],
    batch: Annotated[int, typer.Option(help="Run at most this many rows per call; 0 = all at once.")] = 0,
    gate_threshold: Annotated[float | None, typer.Option("--gate-threshold", help="Gated bundles: a block runs iff its gate probability is above this (default: the bundle's, 0.5 unless exported otherwise).")] = None,
    exit_thresholds: Annotated[str | None, typer.Option("--exit-thresholds", help="Early-exit bundles: one confidence threshold per stage, comma-separated (default: the bundle's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    device: DeviceOpt = "auto",
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
    _print_device_note(loaded, device)
    feed = read_arrays(inputs)
    feed.update(_threshold_feed(loaded, gate_threshold, _parse_floats(exit_thresholds, "--exit-thresholds")))
    for note in _cast_float64(feed, {name: loaded.input_meta(name) for name in loaded.input_names}):
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
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


def _threshold_feed(bundle: Any, gate: float | None, exits: list[float] | None) -> dict[str, np.ndarray]:
    """The threshold inputs ``--gate-threshold`` and ``--exit-thresholds`` give, checked against
    the bundle's inputs (a bundle without that input refuses the option)."""
    import math

    feed: dict[str, np.ndarray] = {}
    for option, name, value in (("--gate-threshold", "gate_threshold", gate), ("--exit-thresholds", "exit_thresholds", exits)):
        if value is None:
            continue
        if name not in bundle.input_names:
            raise BadInputError(f"{option} applies to bundles with a '{name}' input; '{bundle.path}' takes "
                                f"{bundle.input_names} | Fix: leave {option} out")
        values = [value] if isinstance(value, float) else list(value)
        if not all(math.isfinite(v) for v in values):
            raise BadInputError(f"{option} must be finite, got {values} | Fix: e.g. {option} 0.5")
        meta = bundle.input_meta(name)
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != len(meta.shape) or any(isinstance(want, int) and got != want for got, want in zip(array.shape, meta.shape)):
            want = meta.shape[0] if meta.shape else 1
            raise BadInputError(f"{option} takes {want} value(s) for this bundle, got {len(values)} | Fix: one per stage, e.g. "
                                f"{option} {','.join(['0.9'] * int(want))}")
        feed[name] = array
    return feed


def _cast_float64(feed: dict[str, np.ndarray], metadata: dict[str, Any]) -> list[str]:
    """Cast float64 arrays of float32 inputs (what NumPy makes by default) to float32, in
    place; a note for each. Values beyond float32's range are refused rather than made inf."""
    notes = []
    for name, meta in metadata.items():
        array = feed.get(name)
        if array is None or array.dtype != np.float64 or np.dtype(meta.dtype) != np.float32:
            continue
        cast = array.astype(np.float32)
        if np.isfinite(array).all() and not np.isfinite(cast).all():
            raise BadInputError(f"'{name}' holds float64 values beyond float32's range (largest |value| "
                                f"{float(np.abs(array).max()):.3g}) | Fix: save the inputs as float32, preprocessed like the model's")
        feed[name] = cast
        notes.append(f"cast '{name}' from float64 to float32, the graph's type (save it as float32 to skip this)")
    return notes


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1,32",
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 10,
    iterations: Annotated[int, typer.Option(help="Timed calls per batch size.")] = 50,
    threads: Annotated[int, typer.Option(help="Threads for every runner; 0 = one per CPU core.")] = 0,
    no_torch: Annotated[bool, typer.Option("--no-torch", help="Do not time the PyTorch reference (timed by default where torch and the bundle's reference weights are).")] = False,
    baseline: Annotated[Path | None, typer.Option(help="Another bundle of the same model (e.g. its mask form) to time side by side (default: none).")] = None,
    device: DeviceOpt = "auto",
    sweep: Annotated[str | None, typer.Option(help="Early-exit bundles: exit thresholds to sweep, comma-separated, or 'default' (0,0.5,0.8,0.9,0.95,0.98,0.99,0.995,0.999,1.01); the bundle's own thresholds are measured too. Default: no sweep.")] = None,
    data: Annotated[str | None, typer.Option(help="With --sweep: .npz (input, labels) or .npy of inputs to sweep over, or a dataset streamed as in check --data (an image folder, a folder or glob of .npz/.npy shards) (default: the whole digits held-out split for a bundle checked on digits, else its golden inputs).")] = None,
    plot: Annotated[Path | None, typer.Option(help="With --sweep: draw the sweep to this PNG (needs matplotlib: pip install 'slimdeploy\\[plot]').", callback=_result_file("--plot"))] = None,
    workers: WorkersOpt = 1,
    ray: RayOpt = None,
    work_dir: WorkDirOpt = None,
    on_bad_input: OnBadOpt = None,
    shard_size: ShardSizeOpt = None,
    retries: RetriesOpt = 2,
    force: WorkForceOpt = False,
    json_out: JsonOpt = None,
    arch: ReferenceArchOpt = None,
) -> None:
    """Latency percentiles and throughput on ONNX Runtime (or the TensorRT engines with --device tensorrt), beside PyTorch eager when torch is here; exit shares and threshold sweeps of early-exit bundles. Timings taken while other processes kept the CPU busy are flagged (noisy)."""
    from slimdeploy.bench import DEFAULT_SWEEP, bench_bundle, plot_sweep

    if plot is not None and sweep is None:
        raise BadInputError("--plot draws a threshold sweep | Fix: add --sweep default (or a list of thresholds)")
    if data is not None and sweep is None:
        raise BadInputError("--data gives the inputs of a threshold sweep | Fix: add --sweep default (or a list of thresholds)")
    execution = _dataset_job(data, workers, ray, work_dir, None, on_bad_input, shard_size, retries, force)
    stream = None if execution is None else _dataset_options(execution, None, None, device, 0, None, on_bad_input, shard_size)
    _print_device_note(bundle, device)
    if plot is not None:  # before the benchmark, not after it
        from slimdeploy._optional import optional_import

        optional_import("matplotlib", "draw the threshold sweep (--plot)")
    sweep_values: list[float] | None = None
    if sweep is not None:
        try:
            sweep_values = list(DEFAULT_SWEEP) if sweep == "default" else [float(v) for v in sweep.split(",") if v.strip()]
        except ValueError:
            raise BadInputError(f"--sweep '{sweep}' is not a comma-separated list of numbers | Fix: e.g. --sweep 0.5,0.9,0.99") from None

    with StepPrinter(quiet=json_out == "-") as progress, _dataset_progress("sweep", json_out) as sweep_progress:
        report = bench_bundle(
            bundle,
            batch_sizes=_parse_ints(batch, "--batch"),
            warmup=warmup,
            iterations=iterations,
            threads=threads,
            torch_reference=False if no_torch else None,
            baseline=baseline,
            progress=progress,
            arch=arch,
            device=device,
            sweep=sweep_values,
            data=data,
            stream=stream,
            stream_progress=sweep_progress,
        )
    if plot is not None and report.sweep:
        plot_sweep(report.sweep, plot, title=_sweep_title(bundle, report))
    if report.sweep_dataset is not None:
        _warn_skipped(report.sweep_dataset)
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    if json_out != "-":
        _print_bench(report, iterations, warmup)
        if plot is not None and report.sweep:
            out_console.print(f"sweep drawn to {escape(str(plot))}", soft_wrap=True)
    if json_out:
        report.write_json(json_out)


def _sweep_title(bundle: Path, report: Any) -> str:
    """``s2d_resnet20_cifar (staged, fp32): exit threshold sweep on digits:heldout``."""
    from slimdeploy.bundle.reader import read_manifest

    manifest = read_manifest(Path(bundle))
    model = manifest.get("model") or {}
    return (f"{model.get('arch', bundle)} ({manifest.get('dynamic')}, {manifest.get('precision')}): exit threshold sweep "
            f"on {report.sweep_source}")


def _print_bench(report: Any, iterations: int, warmup: int) -> None:
    """The bench tables and lines on stdout."""
    load = "" if report.other_load_cores is None else f", other processes {report.other_load_cores:.2f} cores"
    table = Table(title=f"latency ({report.threads} threads, {iterations} calls after {warmup} warm-up{load})")
    for column in ("runner", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s"):
        table.add_column(column)
    for r in report.results:
        table.add_row(r.runner, str(r.batch_size), f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}", format_count(r.throughput))
    out_console.print(table)
    for key, value in report.speedups.items():
        out_console.print(f"{key}: {value:.2f}x" + (" [yellow](noisy: other processes shared the CPU)[/yellow]" if report.noisy else ""))
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
        first = report.sweep[0]
        sweep_table = Table(title=f"threshold sweep ({first.samples} samples of {report.sweep_source}, batch {first.batch_size})")
        for column in ("threshold", "exits per stage", "MACs/sample", "accuracy", "latency ms"):
            sweep_table.add_column(column)
        for point in report.sweep:
            accuracy = "-" if point.accuracy is None else f"{point.accuracy:.1%}"
            label = f"default ({'/'.join(f'{t:.3g}' for t in point.thresholds)})" if point.default else point.label
            sweep_table.add_row(label, " ".join(f"{v:.0%}" for v in point.exit_share_per_stage),
                                format_macs(point.macs_average, 2), accuracy, f"{point.latency_ms:.3f}")
        out_console.print(sweep_table)
        if report.sweep_dataset is not None:
            _print_run(report.sweep_dataset)
    for note in report.notes:
        out_console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)


@app.command()
def inspect(
    target: Annotated[str, typer.Argument(help="Bundle directory, .onnx file, checkpoint file, or zoo:NAME.")],
    arch: Annotated[str | None, typer.Option(help="Architecture, for checkpoints that do not name one.")] = None,
    arch_args: ArchArgsOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a pickled nn.Module checkpoint.")] = False,
    json_out: JsonOpt = None,
) -> None:
    """Describe a checkpoint, a bundle or an ONNX file: what kind of model, architecture, parameters, MACs, graphs, inputs and outputs."""
    from slimdeploy.describe import inspect_bundle, inspect_checkpoint, inspect_onnx

    path = _resolve_checkpoint(target)
    given = [flag for flag, value in (("--arch", arch), ("--arch-args", arch_args), ("--input-size", input_size),
                                      ("--mean", mean), ("--std", std)) if value is not None]
    if given and (path.is_dir() or path.suffix.lower() == ".onnx"):
        raise BadInputError(f"{'/'.join(given)}: options for a checkpoint; '{path}' is a {'bundle' if path.is_dir() else 'graph'} "
                            "whose inputs are fixed | Fix: leave them out")
    if path.is_dir():
        info = inspect_bundle(path)
    elif path.suffix.lower() == ".onnx":
        info = inspect_onnx(path)
    else:
        from slimdeploy.export.options import check_preprocessing_option

        info = inspect_checkpoint(
            path, arch=arch, arch_args=_parse_json_arg(arch_args, "--arch-args"), trust_pickle=trust_pickle,
            input_size=check_preprocessing_option("input_size", _parse_size(input_size)),
            mean=check_preprocessing_option("mean", _parse_floats(mean, "--mean")),
            std=check_preprocessing_option("std", _parse_floats(std, "--std")),
        )
    if json_out != "-":
        table = Table(show_header=False, title=f"{info['kind']}: {path}")
        table.add_column("field", no_wrap=True)
        table.add_column("value", overflow="fold")
        for key, value in info.items():
            if key in ("kind", "per_layer_macs"):
                continue
            table.add_row(key, escape(_inspect_value(key, value)))
        out_console.print(table)
    _emit_json(info, json_out)


def _inspect_value(key: str, value: Any) -> str:
    """One field of ``inspect`` for people: counts with separators, MACs with a unit, inputs and
    outputs and graphs one per line."""
    if key in ("params", "nodes") and isinstance(value, int):
        return format_count(value)
    if key == "macs" and isinstance(value, (int, float)):
        return f"{format_macs(value)} ({format_count(value)})"
    if key in ("inputs", "outputs") and isinstance(value, list):
        return "\n".join(f"{io['name']}: {io['dtype']} {io['shape']}" for io in value)
    if key == "graphs" and isinstance(value, list):
        return "\n".join(
            f"{g['name']} ({g['file']}): opset {g['opset']}, {format_count(g['nodes'])} nodes; "
            f"in {', '.join(i['name'] for i in g['inputs'])}; out {', '.join(o['name'] for o in g['outputs'])}"
            for g in value)
    if key == "op_types" and isinstance(value, dict):
        return ", ".join(f"{op} {format_count(count)}" for op, count in value.items())
    if key == "preprocessing" and isinstance(value, dict) and "input_size" in value:
        return _describe_preprocessing(value)
    if key == "parity" and isinstance(value, dict) and "passed" in value:
        worst = ", ".join(f"{name} {error:.2g}" for name, error in (value.get("max_abs") or {}).items())
        rule = (value.get("tolerance_rule") or {}).get("description")
        return (f"{'passed' if value['passed'] else 'FAILED'} against {value.get('reference')} on {value.get('samples')} samples "
                f"at batch {'/'.join(map(str, value.get('batch_sizes', [])))}; max abs error {worst}" + (f"; tolerance: {rule}" if rule else ""))
    if key == "files" and isinstance(value, dict):
        return "\n".join(f"{name} (sha256 {str(digest)[:12]})" for name, digest in value.items())
    return value if isinstance(value, str) else json.dumps(value, default=str)


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every finding with its graph and node (default: identical findings grouped, with counts).")] = False,
    json_out: JsonOpt = None,
) -> None:
    """TensorRT compatibility of a bundle or ONNX file, checked on this CPU. Exit 1 on errors."""
    from slimdeploy.exporters.trt_lint import lint_path

    report = lint_path(target, trt_version=trt_version)
    if json_out != "-":
        title = f"TensorRT {report.trt_version} lint of {target} (operator matrix {report.matrix})"
        if verbose and report.findings:
            table = Table(title=title)
            for column in ("severity", "rule", "graph", "node", "message", "fix"):
                table.add_column(column, overflow="fold")
            for f in report.findings:
                table.add_row(_severity(f.severity), f.rule, escape(f.graph), escape(f.node or "-"), escape(f.message), escape(f.fix))
            out_console.print(table)
        elif report.findings:
            _print_lint_summary(report, title)
        for note in report.notes:
            out_console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
        verdict = "[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]"
        more = "" if verbose or not report.findings else " (--verbose lists each finding, --json all of them)"
        out_console.print(
            f"lint {verdict}: {format_count(len(report.errors))} error(s), {format_count(len(report.warnings))} warning(s) in "
            f"{len(report.graphs)} graph(s) for TensorRT {report.trt_version}{more}", soft_wrap=True,
        )
    _emit_json(report.to_dict(), json_out)
    if not report.passed:
        raise CheckFailedError(f"'{target}' has {len(report.errors)} TensorRT lint error(s) (first: {report.errors[0].rule}: {report.errors[0].message})")


def _severity(severity: str) -> str:
    return "[red]error[/red]" if severity == "error" else "[yellow]warning[/yellow]"


# The summary lists this many kinds of finding; the rest are counted (--verbose lists them).
LINT_GROUPS_SHOWN = 12


def _print_lint_summary(report: Any, title: str) -> None:
    """One screen: each kind of finding once, with its count and first case, then each fix once."""
    groups = report.groups()
    fixes: list[str] = []
    out_console.print(f"{title}: {len(groups)} kind(s) of finding", soft_wrap=True)
    for group in groups[:LINT_GROUPS_SHOWN]:
        if group.fix not in fixes:
            fixes.append(group.fix)
        graph = f"{group.first.graph}/" if len(report.graphs) > 1 and group.first.graph else ""
        at = f" (first at {graph}{group.first.node})" if group.first.node else ""
        graphs = f" in {len(group.graphs)} graphs" if len(group.graphs) > 1 else ""
        out_console.print(f"  {_severity(group.severity)} {group.rule} x{format_count(group.count)}{escape(graphs)}: "
                          f"{escape(group.first.message + at)} [dim]\\[fix {fixes.index(group.fix) + 1}][/dim]")
    if len(groups) > LINT_GROUPS_SHOWN:
        rest = groups[LINT_GROUPS_SHOWN:]
        out_console.print(f"  ... and {len(rest)} more kind(s) ({format_count(sum(g.count for g in rest))} finding(s))")
    for number, fix in enumerate(fixes, 1):  # not wrapped: a fix may hold a command to copy
        out_console.print(f"fix {number}: {escape(fix)}", soft_wrap=True)


@zoo_app.command("list")
def zoo_list(json_out: JsonOpt = None) -> None:
    """Shipped demo checkpoints (with accuracy on held-out digits), then the registered architectures by family."""
    from slimdeploy.zoo import zoo_listing

    notes: list[str] = []
    rows = zoo_listing(notes)
    for note in notes:
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    if json_out != "-":
        checkpoints = [row for row in rows if row["kind"] == "checkpoint"]
        architectures = [row for row in rows if row["kind"] == "architecture"]
        _print_zoo_checkpoints(checkpoints)
        if architectures:
            _print_zoo_architectures(architectures)
    _emit_json(rows, json_out)


# Below this width, zoo list puts each checkpoint on its own lines instead of a table.
WIDE_TERMINAL = 100


def _zoo_notes(row: dict[str, Any]) -> str:
    """What a shipped checkpoint's metrics say: a gated model's skips, an early-exit one's exits."""
    metrics = row.get("metrics") or {}
    if "skip_rate" in metrics:  # gated models: what they skip, and the no-gate baseline
        return f"skips {metrics['skip_rate']:.0%} of gated blocks; no-gate baseline {metrics['baseline_accuracy']:.1%}"
    if "exit_share_per_stage" in metrics:  # early exits: where samples leave
        shares = "/".join(f"{v:.0%}" for v in metrics["exit_share_per_stage"])
        return f"exits per stage {shares}; last stage alone {metrics['final_stage_accuracy']:.1%}"
    return ""


def _print_zoo_checkpoints(rows: list[dict[str, Any]]) -> None:
    """The shipped checkpoints: a table on a wide terminal, a few lines each on a narrow one;
    no name is ever cut (names never wrap, notes do)."""
    title = "Shipped checkpoints (trained on digits): slimdeploy export zoo:NAME --out DIR"
    if out_console.width >= WIDE_TERMINAL:
        table = Table(title=title, title_justify="left")
        table.add_column("checkpoint", no_wrap=True, min_width=max(len(f"zoo:{r['name']}") for r in rows))
        table.add_column("architecture (family)", no_wrap=True, min_width=max(len(f"{r['arch']} ({r['family']})") for r in rows))
        for column in ("parameters", "accuracy"):
            table.add_column(column, justify="right", no_wrap=True)
        table.add_column("notes", overflow="fold")
        for row in rows:
            table.add_row(f"zoo:{row['name']}", f"{row['arch']} ({row.get('family') or '-'})",
                          format_count(row["params"]) if row.get("params") else "-", _accuracy(row), _zoo_notes(row))
        out_console.print(table)
        return
    out_console.print(f"[bold]{title}[/bold]")
    for row in rows:
        out_console.print(f"  zoo:{row['name']}", soft_wrap=True)
        details = [f"{row['arch']} ({row.get('family') or '-'})"]
        if row.get("params"):
            details.append(f"{format_count(row['params'])} parameters")
        details.append(f"accuracy {_accuracy(row)}")
        extra = _zoo_notes(row)
        out_console.print(Padding(Text(", ".join(details) + (f"; {extra}" if extra else "")), (0, 0, 0, 6), expand=False))


def _accuracy(row: dict[str, Any]) -> str:
    return f"{row['accuracy']:.1%}" if row.get("accuracy") is not None else "-"


def _print_zoo_architectures(rows: list[dict[str, Any]]) -> None:
    """Every registered architecture, one paragraph per family (names wrap whole, at ', ')."""
    from slimdeploy.describe import model_kind

    out_console.print()
    out_console.print("[bold]Architectures by family (pass one as --arch NAME)[/bold]")
    families: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        families.setdefault(row.get("family") or "-", []).append(row)
    for family, members in families.items():
        kinds = sorted({model_kind(family, bool(row.get("dynamic"))) for row in members})
        out_console.print(f"  [bold]{family}[/bold] ({len(members)}, {'/'.join(kinds)})")
        out_console.print(Padding(Text(", ".join(row["name"] for row in members)), (0, 0, 0, 4), expand=False))


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
