"""torch.export → ONNX with a dynamic batch axis and the names of docs/design.md §8.

Uses ``torch.onnx.export(..., dynamo=True)``: the model is captured with ``torch.export`` and
translated by onnxscript. The batch axis is a symbolic dimension named ``batch``; every other
dimension is fixed by the example input. Default opset 18 (TensorRT 10.x parses 9-24).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from slimdeploy._optional import optional_import
from slimdeploy.errors import ExportError

DEFAULT_OPSET = 18
# torch.export reasons about sizes 0 and 1 specially, so the example batch is 2 and the range
# is stated explicitly; 1 is still accepted at run time.
EXAMPLE_BATCH = 2
MAX_BATCH = 4096


@dataclass
class ExportSpec:
    """How one graph is exported.

    Attributes:
        input_names: graph input names in ``forward`` order. Defaults to ``["input"]``.
        output_names: graph output names in the order ``forward`` returns them. Defaults to
            ``["logits"]``.
        batch_inputs: inputs whose axis 0 is the dynamic batch. Defaults to ``["input"]``.
        opset: ONNX opset. Defaults to 18.
    """

    input_names: list[str] = field(default_factory=lambda: ["input"])
    output_names: list[str] = field(default_factory=lambda: ["logits"])
    batch_inputs: list[str] = field(default_factory=lambda: ["input"])
    opset: int = DEFAULT_OPSET


def export_onnx(module: Any, example_inputs: Sequence[Any], spec: ExportSpec, as_list: bool = False) -> Any:
    """Export ``module`` to an ``onnx.ModelProto``.

    Args:
        module: ``nn.Module`` in eval mode.
        example_inputs: tensors for ``forward``, with batch ``EXAMPLE_BATCH`` on batch inputs.
        spec: names, dynamic axes and opset.
        as_list: ``forward`` takes the inputs as one list argument (many inputs), not
            positionally. Defaults to False.

    Raises:
        ExportError: torch.export or the ONNX translation failed (an unsupported layer or
            data-dependent Python control flow); the message names the first cause.
    """
    torch = optional_import("torch", "export a model")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic_shapes: Any = tuple({0: batch} if name in spec.batch_inputs else None for name in spec.input_names)
    args: tuple[Any, ...] = tuple(example_inputs)
    if as_list:
        dynamic_shapes, args = (list(dynamic_shapes),), (list(example_inputs),)
    # The exporter prints its progress and a few known-harmless warnings (torchvision ops
    # not installed); slimdeploy shows its own progress instead.
    quiet_loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in quiet_loggers]
    try:
        for lg in quiet_loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=spec.opset,
                optimize=True,
                verify=False,
                report=False,
            )
    except Exception as exc:  # torch raises many types here (UserError, Unsupported, ...)
        raise ExportError(_export_failure_message(exc)) from exc
    finally:
        for lg, level in zip(quiet_loggers, levels):
            lg.setLevel(level)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def _export_failure_message(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = lines[0] if lines else type(exc).__name__
    # The first line of the innermost cause usually names the op or layer that failed.
    inner = exc.__cause__
    while inner is not None and inner.__cause__ is not None:
        inner = inner.__cause__
    if inner is not None and str(inner).strip():
        cause = f"{cause} (cause: {str(inner).strip().splitlines()[0]})"
    return (
        f"could not export the model to ONNX: {cause[:400]} | Note: slimdeploy exports through "
        "torch.export, which needs layers with ONNX translations and no data-dependent Python "
        "control flow | Fix: replace the unsupported layer, or open an issue with this message "
        "(SLIMDEPLOY_DEBUG=1 shows the full trace)"
    )


def check_onnx(model: Any) -> None:
    """Run the full ``onnx.checker`` (with shape inference); failures raise ``ExportError``."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {str(exc).strip()[:400]}") from exc
