"""Lazy imports of heavy, optional dependencies.

``optional_import("torch", extra="export")`` returns the module or raises
``BackendUnavailableError`` with the install command, so a missing backend is exit code 3 with
a message, never an ImportError traceback.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
from types import ModuleType

from slimdeploy.errors import BackendUnavailableError

# How each optional module is installed. torch is pinned to the CPU wheel on purpose: a plain
# "torch" requirement pulls a multi-GB CUDA build.
INSTALL_HINTS: dict[str, str] = {
    "torch": "pip install torch==2.13.0 'slimdeploy[export]'",
    "onnxslim": "pip install 'slimdeploy[export]'",
    "onnxscript": "pip install 'slimdeploy[export]'",
    "sklearn": "pip install 'slimdeploy[export]'",
    "PIL": "pip install 'slimdeploy[images]'",
    "tensorrt": "pip install 'slimdeploy[trt]' (or use the slimdeploy TensorRT image); on a Jetson, TensorRT "
    "comes with JetPack: do not pip install it there, use docker/jetson.Dockerfile",
    "cuda": "pip install 'slimdeploy[trt]'",
    "matplotlib": "pip install 'slimdeploy[plot]'",
    "safetensors": "pip install 'slimdeploy[safetensors]'",
    "openvino": "pip install 'slimdeploy[openvino]'",
}


def is_available(name: str) -> bool:
    """True when ``name`` can be imported, checked without importing it or, for a dotted name,
    its parent packages (``cuda.bindings``: ``cuda`` is a namespace that several NVIDIA packages
    share, so the namespace alone says nothing about cuda-python)."""
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
        for part in rest:
            if spec is None or spec.submodule_search_locations is None:
                return False
            spec = importlib.machinery.PathFinder.find_spec(f"{spec.name}.{part}", list(spec.submodule_search_locations))
        return spec is not None
    except (ImportError, ValueError):
        return False


def optional_import(name: str, purpose: str = "") -> ModuleType:
    """Import ``name`` or raise ``BackendUnavailableError`` naming the install command.

    Args:
        name: module to import, e.g. ``"torch"``.
        purpose: what needed it, for the message (e.g. ``"export"``). Defaults to "".
    """
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or an installed package that fails to import (OSError...)
        top = name.split(".")[0]
        hint = INSTALL_HINTS.get(top, f"pip install {top}")
        need = f" to {purpose}" if purpose else ""
        raise BackendUnavailableError(
            f"{top} is needed{need} but cannot be imported ({exc}) | Fix: {hint}"
        ) from exc
