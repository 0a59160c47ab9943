"""The zoo: registered architectures and the demo checkpoints shipped with slimdeploy.

Shipped checkpoints are described by ``zoo.json`` (a JSON list, one object per checkpoint) next
to this file; the files themselves live in ``checkpoints/``. Every one is trained on the digits
``train`` split (``slimdeploy.data``) by a recipe in ``slimdeploy.zoo.train*`` and records its
top-1 accuracy on the 500-image ``heldout`` split, so a user can export a real, trained model without
bringing their own: ``slimdeploy zoo list`` prints the path of each, ready for ``export``.

Doors:
    ``list_zoo()``             the shipped checkpoints as ``ZooEntry`` objects.
    ``get_zoo_entry(name)``    one of them; unknown names raise ``UnknownZooEntryError``.
    ``zoo_checkpoint_path(name)``  the absolute path of a shipped checkpoint file.
    ``zoo_listing()``          what ``slimdeploy zoo list --json -`` prints (docs/design.md §8): one
                               dict per registered architecture and per shipped checkpoint.

This module imports without torch; only the listing of registered architectures needs it
(without torch, ``zoo_listing()`` lists the shipped checkpoints alone).
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from slimdeploy._optional import is_available
from slimdeploy.errors import BadInputError, CheckpointError

ZOO_DIR = Path(__file__).resolve().parent
INDEX_PATH = ZOO_DIR / "zoo.json"
CHECKPOINT_DIR = ZOO_DIR / "checkpoints"

# Keys every row of ``zoo_listing()`` carries, in this order (``None`` where not applicable).
LISTING_KEYS = (
    "name", "kind", "arch", "arch_args", "family", "dynamic", "input_size",
    "checkpoint", "dataset", "accuracy", "params", "description",
)


class UnknownZooEntryError(BadInputError):
    """A zoo name that is not a shipped checkpoint. Exit code 2."""


@dataclass
class ZooEntry:
    """One shipped demo checkpoint, as recorded in ``zoo.json``.

    Attributes:
        name: zoo name (``spconv_resnet20_digits``); not an architecture name.
        arch: registered architecture the checkpoint holds.
        arch_args: constructor arguments of ``arch``.
        checkpoint: file name under ``directory`` (``checkpoints/`` for shipped entries).
        dataset: what it was trained on (``"digits"``).
        accuracy: top-1 on the held-out split, in [0, 1].
        params: number of parameters.
        train_command: the command that retrains it and rewrites this entry.
        description: one line for ``zoo list``.
        family: architecture family (``"spconv"``, ``"mobilenet"``), so that listing needs no torch.
        input_size: (C, H, W) of the model input.
        metrics: further held-out figures, JSON values (a gated model's ``skip_rate``,
            ``baseline_accuracy``, ...). Defaults to {}.
        directory: folder holding ``checkpoint``; not written to ``zoo.json``. Defaults to the
            package's ``checkpoints/``.
    """

    name: str
    arch: str
    arch_args: dict[str, Any]
    checkpoint: str
    dataset: str
    accuracy: float
    params: int
    train_command: str
    description: str
    family: str = ""
    input_size: list[int] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    directory: Path = field(default=CHECKPOINT_DIR, compare=False, repr=False)

    @property
    def path(self) -> Path:
        """Absolute path of the checkpoint file."""
        return (self.directory / self.checkpoint).resolve()

    def to_dict(self) -> dict[str, Any]:
        """The entry as stored in ``zoo.json`` (without ``directory``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "directory"}

    @classmethod
    def from_dict(cls, data: dict[str, Any], directory: Path = CHECKPOINT_DIR) -> ZooEntry:
        """Build an entry from a ``zoo.json`` object; unknown keys are ignored."""
        known = {f.name for f in fields(cls)} - {"directory"}
        return cls(**{k: v for k, v in data.items() if k in known}, directory=directory)


def read_index(index_path: Path = INDEX_PATH) -> list[ZooEntry]:
    """Entries of a ``zoo.json`` file; a missing file is an empty zoo.

    Args:
        index_path: the index file. Defaults to the package's ``zoo.json``.
    """
    if not index_path.is_file():
        return []
    data = json.loads(index_path.read_text(encoding="utf-8"))
    return [ZooEntry.from_dict(item) for item in data]


