"""Statistics that add up batch by batch and merge across workers to the same result.

``ErrorSketch`` keeps a histogram of non-negative values (absolute errors) in logarithmic
buckets, after DDSketch: a value ``v > 0`` falls in bucket ``ceil(log_g v)`` with
``g = (1 + a) / (1 - a)``, and a bucket answers for its values with ``2 g^i / (g + 1)``, which
lies within ``a`` (relative) of every value in it. With ``RELATIVE_ERROR`` = 1 %, a percentile
read from the sketch is within 1 % of the exact one (nearest rank: the smallest value with at
least ``ceil(q n)`` values at or below it), and is clamped to the exact minimum and maximum,
which the sketch also keeps. Values below ``ZERO_BELOW`` count as 0 (an absolute error of at
most 1e-30). Buckets are counts, so merging adds counts: merging in any order, or adding the
same values in other batches, gives the same sketch.

``ExactSum`` adds floats exactly (as fractions), so a mean over batches merged in any order is
the same number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

RELATIVE_ERROR = 0.01
ZERO_BELOW = 1e-30
_GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_LOG_GAMMA = math.log(_GAMMA)
# The percentiles a streamed report gives for each numeric output.
PERCENTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99.9": 0.999}


@dataclass
class ExactSum:
    """A sum of floats kept exactly; ``value`` rounds it once."""

    total: Fraction = field(default_factory=Fraction)

    def add(self, values: np.ndarray) -> None:
        """Add every (finite) value of ``values``: ``math.fsum`` rounds the batch's exact sum
        once, and that float is added exactly."""
        if values.size:
            self.total += Fraction(math.fsum(values.ravel().tolist()))

    def merge(self, other: ExactSum) -> None:
        self.total += other.total

    @property
    def value(self) -> float:
        return float(self.total)

    def to_dict(self) -> list[str]:
        return [str(self.total.numerator), str(self.total.denominator)]

    @classmethod
    def from_dict(cls, data: list[str]) -> ExactSum:
        return cls(Fraction(int(data[0]), int(data[1])))


@dataclass
class ErrorSketch:
    """Histogram of non-negative finite values in logarithmic buckets (module docstring)."""

    count: int = 0
    zeros: int = 0
    buckets: dict[int, int] = field(default_factory=dict)
    low: float = math.inf
    high: float = 0.0

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` (non-negative and finite: the caller leaves NaN and inf out)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if not values.size:
            return
        self.count += int(values.size)
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))
        positive = values[values >= ZERO_BELOW]
        self.zeros += int(values.size - positive.size)
        if positive.size:
            keys, counts = np.unique(np.ceil(np.log(positive) / _LOG_GAMMA).astype(np.int64), return_counts=True)
            for key, count in zip(keys.tolist(), counts.tolist()):
                self.buckets[key] = self.buckets.get(key, 0) + count

    def merge(self, other: ErrorSketch) -> None:
        self.count += other.count
        self.zeros += other.zeros
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)
        for key, count in other.buckets.items():
            self.buckets[key] = self.buckets.get(key, 0) + count

    def quantile(self, q: float) -> float:
        """The nearest-rank ``q`` quantile, within ``RELATIVE_ERROR`` (0 for no values)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count - 1e-9))
        if rank <= self.zeros:
            return max(0.0, self.low) if self.low < ZERO_BELOW else 0.0
        seen = self.zeros
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if seen >= rank:
                estimate = 2 * _GAMMA ** key / (_GAMMA + 1)
                return float(min(max(estimate, self.low), self.high))
        return self.high

    def percentiles(self) -> dict[str, float]:
        """``PERCENTILES`` read from the sketch."""
        return {name: self.quantile(q) for name, q in PERCENTILES.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "zeros": self.zeros, "low": None if math.isinf(self.low) else self.low,
                "high": self.high, "buckets": {str(k): v for k, v in sorted(self.buckets.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ErrorSketch:
        low = math.inf if data["low"] is None else float(data["low"])
        return cls(int(data["count"]), int(data["zeros"]), {int(k): int(v) for k, v in data["buckets"].items()},
                   low, float(data["high"]))
