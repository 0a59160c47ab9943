"""How numbers read in every command's output: one helper per kind, so that ``export``,
``inspect`` and ``bench`` write a parameter count or a MAC count the same way.

    format_count(105082)       -> "105,082"
    format_macs(15188608)      -> "15.2 M"
    format_seconds(8.14)       -> "8.1 s"

JSON output keeps the raw numbers; these are for people.
"""

from __future__ import annotations

import math

# MAC counts scale by thousands: the largest unit that keeps the number at or above 1.
_MAC_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def format_count(value: int | float) -> str:
    """A whole count with thousands separators: ``105,082``."""
    return f"{round(value):,}"


def format_macs(value: int | float, digits: int = 1) -> str:
    """A MAC (or FLOP) count with a unit: ``15.2 M``, ``1.8 G``, ``640 k``; plain below 1,000.

    Args:
        value: the count.
        digits: decimals kept in the scaled number. Defaults to 1 (3 significant digits or so).
    """
    if not math.isfinite(value):
        return str(value)
    for scale, unit in _MAC_UNITS:
        if abs(value) >= scale:
            scaled = value / scale
            # 640 k, not 640.0 k: decimals only where they carry information.
            return f"{scaled:.{0 if abs(scaled) >= 100 else digits}f} {unit}"
    return format_count(value)


def format_seconds(value: float) -> str:
    """A duration: ``0.42 s`` below one second, ``8.1 s`` below a minute, ``2 min 5 s`` above."""
    if value < 1:
        return f"{value:.2f} s"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds} s"

