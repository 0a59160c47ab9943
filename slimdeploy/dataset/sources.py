"""Datasets of any size as shards read a batch at a time: an image folder, array shards, one file.

    source = open_source("val/", shard_size=1000, on_bad="skip")
    source.kind, source.samples, len(source.shards)
    with ShardReader(source, facts, chunk=64, on_bad="skip") as reader:
        for batch in reader.batches(source.shards[0]):
            batch.inputs, batch.indices, batch.labels, batch.references, batch.skipped

What ``--data SOURCE`` may name:

- an image folder: one sub-folder per class, the labels being the classes' indices in sorted
  order, files found recursively in sorted order with torchvision's ImageFolder suffixes
  (``images.IMAGE_SUFFIXES``); each image preprocessed as the manifest says (``images.py``);
- a folder or a glob (``"shards/*.npz"``) of .npz/.npy files, in sorted order: each .npz holds
  ``input`` (preprocessed float32 [N, C, H, W]) and optionally ``labels`` ([N] integers) and
  reference outputs ``ref_<output>``; an .npy holds inputs only;
- one .npz/.npy file, the same layout.

A shard is a unit of work and of resumption: ``shard_size`` consecutive samples (of one array
file, or of the image list). Within a shard, samples are read ``chunk`` at a time, so memory
follows the chunk, not the shard or the dataset; every sample keeps its global index (its
position in the listing), which reports use and which stays the same however the shards are
spread over workers.

Everything read is untrusted. A whole file is bad when it lacks ``input``, has the wrong dtype
or shape, or holds arrays this bundle does not produce; a sample is bad when it holds NaN or
inf, its label is outside the model's classes, or its image does not decode. With
``on_bad="fail"`` the first one stops the run (``BadInputError`` with its path); with
``"skip"`` it is left out and listed (``BadItem``: path, row, reason).
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.dataset.arrays import ARRAY_SUFFIXES, ArrayFile
from slimdeploy.dataset.images import (
    IMAGE_SUFFIXES,
    BadImageError,
    check_image_input,
    pillow,
    read_image,
)
from slimdeploy.errors import BadInputError

ON_BAD = ("fail", "skip")
IMAGES, ARRAYS = "images", "arrays"
REFERENCE_PREFIX = "ref_"
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class BadItem:
    """A sample (or a whole file, ``row`` None) left out of the run, and why."""

    path: str
    reason: str
    sample: int = -1
    row: int | None = None

    def describe(self) -> str:
        where = self.path if self.row is None else f"{self.path} row {self.row}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class Shard:
    """``rows`` consecutive samples: rows ``start``.. of the array ``file``, or ``images``
    ((path relative to the folder, label) pairs). ``first_sample`` is the global index of the
    first."""

    index: int
    first_sample: int
    rows: int
    file: str = ""
    start: int = 0
    images: tuple[tuple[str, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "first_sample": self.first_sample, "rows": self.rows, "file": self.file,
                "start": self.start, "images": [list(item) for item in self.images]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shard:
        return cls(int(data["index"]), int(data["first_sample"]), int(data["rows"]), str(data["file"]), int(data["start"]),
                   tuple((str(path), int(label)) for path, label in data["images"]))


@dataclass
class DataSource:
    """A listed dataset: its shards, and files refused while listing (``problems``)."""

    text: str
    kind: str
    root: str
    shard_size: int
    shards: list[Shard]
    classes: list[str] = field(default_factory=list)
    problems: list[BadItem] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def samples(self) -> int:
        return sum(shard.rows for shard in self.shards)

    def describe(self) -> str:
        """``image folder 'val' (10 classes)``, ``3 array files 'shards/*.npz'``."""
        if self.kind == IMAGES:
            return f"image folder '{self.text}' ({len(self.classes)} classes)"
        files = len({shard.file for shard in self.shards})
        return f"{files} array file(s) '{self.text}'"

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "kind": self.kind, "root": self.root, "shard_size": self.shard_size,
                "shards": [shard.to_dict() for shard in self.shards], "classes": self.classes,
                "problems": [vars(item) for item in self.problems], "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSource:
        return cls(data["text"], data["kind"], data["root"], int(data["shard_size"]),
                   [Shard.from_dict(shard) for shard in data["shards"]], list(data["classes"]),
                   [BadItem(**item) for item in data["problems"]], data["fingerprint"])


def is_dataset(text: str) -> bool:
    """True when ``--data`` names a folder or a glob (streamed), not one file."""
    path = Path(text)
    return path.is_dir() or (any(c in text for c in _GLOB_CHARS) and not path.exists())


def open_source(text: str, shard_size: int, on_bad: str = "fail") -> DataSource:
    """List the dataset ``text`` names (see the module docstring) and cut it into shards of
    ``shard_size`` samples. Files refused while listing are ``problems`` (``on_bad="skip"``) or
    a ``BadInputError`` (``"fail"``)."""
    path = Path(text)
    if any(c in text for c in _GLOB_CHARS) and not path.exists():
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix.lower() in ARRAY_SUFFIXES and Path(p).is_file())
        if not files:
            raise BadInputError(f"--data '{text}' matches no .npz/.npy file | Fix: check the pattern, e.g. --data 'shards/*.npz'")
        return _array_source(text, files, shard_size, on_bad)
    if path.is_file():
        if path.suffix.lower() not in ARRAY_SUFFIXES:
            raise BadInputError(f"--data '{text}' is neither an .npz/.npy file nor a folder | Fix: pass an image folder, a "
                                "folder or glob of .npz/.npy shards, or one .npz/.npy file")
        return _array_source(text, [path], shard_size, on_bad)
    if not path.is_dir():
        raise BadInputError(f"--data '{text}' does not exist | Fix: check the path")
    entries = sorted(os.scandir(path), key=lambda entry: entry.name)
    arrays = [Path(e.path) for e in entries if e.is_file() and Path(e.name).suffix.lower() in ARRAY_SUFFIXES]
    classes = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    if arrays and classes:
        raise BadInputError(f"--data '{text}' holds both .npz/.npy files and sub-folders | Note: a folder is either an image "
                            "folder (one sub-folder per class) or a folder of array shards | Fix: separate them")
    if arrays:
        return _array_source(text, arrays, shard_size, on_bad)
    if not classes:
        raise BadInputError(f"--data '{text}' holds neither class sub-folders of images nor .npz/.npy files | Fix: pass an "
                            "image folder (one sub-folder per class) or a folder of .npz/.npy shards")
    return _image_source(text, path, classes, shard_size)


def _array_source(text: str, files: Sequence[Path], shard_size: int, on_bad: str) -> DataSource:
    shards: list[Shard] = []
    problems: list[BadItem] = []
    digest = hashlib.sha256(f"{ARRAYS}:{shard_size}".encode())
    first = 0
    for file in files:
        try:
            with ArrayFile(file) as arrays:
                info = arrays.members.get("input")
        except BadInputError as exc:
            problems.append(_refused(BadItem(str(file), str(exc).split(" | ")[0]), on_bad, exc))
            continue
        if info is None or not info.shape:
            item = BadItem(str(file), f"no array 'input' of samples (has {sorted(arrays.members)})")
            problems.append(_refused(item, on_bad))
            continue
        _stamp(digest, file)
        for start in range(0, info.rows, shard_size):
            rows = min(shard_size, info.rows - start)
            shards.append(Shard(len(shards), first, rows, file=str(file), start=start))
            first += rows
    if not shards:
        raise BadInputError(f"--data '{text}' holds no samples ({len(problems)} file(s) refused"
                            + (f", first: {problems[0].describe()}" if problems else "") + ") | Fix: check the files")
    return DataSource(text, ARRAYS, "", shard_size, shards, problems=problems, fingerprint=digest.hexdigest())


def _image_source(text: str, root: Path, classes: list[str], shard_size: int) -> DataSource:
    items: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        before = len(items)
        for directory, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for filename in sorted(filenames):
                if Path(filename).suffix.lower() in IMAGE_SUFFIXES:
                    items.append((str((Path(directory) / filename).relative_to(root)), label))
        if len(items) == before:
            empty.append(name)
    if empty:
        raise BadInputError(f"image folder '{text}': class folder(s) {empty[:5]} hold no image ({'/'.join(IMAGE_SUFFIXES)}) | "
                            "Fix: remove the empty class folders, or add their images")
    digest = hashlib.sha256(f"{IMAGES}:{shard_size}:{classes}".encode())
    for relative, _ in items:
        digest.update(relative.encode())
        _stamp(digest, root / relative)
    shards = [
        Shard(index, start, len(items[start:start + shard_size]), images=tuple(items[start:start + shard_size]))
        for index, start in enumerate(range(0, len(items), shard_size))
    ]
    return DataSource(text, IMAGES, str(root), shard_size, shards, classes=classes, fingerprint=digest.hexdigest())


def _stamp(digest: Any, path: Path) -> None:
    """Fold a file's name, size and modification time into ``digest`` (what resuming compares)."""
    try:
        info = os.stat(path)
        digest.update(f"{path}:{info.st_size}:{info.st_mtime_ns}".encode())
    except OSError:
        digest.update(f"{path}:missing".encode())


