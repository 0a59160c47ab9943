"""Giving a finished bundle its name without ever leaving the name empty.

``swap_into_place`` exchanges the new and the old directory atomically where Linux offers
``renameat2(RENAME_EXCHANGE)``; elsewhere the old bundle is renamed aside first, and
``recover_interrupted_swap`` (run by every later read or write of that name) puts it back if
the process died between the two renames.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

from slimdeploy.bundle.schema import MANIFEST
from slimdeploy.errors import BadInputError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def swap_into_place(staging: Path, out: Path) -> None:
    """Give the finished ``staging`` the name ``out``: one rename for a new name; an atomic
    exchange where the system has one; else the old bundle renamed aside first (to
    ``.NAME.old-*``, restored by ``recover_interrupted_swap`` if the process dies before the
    second rename) and deleted only once the new one is in place."""
    if not os.path.lexists(out):
        os.rename(staging, out)
        return
    if exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now the old bundle
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def exchange(first: Path, second: Path) -> bool:
    """Swap two directories' names atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``).
    False where the system or the file system does not offer it; ``OSError`` for other failures."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no renameat2 in this C library (glibc < 2.28, musl < 1.2.5?)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def recover_interrupted_swap(out: str | Path) -> Path | None:
    """Put back a bundle that a replacement interrupted between its two renames left as
    ``.NAME.old-*`` beside a missing ``NAME`` (the newest such directory holding a manifest).
    Returns the restored path, or None when there was nothing to restore."""
    out = Path(out).absolute()
    if os.path.lexists(out) or not out.parent.is_dir():
        return None
    candidates = [
        path for path in out.parent.glob(f".{out.name}.old-*")
        if path.is_dir() and not path.is_symlink() and (path / MANIFEST).is_file()
    ]
    if not candidates:
        return None
    newest = max(candidates, key=lambda path: path.stat().st_mtime)
    try:
        os.rename(newest, out)
    except OSError as exc:
        raise BadInputError(
            f"'{out}' is missing and the bundle it replaced waits in '{newest}', which cannot be renamed back "
            f"({exc.strerror}) | Fix: rename it to '{out.name}' yourself"
        ) from None
    return out
