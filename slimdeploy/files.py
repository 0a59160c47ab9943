"""Reading user arrays and writing JSON results: one place for the messages they give.

``read_arrays`` reads an .npz (every array by name) or an .npy (one array, returned under
``default_name``) without unpickling, and turns every failure into a ``BadInputError`` that
says how to write the file. ``write_json`` writes to a file, or to stdout for ``-``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.errors import BadInputError


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
    """Write ``data`` as indented JSON to ``path``, or to stdout when ``path`` is ``-``."""
    text = json.dumps(data, indent=2, default=str)
    if str(path) == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")
