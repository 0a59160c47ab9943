"""The export pipeline: checkpoint → ONNX → simplified ONNX → parity-checked bundle.

    result = export("model.pt", "bundle/", arch="spconv_resnet20_cifar")
    result.report.passed  # parity of the bundled graph against the PyTorch model

Steps (DESIGN.md §2): load the checkpoint; pick held-out inputs (digits held-out split at the
model's input size, or ``data``); run the PyTorch reference; export with torch.export; run the
full onnx.checker; check parity; simplify with onnxslim, re-check the graph and parity (and
keep the unsimplified graph if simplification broke parity); write the bundle atomically. A
bundle whose parity fails is still written, so it can be inspected; the caller decides the exit
code (the CLI exits 1).
"""

from __future__ import annotations

import io
import json
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimdeploy.bundle import GOLDEN, REFERENCE_WEIGHTS, REPORT, ensure_writable, write_bundle
from slimdeploy.engines.base import TensorMeta, check_feed
from slimdeploy.errors import BadInputError, InputValidationError
from slimdeploy.parity import ParityReport, check_parity, run_batches
from slimdeploy.versions import versions

TARGETS = ("ort",)
DEFAULT_SAMPLES = 32
DEFAULT_BATCH_SIZES = (1, 16)
MODEL_FILE = "model.onnx"

Progress = Callable[[str], None]


@dataclass
class ExportResult:
    """What ``export`` produced: the bundle path, its manifest and the final parity report."""

    bundle: Path
    manifest: dict[str, Any]
    report: ParityReport
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report.passed