def _refused(item: BadItem, on_bad: str, cause: BaseException | None = None) -> BadItem:
    """``item`` when bad inputs are skipped; ``BadInputError`` naming it when they fail the run."""
    if on_bad == "fail":
        raise BadInputError(f"bad input {item.describe()} | Fix: fix or remove it, or pass --on-bad-input skip to leave "
                            "such inputs out (each is listed in the report)") from cause
    return item


@dataclass(frozen=True)
class BundleFacts:
    """What reading needs to know of the bundle: the input's (C, H, W), preprocessing, the
    outputs' dtypes and fixed dims, and the number of classes (the logits' width)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    outputs: dict[str, tuple[str, tuple[Any, ...]]]
    classes: int | None

    @classmethod
    def of(cls, bundle: Any) -> BundleFacts:
        prep = bundle.manifest["preprocessing"]
        outputs = {spec.name: (spec.dtype, tuple(spec.shape)) for spec in bundle.spec.outputs}
        logits = outputs.get("logits")
        classes = logits[1][1] if logits and len(logits[1]) == 2 and isinstance(logits[1][1], int) else None
        return cls(tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"]), outputs, classes)


@dataclass
class Batch:
    """Up to ``chunk`` samples of one shard: preprocessed inputs, their global indices, labels
    and stored references where the data has them, and the samples left out."""

    inputs: np.ndarray
    indices: np.ndarray
    labels: np.ndarray | None = None
    references: dict[str, np.ndarray] | None = None
    skipped: list[BadItem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inputs)


class ShardReader:
    """Reads the shards of a source a chunk at a time, validating every sample (see the module
    docstring). Use as a context manager."""

    def __init__(self, source: DataSource, facts: BundleFacts, chunk: int, on_bad: str = "fail") -> None:
        self.source, self.facts, self.chunk, self.on_bad = source, facts, chunk, on_bad
        self._mean = np.asarray(facts.mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(facts.std, dtype=np.float32).reshape(-1, 1, 1)
        self._image_module = None
        if source.kind == IMAGES:
            check_image_input(facts.input_size)
            self._image_module = pillow()
            if facts.classes is not None and len(source.classes) > facts.classes:
                raise BadInputError(f"image folder '{source.text}' has {len(source.classes)} classes but the model tells "
                                    f"{facts.classes} apart | Fix: point --data at a folder of this model's classes")

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def batches(self, shard: Shard) -> Iterator[Batch]:
        """The shard's samples, ``chunk`` at a time (bad ones left out and listed, or raised)."""
        if self.source.kind == IMAGES:
            yield from self._image_batches(shard)
        else:
            yield from self._array_batches(shard)

    def _image_batches(self, shard: Shard) -> Iterator[Batch]:
        root = Path(self.source.root)
        for offset in range(0, shard.rows, self.chunk):
            inputs, indices, labels, skipped = [], [], [], []
            for position, (relative, label) in enumerate(shard.images[offset:offset + self.chunk], shard.first_sample + offset):
                try:
                    inputs.append(read_image(root / relative, self.facts.input_size, self._mean, self._std, self._image_module))
                except BadImageError as exc:
                    skipped.append(_refused(BadItem(str(root / relative), str(exc), sample=position), self.on_bad))
                    continue
                indices.append(position)
                labels.append(label)
            shape = (0, *self.facts.input_size)
            yield Batch(np.stack(inputs) if inputs else np.zeros(shape, np.float32), np.asarray(indices, np.int64),
                        np.asarray(labels, np.int64), None, skipped)

    def _array_batches(self, shard: Shard) -> Iterator[Batch]:
        with ArrayFile(shard.file) as arrays:
            problem = self._file_problem(arrays)
            if problem:
                item = _refused(BadItem(shard.file, problem, sample=shard.first_sample), self.on_bad)
                yield Batch(np.zeros((0, *self.facts.input_size), np.float32), np.zeros(0, np.int64), skipped=[item])
                return
            references = [name for name in arrays.members if name.startswith(REFERENCE_PREFIX)]
            for offset in range(0, shard.rows, self.chunk):
                start = shard.start + offset
                stop = start + min(self.chunk, shard.rows - offset)
                inputs = arrays.read("input", start, stop)
                labels = arrays.read("labels", start, stop) if "labels" in arrays.members else None
                refs = {name[len(REFERENCE_PREFIX):]: arrays.read(name, start, stop) for name in references} or None
                indices = np.arange(stop - start, dtype=np.int64) + shard.first_sample + offset
                keep, skipped = self._good_rows(shard, start, inputs, labels, refs)
                yield Batch(inputs[keep], indices[keep], None if labels is None else labels[keep].astype(np.int64),
                            None if refs is None else {name: value[keep] for name, value in refs.items()}, skipped)

    def _file_problem(self, arrays: ArrayFile) -> str:
        """Why a whole array file cannot be read for this bundle ("" when it can)."""
        members = arrays.members
        info = members.get("input")
        if info is None or not info.shape:
            return f"no array 'input' of samples (has {sorted(members)})"
        if info.dtype != np.float32 or info.shape[1:] != self.facts.input_size:
            return (f"'input' is {info.dtype} {list(info.shape)}, expected float32 [N, "
                    f"{', '.join(map(str, self.facts.input_size))}] (preprocessed like the model's inputs)")
        labels = members.get("labels")
        if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (info.rows,)):
            return f"'labels' is {labels.dtype} {list(labels.shape)}, expected {info.rows} integer class indices"
        given = {name[len(REFERENCE_PREFIX):]: meta for name, meta in members.items() if name.startswith(REFERENCE_PREFIX)}
        if given:
            unknown = sorted(set(given) - set(self.facts.outputs))
            missing = sorted(set(self.facts.outputs) - set(given))
            if unknown or missing:
                return (f"reference arrays do not match the bundle's outputs {sorted(self.facts.outputs)}"
                        + (f": unknown {unknown}" if unknown else "") + (f": missing {missing}" if missing else ""))
            for name, meta in given.items():
                _, shape = self.facts.outputs[name]
                fixed = all(isinstance(want, str) or got == want for got, want in zip(meta.shape, shape))
                if meta.dtype.kind not in "biuf" or len(meta.shape) != len(shape) or meta.rows != info.rows or not fixed:
                    return f"'ref_{name}' is {meta.dtype} {list(meta.shape)}, expected {info.rows} rows shaped {list(shape)}"
        extra = sorted(set(members) - {"input", "labels"} - {f"{REFERENCE_PREFIX}{n}" for n in given})
        if extra:
            return f"unexpected array(s) {extra} | Note: expected input, labels and ref_<output>"
        return ""

    def _good_rows(
        self,
        shard: Shard,
        start: int,
        inputs: np.ndarray,
        labels: np.ndarray | None,
        references: dict[str, np.ndarray] | None,
    ) -> tuple[np.ndarray, list[BadItem]]:
        """Which rows of a chunk are usable, and the others as ``BadItem`` (or raised)."""
        reasons: dict[int, str] = {}
        finite = np.isfinite(inputs.reshape(len(inputs), -1)).all(axis=1)
        for row in np.flatnonzero(~finite):
            reasons.setdefault(int(row), "input holds NaN or inf")
        if labels is not None and self.facts.classes is not None:
            for row in np.flatnonzero((labels < 0) | (labels >= self.facts.classes)):
                reasons.setdefault(int(row), f"label {int(labels[row])} is not a class of this model (0..{self.facts.classes - 1})")
        for name, value in (references or {}).items():
            array = value.reshape(len(value), -1)
            if array.dtype.kind == "f":
                for row in np.flatnonzero(~np.isfinite(array).all(axis=1)):
                    reasons.setdefault(int(row), f"reference '{name}' holds NaN or inf")
        skipped = [
            _refused(BadItem(shard.file, reason, sample=shard.first_sample + start - shard.start + row, row=start + row), self.on_bad)
            for row, reason in sorted(reasons.items())
        ]
        keep = np.ones(len(inputs), dtype=bool)
        keep[list(reasons)] = False
        return keep, skipped
