"""Parity over a whole dataset (``slimdeploy.dataset``, ``check --data FOLDER``): the streamed
report agrees with the in-memory check on the same images; one process, ``--workers 2`` and a
Ray local cluster give the same report; an interrupted run resumes; a bad image is named and
skipped or fails the run. The data is a real image folder of digits (``digits_image_folder``,
240 images, four shards of 60), checked against reference shards written once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slimdeploy.dataset import (
    DatasetOptions,
    DatasetSummary,
    Execution,
    check_dataset,
    comparable_report,
)
from slimdeploy.dataset.execute import SHARDS_DIR, Progress
from slimdeploy.errors import BadInputError, OutputExistsError
from tests.conftest import (
    DIGITS_FOLDER_IMAGES,
    DIGITS_FOLDER_SHARD,
    assert_one_line_error,
    folder_inputs,
    run_cli,
)

SHARDS = DIGITS_FOLDER_IMAGES // DIGITS_FOLDER_SHARD


def options(references: Path | None, execution: Execution | None = None) -> DatasetOptions:
    return DatasetOptions(shard_size=DIGITS_FOLDER_SHARD, references=str(references) if references else None,
                          execution=execution or Execution())


def comparable_json(report: dict[str, Any]) -> dict[str, Any]:
    """``comparable_report`` of a report read back from ``--json``."""
    report = {key: value for key, value in report.items() if key != "seconds"}
    report["dataset"] = {key: value for key, value in report["dataset"].items() if key not in DatasetSummary.RUN_FIELDS}
    return report


@pytest.fixture(scope="module")
def single(exported_bundle: Path, digits_image_folder: Path, digits_references: Path) -> Any:
    """The folder checked in this process, shard after shard."""
    return check_dataset(exported_bundle, str(digits_image_folder), options(digits_references))


def test_streamed_report_matches_the_in_memory_check(tmp_path: Path, exported_bundle: Path, digits_image_folder: Path, single: Any) -> None:
    from slimdeploy.bundle import load_bundle
    from slimdeploy.parity import check_bundle

    prep = load_bundle(exported_bundle).manifest["preprocessing"]
    inputs, labels = folder_inputs(digits_image_folder, tuple(prep["input_size"]), prep["mean"], prep["std"])
    np.savez(tmp_path / "all.npz", input=inputs, labels=labels)
    whole = check_bundle(exported_bundle, data=tmp_path / "all.npz")

    assert single.passed and whole.passed
    assert single.dataset.samples == single.samples == DIGITS_FOLDER_IMAGES and single.dataset.shards == SHARDS
    assert single.dataset.skipped == 0 and single.dataset.kind == "images"
    # Counts agree exactly; error figures to float noise (the reference ran at other batch sizes).
    assert single.task == whole.task
    assert 0.9 < single.task.accuracy_candidate <= 1.0
    for streamed, memory in zip(single.outputs, whole.outputs):
        assert (streamed.name, streamed.batch_size, streamed.elements, streamed.mismatched) == \
            (memory.name, memory.batch_size, memory.elements, memory.mismatched)
        assert streamed.max_abs == pytest.approx(memory.max_abs, rel=0.05, abs=1e-6)
        assert streamed.percentiles["p50"] <= streamed.percentiles["p99"] <= streamed.max_abs


def test_two_worker_processes_give_the_same_report(exported_bundle: Path, digits_image_folder: Path, digits_references: Path,
                                                   single: Any) -> None:
    two = check_dataset(exported_bundle, str(digits_image_folder), options(digits_references, Execution(workers=2)))
    assert two.dataset.mode == "processes" and two.dataset.workers == 2
    assert comparable_report(two) == comparable_report(single)


@pytest.mark.slow
def test_ray_local_cluster_gives_the_same_report(tmp_path: Path, exported_bundle: Path, digits_image_folder: Path,
                                                 digits_references: Path, single: Any) -> None:
    pytest.importorskip("ray", reason="Ray is not installed here (pip install 'slimdeploy[ray]'): the Ray path is not tested")
    out = tmp_path / "ray.json"
    result = run_cli("check", str(exported_bundle), "--data", str(digits_image_folder), "--references", str(digits_references),
                     "--ray", "auto", "--workers", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "ran on Ray, 2 actor(s)" in result.stdout
    # Progress goes to stderr (one line per tenth in a log), never into the report.
    assert f"checking: {DIGITS_FOLDER_IMAGES}/{DIGITS_FOLDER_IMAGES} samples" in result.stderr
    report = json.loads(out.read_text())
    assert report["dataset"]["mode"] == "ray" and report["dataset"]["workers"] == 2
    assert comparable_json(report) == json.loads(json.dumps(comparable_report(single)))


class StopAfter(Progress):
    """Interrupts a run (as Ctrl-C would) once ``shards`` shards have finished."""

    def __init__(self, shards: int) -> None:
        self.left = shards

    def advance(self, samples: int) -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_from_its_finished_shards(tmp_path: Path, exported_bundle: Path, digits_image_folder: Path,
                                                             digits_references: Path, single: Any) -> None:
    work = tmp_path / "work"
    job = options(digits_references, Execution(work_dir=str(work)))
    with pytest.raises(KeyboardInterrupt):
        check_dataset(exported_bundle, str(digits_image_folder), job, progress=StopAfter(2))
    assert len(list((work / SHARDS_DIR).glob("*.json"))) == 2

    resumed = check_dataset(exported_bundle, str(digits_image_folder), job)
    assert resumed.dataset.resumed_shards == 2
    assert comparable_report(resumed) == comparable_report(single)
    # The work folder holds this job: another one (other shard size) is refused, not mixed in.
    with pytest.raises(OutputExistsError, match="another job"):
        check_dataset(exported_bundle, str(digits_image_folder),
                      DatasetOptions(shard_size=DIGITS_FOLDER_SHARD // 2, execution=Execution(work_dir=str(work))))


@pytest.fixture(scope="module")
def folder_with_bad_image(tmp_path_factory: pytest.TempPathFactory, digits_image_folder: Path) -> Path:
    """Twenty of the digits images and, first in its class, a file that is not an image."""
    root = tmp_path_factory.mktemp("bad") / "digits"
    for label in range(2):
        (root / str(label)).mkdir(parents=True)
        for path in sorted((digits_image_folder / str(label)).iterdir())[:10]:
            shutil.copy(path, root / str(label) / path.name)
    (root / "1" / "00000-broken.png").write_bytes(b"not a PNG")
    return root


def test_a_bad_image_fails_the_run_naming_its_path(exported_bundle: Path, folder_with_bad_image: Path) -> None:
    broken = folder_with_bad_image / "1" / "00000-broken.png"
    result = run_cli("check", str(exported_bundle), "--data", str(folder_with_bad_image))
    assert_one_line_error(result, 2, str(broken), "cannot decode", "--on-bad-input skip")
    with pytest.raises(BadInputError, match=r"00000-broken\.png"):
        check_dataset(exported_bundle, str(folder_with_bad_image), DatasetOptions(on_bad="fail"))


def test_a_bad_image_is_skipped_and_listed_by_flag(exported_bundle: Path, folder_with_bad_image: Path) -> None:
    report = check_dataset(exported_bundle, str(folder_with_bad_image), DatasetOptions(on_bad="skip", shard_size=8))
    assert report.passed
    assert (report.dataset.listed, report.dataset.samples, report.dataset.skipped) == (21, 20, 1)
    (item,) = report.dataset.skipped_items
    assert item["path"] == str(folder_with_bad_image / "1" / "00000-broken.png") and item["sample"] == 10
    assert "cannot decode" in item["reason"]
    assert report.task.samples == 20


def test_a_dataset_job_with_user_code_needs_reference_shards(exported_bundle: Path, digits_image_folder: Path) -> None:
    """Dataset workers never import a factory: --arch without --references is refused first."""
    result = run_cli("check", str(exported_bundle), "--data", str(digits_image_folder), "--arch", "tests/own_models.py:gated_net")
    assert_one_line_error(result, 2, "--arch is not supported with a dataset source", "slimdeploy reference", "--references")


@pytest.mark.parametrize(("args", "fragments"), [
    (["--data", "{missing}"], ["does not exist"]),
    (["--data", "{empty}"], ["neither class sub-folders", "Fix:"]),
    (["--data", "{empty}/*.npz"], ["matches no .npz/.npy file"]),
    (["--workers", "2"], ["--workers", "add --data"]),
])
def test_bad_sources_and_options_get_one_line(tmp_path: Path, exported_bundle: Path, args: list[str], fragments: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    result = run_cli("check", str(exported_bundle), *[arg.format(**names) for arg in args])
    assert_one_line_error(result, 2, *fragments)
    assert not (tmp_path / "missing").exists()


@pytest.mark.slow
def test_reference_command_writes_shards_a_check_reads(tmp_path: Path, exported_bundle: Path, folder_with_bad_image: Path) -> None:
    """``slimdeploy reference`` writes reference shards (bad image skipped and named); a check
    against them gives the figures of a check against PyTorch; a folder it did not make is
    refused."""
    refs = tmp_path / "refs"
    result = run_cli("reference", str(exported_bundle), "--data", str(folder_with_bad_image), "--out", str(refs),
                     "--shard-size", "8", "--on-bad-input", "skip")
    assert result.returncode == 0, result.stderr
    assert "wrote PyTorch references of 20 samples" in result.stdout and "00000-broken.png" in result.stderr
    assert sorted(path.name for path in refs.glob("shard-*.npz")) == [f"shard-{i:06d}.npz" for i in range(3)]

    stored = check_dataset(exported_bundle, str(folder_with_bad_image),
                           DatasetOptions(on_bad="skip", shard_size=8, references=str(refs)))
    live = check_dataset(exported_bundle, str(folder_with_bad_image), DatasetOptions(on_bad="skip", shard_size=8))
    assert stored.reference == "reference shards" and live.reference == "torch"
    assert (stored.passed, stored.task, stored.dataset.skipped) == (live.passed, live.task, 1)
    assert [o.max_abs for o in stored.outputs] == [o.max_abs for o in live.outputs]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = run_cli("reference", str(exported_bundle), "--data", str(folder_with_bad_image), "--out", str(tmp_path / "mine"))
    assert_one_line_error(result, 2, "not empty")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
