"""Writing a bundle so that nothing is lost: ``write_bundle``, ``update_bundle``, ``ensure_writable``.

A bundle is written into a temporary sibling directory (``.NAME.tmp-*``), its manifest is
validated against the schema the reader uses, and only then does it take the bundle's name:

- a new name: one rename;
- replacing a bundle: on Linux one ``renameat2(RENAME_EXCHANGE)`` swaps the two directories
  atomically (the old one is then deleted); elsewhere, or where the file system lacks it, the
  old bundle is renamed aside to ``.NAME.old-*`` first. If the process dies between those two
  renames, the name is empty for a moment: the next ``load_bundle`` or write of that name finds
  ``.NAME.old-*`` beside the missing ``NAME`` and puts it back (``recover_interrupted_swap``).

``--force`` replaces only what slimdeploy made: an empty directory, or a directory whose
``manifest.json`` lists every file in it (a bundle of any schema version). A project folder,
``.``, the home folder, a file or a link is refused with exit 2. The output location is checked
before the long work (``ensure_writable``); free space is checked before the first byte is
written, and every write error is exit 2 naming the path, with the old bundle untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.bundle.reader import read_manifest, sha256_file
from slimdeploy.bundle.schema import (
    MANIFEST,
    SCHEMA_VERSION,
    check_relative_path,
    validate_manifest,
)
from slimdeploy.bundle.swap import recover_interrupted_swap, swap_into_place
from slimdeploy.errors import BundleError, OutputExistsError
from slimdeploy.files import check_free_space, check_writable_location, output_error

_NOT_A_BUNDLE = ("--force replaces only a slimdeploy bundle (a directory whose manifest.json lists every file in it) "
                 "or an empty directory")


def ensure_writable(out_dir: str | Path, force: bool, expected_bytes: int = 0) -> Path:
    """Before any work: ``out_dir`` can become a bundle. Refused (exit 2): an existing
    directory without ``force``; with ``force``, anything but an empty directory or a
    slimdeploy bundle; a file or a link; a location whose folder cannot be made or written, or
    has less than ``expected_bytes`` free (``bundle_size_hint``; defaults to 0: not checked)."""
    out = Path(out_dir)
    recover_interrupted_swap(out)
    if out.is_symlink():
        raise OutputExistsError(f"'{out}' is a symbolic link | Fix: pass the directory itself, or choose another --out")
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"'{out}' exists and is not a directory | Fix: choose another --out")
        if not force:
            raise OutputExistsError(
                f"output directory '{out}' already exists | Fix: choose another --out, or pass --force to replace it"
            )
        refuse_unless_replaceable(out)
    check_writable_location(out)
    check_free_space(out.absolute().parent, expected_bytes, out)
    return out


def bundle_size_hint(checkpoint: str | Path) -> int:
    """Bytes a bundle of ``checkpoint`` takes, roughly: its weights twice (the graphs and the
    reference weights). 0 when the file cannot be read here (loading it will say why)."""
    try:
        return 2 * Path(checkpoint).stat().st_size
    except (OSError, ValueError):
        return 0


def refuse_unless_replaceable(out: Path) -> None:
    """``OutputExistsError`` unless the existing directory ``out`` is empty or a slimdeploy
    bundle holding nothing it does not list, and is neither the current directory (or one above
    it) nor the home folder."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise OutputExistsError(
            f"'{out}' is the current directory, one above it, or the home folder | Note: {_NOT_A_BUNDLE} | "
            "Fix: choose a new --out, e.g. bundles/NAME"
        )
    entries = list(out.iterdir())
    if not entries:
        return
    try:
        data = read_manifest(out)
    except BundleError:
        data = None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not isinstance(data.get("schema_version"), int):
        raise OutputExistsError(
            f"'{out}' is not a slimdeploy bundle (no valid {MANIFEST}) | Note: {_NOT_A_BUNDLE} | Fix: choose another "
            "--out, or delete the directory yourself if nothing in it is needed"
        )
    unlisted = _unlisted_entries(out, set(files))
    if unlisted:
        shown = ", ".join(unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
        raise OutputExistsError(
            f"'{out}' holds files its manifest does not list ({shown}) | Note: {_NOT_A_BUNDLE} | Fix: move them out, "
            "or choose another --out"
        )


def _unlisted_entries(root: Path, listed: set[str]) -> list[str]:
    """Files (and links, and anything not a directory) under ``root`` that are neither the
    manifest nor listed in ``files``."""
    found = []
    for directory, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            if stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            if relative != MANIFEST and relative not in listed:
                found.append(relative)
    return sorted(found)


def write_bundle(
    out_dir: str | Path,
    files: Mapping[str, bytes | Path | Mapping[str, np.ndarray]],
    manifest: dict[str, Any],
    force: bool = False,
) -> Path:
    """Write ``files`` and ``manifest`` atomically into ``out_dir``.

    Args:
        out_dir: the bundle directory to create.
        files: relative path → bytes, a file to copy, or a dict of arrays (saved as .npz).
        manifest: manifest fields; ``schema_version`` and ``files`` (sha256 of each) are added.
        force: replace an existing ``out_dir`` (only a slimdeploy bundle, see
            ``ensure_writable``). Defaults to False.

    Returns:
        The bundle path.
    """
    out = ensure_writable(out_dir, force).resolve()
    _make_parent(out)
    check_free_space(out.parent, sum(_size(content) for content in files.values()), out)
    with _staging(out) as staging:
        digests: dict[str, str] = {}
        for relative, content in files.items():
            target = _inside(staging, relative)
            if isinstance(content, bytes):
                target.write_bytes(content)
            elif isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                with open(target, "wb") as handle:
                    np.savez_compressed(handle, **content)
            digests[relative] = sha256_file(target)
        full = {"schema_version": SCHEMA_VERSION, **manifest, "files": digests}
        (staging / MANIFEST).write_text(_manifest_text(full, out))
    return out


def update_bundle(
    bundle_dir: str | Path,
    files: Mapping[str, bytes],
    manifest: dict[str, Any],
) -> Path:
    """Add or replace files of an existing bundle and rewrite its manifest, atomically: the
    bundle is copied to a temporary sibling (links refused, never copied through), changed
    there, and swapped into place (as ``write_bundle`` does), so a crash leaves the old bundle
    intact. Every path stays inside the bundle.

    Args:
        bundle_dir: the bundle directory.
        files: relative path → new content.
        manifest: the full new manifest; its ``files`` digests are updated for ``files``.

    Returns:
        The bundle path.
    """
    out = Path(bundle_dir).resolve()
    existing = sum(entry.stat().st_size for entry in out.rglob("*") if entry.is_file() and not entry.is_symlink())
    check_free_space(out.parent, existing + sum(len(content) for content in files.values()), out)
    with _staging(out) as staging:
        _copy_tree(out, staging)
        digests = dict(manifest.get("files", {}))
        for relative, content in files.items():
            target = _inside(staging, relative)
            target.write_bytes(content)
            digests[relative] = sha256_file(target)
        full = {**manifest, "files": digests}
        (staging / MANIFEST).write_text(_manifest_text(full, out))
    return out


def _manifest_text(manifest: dict[str, Any], out: Path) -> str:
    """The manifest as written, validated against the schema the reader uses (as JSON, so the
    types are the ones a reader will see)."""
    text = json.dumps(manifest, indent=2, default=_json_default) + "\n"
    validate_manifest(json.loads(text), f"the manifest of the new bundle '{out}' (a slimdeploy bug: please report it)")
    return text


def _inside(staging: Path, relative: str) -> Path:
    """``staging / relative`` for a relative path that stays inside, its folders made."""
    try:
        check_relative_path(relative)
    except ValueError as exc:
        raise BundleError(f"bundle file name: {exc}") from None
    target = staging / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _size(content: bytes | Path | Mapping[str, np.ndarray]) -> int:
    """Bytes a bundle file takes at most (arrays before compression)."""
    if isinstance(content, bytes):
        return len(content)
    if isinstance(content, Path):
        return content.stat().st_size
    return sum(np.asarray(array).nbytes for array in content.values())


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from None


def _copy_tree(source: Path, target: Path) -> None:
    """Copy a bundle directory's contents; a link is refused, never copied through."""
    for directory, dirnames, filenames in os.walk(source):
        relative = Path(directory).relative_to(source)
        for name in [*dirnames, *filenames]:
            path = Path(directory) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"'{path}' is a symbolic link; a bundle holds no links | Fix: re-export the bundle")
            if stat.S_ISDIR(mode):
                (target / relative / name).mkdir(exist_ok=True)
            elif stat.S_ISREG(mode):
                shutil.copy2(path, target / relative / name)


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` that replaces ``out`` when the block completes, and is
    removed if anything in it fails: a bundle is never seen half-written. An ``OSError`` (full
    disk, read-only folder) becomes a ``BadInputError`` naming ``out``."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise output_error(out, exc) from None
    # mkdtemp makes the directory private (0700); a bundle gets the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(staging, 0o777 & ~umask)
        yield staging
        swap_into_place(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise output_error(out, exc) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
