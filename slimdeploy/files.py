"""Reading user arrays and writing results: one place for the messages they give.

``read_arrays`` reads an .npz (every array by name) or an .npy (one array, returned under
``default_name``) without unpickling, and turns every failure into a ``BadInputError`` that
says how to write the file. ``write_json`` writes to a file, or to stdout for ``-``.

Outputs lose nothing: ``check_output_file`` and ``check_writable_location`` are called before
the long work (the folder exists, or can be made, and takes a file), ``atomic_output`` writes
beside the target and renames into place only when complete, and every ``OSError`` (a
read-only folder, a full disk) becomes a ``BadInputError`` (exit 2) naming the path.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.errors import BadInputError, OutputExistsError

STDOUT = "-"


def read_arrays(path: str | Path, default_name: str = "input") -> dict[str, np.ndarray]:
    """Arrays of an .npz by name, or the array of an .npy under ``default_name``.

    Args:
        path: the file.
        default_name: key for the array of an .npy file. Defaults to ``"input"``.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"data file '{path}' does not exist | Fix: check the path")
    try:
        if path.suffix == ".npy":
            return {default_name: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("not an .npz archive")
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise BadInputError(
            f"cannot read '{path}' as .npz/.npy ({exc}) | Fix: save it with numpy.savez(path, input=x, labels=y)"
        ) from exc


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON to ``path`` (atomically), or to stdout when ``path`` is ``-``."""
    text = json.dumps(data, indent=2, default=str)
    if str(path) == STDOUT:
        print(text)
    else:
        with atomic_output(path) as tmp:
            tmp.write_text(text + "\n")


def output_error(path: str | Path, exc: OSError) -> BadInputError:
    """The one-line error for an ``OSError`` met writing ``path``, with the fix for its cause."""
    fixes = {
        errno.ENOSPC: "free some space, or write somewhere else",
        errno.EDQUOT: "free some space, or write somewhere else",
        errno.EROFS: "the file system is read-only: write somewhere else",
        errno.EACCES: "write to a folder you may write to, or change its permissions",
        errno.EPERM: "write to a folder you may write to, or change its permissions",
        errno.ENOENT: "create the folder first, or choose another path",
        errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    }
    reason = exc.strerror or str(exc)
    return BadInputError(f"cannot write '{path}': {reason} | Fix: {fixes.get(exc.errno or 0, 'choose another path')}")


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    current = path.absolute()
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    return current


def check_writable_location(path: str | Path, make_parents: bool = True) -> None:
    """``BadInputError`` unless ``path`` can be created: its folder exists (or, with
    ``make_parents``, its closest existing ancestor is a folder) and takes a new file (tried
    with a probe file, removed at once: permission bits do not show a read-only mount or root's
    rights). Nothing is left behind."""
    parent = Path(path).absolute().parent
    if not make_parents and not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise BadInputError(f"cannot write '{path}': the folder '{parent}' {what} | Fix: create it first, or choose another path")
    existing = nearest_existing(parent)
    if not existing.is_dir():
        raise BadInputError(f"cannot write '{path}': '{existing}' is a file, not a folder | Fix: choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".slimdeploy-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise output_error(path, exc) from None


def check_output_file(path: str | Path | None, option: str, force: bool = True) -> None:
    """Before the long work: ``path`` (a result file named by ``option``) can be written. An
    existing file is replaced only with ``force``; a folder never. ``-`` (stdout) and None pass."""
    if path is None or str(path) == STDOUT:
        return
    target = Path(path)
    if target.is_dir():
        raise BadInputError(f"{option} '{target}' is a folder | Fix: name a file, e.g. {option} {target / 'out'}")
    if os.path.lexists(target) and not force:
        raise OutputExistsError(f"'{target}' already exists | Fix: choose another {option}, or pass --force")
    check_writable_location(target, make_parents=False)


def check_free_space(directory: str | Path, needed: int, path: str | Path) -> None:
    """``BadInputError`` when ``directory``'s file system has less than ``needed`` bytes free
    (checked before writing ``path``, so that a full disk stops nothing half-way)."""
    try:
        free = shutil.disk_usage(nearest_existing(Path(directory))).free
    except OSError:
        return  # no figure: the write itself will say
    if free < needed:
        raise BadInputError(
            f"cannot write '{path}': it needs about {needed / 1e6:.1f} MB and {free / 1e6:.1f} MB are free | Fix: free "
            "some space, or write somewhere else"
        )


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; renamed over ``path`` when the block completes,
    removed if it fails. ``OSError`` becomes a ``BadInputError`` naming ``path``."""
    target = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.absolute().parent)
        os.close(fd)
    except OSError as exc:
        raise output_error(target, exc) from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise output_error(target, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (mkstemp makes files private; results get the usual permissions)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
