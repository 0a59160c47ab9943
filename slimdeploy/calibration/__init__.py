"""Calibration and reduced precision (docs/design.md §6): calibration data, calibration ranges
stored for reuse, INT8 QDQ in the target's form (U8S8 for ONNX Runtime, S8S8 for TensorRT),
FP16, decision heads kept FP32."""

from slimdeploy.calibration.apply import (
    CONV_OPS,
    PRECISIONS,
    PrecisionResult,
    agreement,
    apply_precision,
    check_precision,
)
from slimdeploy.calibration.decisions import DecisionScope, decision_nodes
from slimdeploy.calibration.fp16 import convert_fp16
from slimdeploy.calibration.int8 import INT8_TARGETS, qdq_violations, quantize_int8
from slimdeploy.calibration.ranges import (
    METHODS,
    RECORD_FILE,
    CalibrationRecord,
    collect_ranges,
    is_record,
)
from slimdeploy.calibration.readers import CalibrationSet, load_calibration

__all__ = [
    "CONV_OPS", "INT8_TARGETS", "METHODS", "PRECISIONS", "RECORD_FILE", "CalibrationRecord", "CalibrationSet",
    "DecisionScope", "PrecisionResult", "agreement", "apply_precision", "check_precision",
    "collect_ranges", "convert_fp16", "decision_nodes", "is_record", "load_calibration",
    "qdq_violations", "quantize_int8",
]