def load_data_file(path: str | Path, input_name: str = "input") -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs (and labels, when present) from an .npz (keys ``input``, optional ``labels``) or
    an .npy file holding the input array."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"data file '{path}' does not exist | Fix: check the path")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as data:
            if input_name not in data.files:
                raise InputValidationError(
                    f"'{path}' has no array '{input_name}' (has {data.files}) | Fix: save the inputs "
                    f"with np.savez(path, {input_name}=x, labels=y)"
                )
            labels = data["labels"] if "labels" in data.files else None
            return data[input_name], labels
    except (ValueError, OSError) as exc:
        raise BadInputError(f"cannot read '{path}' as .npz/.npy ({exc}) | Fix: save it with numpy.savez") from exc


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    target: str = "ort",
    trust_pickle: bool = False,
    force: bool = False,
    data: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    opset: int | None = None,
    simplify: bool = True,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    threads: int = 0,
    reference_weights: bool = True,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a checkpoint to a parity-checked bundle.

    Args:
        checkpoint: checkpoint file (slimdeploy format, foreign state_dict, or pickled module
            with ``trust_pickle``).
        out: bundle directory to create.
        arch: registered architecture; needed when the checkpoint does not name one.
        arch_args: constructor arguments overriding the checkpoint's and the inferred ones.
        target: ``"ort"``. Defaults to ``"ort"``.
        trust_pickle: allow a pickled ``nn.Module`` checkpoint (runs code). Defaults to False.
        force: replace an existing ``out``. Defaults to False.
        data: .npz/.npy with parity inputs (and labels). Defaults to the digits held-out split.
        samples: how many held-out samples the parity check and golden file use. Defaults to 32.
        batch_sizes: batch sizes the candidate is checked at. Defaults to (1, 16).
        opset: ONNX opset. Defaults to 18.
        simplify: simplify with onnxslim (and re-check). Defaults to True.
        tolerances: per-output (atol, rtol), ``""`` the default. Defaults to the FP32 defaults
            (atol 1e-4, rtol 1e-3).
        threads: ONNX Runtime intra-op threads for the check; 0 = ORT's choice. Defaults to 0.
        reference_weights: store the PyTorch weights in the bundle (``reference.pt``) for
            ``check --data`` and ``bench`` where torch is installed. Defaults to True.
        progress: callable told the name of each step. Defaults to silence.
    """
    from slimdeploy import exporters
    from slimdeploy._optional import optional_import
    from slimdeploy.engines.ort_runner import OrtRunner
    from slimdeploy.engines.torch_runner import TorchRunner
    from slimdeploy.flops import count_macs
    from slimdeploy.loading import load_checkpoint, save_checkpoint

    say = progress or (lambda _message: None)
    if target not in TARGETS:
        raise BadInputError(f"unknown target '{target}' | Note: expected one of {list(TARGETS)}")
    if samples < 1 or any(b < 1 for b in batch_sizes):
        raise BadInputError("samples and batch sizes must be positive integers")
    out = ensure_writable(out, force)  # fail before any work
    started = time.perf_counter()
    torch = optional_import("torch", "export a model")
    notes: list[str] = []

    say("loading checkpoint")
    loaded = load_checkpoint(checkpoint, arch=arch, arch_args=arch_args, trust_pickle=trust_pickle)
    notes.extend(loaded.notes)
    prep = loaded.preprocessing
    input_meta = TensorMeta("input", np.dtype(np.float32), ("batch", *prep.input_size))

    say("preparing held-out inputs")
    inputs, labels, data_source = _parity_inputs(
        data, prep, samples, input_meta, trained_on_digits=loaded.meta.get("dataset") == "digits"
    )
    feed = {"input": inputs}

    say("running the PyTorch reference")
    spec = exporters.ExportSpec(opset=opset or exporters.onnx_export.DEFAULT_OPSET)
    with TorchRunner(loaded.module, {"input": input_meta}, spec.output_names) as reference_runner:
        reference = run_batches(reference_runner, feed, batch_size=len(inputs))
    macs = count_macs(loaded.module, prep.input_size)

    say("exporting with torch.export")
    export_started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(exporters.onnx_export.EXAMPLE_BATCH, *prep.input_size, generator=generator)
    model = exporters.export_onnx(loaded.module, (example,), spec)
    export_seconds = time.perf_counter() - export_started
    exporters.check_onnx(model)

    def parity(graph: Any, label: str) -> ParityReport:
        with OrtRunner(graph.SerializeToString(), threads=threads) as runner:
            return check_parity(runner, feed, reference, batch_sizes, "torch", tolerances=tolerances,
                                labels=labels, progress=lambda step: say(f"{label}: {step}"))

    say("checking parity of the exported graph")
    report = parity(model, "exported graph")
    simplified_info: dict[str, Any] = {"applied": False}
    if simplify:
        say("simplifying with onnxslim")
        result = exporters.simplify(model)
        simplified_info = {"applied": False, "nodes_before": result.nodes_before, "nodes_after": result.nodes_after}
        if result.error:
            notes.append(f"onnxslim failed, kept the unsimplified graph: {result.error}")
        else:
            exporters.check_onnx(result.model)
            say("re-checking parity after simplification")
            slim_report = parity(result.model, "simplified graph")
            if slim_report.passed or not report.passed:
                model, report = result.model, slim_report
                simplified_info["applied"] = True
            else:
                notes.append("onnxslim's graph failed parity where the exported one passed; kept the exported graph")

    say("writing the bundle")
    golden: dict[str, np.ndarray] = {"input": inputs, **{f"ref_{k}": v for k, v in reference.items()}}
    if labels is not None:
        golden["labels"] = labels
    info = _registered(loaded.arch)
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "model": {
            "arch": loaded.arch,
            "arch_args": loaded.arch_args,
            "family": info.family if info else "custom",
            "dynamic": bool(info.dynamic) if info else False,
            "source": Path(loaded.source).name,
            "params": macs.params,
            "macs": macs.macs,
            "meta": loaded.meta,
        },
        "preprocessing": prep.to_dict(),
        "target": target,
        "dynamic": None,
        "precision": "fp32",
        "opset": spec.opset,
        "inputs": [_spec_dict(input_meta)],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", int(reference["logits"].shape[1])]}],
        "graphs": [{"name": "model", "file": MODEL_FILE}],
        "decisions": {"outputs": [], "thresholds": {}},
        "stages": [],
        "golden": {
            "file": GOLDEN, "samples": int(len(inputs)), "batch_sizes": list(batch_sizes),
            "source": data_source, "labels": labels is not None, "reference": "torch",
        },
        "tolerances": report.tolerances,
        "parity": report.summary(),
        "export": {
            "seconds_total": None,  # filled below, once the bundle is written
            "seconds_torch_export": round(export_seconds, 3),
            "simplify": simplified_info,
            "peak_rss_mb": None,
            "notes": notes,
        },
    }
    files: dict[str, Any] = {
        MODEL_FILE: model.SerializeToString(),
        GOLDEN: golden,
        REPORT: (json.dumps(report.to_dict(), indent=2) + "\n").encode(),
    }
    if reference_weights and info is not None:
        # The PyTorch weights ride along (weights_only format) so that, where torch is
        # installed, `check --data` can compute fresh references and `bench` can time PyTorch.
        buffer = io.BytesIO()
        save_checkpoint(buffer, loaded.module, loaded.arch, loaded.arch_args, prep, loaded.meta)
        files[REFERENCE_WEIGHTS] = buffer.getvalue()
        manifest["reference_weights"] = REFERENCE_WEIGHTS
    else:
        manifest["reference_weights"] = None
    manifest["export"]["seconds_total"] = round(time.perf_counter() - started, 3)
    manifest["export"]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    bundle_path = write_bundle(out, files, manifest, force=force)
    return ExportResult(bundle_path, manifest, report, notes)


def _registered(name: str) -> Any:
    """The registry entry of ``name``, or None for a pickled module of an unregistered class."""
    from slimdeploy.errors import ArchitectureError
    from slimdeploy.models.registry import get_arch

    try:
        return get_arch(name)
    except ArchitectureError:
        return None


def _spec_dict(meta: TensorMeta) -> dict[str, Any]:
    return {"name": meta.name, "dtype": np.dtype(meta.dtype).name, "shape": list(meta.shape)}


def _parity_inputs(
    data: str | Path | None,
    prep: Any,
    samples: int,
    input_meta: TensorMeta,
    trained_on_digits: bool,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Held-out inputs for the parity check: the user's file, or the digits held-out split."""
    if data is not None:
        inputs, labels = load_data_file(data)
        inputs, labels = inputs[:samples], (labels[:samples] if labels is not None else None)
        check_feed({"input": inputs}, {"input": input_meta})
        return inputs, labels, str(Path(data).name)
    from slimdeploy.data import digits_inputs

    inputs, labels = digits_inputs("heldout", prep.input_size, prep.mean, prep.std, count=samples)
    # Digits labels mean something only for models trained on digits (the zoo's).
    if not trained_on_digits:
        labels = None
    return inputs, labels, f"digits:heldout[:{samples}]"
