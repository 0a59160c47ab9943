"""Parity at dataset scale: ``slimdeploy check BUNDLE --data SOURCE`` over 2,000 and 20,000 real
images, as an image folder and as .npz shards, in one process, on two worker processes and on
a Ray local cluster of two actors.

    python benchmarks/dataset_scale.py            # full run (20,000 images; about 5 minutes on 2 cores)
    python benchmarks/dataset_scale.py --quick    # 400 and 1,000 images: a smoke test

What one run does:

1. Exports the shipped ``zoo:mobilenet_v1_digits`` (the command a user runs).
2. Builds the dataset from the digits held-out split (500 real 8x8 images, none seen in
   training): image ``i`` is held-out image ``i % 500``, shifted by up to one pixel, its
   contrast scaled by 0.75-1.0 and grey noise (sigma 0.03) added, from a fixed seed; it is
   written as 8-bit PNGs under one folder per class, and the same 8-bit pixels, prepared as the
   bundle's manifest says, as .npz shards of 2,000 samples (``input``, ``labels``). The first
   2,000 images form the small dataset.
3. Runs ``python -m slimdeploy check BUNDLE --data SOURCE --json FILE`` (PyTorch references
   computed batch by batch in each worker, 1 intra-op thread per worker) as a child process
   and measures it from outside: wall time, and peak memory as the ``ru_maxrss`` that
   ``os.wait4`` returns (the command and the worker processes it waited for; Linux reports the
   largest). ``--threads`` is per worker here (default 1). The job's own rate (``samples_per_second`` in the report: listing and bundle
   loading included, interpreter start excluded) is kept beside it.
4. Checks that the reports agree: one process, ``--workers 2`` and ``--ray auto --workers 2``
   on the image folder give the same report (everything but timings and how it ran), and so
   do one process and ``--workers 2`` on the shards; the image folder and the shards (the same
   pixels) give the same figures.

Peak memory must not grow with the dataset: the check is the ratio of the peak at 20,000
images to the peak at 2,000 (target at most 1.1). Throughput at 2 workers over 1 has no
target on a 2-core machine shared with other work (the load is recorded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import OtherLoad, benchmark_arguments, machine_facts, write_results  # noqa: E402

HELDOUT = 500
SHARD_FILE_ROWS = 2_000
SEED = 0
RUN_FIELDS = ("mode", "workers", "threads", "resumed_shards", "retried_shards", "seconds", "samples_per_second")


def augmented_digits(count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 8-bit 8x8 grey images and labels made from the held-out digits (docstring)."""
    from slimdeploy.data import digits_split

    grey, labels = digits_split("heldout")
    rng = np.random.default_rng(SEED)
    base = np.arange(count) % len(grey)
    shifts = rng.integers(-1, 2, size=(count, 2))
    contrast = rng.uniform(0.75, 1.0, size=count).astype(np.float32)
    images = np.empty((count, 8, 8), dtype=np.uint8)
    for i in range(count):
        image = np.roll(grey[base[i]], tuple(shifts[i]), axis=(0, 1)) * contrast[i]
        image = image + rng.normal(0.0, 0.03, size=image.shape).astype(np.float32)
        images[i] = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return images, labels[base]


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:06d}.png")


def write_shards(images: np.ndarray, labels: np.ndarray, root: Path, preprocessing: dict[str, Any]) -> None:
    """The images in ImageFolder order (by class, then by name), prepared as the bundle says."""
    from slimdeploy.data import prepare_images

    order = np.lexsort((np.arange(len(labels)), labels))
    root.mkdir(parents=True)
    for part, start in enumerate(range(0, len(order), SHARD_FILE_ROWS)):
        rows = order[start:start + SHARD_FILE_ROWS]
        inputs = prepare_images(images[rows].astype(np.float32) / 255.0, tuple(preprocessing["input_size"]),
                                preprocessing["mean"], preprocessing["std"])
        np.savez(root / f"part-{part:03d}.npz", input=inputs, labels=labels[rows])


