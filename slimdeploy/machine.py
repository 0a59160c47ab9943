"""What else the machine was doing while something was timed.

Timings taken while other processes use the CPU are slower, and a ratio of two such timings can
be off by any factor (a busy 2-core machine turned a 3.7x speed-up into "158x"). ``OtherLoad``
measures the cores that other processes kept busy during a block: the machine's busy time
(``/proc/stat``, every core) minus this process's own CPU time, over the wall time. ``bench``
and the benchmark scripts flag timings above ``NOISY_OTHER_CORES``.

    with OtherLoad() as other:
        ...timed work...
    other.cores        # e.g. 0.03 on an idle machine; None where /proc/stat cannot be read
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Other processes keeping more than a fifth of a core busy on average make timings noisy: the
# runners use every core, so any other work takes turns with them (the benchmarks' threshold).
NOISY_OTHER_CORES = 0.2
_PROC_STAT = Path("/proc/stat")


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``, every core), or
    None where that cannot be read (not Linux)."""
    try:
        first = _PROC_STAT.read_text().splitlines()[0].split()
        fields = [int(value) for value in first[1:]]
    except (OSError, IndexError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class OtherLoad:
    """Cores that other processes kept busy while the block ran (``cores``; None where the
    machine's busy time cannot be read). See the module docstring."""

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._busy, self._own, self._start = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._start
        busy = machine_busy_seconds()
        if self._busy is None or busy is None or wall <= 0:
            return
        others = (busy - self._busy) - (own_cpu_seconds() - self._own)
        self.cores = round(max(0.0, others / wall), 3)
