"""Running a job's shards: in this process, on local worker processes, or on Ray.

    answers = run_shards(spec, shards, Execution(workers=2, work_dir="runs/val"), progress)

Every mode runs the same ``job.ShardWorker`` on the same shards and hands back one answer per
shard; the caller merges them (exactly: ``accumulate.py``), so the report does not depend on
the mode, the number of workers or the order answers came back.

- ``workers == 1`` and no Ray: one worker in this process.
- ``workers > 1``: a pool of local processes (``concurrent.futures``, spawned), one worker
  (one loaded bundle) per process.
- ``ray``: Ray Data batch inference. The shards are a Ray dataset; ``map_batches`` sends them,
  one per call, to a fixed pool of ``workers`` actors, each holding a ``ShardWorker`` (a staged
  bundle runs its controller inside the actor). ``"auto"`` connects to the cluster Ray finds
  (``RAY_ADDRESS``, or one started on this machine) or starts a local one; anything else is
  the address of a cluster (``ray://head:10001``), whose nodes must reach the bundle and the
  data at the same paths.

Answers are written per shard under ``work_dir`` (``ResultStore``) as they come back, so an
interrupted run started again with the same ``work_dir`` redoes only the shards that had not
finished (in any mode). A shard whose worker crashed or died is tried again, up to ``retries``
more times (a new process pool when a process died); a domain error (a bad input with
``--on-bad-input fail``) stops the run at once, with its exit code.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimdeploy.dataset.job import ShardWorker
from slimdeploy.dataset.sources import Shard
from slimdeploy.errors import (
    BackendUnavailableError,
    BadInputError,
    OutputExistsError,
    SlimDeployError,
)
from slimdeploy.files import atomic_output, output_error

JOB_FILE = "job.json"
SHARDS_DIR = "shards"
RAY_HINT = "pip install 'slimdeploy[ray]'"


class ShardError(SlimDeployError):
    """A shard failed in a worker; carries the worker's exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Execution:
    """Where and how shards run (see the module docstring).

    Attributes:
        workers: worker processes or Ray actors. Defaults to 1 (this process).
        ray: ``"auto"`` or a cluster address; None runs without Ray. Defaults to None.
        work_dir: folder for per-shard results (resumable); None keeps them in memory.
            Defaults to None.
        force: replace a ``work_dir`` that holds another job's results. Defaults to False.
        retries: further tries of a shard whose worker crashed. Defaults to 2.
    """

    workers: int = 1
    ray: str | None = None
    work_dir: str | None = None
    force: bool = False
    retries: int = 2

    @property
    def mode(self) -> str:
        """``ray``, ``processes`` or ``in-process``."""
        return "ray" if self.ray else "processes" if self.workers > 1 else "in-process"