def run_check(bundle: Path, data: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """``slimdeploy check BUNDLE --data DATA --json OUT EXTRA`` in a child, measured from outside."""
    command = [sys.executable, "-m", "slimdeploy", "check", str(bundle), "--data", str(data), "--json", str(out), *extra]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log_path = out.with_suffix(".log")
    with open(log_path, "wb") as log, OtherLoad() as other:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"check failed (exit {child.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
    report = json.loads(out.read_text())
    summary = report["dataset"]
    return {
        "command": "python -m slimdeploy check BUNDLE --data " + data.name + " " + " ".join(extra),
        "samples": summary["samples"],
        "mode": summary["mode"],
        "workers": summary["workers"],
        "threads_per_worker": summary["threads"],
        "wall_seconds": round(wall, 2),
        "job_seconds": round(summary["seconds"], 2),
        "samples_per_second": round(summary["samples_per_second"], 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "other_processes_cpu_cores": other.cores,
        "passed": report["passed"],
        "top1_agreement": report["task"]["top1_agreement"],
        "accuracy_candidate": report["task"]["accuracy_candidate"],
    }


def comparable(path: Path, figures_only: bool = False) -> dict[str, Any]:
    """A report without timings and how it ran; ``figures_only``: its figures alone (outputs,
    task, decisions, pass), what an image folder and shards of the same pixels share."""
    report = json.loads(path.read_text())
    report.pop("seconds", None)
    report["dataset"] = {key: value for key, value in report["dataset"].items() if key not in RUN_FIELDS}
    if figures_only:
        return {key: report[key] for key in ("outputs", "task", "decisions", "passed", "samples")}
    return report


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0], REPO / "benchmarks" / "results" / "dataset_scale.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimdeploy-dataset-scale"),
                        help="folder for the bundle, the datasets and the reports (new, or one this script made)")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray run")
    parser.set_defaults(threads=1)  # intra-op threads per worker: workers, not threads, use the cores
    args = parser.parse_args()
    small, large = (400, 1_000) if args.quick else (2_000, 20_000)
    facts = machine_facts()
    work = args.work
    if work.exists():
        if not (work / "dataset_scale.marker").is_file():
            raise SystemExit(f"--work {work} exists and was not made by this script: choose another folder")
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "dataset_scale.marker").write_text("made by benchmarks/dataset_scale.py\n")

    bundle = work / "bundle"
    print("exporting zoo:mobilenet_v1_digits", flush=True)
    subprocess.run([sys.executable, "-m", "slimdeploy", "export", "zoo:mobilenet_v1_digits", "--out", str(bundle)],
                   check=True, capture_output=True, cwd=REPO)
    preprocessing = json.loads((bundle / "manifest.json").read_text())["preprocessing"]

    started = time.perf_counter()
    images, labels = augmented_digits(large)
    sources = {}
    for count in (small, large):
        sources[f"images-{count}"] = work / f"images-{count}"
        write_image_folder(images[:count], labels[:count], sources[f"images-{count}"])
        sources[f"shards-{count}"] = work / f"shards-{count}"
        write_shards(images[:count], labels[:count], sources[f"shards-{count}"], preprocessing)
    build_seconds = time.perf_counter() - started
    print(f"wrote {large:,} images as a folder and as shards (and the first {small:,}) in {build_seconds:.0f} s", flush=True)

    threads = ["--threads", str(args.threads)]
    plan = [
        (f"images-{small}", []), (f"images-{large}", []), (f"images-{large}", ["--workers", "2"]),
        (f"shards-{small}", []), (f"shards-{large}", []), (f"shards-{large}", ["--workers", "2"]),
    ]
    have_ray = not args.no_ray and subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode == 0
    if have_ray:
        plan.append((f"images-{large}", ["--ray", "auto", "--workers", "2"]))
    runs = {}
    for name, extra in plan:
        label = name + ("-" + "-".join(arg.strip("-") for arg in extra) if extra else "")
        print(f"check {label}", flush=True)
        runs[label] = run_check(bundle, sources[name], work / f"{label}.json", [*extra, *threads])
        print(f"  {runs[label]['samples_per_second']:,} samples/s, peak {runs[label]['peak_rss_mb']} MB", flush=True)

    same = {
        "images_workers_2_vs_1": comparable(work / f"images-{large}-workers-2.json") == comparable(work / f"images-{large}.json"),
        "shards_workers_2_vs_1": comparable(work / f"shards-{large}-workers-2.json") == comparable(work / f"shards-{large}.json"),
        "images_vs_shards_figures": comparable(work / f"images-{large}.json", True) == comparable(work / f"shards-{large}.json", True),
    }
    if have_ray:
        same["images_ray_2_vs_1"] = comparable(work / f"images-{large}-ray-auto-workers-2.json") == comparable(work / f"images-{large}.json")
    memory_ratio = {kind: runs[f"{kind}-{large}"]["peak_rss_mb"] / runs[f"{kind}-{small}"]["peak_rss_mb"] for kind in ("images", "shards")}
    speedup = {kind: runs[f"{kind}-{large}-workers-2"]["samples_per_second"] / runs[f"{kind}-{large}"]["samples_per_second"]
               for kind in ("images", "shards")}
    result = {
        "benchmark": "dataset_scale",
        "quick": args.quick,
        "machine": facts,
        "load_average_at_end": list(os.getloadavg()),
        "bundle": "zoo:mobilenet_v1_digits (MobileNet v1 0.25x, 3x32x32, parity at batch 1 and 16)",
        "dataset": {"images": large, "small": small, "made_from": f"digits held-out split ({HELDOUT} images), augmented",
                    "shard_file_rows": SHARD_FILE_ROWS, "build_seconds": round(build_seconds, 1)},
        "threads_per_worker": int(threads[1]),
        "settings": {"threads": int(threads[1])},  # per worker, as every results file records it
        "reference": "PyTorch reference.pt, batch by batch in each worker",
        "runs": runs,
        "same_report": same,
        "peak_memory_ratio_large_over_small": {kind: round(value, 3) for kind, value in memory_ratio.items()},
        "throughput_2_workers_over_1": {kind: round(value, 2) for kind, value in speedup.items()},
        "ray_run": have_ray,
    }
    result["checks"] = [
        {"name": f"peak memory {large:,} / {small:,} images ({kind})", "value": value, "target": "<= 1.1", "met": value <= 1.1}
        for kind, value in memory_ratio.items()
    ] + [{"name": f"same report: {name}", "value": float(ok), "target": "1", "met": ok} for name, ok in same.items()]
    table = "\n".join(
        f"{label:<34} {run['samples']:>7,} samples  {run['samples_per_second']:>8,.1f}/s  wall {run['wall_seconds']:>6.1f} s  "
        f"peak {run['peak_rss_mb']:>7.1f} MB" for label, run in runs.items())
    write_results(result, args.out, table)


if __name__ == "__main__":
    main()
