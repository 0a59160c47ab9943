"""Calibration ranges: run the model on calibration data once, keep every tensor's range.

    ranges = collect_ranges(model, [{"input": x}], method="MinMax")   # tensor -> (min, max)
    record = CalibrationRecord("MinMax", {"model": ranges}, data={"source": "digits:calib[:100]", ...})
    record.save(bundle / "calibration.json")

The ranges are ONNX Runtime's (``create_calibrator``: MinMax, Entropy or Percentile over every
float tensor). Only each tensor's (min, max) is kept: that is all the QDQ quantizer reads, and
from it both INT8 forms follow (asymmetric U8 activations for ONNX Runtime, symmetric S8 for
TensorRT), so a bundle for the other target is made from the record without recalibrating.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slimdeploy.errors import BadInputError, ExportError


class HistogramRangeError(ExportError):
    """A histogram calibrator (Percentile, Entropy) cannot bin a tensor whose values span too
    little of their magnitude for float32 (a near-constant large activation). Exit code 2."""

METHODS = ("MinMax", "Entropy", "Percentile")
# Percentile (99.999th, ONNX Runtime's histogram calibrator) clips the rare outliers that MinMax
# stretches every scale for: on the SPConv ResNet-20 demo, S8S8 top-1 agreement with FP32 rose
# from 97.0 % (MinMax) to 98.6 %, U8S8 from 99.0 % to 99.6 % (500 held-out digits).
DEFAULT_METHOD = "Percentile"
RECORD_FILE = "calibration.json"
RECORD_FORMAT = 1

Ranges = dict[str, tuple[float, float]]


@dataclass
class CalibrationRecord:
    """Ranges of every calibrated graph (``model``, or each piece of a staged bundle), the
    method that produced them and the data they came from."""

    method: str
    graphs: dict[str, Ranges]
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "method": self.method,
            "data": self.data,
            # Tensors in name order: ONNX Runtime's calibrator returns them in no fixed order, and
            # the same ranges should always be the same bytes (and digest) in a bundle.
            "graphs": {name: {t: list(ranges[t]) for t in sorted(ranges)} for name, ranges in self.graphs.items()},
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationRecord:
        if data.get("format") != RECORD_FORMAT or "graphs" not in data:
            raise BadInputError(f"not a slimdeploy calibration record (format {data.get('format')!r}) | Fix: pass the calibration.json of a bundle")
        graphs = {name: {t: (float(v[0]), float(v[1])) for t, v in ranges.items()} for name, ranges in data["graphs"].items()}
        return cls(str(data["method"]), graphs, dict(data.get("data", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> CalibrationRecord:
        """Read a record from a ``calibration.json`` or from a bundle folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = _bundle_record(path) if (path / "manifest.json").exists() else path / RECORD_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(f"cannot read calibration ranges from '{path}' ({exc}) | Fix: pass a bundle's calibration.json") from exc
        return cls.from_dict(data)


def _bundle_record(bundle_dir: Path) -> Path:
    """The ``calibration.json`` of a bundle, read as the bundle reader serves files: the bundle
    checked (schema, paths inside, no links, digests), the file named by its manifest."""
    from slimdeploy.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    ranges = (bundle.manifest.get("calibration") or {}).get("ranges")
    if not ranges:
        raise BadInputError(f"bundle '{bundle_dir}' holds no calibration ranges (not an INT8 bundle) | Fix: pass an INT8 "
                            "bundle or its calibration.json, or calibrate (--calib digits|PATH)")
    return bundle.file(ranges)


def is_record(source: str | Path) -> bool:
    """True when ``source`` names stored ranges (a .json file, or a bundle with calibration.json)."""
    path = Path(source)
    return (path.is_file() and path.suffix == ".json") or (path.is_dir() and (path / RECORD_FILE).is_file())


def check_method(method: str) -> str:
    """``method`` if ONNX Runtime knows it, else a BadInputError naming the choices."""
    if method not in METHODS:
        raise BadInputError(f"unknown calibration method '{method}' | Note: expected one of {list(METHODS)}")
    return method


def collect_ranges(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], method: str = DEFAULT_METHOD) -> Ranges:
    """Range of every float tensor of ``model`` over ``feeds`` (ONNX Runtime's calibrator).

    Args:
        model: the FP32 graph.
        feeds: calibration batches, each a feed dict.
        method: ``MinMax``, ``Entropy`` or ``Percentile``. Defaults to ``Percentile``.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    check_method(method)
    batches = [dict(feed) for feed in feeds]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="slimdeploy-calib-") as tmp, quiet_quantizer():
        source = Path(tmp) / "model.onnx"
        onnx.save(model, source)
        calibrator = create_calibrator(
            source, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=getattr(CalibrationMethod, method),
        )
        try:
            calibrator.collect_data(Reader())
        except ValueError as exc:  # numpy's histogram of a near-constant large float32 tensor
            if method == "MinMax":
                raise
            raise HistogramRangeError(
                f"the {method} calibrator cannot histogram a tensor of graph '{model.graph.name}' ({exc}) | Note: "
                "a tensor whose values barely vary at a large magnitude cannot be binned in float32 | Fix: pass "
                "--calib-method MinMax") from exc
        tensors = calibrator.compute_data()
        del calibrator
    ranges = {name: (_scalar(data.range_value[0]), _scalar(data.range_value[1])) for name, data in tensors.data.items()}
    # A tensor seen only empty (a compacted block no sample executed) has no range: leave it
    # out, so that nothing is quantized with a made-up one (``int8.unranged_nodes``). MinMax
    # marks it (inf, -inf); the histogram methods give it an empty (low == high) range, as they
    # do a tensor that is constant over the data, which is as well left in FP32.
    return {name: (low, high) for name, (low, high) in ranges.items()
            if np.isfinite(low) and np.isfinite(high) and (low < high or (method == "MinMax" and low == high))}


def _scalar(value: Any) -> float:
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Silence ONNX Runtime's quantization tools for a block: their warnings (per-tensor
    chatter), the histogram calibrators' prints ("Collecting tensor data and making histogram
    ...") and the NumPy RuntimeWarnings their statistics raise on tensors that are constant
    over the data (calibrate.py: "invalid value encountered in divide"). None of it is for the
    user: what matters is in the export's own progress and notes; stdout carries results."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        logging.disable(level)
