"""What ``slimdeploy inspect`` and ``slimdeploy env`` report.

``inspect_bundle`` reads the manifest and the bundle's graphs (no torch); ``inspect_onnx`` reads
an ONNX file (no torch); ``inspect_checkpoint`` loads the model (torch) and counts parameters and
MACs; ``environment`` lists backends and versions without
importing torch or tensorrt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimdeploy._optional import INSTALL_HINTS, is_available
from slimdeploy.versions import package_version


def model_kind(family: str | None, dynamic: bool) -> str:
    """``"gated"``, ``"early-exit"`` or ``"static"``: what a model of ``family`` decides per
    sample (its deploy recipe says; needs torch for dynamic families)."""
    if not dynamic:
        return "static"
    from slimdeploy.recipes import recipe_for

    kind = recipe_for(family).decision_kind
    return {"gated": "gated", "early_exit": "early-exit"}.get(kind or "", "dynamic")


def inspect_bundle(path: str | Path) -> dict[str, Any]:
    """Summary of a bundle from its manifest (files verified), with each of its graphs read
    (inputs, outputs, opset, nodes)."""
    from slimdeploy.bundle import load_bundle

    bundle = load_bundle(path)
    manifest = bundle.manifest
    model = manifest["model"]
    decisions = {spec.get("kind", "gate") for spec in (manifest.get("decisions") or {}).get("outputs", [])}
    what = "early-exit" if "exit" in decisions else "gated" if decisions else "static"
    form = f", {manifest['dynamic']} form" if manifest.get("dynamic") else ""
    return {
        "kind": "bundle",
        "model": f"{what} ({model['family']} family{form}), {manifest['precision']} for {TARGET_NAMES.get(manifest['target'], manifest['target'])}",
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
        "graphs": [{"name": graph["name"], **_graph_summary(bundle.file(graph["file"]), graph["file"])}
                   for graph in manifest["graphs"]],
        "parity": manifest["parity"],
        "preprocessing": manifest["preprocessing"],
        "versions": manifest["versions"],
        "files": manifest["files"],
        **({"tensorrt": _trt_summary(manifest["trt"])} if manifest.get("trt") else {}),
    }


TARGET_NAMES = {"ort": "ONNX Runtime", "trt": "TensorRT"}
# How many operator types a graph summary names (the most frequent first).
OP_TYPES_SHOWN = 8


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """Summary of an ONNX file (needs onnx, not torch): what it is, its inputs and outputs with
    shapes and types, opset, producer, nodes (and the most frequent operators), parameters."""
    path = Path(path)
    return {"kind": "onnx", **_graph_summary(path, path.name, detail=True)}


def _graph_summary(path: Path, file: str, detail: bool = False) -> dict[str, Any]:
    """``file``, opset, inputs, outputs, node count and the most frequent operators of the ONNX
    graph at ``path``; with ``detail`` also its producer, parameters and what it is."""
    import numpy as np
    import onnx

    from slimdeploy.errors import BadInputError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, OSError...
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise BadInputError(f"cannot read '{path}' as an ONNX model ({first}) | Fix: pass a valid .onnx file, a bundle "
                            "directory or a checkpoint") from None
    ops: dict[str, int] = {}
    for node in _all_nodes(model.graph):
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    summary: dict[str, Any] = {
        "file": file,
        "opset": opset,
        "inputs": [_value_info(value) for value in model.graph.input],
        "outputs": [_value_info(value) for value in model.graph.output],
        "nodes": sum(ops.values()),
        "op_types": dict(sorted(ops.items(), key=lambda item: -item[1])[:OP_TYPES_SHOWN]),
    }
    if detail:
        summary["what"] = _what_graph(ops, model)
        summary["producer"] = f"{model.producer_name} {model.producer_version}".strip() or None
        summary["params"] = int(sum(int(np.prod(init.dims)) for init in model.graph.initializer))
    return summary


def _all_nodes(graph: Any) -> list[Any]:
    """Every node of ``graph`` and of its subgraphs (``If`` branches, ``Loop`` bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.HasField("g"):
                nodes.extend(_all_nodes(attribute.g))
            for sub in attribute.graphs:
                nodes.extend(_all_nodes(sub))
    return nodes


def _value_info(value: Any) -> dict[str, Any]:
    """Name, dtype and shape (symbolic dimensions by name) of a graph input or output."""
    from onnx import helper

    tensor = value.type.tensor_type
    shape = [dim.dim_param or (dim.dim_value if dim.HasField("dim_value") else "?") for dim in tensor.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown"
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _what_graph(ops: dict[str, int], model: Any) -> str:
    """What an ONNX graph looks like: its precision and, for slimdeploy's dynamic forms, how it routes."""
    from onnx import TensorProto

    if ops.get("QuantizeLinear"):
        zero_points = [init for init in model.graph.initializer if init.name.endswith("zero_point")]
        unsigned = any(init.data_type == TensorProto.UINT8 for init in zero_points)
        precision = "INT8 Q/DQ, " + ("U8S8 (the ONNX Runtime form)" if unsigned else "S8S8 (the TensorRT form)")
    elif any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer):
        precision = "FP16"
    else:
        precision = "FP32"
    if ops.get("If"):
        routing = "; If nodes decide per batch (an 'if' form)"
    elif ops.get("NonZero") and ops.get("ScatterND"):
        routing = "; NonZero/ScatterND route rows (a gated 'compact' form)"
    else:
        routing = ""
    return precision + routing


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
    input_size: tuple[int, ...] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Summary of a checkpoint: what kind of model it holds (gated, early-exit or static, and
    its family), its parameters, MACs (at ``input_size``, defaulting to the checkpoint's) and I/O;
    ``mean``/``std`` as ``export`` takes them (``loading.choose_preprocessing``)."""
    from slimdeploy.flops import count_macs, count_macs_of
    from slimdeploy.loading import choose_preprocessing, load_checkpoint
    from slimdeploy.models import find_arch
    from slimdeploy.recipes import recipe_for

    loaded = load_checkpoint(path, arch=arch, arch_args=arch_args, trust_pickle=trust_pickle)
    choice = choose_preprocessing(loaded, input_size, mean, std)
    loaded.preprocessing, loaded.notes = choice.preprocessing, [*loaded.notes, *choice.notes]
    info = find_arch(loaded.arch)
    torch = __import__("torch")
    info = find_arch(loaded.arch)
    # What the bundle would run: a network built with GatedBlocks or Exits, with its decisions.
    module = recipe_for(info.family if info else None, loaded.module).reference_module(loaded)
    if hasattr(module, "forward_all"):
        # Early-exit models: forward stops at the first confident stage; count every stage.
        macs = count_macs_of(module, module.forward_all, torch.zeros(1, *loaded.preprocessing.input_size))
    else:
        macs = count_macs(module, loaded.preprocessing.input_size)
    with torch.inference_mode():
        out = module(torch.zeros(1, *loaded.preprocessing.input_size))
    logits = out[0] if isinstance(out, (tuple, list)) else out
    family = info.family if info else "custom"
    return {
        "kind": "checkpoint",
        "model": f"{model_kind(family, bool(info and info.dynamic))} ({family} family)",
        "arch": loaded.arch,
        "arch_args": loaded.arch_args,
        "params": macs.params,
        "macs": macs.macs,
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", *loaded.preprocessing.input_size]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", int(logits.shape[1])]}],
        "preprocessing": {**loaded.preprocessing.to_dict(), "source": choice.sources},
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
