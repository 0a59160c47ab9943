"""Parity tolerances: validated before use, and FP32 defaults that scale with the model.

A fixed FP32 ``atol`` (1e-4) does not fit every model: an exported graph rounds differently
from PyTorch (other summation orders, BatchNorm folded into weights), and how far that moves
an output depends on the network (its depth, the scale of its activations, how much the last
layer cancels), not only on the output's own magnitude. So the default FP32 tolerance is
measured per model:

    PyTorch's own float32 rounding noise on the parity samples is the largest difference,
    per output, between the reference in float32 and the same model run once more in
    float64 (a ``.double()`` copy). The tolerance of that output is then
        atol = max(1e-4, NOISE_FACTOR x noise)   (NOISE_FACTOR = 10),  rtol = 1e-3
    capped at NOISE_CAP (1 %) of the output's largest |value|. Rows whose decisions (gates,
    exits) differ between float32 and float64 are left out of the measure.

A correct export differs from PyTorch by about PyTorch's own float32 error (both round the
same exact result), while a real defect (a 1-2 % change in one convolution's weights) moves
the outputs by orders of magnitude more (benchmarks/tolerance.py measures both). The measured
tolerances are stored in the manifest, so ``check`` applies them without torch. Tolerances a
user gives (``--atol``/``--rtol``, ``tolerances=``) are used as given.

``check_tolerances`` refuses non-finite or negative tolerances (bad input, exit 2): a NaN
tolerance would pass anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from slimdeploy.errors import BadInputError

# Default tolerances by precision, per output (the ``""`` key is the default for all outputs);
# parity.py's docstring says why each. FP32's atol is the floor of the measured rule below.
DEFAULT_TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "fp32": {"": (1e-4, 1e-3)},
    "fp16": {"": (5e-2, 1e-2)},
    "int8": {"": (0.25, 0.1)},
}

NOISE_FACTOR = 10.0
# The measured tolerance never exceeds this fraction of the output's largest |value|: a model
# whose float32 result is that far from float64 cannot be judged elementwise in FP32.
NOISE_CAP = 0.01
RULE_MEASURED = "fp32-noise"
RULE_DEFAULT = "precision-default"
RULE_GIVEN = "given"
Tolerances = Mapping[str, Sequence[float]]


def check_tolerances(tolerances: Tolerances, source: str = "tolerances") -> dict[str, tuple[float, float]]:
    """``tolerances`` (output name, ``""`` the default → (atol, rtol)) as floats, or
    ``BadInputError`` naming the first entry that is not a pair of finite numbers >= 0.

    Args:
        tolerances: the mapping to check.
        source: where they came from, for the message (``--atol/--rtol``, a manifest).
            Defaults to "tolerances".
    """
    if not isinstance(tolerances, Mapping) or not tolerances:
        raise BadInputError(f"{source}: expected a mapping of output name to (atol, rtol), got {tolerances!r}")
    checked: dict[str, tuple[float, float]] = {}
    for name, pair in tolerances.items():
        try:
            atol, rtol = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise BadInputError(f"{source}: '{name}' is {pair!r} | Note: expected a pair (atol, rtol) of numbers") from None
        for label, value in (("atol", atol), ("rtol", rtol)):
            if not math.isfinite(value) or value < 0:
                raise BadInputError(
                    f"{source}: {label} {value!r} for {name or 'every output'} is not a finite number >= 0 "
                    f"(a NaN tolerance would pass anything) | Fix: give e.g. --atol 1e-4 --rtol 1e-3"
                )
        checked[str(name)] = (atol, rtol)
    if "" not in checked:
        raise BadInputError(f"{source}: no default entry '' | Note: expected e.g. {{\"\": [1e-4, 1e-3]}}")
    return checked


@dataclass
class ToleranceRule:
    """How a report's tolerances were chosen (``ParityReport.tolerance_rule``).

    Attributes:
        rule: ``"fp32-noise"`` (measured), ``"precision-default"`` or ``"given"``.
        description: the rule in words, as the report and the CLI print it.
        base: the precision's default (atol, rtol). Defaults to none.
        factor: NOISE_FACTOR for the measured rule. Defaults to None.
        noise: per output, max |float32 - float64| of the reference. Defaults to {}.
        capped: outputs whose measured tolerance hit NOISE_CAP. Defaults to none.
        excluded_rows: parity rows left out because a decision differed in float64. Defaults to 0.
        note: why the measure fell back to the default, when it did. Defaults to "".
    """

    rule: str
    description: str
    base: list[float] = field(default_factory=list)
    factor: float | None = None
    noise: dict[str, float] = field(default_factory=dict)
    capped: list[str] = field(default_factory=list)
    excluded_rows: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_rule(base: Sequence[float], note: str = "") -> ToleranceRule:
    """The precision's fixed default, e.g. for FP16/INT8 or when the noise cannot be measured."""
    return ToleranceRule(RULE_DEFAULT, f"precision default: |c - r| <= {base[0]:g} + {base[1]:g}*|r|",
                         base=[float(base[0]), float(base[1])], note=note)


def given_rule() -> ToleranceRule:
    """Tolerances the user gave, used as given."""
    return ToleranceRule(RULE_GIVEN, "given by the user (--atol/--rtol or tolerances=), used as given")


