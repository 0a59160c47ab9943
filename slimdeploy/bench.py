"""Latency and throughput of a bundle, with the PyTorch reference side by side when torch is here.

For each batch size, the golden inputs are tiled to that batch, every runner is warmed up and
then timed call by call; the report gives p50/p90/p99 latency and throughput (images per second
at the median). Runners share the thread count, so ratios compare like with like. Absolute
times depend on the machine; the ratios are the figures to read.

Early-exit bundles also get ``ExitStats`` (the share of samples leaving at each stage, average
MACs per sample from the per-stage MACs in the plan) and, with ``sweep``, a threshold sweep:
accuracy vs average MACs vs measured latency per threshold setting (``sweep_exits``), written
as JSON and drawn as a PNG (``plot_sweep``; needs matplotlib).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy._optional import is_available
from slimdeploy.bundle import Bundle, bundle_runner, load_bundle, reference_runner, resolve_device
from slimdeploy.engines.base import Runner
from slimdeploy.errors import BackendUnavailableError, BadInputError
from slimdeploy.files import atomic_output, write_json
from slimdeploy.limits import (
    check_batch_memory,
    check_batch_sizes,
    check_device,
    check_option,
    check_threads,
)
from slimdeploy.machine import NOISY_OTHER_CORES, OtherLoad
from slimdeploy.predicted import (
    SweepPoint,
    exit_macs,
    gated_macs,
)

DEFAULT_BATCH_SIZES = (1, 32)
DEFAULT_WARMUP = 10
DEFAULT_ITERATIONS = 50


@dataclass
class LatencyResult:
    """Timing of one runner at one batch size (milliseconds per call)."""

    runner: str
    batch_size: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # images per second at the median latency
    # Cores other processes kept busy while this was timed (``machine.OtherLoad``); None
    # where that cannot be measured.
    other_cores: float | None = None


@dataclass
class DecisionStats:
    """What a gated bundle decided on the benchmark inputs, and the compute it predicts.

    MACs are per sample (Conv and Linear layers, gate cost included). ``predicted_speedup`` is
    the ``mask`` form's MACs over this form's at that batch size: what skipping should buy.
    """

    form: str
    samples: int
    skip_rate_per_block: list[float]
    skip_rate: float
    macs_mask: float
    macs_ideal: float
    macs_form: dict[str, float]
    predicted_speedup: dict[str, float]


@dataclass
class ExitStats:
    """Where an early-exit bundle's samples left, and the compute that predicts.

    MACs are per sample (Conv and Linear layers). ``macs_mask`` runs every stage;
    ``macs_ideal`` runs each sample up to its exit stage (what ``staged`` computes);
    ``macs_form`` is what this bundle's form computes at each batch size (``if`` runs a stage on
    the whole batch when any sample reaches it). ``predicted_speedup`` is mask over form.
    """

    form: str
    samples: int
    thresholds: list[float]
    exit_share_per_stage: list[float]
    macs_per_stage: list[int]
    macs_mask: float
    macs_ideal: float
    macs_form: dict[str, float]
    predicted_speedup: dict[str, float]
    accuracy: float | None = None


@dataclass
class BenchReport:
    """All timings of one bench run, and the machine facts that frame them."""

    bundle: str
    threads: int
    results: list[LatencyResult] = field(default_factory=list)
    speedups: dict[str, float] = field(default_factory=dict)
    decisions: DecisionStats | None = None
    exits: ExitStats | None = None
    sweep: list[SweepPoint] = field(default_factory=list)
    # Where the sweep's inputs came from (``digits:heldout``, the --data file, ``golden``).
    sweep_source: str = ""
    # A sweep streamed over a dataset: what was read and how it ran (``dataset.DatasetSummary``).
    sweep_dataset: Any = None
    notes: list[str] = field(default_factory=list)
    # What makes the figures less than trustworthy (other load), printed as warnings.
    warnings: list[str] = field(default_factory=list)
    # The most cores other processes kept busy during any timing, and whether that is above
    # ``machine.NOISY_OTHER_CORES`` (the figures shared the CPU). None: not measurable here.
    other_load_cores: float | None = None
    noisy: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what ``bench --json`` writes)."""
        return asdict(self)

    def write_json(self, path: str | Path) -> None:
        """Write ``to_dict()`` as JSON to ``path``, or to stdout for ``"-"``."""
        write_json(self.to_dict(), path)


