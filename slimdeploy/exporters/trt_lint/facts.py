"""The facts the lint applies, read from ``trt_ops.json`` (the onnx-tensorrt operator matrices
of TensorRT 10.15 and 10.1 and constraints read in the parser source; docs/tensorrt-facts.md
says where each part comes from), and the choice of matrix for a TensorRT version.

A target of 10.15 or newer is linted against the 10.15 matrix, the newest one read; a target
newer than 10.15 gets a warning saying so (the JSON's own note). A target from 10.3 to 10.14 is
linted against the 10.1 matrix, the newest one read that is not newer than the target, with
the 10.15 matrix at hand to say "supported from some release up to 10.15" instead of a flat
"unsupported".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from onnx import TensorProto

from slimdeploy.errors import BadInputError

FACTS_FILE = Path(__file__).with_name("trt_ops.json")
# The TensorRT versions slimdeploy targets (JetPack 6 ships 10.3; 11.x is the newest line).
OLDEST_SUPPORTED = (10, 3)
NEWEST_MAJOR = 11

# ONNX element types as the matrix's "Supported Types" column prints them.
TYPE_NAMES: dict[int, str] = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE", TensorProto.INT32: "INT32", TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL",
    TensorProto.INT4: "INT4", TensorProto.FLOAT4E2M1: "FP4",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.FLOAT8E4M3FNUZ: "FP8",
    TensorProto.FLOAT8E5M2: "FP8", TensorProto.FLOAT8E5M2FNUZ: "FP8",
    TensorProto.INT16: "INT16", TensorProto.UINT16: "UINT16", TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64", TensorProto.UINT4: "UINT4", TensorProto.STRING: "STRING",
    TensorProto.COMPLEX64: "COMPLEX64", TensorProto.COMPLEX128: "COMPLEX128",
}
# Element types TensorRT takes only through quantization (data_types_note).
QUANTIZED_TYPES = frozenset({
    TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ,
})
# The 10.1 matrix prints INT64 as "INF64" for ConstantOfShape: a typo in the doc.
_TYPE_TYPOS = {"INF64": "INT64"}


@cache
def load_facts() -> dict[str, Any]:
    """The parsed ``trt_ops.json``."""
    return json.loads(FACTS_FILE.read_text())


def _matrix_version() -> str:
    return str(load_facts()["_meta"]["primary_source"]["header"]["trt_version"])


DEFAULT_TRT_VERSION = _matrix_version()


def parse_version(text: str) -> tuple[int, int]:
    """``"10.3"``, ``"10.3.0.26"`` or ``"11"`` → (major, minor); refuses versions outside 10.3 to 11.x."""
    match = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.\d+)*\s*", str(text))
    if not match:
        raise BadInputError(f"'{text}' is not a TensorRT version | Fix: pass e.g. --trt-version 10.3 or 11.1")
    version = (int(match.group(1)), int(match.group(2) or 0))
    if version < OLDEST_SUPPORTED or version[0] > NEWEST_MAJOR:
        raise BadInputError(
            f"TensorRT {text} is outside the versions slimdeploy targets | Note: expected 10.3 to "
            f"{NEWEST_MAJOR}.x | Fix: pass --trt-version between 10.3 and {NEWEST_MAJOR}.x"
        )
    return version


@dataclass(frozen=True)
class Matrix:
    """The operator matrix the lint applies for one TensorRT version.

    Attributes:
        target: the target version, (major, minor).
        name: version of the matrix applied (``"10.15"`` or ``"10.1"``).
        ops: op name → {"supported", "types", "restrictions"}.
        opset_min: lowest ONNX opset the matrix's header names.
        opset_max: highest ONNX opset the matrix's header names.
        newer: the 10.15 matrix when the applied one is older (targets 10.3 to 10.14), else None.
    """

    target: tuple[int, int]
    name: str
    ops: dict[str, dict[str, Any]]
    opset_min: int
    opset_max: int
    newer: dict[str, dict[str, Any]] | None = None

    @property
    def newer_than_read(self) -> bool:
        """The target is newer than the newest matrix read (no 11.x matrix exists here)."""
        return self.target > parse_version(_matrix_version())

    def op(self, op_type: str) -> dict[str, Any] | None:
        return self.ops.get(op_type)

    def types(self, op_type: str) -> set[str]:
        entry = self.ops.get(op_type) or {}
        return {_TYPE_TYPOS.get(t, t) for t in entry.get("types", [])}

    def restriction(self, op_type: str) -> str:
        return str((self.ops.get(op_type) or {}).get("restrictions", ""))


@cache
def matrix_for(version: str) -> Matrix:
    """The matrix to lint against for TensorRT ``version`` (see the module docstring)."""
    facts = load_facts()
    target = parse_version(version)
    primary = facts["_meta"]["primary_source"]["header"]
    if target >= parse_version(str(primary["trt_version"])):
        return Matrix(target, str(primary["trt_version"]), facts["operators_10_15"],
                      int(primary["opset_min"]), int(primary["opset_max"]))
    header = facts["_meta"]["secondary_source"]["header_text"]
    low, high = (int(v) for v in re.findall(r"opset (\d+)", header)[:2])
    return Matrix(target, "10.1", facts["operators_10_1"], low, high, newer=facts["operators_10_15"])


def requested(op_type: str) -> dict[str, Any]:
    """The parser-source constraints collected for ``op_type`` (empty when none were)."""
    return dict(load_facts()["requested_ops"].get(op_type, {}))