def measured_tolerances(
    noise: Mapping[str, float],
    reference: Mapping[str, np.ndarray],
    base: Sequence[float],
    factor: float = NOISE_FACTOR,
) -> tuple[dict[str, tuple[float, float]], ToleranceRule]:
    """Per-output tolerances from measured float32 noise: atol = max(base atol, factor x noise),
    capped at NOISE_CAP x max|reference|; rtol = base rtol.

    Args:
        noise: max |float32 - float64| per numeric output.
        reference: the float32 reference outputs (for the cap).
        base: the precision's default (atol, rtol).
        factor: multiple of the noise. Defaults to NOISE_FACTOR.
    """
    atol, rtol = float(base[0]), float(base[1])
    tolerances: dict[str, tuple[float, float]] = {"": (atol, rtol)}
    capped = []
    for name, value in noise.items():
        wanted = max(atol, factor * float(value))
        values = np.asarray(reference[name], dtype=np.float64)
        cap = max(atol, NOISE_CAP * float(np.abs(values).max())) if values.size else atol
        if wanted > cap:
            capped.append(name)
        tolerances[name] = (min(wanted, cap), rtol)
    rule = ToleranceRule(
        RULE_MEASURED,
        f"per output atol = max({atol:g}, {factor:g} x max|ref32 - ref64|) (PyTorch's own float32 noise on "
        f"the parity samples, capped at {NOISE_CAP:.0%} of max|ref|), rtol {rtol:g}",
        base=[atol, rtol], factor=factor, noise={k: float(v) for k, v in noise.items()}, capped=capped,
    )
    return tolerances, rule


def float64_noise(
    module: Any,
    feed: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    decision_names: Sequence[str] = (),
    batch_size: int = 16,
) -> tuple[dict[str, float], int]:
    """Max |float32 - float64| per numeric output of ``module`` on ``feed`` (needs torch).

    Runs a float64 copy of ``module`` on the float64 feed and compares it with ``reference``
    (the float32 outputs of the same rows). Rows where a decision output differs are left out.
    Raises ``ValueError`` when the float64 outputs are not finite or every row was left out.

    Args:
        module: the float32 reference module (not changed: a copy is converted).
        feed: input arrays by name (float32), rows along axis 0.
        reference: float32 outputs for ``feed`` by name.
        output_names: the forward's outputs, in order.
        decision_names: decision outputs among them (gates, exit stages). Defaults to none.
        batch_size: rows per forward. Defaults to 16.

    Returns:
        The noise per numeric output, and how many rows were left out.
    """
    import copy

    import torch

    double = copy.deepcopy(module).double().eval()
    arrays = {name: torch.from_numpy(np.asarray(value, dtype=np.float64)) for name, value in feed.items()}
    rows = len(next(iter(arrays.values())))
    pieces: list[dict[str, np.ndarray]] = []
    with torch.inference_mode():
        for start in range(0, rows, batch_size):
            result = double(*(value[start:start + batch_size] for value in arrays.values()))
            values = result if isinstance(result, (tuple, list)) else [result]
            pieces.append({name: value.detach().numpy() for name, value in zip(output_names, values)})
    outputs = {name: np.concatenate([piece[name] for piece in pieces]) for name in output_names}
    keep = np.ones(rows, dtype=bool)
    for name in decision_names:
        differ = np.asarray(outputs[name]).reshape(rows, -1) != np.asarray(reference[name]).reshape(rows, -1)
        keep &= ~differ.any(axis=1)
    if not keep.any():
        raise ValueError("every parity row took other decisions in float64")
    noise = {}
    for name in output_names:
        if name in decision_names:
            continue
        high = np.asarray(outputs[name], dtype=np.float64)[keep]
        if not np.isfinite(high).all():
            raise ValueError(f"the float64 model gives non-finite '{name}'")
        noise[name] = float(np.abs(high - np.asarray(reference[name], dtype=np.float64)[keep]).max(initial=0.0))
    return noise, int((~keep).sum())


def fp32_tolerances(
    given: Tolerances | None,
    module: Any,
    feed: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    decision_names: Sequence[str] = (),
) -> tuple[dict[str, tuple[float, float]], ToleranceRule]:
    """The FP32 tolerances of an export: ``given`` ones as they are (checked), otherwise the
    measured rule (``float64_noise``, ``measured_tolerances``); the FP32 default with a note when
    the model cannot run in float64.

    Args:
        given: the user's tolerances, or None.
        module: the float32 reference module.
        feed: the parity inputs.
        reference: the float32 reference outputs for ``feed``.
        output_names: the forward's outputs, in order.
        decision_names: decision outputs among them. Defaults to none.
    """
    base = DEFAULT_TOLERANCES["fp32"][""]
    if given:
        return check_tolerances(given, "tolerances"), given_rule()
    try:
        noise, excluded = float64_noise(module, feed, reference, output_names, decision_names)
    except Exception as exc:  # a layer without float64 kernels, non-finite float64 outputs...
        note = f"float32 noise not measured ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}); used the fixed default"
        return check_tolerances(DEFAULT_TOLERANCES["fp32"]), default_rule(base, note)
    tolerances, rule = measured_tolerances(noise, reference, base)
    rule.excluded_rows = excluded
    return tolerances, rule
