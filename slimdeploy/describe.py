"""What ``slimdeploy inspect`` and ``slimdeploy env`` report.

``inspect_bundle`` reads only the manifest (no torch); ``inspect_checkpoint`` loads the model
(torch) and counts parameters and MACs; ``environment`` lists backends and versions without
importing torch or tensorrt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimdeploy._optional import INSTALL_HINTS, is_available
from slimdeploy.versions import package_version


def inspect_bundle(path: str | Path) -> dict[str, Any]:
    """Summary of a bundle from its manifest (files verified)."""
    from slimdeploy.bundle import load_bundle

    bundle = load_bundle(path)
    manifest = bundle.manifest
    model = manifest["model"]
    return {
        "kind": "bundle",
        "arch": model["arch"],
        "arch_args": model["arch_args"],
        "family": model["family"],
        "params": model["params"],
        "macs": model["macs"],
        # Deploy transforms and what they folded (e.g. CondenseNet: condense, fold).
        "transforms": model.get("transforms", []),
        "folds": model.get("folds", {}),
        "target": manifest["target"],
        "precision": manifest["precision"],
        "dynamic": manifest["dynamic"],
        "opset": manifest["opset"],
        "inputs": manifest["inputs"],
        "outputs": manifest["outputs"],
        "graphs": manifest["graphs"],
        "parity": manifest["parity"],
        "preprocessing": manifest["preprocessing"],
        "versions": manifest["versions"],
        "files": manifest["files"],
        **({"tensorrt": _trt_summary(manifest["trt"])} if manifest.get("trt") else {}),
    }


def _trt_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """The TensorRT build of a bundle: batch range, and the engines once built (and where)."""
    built = plan.get("built") or {}
    return {
        "batch": plan["batch"],
        "engines": len(plan["engines"]) if plan.get("engines") else None,
        "built_with": built.get("tensorrt"),
        "engines_passed": (built.get("parity") or {}).get("passed"),
        "build_command": plan["build_command"],
    }


def inspect_checkpoint(
    path: str | Path,
    arch: str | None = None,
    arch_args: dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Summary of a checkpoint: the model it builds, its parameters, MACs and I/O."""
    from slimdeploy.flops import count_macs, count_macs_of
    from slimdeploy.loading import load_checkpoint

    loaded = load_checkpoint(path, arch=arch, arch_args=arch_args, trust_pickle=trust_pickle)
    torch = __import__("torch")
    if hasattr(loaded.module, "forward_all"):
        # Early-exit models: forward stops at the first confident stage; count every stage.
        macs = count_macs_of(loaded.module, loaded.module.forward_all, torch.zeros(1, *loaded.preprocessing.input_size))
    else:
        macs = count_macs(loaded.module, loaded.preprocessing.input_size)
    with torch.inference_mode():
        out = loaded.module(torch.zeros(1, *loaded.preprocessing.input_size))
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return {
        "kind": "checkpoint",
        "arch": loaded.arch,
        "arch_args": loaded.arch_args,
        "params": macs.params,
        "macs": macs.macs,
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", *loaded.preprocessing.input_size]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", int(logits.shape[1])]}],
        "preprocessing": loaded.preprocessing.to_dict(),
        "meta": loaded.meta,
        "notes": loaded.notes,
        "per_layer_macs": macs.per_layer,
    }


def environment() -> list[dict[str, Any]]:
    """One row per component: name, version, available, and the reason when it is not."""
    rows: list[dict[str, Any]] = []
    for name, module, purpose in (
        ("onnx", "onnx", "read and check graphs"),
        ("onnxruntime", "onnxruntime", "run bundles (ort target)"),
        ("torch", "torch", "export, and the PyTorch reference"),
        ("onnxscript", "onnxscript", "export"),
        ("onnxslim", "onnxslim", "simplify graphs at export"),
        ("scikit-learn", "sklearn", "digits data for demo models and parity"),
        ("openvino", "openvino", "run bundles on OpenVINO's CPU plugin (--device openvino)"),
        ("tensorrt", "tensorrt", "build and run TensorRT engines"),
        ("cuda-python", "cuda.bindings.runtime", "TensorRT device buffers"),
    ):
        present = is_available(module)
        row = {"name": name, "version": package_version(name), "available": present, "purpose": purpose, "reason": ""}
        if not present:
            row["reason"] = f"not installed: {INSTALL_HINTS.get(module, f'pip install {name}')}"
        rows.append(row)
    if is_available("onnxruntime"):
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        rows.append({"name": "onnxruntime providers", "version": ", ".join(providers), "available": True, "purpose": "", "reason": ""})
        if "CUDAExecutionProvider" not in providers:
            rows.append({"name": "cuda (onnxruntime)", "version": None, "available": False, "purpose": "GPU inference",
                         "reason": "no CUDAExecutionProvider: install onnxruntime-gpu on a CUDA machine"})
    return rows
