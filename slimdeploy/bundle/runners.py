"""Running a loaded bundle: ``bundle_runner`` (its graphs or engines) and ``reference_runner``
(its PyTorch weights). Every file they open comes through ``Bundle.file``: listed, verified,
inside the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimdeploy.bundle.reader import OPENVINO, TENSORRT, Bundle
from slimdeploy.errors import BundleError

# The transform that marks a network whose decisions were discovered (recipes.discovered).
DISCOVER = "discover"
# --device auto: the bundle's default CPU runtime (manifest ``runtime``, chosen at export).
AUTO = "auto"


def resolve_device(bundle: Bundle, device: str) -> str:
    """``device`` itself, or for ``"auto"`` the bundle's default CPU runtime: ``"openvino"``
    where the export found OpenVINO faster (manifest ``runtime.default``, ``export.runtime``)
    and it is installed here, else ``"cpu"`` (ONNX Runtime)."""
    if device != AUTO:
        return device
    return OPENVINO if _prefers_openvino(bundle) and _openvino_here() else "cpu"


def device_note(bundle: Bundle, device: str) -> str | None:
    """One line for the user when ``--device auto`` follows (or cannot follow) a bundle's
    default runtime other than ONNX Runtime; None otherwise."""
    if device != AUTO or not _prefers_openvino(bundle):
        return None
    if _openvino_here():
        return ("running on OpenVINO, this bundle's default CPU runtime (faster than ONNX Runtime when it was exported: "
                "manifest runtime) | Note: --device cpu runs ONNX Runtime")
    return ("this bundle runs fastest on OpenVINO (measured when it was exported), which is not installed here: running on "
            "ONNX Runtime | Fix: pip install 'slimdeploy[openvino]'")


def _prefers_openvino(bundle: Bundle) -> bool:
    return (bundle.manifest.get("runtime") or {}).get("default") == OPENVINO


def _openvino_here() -> bool:
    from slimdeploy.engines.openvino_runner import is_available

    return is_available()


def bundle_runner(bundle: Bundle, device: str = "cpu", threads: int = 0, replay: bool = False) -> Any:
    """The runner that executes this bundle: ONNX Runtime on its graph, or the staged
    controller over one ONNX Runtime session per piece; with ``device="tensorrt"``, the same
    over the TensorRT engines that ``slimdeploy build`` recorded in the manifest.

    Args:
        bundle: a loaded bundle.
        device: ``"cpu"`` or ``"cuda"`` (ONNX Runtime), ``"openvino"`` (the same graphs on
            OpenVINO's CPU plugin), ``"tensorrt"``, or ``"auto"`` (the bundle's default CPU
            runtime, ``resolve_device``). Defaults to ``"cpu"``.
        threads: intra-op threads; 0 lets ONNX Runtime choose. Defaults to 0.
        replay: staged bundles only: take gate decisions from the feed. Defaults to False.
    """
    from slimdeploy.engines.factory import make_runner

    device = resolve_device(bundle, device)
    manifest = bundle.manifest
    graphs: dict[str, Path] = {graph["name"]: bundle.file(graph["file"]) for graph in bundle.graphs}
    backend, batch_range = "onnxruntime", None
    if device == TENSORRT:
        from slimdeploy.engines.trt_build import engine_batch_range, is_available

        build = manifest.get("trt") or {}
        engines = build.get("engines")
        if not is_available():  # say so first: building engines here would fail the same way
            from slimdeploy._optional import INSTALL_HINTS
            from slimdeploy.errors import BackendUnavailableError

            held = f"it holds {len(engines)} engine(s) built elsewhere" if engines else "it holds no engines yet"
            raise BackendUnavailableError(
                f"--device tensorrt: TensorRT is not installed here ({held}) | Note: engines run, and are built, on "
                f"the GPU machine they are for | Fix: run this on that machine (slimdeploy build {bundle.path} first if "
                f"needed), check the ONNX graphs here without --device, or install TensorRT: {INSTALL_HINTS['tensorrt']}"
            )
        if not engines:
            raise BundleError(
                f"bundle '{bundle.path}' has no TensorRT engines | Fix: build them on this machine with "
                f"slimdeploy build {bundle.path}"
            )
        graphs = {name: bundle.file(file) for name, file in engines.items()}
        backend = TENSORRT
        batch_range = engine_batch_range(build)
    elif device == OPENVINO:
        backend, device = OPENVINO, "cpu"
    return make_runner(
        graphs,
        manifest["dynamic"],
        bundle.input_meta("input"),
        plan=manifest.get("gating") or manifest.get("exits") or None,
        decision_defaults=manifest["decisions"]["thresholds"],
        device=device,
        threads=threads,
        replay=replay,
        backend=backend,
        batch_range=batch_range,
    )


def reference_runner(bundle: Bundle, threads: int = 0, arch: str | None = None) -> Any:
    """A ``TorchRunner`` over the bundle's ``reference.pt`` (needs torch); raises
    ``BundleError`` when the bundle carries no reference weights.

    Args:
        bundle: a loaded bundle.
        threads: torch intra-op threads; 0 keeps torch's setting. Defaults to 0.
        arch: the factory that builds a model of the user's code (``module.path:factory`` or
            ``file.py:factory``, CLI ``--arch``): the bundle records it, but its code is imported
            only when the caller names it. Defaults to none (registered architectures).
    """
    from slimdeploy.engines.torch_runner import TorchRunner
    from slimdeploy.loading import load_checkpoint

    relative = bundle.manifest.get("reference_weights")
    if not relative:
        raise BundleError(
            f"bundle '{bundle.path}' carries no PyTorch reference weights | Fix: re-export without "
            "--no-reference-weights"
        )
    loaded = load_checkpoint(bundle.file(relative), arch=arch)
    module = loaded.module
    if DISCOVER in bundle.manifest["model"]["transforms"]:
        # A network built with the decision protocol: its forward with the decisions recorded
        # gives the bundle's outputs (recipes.discovered).
        from slimdeploy.discovery import discover

        module = discover(module, tuple(loaded.preprocessing.input_size))
    inputs = {name: bundle.input_meta(name) for name in bundle.input_names}
    return TorchRunner(module, inputs, bundle.output_names, threads=threads, name="torch")