class ResultStore:
    """Per-shard answers of one job, on disk under ``work_dir`` (or in memory without one).

    ``work_dir/job.json`` records the job (bundle, data, options that change results); a
    folder holding another job's record is refused unless ``force``, which replaces only what
    slimdeploy wrote there (``job.json`` and ``shards/``); a folder holding anything else is
    refused. Answers are ``shards/NNNNNN.json``, each written atomically.
    """

    def __init__(self, work_dir: str | None, job: Mapping[str, Any], force: bool = False) -> None:
        self.root = Path(work_dir) if work_dir else None
        self.memory: dict[int, dict[str, Any]] = {}
        self.resumed = 0
        if self.root is None:
            return
        record = self.root / JOB_FILE
        if self.root.exists() and not self.root.is_dir():
            raise BadInputError(f"--work-dir '{self.root}' is a file | Fix: name a folder (new, or one an earlier run of this job used)")
        if record.is_file():
            if self._read_json(record) != json.loads(json.dumps(job)):
                if not force:
                    raise OutputExistsError(f"--work-dir '{self.root}' holds the results of another job (other bundle, data or "
                                            "options) | Fix: choose another --work-dir, or pass --force to replace them")
                record.unlink()
                shutil.rmtree(self.root / SHARDS_DIR, ignore_errors=True)
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise BadInputError(f"--work-dir '{self.root}' is not empty and holds no {JOB_FILE} | Note: slimdeploy writes only "
                                "into a new folder or one it made | Fix: choose a new folder")
        try:
            (self.root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(self.root, exc) from None
        if not record.is_file():
            with atomic_output(record) as tmp:
                tmp.write_text(json.dumps(job, indent=1) + "\n")

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    def finished(self, check: Callable[[dict[str, Any]], bool]) -> dict[int, dict[str, Any]]:
        """Answers already on disk that ``check`` accepts (unreadable ones are redone)."""
        if self.root is None:
            return {}
        done = {}
        for path in sorted((self.root / SHARDS_DIR).glob("*.json")):
            data = self._read_json(path)
            if isinstance(data, dict) and isinstance(data.get("shard"), int) and path.stem == f"{data['shard']:06d}":
                try:
                    accepted = check(data)
                except (KeyError, TypeError, ValueError, AttributeError):
                    accepted = False
                if accepted:
                    done[data["shard"]] = data
        self.resumed = len(done)
        return done

    def put(self, answer: dict[str, Any]) -> None:
        if self.root is None:
            return
        with atomic_output(self.root / SHARDS_DIR / f"{answer['shard']:06d}.json") as tmp:
            tmp.write_text(json.dumps(answer))


class Progress:
    """What ``run_shards`` tells as it goes (the CLI shows a progress bar); silent here."""

    def start(self, total: int, done: int) -> None:
        """``total`` samples in the job, ``done`` of them finished by an earlier run."""

    def advance(self, samples: int) -> None:
        """``samples`` more finished."""


def run_shards(
    spec: Mapping[str, Any],
    shards: Sequence[Shard],
    execution: Execution,
    store: ResultStore,
    accept: Callable[[dict[str, Any]], bool],
    on_answer: Callable[[dict[str, Any]], None],
    progress: Progress | None = None,
) -> int:
    """Run every shard not already in ``store``; ``on_answer`` gets each successful answer
    (earlier runs' first). Returns the number of shards retried.

    Args:
        spec: the job (``job.ShardWorker``).
        shards: all shards of the job.
        execution: where they run.
        store: per-shard answers (resumable with a work dir).
        accept: whether an answer found on disk can be used (it is untrusted).
        on_answer: called with each answer.
        progress: told the samples done. Defaults to silence.
    """
    progress = progress or Progress()
    done = store.finished(accept)
    for answer in done.values():
        on_answer(answer)
    pending = [shard for shard in shards if shard.index not in done]
    progress.start(sum(s.rows for s in shards), sum(s.rows for s in shards if s.index in done))
    tries: dict[int, int] = {}
    retried = 0
    while pending:
        failed: dict[int, str] = {}
        for answer in _answers(spec, pending, execution):
            index = int(answer["shard"])
            if answer["ok"]:
                store.put(answer)
                on_answer(answer)
                progress.advance(next(s.rows for s in pending if s.index == index))
            elif not answer.get("retry"):
                raise _domain_error(str(answer["error"]), int(answer.get("exit_code", 2)))
            else:
                failed[index] = str(answer["error"])
        for index in failed:
            tries[index] = tries.get(index, 0) + 1
        exhausted = [index for index in failed if tries[index] > execution.retries]
        if exhausted:
            raise ShardError(f"shard {exhausted[0]} failed {tries[exhausted[0]]} time(s): {failed[exhausted[0]]} | Fix: "
                             "check the worker's machine (memory, disk); finished shards are kept with --work-dir, so "
                             "running the same command again continues from them")
        retried += len(failed)
        pending = [shard for shard in pending if shard.index in failed]
    return retried


def _domain_error(message: str, exit_code: int) -> SlimDeployError:
    """A worker's domain error raised here as its own kind (bad input, backend unavailable),
    so that callers catch it as they would in one process."""
    if exit_code == BadInputError.exit_code:
        return BadInputError(message)
    if exit_code == BackendUnavailableError.exit_code:
        return BackendUnavailableError(message)
    return ShardError(message, exit_code)


def _answers(spec: Mapping[str, Any], shards: Sequence[Shard], execution: Execution) -> Iterator[dict[str, Any]]:
    if execution.ray:
        yield from _ray_answers(spec, shards, execution)
    elif execution.workers > 1:
        yield from _process_answers(spec, shards, execution.workers)
    else:
        worker = ShardWorker(spec)
        try:
            for shard in shards:
                yield worker.run(shard.to_dict())
        finally:
            worker.close()


# -- local processes -------------------------------------------------------------------------
_WORKER: ShardWorker | None = None


def _start_worker(spec: Mapping[str, Any]) -> None:
    global _WORKER
    _WORKER = ShardWorker(spec)


def _run_in_worker(shard: dict[str, Any]) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER.run(shard)


def _process_answers(spec: Mapping[str, Any], shards: Sequence[Shard], workers: int) -> Iterator[dict[str, Any]]:
    """Answers from a pool of spawned processes; a shard whose process died is answered as a
    crash (retried by the caller in a new pool)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # no fork of a process that holds runtime threads
    with ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=context, initializer=_start_worker,
                             initargs=(dict(spec),)) as pool:
        futures = {pool.submit(_run_in_worker, shard.to_dict()): shard for shard in shards}
        for future in as_completed(futures):
            shard = futures[future]
            try:
                yield future.result()
            except Exception as exc:  # BrokenProcessPool: a worker died (killed, out of memory)
                yield {"shard": shard.index, "ok": False, "retry": True,
                       "error": f"shard {shard.index}: worker process failed ({type(exc).__name__}: {exc})"}


# -- Ray -------------------------------------------------------------------------------------
class RayShardWorker:
    """The actor of Ray Data's ``map_batches``: one ``ShardWorker`` per actor; each call gets a
    batch of shard descriptions (JSON) and answers each (JSON)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.worker = ShardWorker(spec)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        answers = [json.dumps(self.worker.run(json.loads(str(text)))) for text in batch["shard"]]
        return {"answer": np.asarray(answers)}


def connect_ray(address: str, workers: int, cpus_per_worker: int) -> Any:
    """Ray, initialised (``auto``: the cluster Ray finds, or a local one sized for the workers;
    else the cluster at ``address``); exit 3 without Ray, exit 2 when the cluster has fewer CPUs
    than the workers need (they would wait forever)."""
    from slimdeploy._optional import is_available

    if not is_available("ray"):
        raise BackendUnavailableError(f"--ray needs Ray, which is not installed here | Fix: {RAY_HINT} (or leave out --ray: "
                                      "--workers N runs local processes)")
    import ray

    if not ray.is_initialized():
        settings: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if address == "auto" and not os.environ.get("RAY_ADDRESS"):
            settings["num_cpus"] = max(os.cpu_count() or 1, workers * cpus_per_worker)
        else:
            settings["address"] = None if address == "auto" else address
        try:
            ray.init(**settings)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BadInputError(f"--ray {address}: cannot reach a Ray cluster ({exc}) | Fix: check the address "
                                "(ray://HEAD:10001 or HEAD:6379), or pass --ray auto for a local cluster") from None
    have = float(ray.cluster_resources().get("CPU", 0))
    if have < workers * cpus_per_worker:
        raise BadInputError(f"the Ray cluster has {have:g} CPUs but --workers {workers} x {cpus_per_worker} CPU(s) each need "
                            f"{workers * cpus_per_worker} | Fix: pass fewer --workers or --threads, or add nodes")
    return ray


def _ray_answers(spec: Mapping[str, Any], shards: Sequence[Shard], execution: Execution) -> Iterator[dict[str, Any]]:
    """Answers from Ray Data: the shards as a dataset, ``map_batches`` over a fixed pool of
    ``RayShardWorker`` actors (one shard per call)."""
    cpus = max(1, int(spec["threads"]))
    ray = connect_ray(str(execution.ray), execution.workers, cpus)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    dataset = ray.data.from_items([{"shard": json.dumps(shard.to_dict())} for shard in shards],
                                  override_num_blocks=len(shards))
    answers = dataset.map_batches(
        RayShardWorker, fn_constructor_kwargs={"spec": dict(spec)}, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(execution.workers, len(shards))), num_cpus=cpus,
    )
    seen = set()
    try:
        for row in answers.iter_rows():
            answer = json.loads(str(row["answer"]))
            seen.add(answer["shard"])
            yield answer
    except Exception as exc:  # an actor that could not start, a lost node: retry what is left
        for shard in shards:
            if shard.index not in seen:
                yield {"shard": shard.index, "ok": False, "retry": True,
                       "error": f"shard {shard.index}: Ray job failed ({type(exc).__name__}: {str(exc)[:300]})"}
