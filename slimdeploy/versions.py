"""Versions of slimdeploy and its backends, for manifests and ``slimdeploy env``.

Reads installed distribution metadata only: nothing heavy is imported.
"""

from __future__ import annotations

import platform
from importlib import metadata

# Distribution names to look for, per component; ONNX Runtime ships under several names.
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "onnxscript": ("onnxscript",),
    "onnxslim": ("onnxslim",),
    "numpy": ("numpy",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_libs"),
    "cuda-python": ("cuda-python", "cuda-bindings"),
    "scikit-learn": ("scikit-learn",),
}


def package_version(component: str) -> str | None:
    """Installed version of ``component`` (any of its distribution names), or None."""
    for dist in DISTRIBUTIONS.get(component, (component,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions(components: tuple[str, ...] = ("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "numpy")) -> dict[str, str | None]:
    """slimdeploy, Python and the given components' versions."""
    from slimdeploy import __version__

    found: dict[str, str | None] = {"slimdeploy": __version__, "python": platform.python_version()}
    found.update({name: package_version(name) for name in components})
    return found
