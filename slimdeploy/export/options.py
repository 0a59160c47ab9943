"""The options of one export, as one frozen value that the CLI builds from its flags and the
Python API accepts (``export(ckpt, out, ExportOptions(precision="int8"))``, or the same fields
as keyword arguments: ``export(ckpt, out, precision="int8")``).

Options are validated when the value is made, so that a bad one is refused before any work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from slimdeploy.errors import BadInputError

TARGETS = ("ort", "trt")
DEFAULT_SAMPLES = 32
# Reduced precision is judged on agreement rates, which need more samples than 32.
DEFAULT_SAMPLES_REDUCED = 100
DEFAULT_BATCH_SIZES = (1, 16)
# --calib-method auto: calibrate with several methods and keep the closest to FP32
# (calibration/stage.py).
AUTO_CALIB = "auto"


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """How to export a checkpoint. Every field has the CLI flag's default.

    Attributes:
        arch: registered architecture, needed when the checkpoint does not name one; or your
            own code, ``module.path:factory`` or ``path/to/file.py:factory``: the factory is
            imported and called with ``arch_args`` and the checkpoint is its state_dict.
        arch_args: constructor arguments overriding the checkpoint's and the inferred ones.
            Defaults to none.
        target: ``"ort"`` (ONNX Runtime) or ``"trt"`` (TensorRT: the bundle also records how
            to build the engines on the target). Defaults to ``"ort"``.
        dynamic: form of a model that decides per sample (its recipe lists the forms: gated
            ``mask``, ``if``, ``compact``, ``staged``, ``loop``; early exits ``mask``, ``if``, ``staged``).
            Defaults to the recipe's default for the target; must be None for static models.
        condense_classifier: CondenseNet: also prune the classifier as the official converter
            does (lossy; parity is then against the condensed PyTorch model). Defaults to False.
        fold: fold what the constants allow before export (the family's recipe says what; the
            manifest's ``model.folds`` records it; parity is against the unfolded model).
            Defaults to True.
        trust_pickle: allow a pickled ``nn.Module`` checkpoint (runs code). Defaults to False.
        force: replace an existing bundle at ``out``. Defaults to False.
        data: .npz/.npy with parity inputs (and labels). Defaults to the digits held-out split.
        samples: how many held-out samples the parity check and golden file use. Defaults to
            32 (100 for fp16 and int8, which pass on agreement rates): see ``parity_samples``.
        batch_sizes: batch sizes the candidate is checked at. Defaults to (1, 16).
        opset: ONNX opset. Defaults to 18 (``exporters.onnx_export.DEFAULT_OPSET``).
        simplify: simplify with onnxslim (and re-check). Defaults to True.
        tolerances: per-output (atol, rtol), ``""`` the default, used as given. Defaults to
            the precision's; for FP32 measured per output (``tolerance.fp32_tolerances``:
            atol max(1e-4, 10x PyTorch's float32 noise), rtol 1e-3), stored in the manifest.
        threads: ONNX Runtime intra-op threads for the check; 0 = ORT's choice. Defaults to 0.
        reference_weights: store the PyTorch weights in the bundle (``reference.pt``) for
            ``check --data`` and ``bench`` where torch is installed. Defaults to True.
        build_spec: ``trt`` only: a ``trt_build.BuildSpec`` (batch range, workspace). Defaults
            to ``BuildSpec()`` (batch 1/8/32, 1024 MiB).
        precision: ``fp32``, ``fp16`` or ``int8`` (QDQ in the target's form). Defaults to fp32.
        calib: INT8 calibration data: ``digits``, an image folder, an .npy/.npz of inputs,
            ``synthetic`` (random, flagged), or a ``calibration.json`` / bundle whose stored
            ranges are reused without recalibrating. Defaults to ``digits`` for models trained
            on digits; others must name their data.
        calib_size: calibration samples to use. Defaults to 100 (the digits calibration split).
        calib_method: ``auto``, ``MinMax``, ``Entropy`` or ``Percentile``. Defaults to ``auto``
            (MinMax and Percentile both tried, the one closer to FP32 on the calibration images kept).
        quantize_decisions: also reduce the precision of gate and exit heads. Defaults to False
            (decision heads stay FP32).
        bias_correction: INT8: shift each quantized Conv/Gemm's bias by its mean output error
            per channel against FP32 on the calibration images. Defaults to True.
        input_size: the image input's size: (S,) a square side, (H, W), or (C, H, W). Defaults
            to the checkpoint's (slimdeploy's format records it; otherwise the architecture's).
        mean: per-channel mean subtracted after scaling pixels to [0, 1], one value per channel
            or one for all. Defaults to the checkpoint's; a foreign checkpoint gets the CIFAR
            statistics (inputs of 64 pixels or less) or ImageNet's, with a note.
        std: per-channel std divided by, as ``mean``. Defaults as ``mean``.
        speed_check: for ``ort``, the export's timings on this CPU (a few seconds each):
            fp16/int8 graphs against FP32 (manifest ``calibration.speed_vs_fp32``, a warning
            when they are slower), and, where OpenVINO is installed, OpenVINO against ONNX
            Runtime (manifest ``runtime``: the bundle's default CPU runtime). Defaults to True.
    """

    arch: str | None = None
    arch_args: Mapping[str, Any] | None = None
    target: str = "ort"
    dynamic: str | None = None
    condense_classifier: bool = False
    fold: bool = True
    trust_pickle: bool = False
    force: bool = False
    data: str | Path | None = None
    samples: int | None = None
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
    opset: int | None = None
    simplify: bool = True
    tolerances: Mapping[str, tuple[float, float]] | None = None
    threads: int = 0
    reference_weights: bool = True
    build_spec: Any = None
    precision: str = "fp32"
    calib: str | Path | None = None
    calib_size: int | None = None
    calib_method: str = AUTO_CALIB
    quantize_decisions: bool = False
    bias_correction: bool = True
    input_size: Sequence[int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    speed_check: bool = True

    def __post_init__(self) -> None:
        from slimdeploy.calibration import check_precision
        from slimdeploy.limits import check_export_options

        if self.target not in TARGETS:
            raise BadInputError(f"unknown target '{self.target}' | Note: expected one of {list(TARGETS)}")
        check_precision(self.precision, None)
        if self.precision != "int8" and (self.calib is not None or self.calib_size is not None):
            raise BadInputError(f"--calib and --calib-size apply to --precision int8, not {self.precision} | Fix: leave them out, or pass --precision int8")
        check_export_options(self.parity_samples, self.batch_sizes, self.threads, self.calib_size, self.tolerances)
        if self.calib_method != AUTO_CALIB:
            from slimdeploy.calibration.ranges import check_method

            check_method(self.calib_method)
        for name, value in (("input_size", self.input_size), ("mean", self.mean), ("std", self.std)):
            object.__setattr__(self, name, check_preprocessing_option(name, value))
        # Own copies, so that the caller's containers cannot change a frozen value.
        object.__setattr__(self, "arch_args", dict(self.arch_args or {}))
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))

    @classmethod
    def of(cls, options: ExportOptions | None = None, **changes: Any) -> ExportOptions:
        """``options`` (or the defaults) with ``changes`` applied; an unknown name is refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise BadInputError(f"unknown export option(s) {unknown} | Note: expected some of {sorted(known)}")
        return replace(options, **changes) if options is not None else cls(**changes)

    @property
    def parity_samples(self) -> int:
        """``samples``, or its default for the precision (32 for fp32, 100 otherwise)."""
        if self.samples is not None:
            return self.samples
        return DEFAULT_SAMPLES if self.precision == "fp32" else DEFAULT_SAMPLES_REDUCED


def check_preprocessing_option(name: str, value: Sequence[Any] | None) -> tuple[Any, ...] | None:
    """``--input-size`` (1 to 3 whole sizes from 1 to ``loading.MAX_SIDE``; channels up to
    ``loading.MAX_CHANNELS``), ``--mean`` (finite numbers) or ``--std`` (finite numbers above
    0), as a tuple; None when not given. ``BadInputError`` naming the option otherwise."""
    import math

    from slimdeploy.loading import MAX_CHANNELS, MAX_SIDE

    if value is None:
        return None
    flag = f"--{name.replace('_', '-')}"
    values = tuple(value)
    if name == "input_size":
        ok = 1 <= len(values) <= 3 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
        limits = [MAX_CHANNELS, MAX_SIDE, MAX_SIDE][3 - len(values):] if ok else []
        if not ok or any(v > limit for v, limit in zip(values, limits)):
            raise BadInputError(f"{flag} {list(values)}: expected C,H,W (or H,W, or one side), whole numbers from 1, sides up to "
                                f"{MAX_SIDE:,} and channels up to {MAX_CHANNELS:,} | Fix: e.g. {flag} 3,224,224")
        return values
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not values or not numbers or (name == "std" and any(v <= 0 for v in values)):
        rule = "finite numbers above 0" if name == "std" else "finite numbers"
        raise BadInputError(f"{flag} {list(values)}: expected {rule}, one per channel or one for all | Fix: e.g. "
                            f"{flag} {'0.229,0.224,0.225' if name == 'std' else '0.485,0.456,0.406'}")
    return tuple(float(v) for v in values)