def time_runner(
    runner: Runner,
    feed: dict[str, np.ndarray],
    warmup: int,
    iterations: int,
) -> LatencyResult:
    """Time ``iterations`` calls of an active runner after ``warmup`` untimed ones, measuring
    the cores other processes kept busy meanwhile (``other_cores``)."""
    for _ in range(warmup):
        runner.infer(feed, check_inputs=False)
    times = np.empty(iterations)
    with OtherLoad() as other:
        for i in range(iterations):
            start = time.perf_counter()
            runner.infer(feed, check_inputs=False)
            times[i] = time.perf_counter() - start
    batch = len(next(iter(feed.values())))
    p50 = float(np.percentile(times, 50))
    return LatencyResult(
        runner=runner.name,
        batch_size=batch,
        iterations=iterations,
        p50_ms=p50 * 1e3,
        p90_ms=float(np.percentile(times, 90)) * 1e3,
        p99_ms=float(np.percentile(times, 99)) * 1e3,
        mean_ms=float(times.mean()) * 1e3,
        throughput=batch / p50,
        other_cores=other.cores,
    )


def compare_runners(
    runners: Mapping[str, Runner],
    feeds: Sequence[dict[str, np.ndarray]],
    warmup: int = DEFAULT_WARMUP,
    rounds: int = 5,
    calls_per_round: int | None = None,
    settle_s: float = 0.05,
) -> dict[str, LatencyResult]:
    """Time active runners side by side, taking turns in rounds (order reversed every other
    round) so that machine noise falls on all of them alike.

    Each round times ``calls_per_round`` calls per runner, cycling through ``feeds`` (several
    feeds at batch 1 let per-sample decisions vary). ``mean_ms`` is the median over rounds of
    each round's mean call time: with feeds whose cost differs, the mean is what throughput
    follows; p50/p90/p99 are over all timed calls.

    Args:
        runners: active runners by label.
        feeds: one or more feeds, all of the same batch size.
        warmup: untimed calls per runner before the first round. Defaults to 10.
        rounds: timed rounds. Defaults to 5.
        calls_per_round: calls per runner per round. Defaults to ``len(feeds)``.
        settle_s: pause before each turn, so the previous runner's worker threads stop spinning
            (ONNX Runtime's and torch's thread pools spin briefly after a call). Defaults to 0.05.
    """
    calls = calls_per_round or len(feeds)
    for runner in runners.values():
        for i in range(warmup):
            runner.infer(feeds[i % len(feeds)], check_inputs=False)
    times: dict[str, list[float]] = {name: [] for name in runners}
    round_means: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else order[::-1]:
            runner, spent = runners[name], []
            time.sleep(settle_s)
            for i in range(calls):
                feed = feeds[i % len(feeds)]
                start = time.perf_counter()
                runner.infer(feed, check_inputs=False)
                spent.append(time.perf_counter() - start)
            times[name].extend(spent)
            round_means[name].append(float(np.mean(spent)))
    batch = len(next(iter(feeds[0].values())))
    results = {}
    for name, values in times.items():
        array = np.asarray(values)
        p50 = float(np.percentile(array, 50))
        results[name] = LatencyResult(
            runner=name, batch_size=batch, iterations=len(array), p50_ms=p50 * 1e3,
            p90_ms=float(np.percentile(array, 90)) * 1e3, p99_ms=float(np.percentile(array, 99)) * 1e3,
            mean_ms=float(np.median(round_means[name])) * 1e3, throughput=batch / p50,
        )
    return results


