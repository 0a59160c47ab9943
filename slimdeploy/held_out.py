"""Export stage: held-out inputs and the PyTorch reference the graphs are checked against.

Parity runs on real inputs that differ from the export example: the user's ``data`` file, or
the digits held-out split at the model's input size. For a model that decides per sample, the
samples are chosen from the whole pool so that every decision is seen both ways where the data
allows (the family recipe says what to cover: every gate open and closed, every exit stage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimdeploy.engines.base import TensorMeta, check_feed
from slimdeploy.errors import InputValidationError
from slimdeploy.files import read_arrays
from slimdeploy.parity import (
    DEFAULT_CRITERIA,
    DecisionSpec,
    ParityReport,
    check_parity,
    check_rows,
    run_batches,
)
from slimdeploy.tolerance import ToleranceRule, fp32_tolerances

if TYPE_CHECKING:
    from slimdeploy.export.options import ExportOptions
    from slimdeploy.exporters.forms import ExportedGraphs
    from slimdeploy.transforms.deploy import DeployedModel

# Batch size of the PyTorch reference run over the sample pool.
REFERENCE_BATCH = 64


@dataclass
class HeldOut:
    """The parity samples: inputs, labels (when they mean something), the PyTorch reference
    outputs, where they came from, the decisions to judge, the FP32 tolerances (the given ones,
    or measured on these samples) and the rule that set them, and notes for the user."""

    inputs: np.ndarray
    labels: np.ndarray | None
    reference: dict[str, np.ndarray]
    source: str
    decisions: list[DecisionSpec]
    tolerances: dict[str, tuple[float, float]]
    tolerance_rule: ToleranceRule
    notes: list[str] = field(default_factory=list)

    @property
    def feed(self) -> dict[str, np.ndarray]:
        """The graphs' feed: the image inputs (thresholds take their defaults)."""
        return {"input": self.inputs}

    def check(self, graphs: ExportedGraphs, options: ExportOptions, label: str, say: Callable[[str], None],
              precision: str = "fp32", backend: str = "onnxruntime") -> ParityReport:
        """Parity of ``graphs`` on ``backend`` (default ONNX Runtime) against the reference at
        ``options.batch_sizes``, with this held-out set's FP32 tolerances for FP32, else
        ``options.tolerances`` or the precision's defaults."""
        fp32 = precision == "fp32"
        with graphs.runner(options.threads, backend=backend) as runner:
            return check_parity(runner, self.feed, self.reference, options.batch_sizes, "torch", precision=precision,
                                tolerances=self.tolerances if fp32 else options.tolerances,
                                labels=self.labels, decisions=self.decisions, batch_inputs=["input"],
                                progress=lambda step: say(f"{label}: {step}"),
                                tolerance_rule=self.tolerance_rule if fp32 else None)


def held_out_samples(deployed: DeployedModel, options: ExportOptions, say: Callable[[str], None]) -> HeldOut:
    """The parity samples of ``deployed`` and its PyTorch reference outputs."""
    from slimdeploy.engines.torch_runner import TorchRunner

    say("preparing held-out inputs and the PyTorch reference")
    count = options.parity_samples
    deciding = deployed.recipe.decision_kind is not None
    loaded = deployed.loaded
    pool, pool_labels, source = parity_inputs(options.data, loaded.preprocessing, None if deciding else count,
                                              deployed.input_meta, trained_on_digits=loaded.meta.get("dataset") == "digits")
    with TorchRunner(deployed.deployment.reference, {"input": deployed.input_meta}, deployed.output_names) as runner:
        pool_reference = run_batches(runner, {"input": pool}, batch_size=REFERENCE_BATCH)
    bits = deployed.recipe.decision_bits(pool_reference, deployed.deployment.module)
    if bits is None:
        rows = np.arange(len(pool))
    else:
        from slimdeploy.recipes import pick_rows

        rows = pick_rows(bits, count)
    inputs, reference = pool[rows], {name: value[rows] for name, value in pool_reference.items()}
    say("measuring PyTorch's float32 noise (the reference once more in float64)" if not options.tolerances
        else "checking tolerances")
    tolerances, rule = fp32_tolerances(options.tolerances, deployed.deployment.reference, {"input": inputs}, reference,
                                       deployed.output_names, [d.name for d in deployed.decisions])
    return HeldOut(
        inputs=inputs,
        labels=pool_labels[rows] if pool_labels is not None else None,
        reference=reference,
        source=source,
        decisions=deployed.decisions,
        tolerances=tolerances,
        tolerance_rule=rule,
        notes=few_samples_note(options.precision, len(rows)),
    )


def load_data_file(path: str | Path, input_name: str = "input") -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs (and labels, when present) from an .npz (keys ``input``, optional ``labels``) or
    an .npy file holding the input array."""
    arrays = read_arrays(path, default_name=input_name)
    if input_name not in arrays:
        raise InputValidationError(
            f"'{path}' has no array '{input_name}' (has {sorted(arrays)}) | Fix: save the inputs "
            f"with np.savez(path, {input_name}=x, labels=y)"
        )
    return arrays[input_name], arrays.get("labels")


def parity_inputs(
    data: str | Path | None,
    prep: Any,
    samples: int | None,
    input_meta: TensorMeta,
    trained_on_digits: bool,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Held-out inputs for the parity check: the user's file, or the digits held-out split
    (the first ``samples``, or all of it when None)."""
    if data is not None:
        inputs, labels = load_data_file(data)
        inputs, labels = inputs[:samples], (labels[:samples] if labels is not None else None)
        check_feed({"input": inputs}, {"input": input_meta})
        check_rows({"input": inputs}, {}, labels, source=f"'{data}'")  # finite, rows agree: before the long work
        return inputs, labels, str(Path(data).name)
    from slimdeploy.data import digits_inputs

    inputs, labels = digits_inputs("heldout", prep.input_size, prep.mean, prep.std, count=samples)
    # Digits labels mean something only for models trained on digits (the zoo's).
    if not trained_on_digits:
        labels = None
    return inputs, labels, "digits:heldout" + (f"[:{samples}]" if samples else "")


def few_samples_note(precision: str, samples: int) -> list[str]:
    """A note when one flipped answer among ``samples`` parity samples already breaks the
    precision's top-1 agreement criterion (fewer than 34 samples for INT8's 97 %)."""
    floor = DEFAULT_CRITERIA.get(precision, {}).get("top1_agreement")
    if floor is None or samples * (1.0 - floor) >= 1.0:
        return []
    enough = int(np.floor(1.0 / (1.0 - floor))) + 1
    return [f"{samples} parity samples: one flipped answer ({100 / samples:.1f} %) already fails the {precision} "
            f"top-1 agreement criterion ({100 * floor:.0f} %) | Fix: pass --samples {enough} or more"]