def write_index(entries: list[ZooEntry], index_path: Path = INDEX_PATH) -> None:
    """Write ``zoo.json`` atomically (temporary sibling, then rename), entries sorted by name.

    Args:
        entries: the complete list of entries.
        index_path: the index file. Defaults to the package's ``zoo.json``.
    """
    text = json.dumps([e.to_dict() for e in sorted(entries, key=lambda e: e.name)], indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".zoo.", suffix=".json", dir=index_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, index_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unknown_recipe(name: str, recipes: list[str]) -> UnknownZooEntryError:
    """The error for a zoo name with no training recipe, with close matches."""
    close = difflib.get_close_matches(name, recipes, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UnknownZooEntryError(
        f"no training recipe for zoo entry '{name}' | Note: {hint}recipes: "
        f"{', '.join(sorted(recipes))} | Fix: pick one of these"
    )


def record_entry(entry: ZooEntry, shipped: bool) -> ZooEntry:
    """Replace ``entry``'s line in the package's ``zoo.json`` when it is a shipped checkpoint
    (a run written elsewhere leaves the index alone); returns the entry."""
    if shipped:
        entries = [e for e in read_index(INDEX_PATH) if e.name != entry.name]
        write_index([*entries, entry], INDEX_PATH)
    return entry


def list_zoo() -> list[ZooEntry]:
    """The shipped demo checkpoints, sorted by name."""
    return sorted(read_index(), key=lambda e: e.name)


def get_zoo_entry(name: str) -> ZooEntry:
    """The shipped checkpoint called ``name``; unknown names raise with close matches.

    Args:
        name: zoo name, e.g. ``"spconv_resnet20_digits"``.
    """
    entries = {e.name: e for e in list_zoo()}
    if name in entries:
        return entries[name]
    close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
    by_arch = [e.name for e in entries.values() if e.arch == name]
    hints = []
    if by_arch:
        shipped = ", ".join(by_arch)
        hints.append(f"'{name}' is an architecture; its shipped checkpoints are {shipped}")
    elif close:
        hints.append(f"did you mean {', '.join(close)}?")
    hints.append(f"shipped: {', '.join(sorted(entries)) or 'none'}")
    raise UnknownZooEntryError(
        f"no shipped checkpoint named '{name}' | Note: {'; '.join(hints)} "
        "| Fix: pick a name from `slimdeploy zoo list`"
    )


def zoo_checkpoint_path(name: str) -> Path:
    """Absolute path of the shipped checkpoint ``name``.

    Raises ``UnknownZooEntryError`` for unknown names and ``CheckpointError`` when the entry
    exists but its file is missing (an install without package data, or a deleted file).

    Args:
        name: zoo name, e.g. ``"mobilenet_v1_digits"``.
    """
    entry = get_zoo_entry(name)
    if not entry.path.is_file():
        raise CheckpointError(
            f"the zoo checkpoint '{name}' is listed but its file '{entry.path}' is missing "
            f"| Fix: retrain it with `{entry.train_command}`"
        )
    return entry.path


def zoo_listing(notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows for ``slimdeploy zoo list``: every shipped checkpoint, then every registered
    architecture by family (families and names in alphabetical order), each a dict with the
    keys of ``LISTING_KEYS`` (docs/design.md §8).

    ``kind`` is ``"architecture"`` or ``"checkpoint"``; ``checkpoint`` is the absolute path of
    the shipped file, or ``None`` for an architecture. Without torch the architectures are left
    out (the registry fills itself by importing the models, which import torch); so they are
    when torch is installed but fails to import, and a line saying why goes to ``notes``.

    Args:
        notes: a list that receives what was left out and why. Defaults to none.
    """
    rows: list[dict[str, Any]] = []
    archs: dict[str, Any] = {}
    names: list[str] = []
    if is_available("torch"):
        from slimdeploy.models.registry import get_arch, list_models

        try:
            names = list_models()
        except Exception as exc:  # torch installed but broken (a missing library, an ABI clash)
            if notes is not None:
                first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                notes.append(f"architectures not listed: torch is installed but cannot be imported ({first})")
        for arch_name in sorted(names, key=lambda name: (get_arch(name).family, name)):
            info = get_arch(arch_name)
            archs[arch_name] = info
            rows.append({
                "name": arch_name,
                "kind": "architecture",
                "arch": arch_name,
                "arch_args": info.default_args(),
                "family": info.family,
                "dynamic": info.dynamic,
                "input_size": list(info.input_size),
                "checkpoint": None,
                "dataset": None,
                "accuracy": None,
                "params": None,
                "description": info.description,
                "metrics": None,
            })
    checkpoints = []
    for entry in list_zoo():
        info = archs.get(entry.arch)
        checkpoints.append({
            "name": entry.name,
            "kind": "checkpoint",
            "arch": entry.arch,
            "arch_args": dict(entry.arch_args),
            "family": entry.family or (info.family if info else None),
            "dynamic": info.dynamic if info else None,
            "input_size": list(entry.input_size) if entry.input_size else None,
            "checkpoint": str(entry.path),
            "dataset": entry.dataset,
            "accuracy": entry.accuracy,
            "params": entry.params,
            "description": entry.description,
            "metrics": dict(entry.metrics),
        })
    return [*checkpoints, *rows]


__all__ = [
    "CHECKPOINT_DIR",
    "INDEX_PATH",
    "LISTING_KEYS",
    "UnknownZooEntryError",
    "ZooEntry",
    "get_zoo_entry",
    "list_zoo",
    "read_index",
    "write_index",
    "zoo_checkpoint_path",
    "zoo_listing",
]