def time_within(runners: Mapping[str, Runner], feeds: Sequence[dict[str, np.ndarray]], budget_s: float,
                rounds: int = 5, max_calls: int = 200) -> tuple[dict[str, float], int]:
    """``compare_runners`` sized to take about ``budget_s`` seconds: the mean call time (ms) of
    each runner, and the calls per turn that sizing gave (at least 1, at most ``max_calls``).

    One untimed and one timed call per runner size the turns (and warm up what a first call
    allocates); the rounds then warm up on every feed. Defaults: 5 rounds, 200 calls per turn.
    """
    slowest = 0.0
    for runner in runners.values():
        runner.infer(feeds[0], check_inputs=False)
        started = time.perf_counter()
        runner.infer(feeds[0], check_inputs=False)
        slowest = max(slowest, time.perf_counter() - started)
    turn_s = budget_s / (rounds * len(runners))
    calls = int(min(max_calls, max(1, turn_s // max(slowest, 1e-6))))
    timed = compare_runners(runners, feeds, warmup=len(feeds), rounds=rounds, calls_per_round=calls)
    return {name: result.mean_ms for name, result in timed.items()}, calls


def image_feeds(images: np.ndarray, batch: int, count: int) -> list[dict[str, np.ndarray]]:
    """Up to ``count`` distinct ``{"input": ...}`` feeds of ``batch`` rows of ``images`` (at
    least one: the first ``batch`` rows)."""
    count = max(1, min(count, len(images) // batch))
    return [{"input": np.ascontiguousarray(images[i * batch:(i + 1) * batch])} for i in range(count)]


def tiled_feed(bundle: Bundle, batch_size: int) -> dict[str, np.ndarray]:
    """The golden inputs repeated or cut to ``batch_size`` rows."""
    golden = bundle.golden()
    feed = {}
    for name in bundle.batch_inputs:
        array = golden[name]
        reps = -(-batch_size // len(array))
        feed[name] = np.ascontiguousarray(np.concatenate([array] * reps)[:batch_size])
    return feed


def decision_stats(bundle: Bundle, gates: np.ndarray, batch_sizes: Sequence[int]) -> DecisionStats:
    """Skip rates and predicted MACs of a gated bundle for the decisions it made."""
    plan, form = bundle.manifest["gating"], bundle.manifest["dynamic"]
    mask = gated_macs(plan, gates, "mask", 1)
    by_batch = {str(b): gated_macs(plan, gates, form, b) for b in batch_sizes}
    return DecisionStats(
        form=form,
        samples=len(gates),
        skip_rate_per_block=[float(v) for v in 1 - gates.mean(axis=0)],
        skip_rate=float(1 - gates.mean()),
        macs_mask=mask,
        macs_ideal=gated_macs(plan, gates, "ideal", 1),
        macs_form=by_batch,
        predicted_speedup={b: mask / v for b, v in by_batch.items()},
    )


def exit_stats(bundle: Bundle, outputs: Mapping[str, np.ndarray], batch_sizes: Sequence[int], labels: np.ndarray | None = None) -> ExitStats:
    """Exit shares and predicted MACs of an early-exit bundle for the exits it took."""
    plan, form = bundle.manifest["exits"], bundle.manifest["dynamic"]
    macs = [int(plan["macs"][f"stage{j}"]) for j in range(plan["n_stages"])]
    stage = np.asarray(outputs["exit_stage"])
    mask = exit_macs(macs, stage, "mask", 1)
    by_batch = {str(b): exit_macs(macs, stage, form, b) for b in batch_sizes}
    return ExitStats(
        form=form,
        samples=len(stage),
        thresholds=[float(t) for t in bundle.manifest["decisions"]["thresholds"]["exit_thresholds"]],
        exit_share_per_stage=[float((stage == j).mean()) for j in range(len(macs))],
        macs_per_stage=macs,
        macs_mask=mask,
        macs_ideal=exit_macs(macs, stage, "ideal", 1),
        macs_form=by_batch,
        predicted_speedup={b: mask / v for b, v in by_batch.items()},
        accuracy=float((outputs["logits"].argmax(1) == labels).mean()) if labels is not None else None,
    )


def sweep_exits(
    runner: Runner,
    images: np.ndarray,
    labels: np.ndarray | None,
    macs_per_stage: Sequence[int],
    values: Sequence[float],
    batch_size: int = 1,
    warmup: int = 3,
    iterations: int | None = None,
    default: Sequence[float] | None = None,
) -> list[SweepPoint]:
    """Accuracy, average MACs and latency of an active early-exit runner at each threshold in
    ``values`` (every stage but the last gets it), and at the bundle's ``default`` thresholds.

    Latency is the mean call time over one pass through ``images`` in batches of
    ``batch_size`` (the pass that gives the decisions), or over ``iterations`` calls cycling
    through them (exits differ per sample, so the mean is what throughput follows). Average
    MACs are what the decisions predict for ``staged`` (each sample up to its exit).

    Args:
        runner: an active runner taking ``input`` and ``exit_thresholds``.
        images: inputs [N, C, H, W].
        labels: classes [N] for accuracy, or None.
        macs_per_stage: MACs per sample of each stage (the plan's ``macs``).
        values: thresholds to try.
        batch_size: rows per call. Defaults to 1.
        warmup: untimed calls per setting. Defaults to 3.
        iterations: timed calls per setting. Defaults to one pass over ``images``.
        default: one threshold per stage, measured as the ``"default"`` point. Defaults to none.
    """
    n_stages = len(macs_per_stage)
    settings: list[tuple[str, np.ndarray]] = []
    for value in values:
        thresholds = np.full(n_stages, value, dtype=np.float32)
        thresholds[-1] = 0.0
        settings.append((f"{value:g}", thresholds))
    if default is not None:
        settings.append(("default", np.asarray(default, dtype=np.float32).reshape(n_stages)))
    points = []
    for label, thresholds in settings:
        feeds = [{"input": images[i:i + batch_size], "exit_thresholds": thresholds} for i in range(0, len(images), batch_size)]
        for i in range(warmup):
            runner.infer(feeds[i % len(feeds)], check_inputs=i > 0)
        outputs, spent = [], 0.0
        for feed in feeds:
            started = time.perf_counter()
            outputs.append(runner.infer(feed, check_inputs=False))
            spent += time.perf_counter() - started
        calls = len(feeds)
        if iterations:
            started = time.perf_counter()
            for i in range(iterations):
                runner.infer(feeds[i % len(feeds)], check_inputs=False)
            spent, calls = time.perf_counter() - started, iterations
        stage = np.concatenate([o["exit_stage"] for o in outputs])
        logits = np.concatenate([o["logits"] for o in outputs])
        points.append(SweepPoint(
            thresholds=[float(t) for t in thresholds],
            exit_share_per_stage=[float((stage == j).mean()) for j in range(n_stages)],
            macs_average=exit_macs(macs_per_stage, stage, "ideal", 1),
            accuracy=float((logits.argmax(1) == labels).mean()) if labels is not None else None,
            latency_ms=spent / calls * 1e3,
            batch_size=batch_size,
            label=label,
            default=label == "default",
            samples=len(images),
        ))
    return points


def plot_sweep(points: Sequence[SweepPoint], path: str | Path, title: str = "early-exit threshold sweep") -> Path:
    """Draw a sweep (``sweep_figure``) to a PNG at ``path``, written atomically.

    Raises ``BackendUnavailableError`` when matplotlib is not installed.
    """
    from slimdeploy._optional import optional_import

    pyplot = optional_import("matplotlib.pyplot", "draw the threshold sweep")
    figure = sweep_figure(points, title)
    out = Path(path)
    try:
        with atomic_output(out) as tmp:
            figure.savefig(tmp, dpi=120, format="png")
    finally:
        pyplot.close(figure)
    return out


def sweep_figure(points: Sequence[SweepPoint], title: str = "early-exit threshold sweep") -> Any:
    """A matplotlib figure of a sweep: accuracy against average MACs, and against latency.

    The title says what was swept (pass the model), over how many samples and what one sample
    is worth in accuracy; the bundle's default thresholds are a star of their own (in the
    legend); threshold labels are written only where they do not overlap one already written
    (the default's first); the accuracy axis spans at least ten samples (and 2 %), so that one
    sample does not look like a trend.

    Raises ``BackendUnavailableError`` when matplotlib is not installed.
    """
    from slimdeploy._optional import optional_import

    matplotlib = optional_import("matplotlib", "draw the threshold sweep")
    matplotlib.use("Agg")
    pyplot = optional_import("matplotlib.pyplot", "draw the threshold sweep")
    ticker = optional_import("matplotlib.ticker", "draw the threshold sweep")
    samples = max((p.samples for p in points), default=0)
    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4.5))
    swept = [p for p in points if not p.default]
    marked = [p for p in points if p.default]
    accuracy = [_accuracy_or_nan(p) for p in points]
    for axis, x_of, label in ((axes[0], lambda p: p.macs_average / 1e6, "average MMACs per sample"),
                              (axes[1], lambda p: p.latency_ms, f"latency ms per call (batch {points[0].batch_size})")):
        axis.plot([x_of(p) for p in swept], [_accuracy_or_nan(p) for p in swept], marker="o", label="one threshold for every exit")
        for point in marked:
            axis.plot([x_of(point)], [_accuracy_or_nan(point)], marker="*", markersize=14, linestyle="none", color="tab:red",
                      label="the bundle's default thresholds")
        axis.set_xlabel(label)
        axis.set_ylabel("accuracy")
        axis.grid(True, alpha=0.3)
        _accuracy_limits(axis, accuracy, samples)
        axis.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
        # The default's label first: where labels would collide, it is the one kept.
        _label_without_overlap(axis, [(x_of(p), _accuracy_or_nan(p), p.label) for p in [*marked, *swept]])
    axes[0].legend(loc="lower right", fontsize=8)
    counted = f"\n{samples} samples; one sample = {100 / samples:.2g} % accuracy" if samples else ""
    figure.suptitle(f"{title}{counted}", fontsize=11)
    figure.tight_layout()
    return figure


def _accuracy_or_nan(point: SweepPoint) -> float:
    return point.accuracy if point.accuracy is not None else float("nan")


def _accuracy_limits(axis: Any, accuracy: Sequence[float], samples: int) -> None:
    """An accuracy axis at least ten samples (and 2 %) tall, inside [0, 1]."""
    finite = [a for a in accuracy if np.isfinite(a)]
    if not finite:
        return
    low, high = min(finite), max(finite)
    span = max(high - low, 10 / samples if samples else 0.0, 0.02)
    middle = (low + high) / 2
    bottom = max(0.0, min(low, middle - span / 2) - 0.1 * span)
    top = min(1.0 + 0.02 * span, max(high, bottom + span) + 0.1 * span)
    axis.set_ylim(bottom, top)


def _label_without_overlap(axis: Any, labelled: Sequence[tuple[float, float, str]], min_gap: float = 0.06) -> list[str]:
    """Write each point's label beside it unless it would land within ``min_gap`` (a fraction
    of the axes) of a label already written: close thresholds are left to the table. Returns
    the labels written."""
    to_axes = axis.transData + axis.transAxes.inverted()
    placed: list[tuple[float, float]] = []
    written = []
    for x, y, text in labelled:
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        ax_x, ax_y = to_axes.transform((x, y))
        if any(abs(ax_x - px) < min_gap and abs(ax_y - py) < min_gap / 2 for px, py in placed):
            continue
        placed.append((ax_x, ax_y))
        axis.annotate(text, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        written.append(text)
    return written


DEFAULT_SWEEP = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.01)


def check_same_model(bundle: Bundle, baseline: Bundle) -> None:
    """``BadInputError`` when ``baseline`` holds another model than ``bundle``: other weights
    (``model.weights_sha256``, recorded at export) or, for bundles without that digest, another
    architecture, arguments or parameter count. A speed-up over another model means nothing."""
    ours, theirs = bundle.manifest.get("model") or {}, baseline.manifest.get("model") or {}
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        raise BadInputError(f"'{baseline.path}' or '{bundle.path}' records no model | Fix: re-export them")
    digests = ours.get("weights_sha256"), theirs.get("weights_sha256")
    if all(digests):
        same = digests[0] == digests[1]
        what = f"weights {str(digests[1])[:12]} vs {str(digests[0])[:12]}"
    else:
        keys = ("arch", "arch_args", "params")
        same = all(ours.get(key) == theirs.get(key) for key in keys)
        what = f"{theirs.get('arch')} {theirs.get('arch_args')} vs {ours.get('arch')} {ours.get('arch_args')}"
    if not same:
        raise BadInputError(
            f"--baseline '{baseline.path}' holds another model than '{bundle.path}' ({what}) | Note: a baseline "
            "is the same checkpoint in another form or precision | Fix: export the baseline from the same checkpoint"
        )


def bench_bundle(
    path: str | Path,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    warmup: int = DEFAULT_WARMUP,
    iterations: int = DEFAULT_ITERATIONS,
    threads: int = 0,
    torch_reference: bool | None = None,
    baseline: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    sweep: Sequence[float] | None = None,
    data: str | Path | None = None,
    arch: str | None = None,
    stream: Any = None,
    stream_progress: Any = None,
) -> BenchReport:
    """Benchmark a bundle on ONNX Runtime and, when possible, PyTorch eager.

    Args:
        path: bundle directory.
        batch_sizes: batch sizes to time. Defaults to (1, 32).
        warmup: untimed calls first. Defaults to 10.
        iterations: timed calls. Defaults to 50.
        threads: intra-op threads for every runner; 0 means one per CPU core. Defaults to 0.
        torch_reference: also time PyTorch; None means when torch and the bundle's reference
            weights are present. Defaults to None.
        baseline: another bundle of the same model (e.g. its ``mask`` form) timed side by side;
            the report gives this bundle's speed-up over it. Defaults to none.
        progress: optional callable told each step. Defaults to silence.
        device: where the bundle (and the baseline) run: ``"cpu"``/``"cuda"`` (ONNX Runtime),
            ``"openvino"`` (OpenVINO's CPU plugin), ``"tensorrt"`` (the engines ``slimdeploy
            build`` made), or ``"auto"`` (this bundle's default CPU runtime, for the baseline
            too). Defaults to ``"cpu"``.
        sweep: early-exit bundles: thresholds to sweep (``sweep_exits``, at the first batch
            size; max-softmax values, or entropies for the entropy rule), and the bundle's
            default thresholds. Defaults to none.
        data: .npz (``input``, optional ``labels``) or .npy of inputs the sweep runs on.
            Defaults to the whole digits held-out split for a bundle checked on digits (where
            scikit-learn is installed), else the golden inputs (``sweep_inputs``). A folder or
            a glob is a dataset, streamed (``dataset.sweep_dataset``).
        stream: ``dataset.DatasetOptions`` for a streamed sweep (workers, Ray, work folder,
            bad inputs); given, ``data`` is streamed even when it is one file. Defaults to the
            defaults for a folder or glob.
        stream_progress: ``dataset.Progress`` told the samples a streamed sweep finished.
            Defaults to silence.
        arch: for a model built by the user's code, the factory that builds it, so that PyTorch
            can be timed (the bundle's record of it is never imported on its own). Defaults to
            none: such a bundle is timed without PyTorch, with a note.

    Timings are flagged ``noisy`` (with a warning) when other processes kept more than
    ``machine.NOISY_OTHER_CORES`` cores busy during any of them; a realised speed-up below the
    predicted one gets a note on what the prediction leaves out (per-call and routing cost).
    """
    say = progress or (lambda _message: None)
    check_device(device)
    check_threads(threads)
    check_batch_sizes(list(batch_sizes), "--batch")
    check_option("warmup", warmup)
    check_option("iterations", iterations)
    if sweep is not None and not all(np.isfinite(float(value)) for value in sweep):
        raise BadInputError(f"--sweep thresholds must be finite numbers, got {list(sweep)} | Fix: e.g. --sweep 0.5,0.9,0.99")
    threads = threads or os.cpu_count() or 1
    bundle = load_bundle(path)
    device = resolve_device(bundle, device)
    if sweep and not bundle.manifest.get("exits"):
        raise BadInputError("--sweep applies to early-exit bundles (exit thresholds); this bundle has none | Fix: leave out --sweep")
    golden_input = bundle.golden()["input"]
    check_batch_memory(batch_sizes, golden_input[:1].nbytes)
    # The sweep's inputs are read and checked before any timing (a dataset is listed).
    if sweep and data is not None and stream is None and _is_dataset(str(data)):
        from slimdeploy.dataset import DatasetOptions

        stream = DatasetOptions()
    if sweep and stream is not None:
        from slimdeploy.dataset import open_source

        if data is None:
            raise BadInputError("a streamed sweep needs --data | Fix: add --data FOLDER (or a glob of .npz shards)")
        open_source(str(data), stream.shard_size or 1000, stream.on_bad)
    streamed = bool(sweep) and stream is not None
    sweep_images, sweep_labels, sweep_source = sweep_inputs(bundle, data) if sweep and not streamed else (None, None, "")
    report = BenchReport(bundle=str(bundle.path), threads=threads)
    backend = device if device in ("tensorrt", "openvino") else "onnxruntime"
    runners: list[Runner] = [bundle_runner(bundle, device=device, threads=threads)]
    runners[0].name = bundle.manifest.get("dynamic") or backend
    if baseline is not None:
        other = load_bundle(baseline)
        check_same_model(bundle, other)
        base_runner = bundle_runner(other, device=device, threads=threads)
        base_runner.name = f"baseline:{other.manifest.get('dynamic') or backend}"
        runners.append(base_runner)
    factory = bundle.manifest["model"].get("factory")
    want_torch = torch_reference if torch_reference is not None else (
        is_available("torch") and bool(bundle.manifest.get("reference_weights")) and (not factory or arch is not None)
    )
    if want_torch:
        try:
            runners.append(reference_runner(bundle, threads=threads, arch=arch))
        except BackendUnavailableError as exc:
            if torch_reference:  # asked for explicitly: say why it cannot be
                raise
            # torch is installed but does not import (a broken install): time the bundle alone.
            report.notes.append(f"PyTorch reference not timed (torch is installed but cannot be imported: {str(exc).split(' | ')[0]})")
    elif torch_reference is None and factory and arch is None:
        report.notes.append(f"PyTorch reference not timed: the model is built by your code ({factory}), which bench "
                            f"imports only when named | Fix: pass --arch {factory} to time it")
    elif torch_reference is False:
        report.notes.append("PyTorch reference not timed (not asked for)")
    else:
        report.notes.append("PyTorch reference not timed (torch not installed or no reference weights in the bundle)")
    for runner in runners:
        with runner:
            for batch_size in batch_sizes:
                say(f"{runner.name} at batch {batch_size}")
                report.results.append(time_runner(runner, tiled_feed(bundle, batch_size), warmup, iterations))
    _flag_other_load(report)
    by_key = {(r.runner, r.batch_size): r for r in report.results}
    main = runners[0].name
    for batch_size in batch_sizes:
        ours = by_key.get((main, batch_size))
        for other in runners[1:]:
            theirs = by_key.get((other.name, batch_size))
            if ours and theirs:
                label = f"{backend}_vs_torch" if other.name == "torch" else f"vs_{other.name.replace(':', '_')}"
                report.speedups[f"{label}_batch{batch_size}"] = theirs.p50_ms / ours.p50_ms
    if bundle.manifest.get("gating"):
        with bundle_runner(bundle, threads=threads) as runner:
            golden = bundle.golden()
            gates = runner.infer({"input": golden["input"]})["gates"]
        report.decisions = decision_stats(bundle, gates, batch_sizes)
    if bundle.manifest.get("exits"):
        golden = bundle.golden()
        with bundle_runner(bundle, threads=threads) as runner:
            outputs = runner.infer({"input": golden["input"]})
            report.exits = exit_stats(bundle, outputs, batch_sizes, golden.get("labels"))
            report.notes.append(f"exit shares and accuracy are over the {len(golden['input'])} golden inputs")
            if sweep and streamed:
                from dataclasses import replace

                from slimdeploy.dataset import sweep_dataset

                say(f"threshold sweep over {len(sweep)} settings and the default, streamed over {data}")
                with OtherLoad() as other:
                    report.sweep, report.sweep_dataset = sweep_dataset(
                        bundle, str(data), sweep, replace(stream, batch_sizes=[batch_sizes[0]]), stream_progress)
                report.sweep_source = report.sweep_dataset.source
                _flag_other_load(report, other.cores)
            elif sweep:
                say(f"threshold sweep over {len(sweep)} settings and the default, on {len(sweep_images)} samples of {sweep_source}")
                plan = bundle.manifest["exits"]
                macs = [int(plan["macs"][f"stage{j}"]) for j in range(plan["n_stages"])]
                default = bundle.manifest["decisions"]["thresholds"]["exit_thresholds"]
                with OtherLoad() as other:
                    report.sweep = sweep_exits(runner, sweep_images, sweep_labels, macs, sweep, batch_size=batch_sizes[0],
                                               default=default)
                report.sweep_source = sweep_source
                _flag_other_load(report, other.cores)
    report.notes.extend(overhead_notes(bundle, report))
    return report


def _is_dataset(data: str) -> bool:
    from slimdeploy.dataset import is_dataset

    return is_dataset(data)


def sweep_inputs(bundle: Bundle, data: str | Path | None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Inputs (and labels, where they mean something) for a threshold sweep, and their source:
    ``data`` when given; else the whole digits held-out split at the bundle's preprocessing when
    its parity ran on digits and scikit-learn is here (500 samples, not the golden few); else
    the golden inputs. Checked like parity inputs (shapes, dtypes, finite, rows)."""
    from slimdeploy.engines.base import check_feed
    from slimdeploy.files import read_arrays
    from slimdeploy.parity import check_rows

    golden_info = bundle.manifest["golden"]
    if data is not None:
        arrays = read_arrays(data)
        if "input" not in arrays:
            raise BadInputError(f"'{data}' has no array 'input' (has {sorted(arrays)}) | Fix: save the inputs with "
                                "np.savez(path, input=x, labels=y)")
        images, labels, source = arrays["input"], arrays.get("labels"), Path(data).name
    elif str(golden_info.get("source", "")).startswith("digits:heldout") and is_available("sklearn"):
        from slimdeploy.data import digits_inputs

        prep = bundle.manifest["preprocessing"]
        images, labels = digits_inputs("heldout", tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"]))
        labels, source = labels if golden_info.get("labels") else None, "digits:heldout"
    else:
        golden = bundle.golden()
        images, labels, source = golden["input"], golden.get("labels"), "golden"
    check_feed({"input": images}, {"input": bundle.input_meta("input")})
    check_rows({"input": images}, {}, labels, source=f"sweep inputs ({source})")
    return np.ascontiguousarray(images), labels, source


def _flag_other_load(report: BenchReport, cores: float | None = None) -> None:
    """Fold the other load measured during the timings (and ``cores``) into the report, and warn
    once when it is above ``NOISY_OTHER_CORES``."""
    measured = [value for value in (*(r.other_cores for r in report.results), cores) if value is not None]
    if not measured:
        return
    report.other_load_cores = max(measured)
    if report.other_load_cores > NOISY_OTHER_CORES and not report.noisy:
        report.noisy = True
        report.warnings.append(
            f"other processes kept up to {report.other_load_cores:.2f} cores busy while timing (above "
            f"{NOISY_OTHER_CORES}): these figures shared the CPU, and ratios can be off by any factor | Fix: rerun "
            "when the machine is idle"
        )


def overhead_notes(bundle: Bundle, report: BenchReport) -> list[str]:
    """A note for every batch size where the realised speed-up over a ``mask`` baseline falls
    short of the one the decisions predict: the prediction counts MACs only, not the cost per
    call (one graph per piece for ``staged``) and the routing of rows between them, which
    dominate at small batches and on small models."""
    stats = report.decisions or report.exits
    if stats is None:
        return []
    notes = []
    graphs = len(bundle.manifest.get("graphs") or [])
    for key, realised in report.speedups.items():
        if not key.startswith("vs_baseline_mask_batch"):
            continue
        batch = key.rsplit("batch", 1)[1]
        predicted = stats.predicted_speedup.get(batch)
        if predicted is None or realised >= 0.9 * predicted:
            continue
        per_call = (f"runs {graphs} graphs per call and routes the rows between them on the host" if stats.form == "staged"
                    else f"adds routing ({stats.form}) that the mask form does not")
        notes.append(
            f"realised {realised:.2f}x < predicted {predicted:.2f}x at batch {batch}: the prediction counts MACs only; "
            f"this form {per_call}, a cost per call that dominates when a call computes little (small batches, small "
            "models). Compare at a larger --batch to see the MACs saved"
        )
    return notes
