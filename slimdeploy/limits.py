"""Bounded work: option ranges, and model sizes checked before anything is allocated.

Every count a user gives (threads, iterations, batch sizes, samples...) is checked against one
table of ranges (``OPTION_RANGES``); a value outside is ``BadInputError`` (exit 2) naming the
valid range. ``--threads 100000`` would otherwise start 100000 threads.

A model is sized before it is built: ``estimate_model`` builds it on torch's ``meta`` device
(shapes only, no memory) and runs one meta forward at batch 1 to read its MACs and activation
sizes. ``check_model_fits`` refuses a model whose weights, activations or MACs exceed what this
machine can hold (``available_memory``), so absurd ``--arch-args`` are refused in a second
instead of allocating until the kernel kills the process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimdeploy.errors import BadInputError

# Threads beyond a few per core only add contention; 100000 would hang thread creation.
THREADS_PER_CORE = 4
DEVICES = ("auto", "cpu", "cuda", "openvino", "tensorrt")
# Copies of the weights an export holds at once (model, folded or float64 copy, ONNX bytes,
# reference.pt bytes): a lower bound, so only models that cannot fit are refused.
WEIGHT_COPIES = 4
# Per sample, the largest activation is held with its input while the next layer runs.
ACTIVATION_COPIES = 2
# A hundred ImageNet ResNet-50s per sample: beyond this an export on this machine does not end.
MAX_MACS_PER_SAMPLE = 10**12


def max_threads() -> int:
    """The most intra-op threads accepted: THREADS_PER_CORE per CPU core."""
    return THREADS_PER_CORE * (os.cpu_count() or 1)


# Option → (smallest, largest, what the value means); the largest may be computed.
OPTION_RANGES: dict[str, tuple[int, int | Callable[[], int], str]] = {
    "threads": (0, max_threads, "intra-op threads; 0 lets the backend choose"),
    "iterations": (1, 1_000_000, "timed calls per batch size"),
    "warmup": (0, 100_000, "untimed calls before timing"),
    "batch": (1, 65_536, "rows per call"),
    "run_batch": (0, 65_536, "rows per call; 0 = all at once"),
    "samples": (1, 100_000, "parity samples"),
    "calib_size": (1, 100_000, "calibration samples"),
    "shard_size": (1, 1_000_000, "samples per shard, the unit of work and of resumption"),
    "chunk": (1, 65_536, "samples read at once within a shard"),
    "workers": (1, 1024, "worker processes or Ray actors"),
    "retries": (0, 100, "further tries of a shard whose worker crashed"),
}


def check_option(name: str, value: Any, flag: str | None = None) -> int:
    """``value`` as an int within ``OPTION_RANGES[name]``, or ``BadInputError`` naming the range.

    Args:
        name: key of ``OPTION_RANGES``.
        value: the value given.
        flag: how the user spelled the option, for the message. Defaults to ``--name``.
    """
    low, high, meaning = OPTION_RANGES[name]
    top = high() if callable(high) else high
    label = flag or f"--{name.replace('_', '-')}"
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
        raise BadInputError(
            f"{label} {value!r} is out of range | Note: expected an integer from {low} to {top} ({meaning}) "
            f"| Fix: pass {label} between {low} and {top}"
        )
    return value


def check_threads(threads: Any) -> int:
    """``threads`` within 0..``max_threads()``; see ``check_option``."""
    return check_option("threads", threads)


def check_batch_sizes(values: Sequence[Any], flag: str = "--batch-sizes") -> list[int]:
    """Every batch size within ``OPTION_RANGES["batch"]``, and at least one."""
    if not values:
        raise BadInputError(f"{flag} is empty | Fix: give at least one batch size, e.g. {flag} 1,16")
    return [check_option("batch", value, flag) for value in values]


def check_device(device: Any) -> str:
    """``device`` one of ``DEVICES``: an unknown one is bad input (exit 2), not a missing backend."""
    if device not in DEVICES:
        raise BadInputError(f"unknown device {device!r} | Note: expected one of {list(DEVICES)} | Fix: pass --device cpu")
    return device


def available_memory() -> int:
    """Bytes this process may still allocate: the kernel's MemAvailable (Linux), else the
    physical memory; lowered to the address-space limit when one is set."""
    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):
        pass
    if not available:
        try:
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 1 << 40
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            available = min(available, soft)
    except (ImportError, ValueError, OSError):
        pass
    return available


@dataclass
class ModelEstimate:
    """Sizes of a model read from its meta-device build (nothing allocated).

    Attributes:
        params: parameter count.
        weight_bytes: bytes of parameters and buffers.
        macs: MACs per sample, or None when the meta forward could not run.
        activation_bytes: bytes of the largest activation per sample, or None likewise.
        input_size: the (C, H, W) the forward ran at.
    """

    params: int
    weight_bytes: int
    macs: int | None
    activation_bytes: int | None
    input_size: tuple[int, ...]


def estimate_model(build: Callable[[], Any], input_size: Sequence[int] | None) -> tuple[Any, ModelEstimate]:
    """Build a model on the meta device and size it (needs torch). Returns the meta module
    (for its ``input_size`` attribute) and the estimate.

    Args:
        build: returns the ``nn.Module``; called inside ``torch.device("meta")``.
        input_size: (C, H, W) for the forward. Defaults to the module's ``input_size``.
    """
    import torch

    from slimdeploy.flops import count_macs_of

    with torch.device("meta"):
        module = build()
    tensors = [*module.parameters(), *module.buffers()]
    params = sum(p.numel() for p in module.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    size = tuple(int(v) for v in (input_size or getattr(module, "input_size", ()) or ()))
    largest = [0]

    def record(_layer: Any, _args: Any, output: Any) -> None:
        for value in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(value, torch.Tensor):
                largest[0] = max(largest[0], value.numel() * value.element_size())

    macs = activation = None
    if len(size) == 3 and all(v > 0 for v in size):
        handles = [layer.register_forward_hook(record) for layer in module.modules()]
        try:
            compute = getattr(module, "forward_all", module)
            macs = count_macs_of(module, compute, torch.empty(1, *size, device="meta")).macs
            activation = max(largest[0], 4 * size[0] * size[1] * size[2])
        except Exception:  # a forward that needs real values (data-dependent control flow)
            macs = activation = None
        finally:
            for handle in handles:
                handle.remove()
    return module, ModelEstimate(params, weight_bytes, macs, activation, size)


def check_model_fits(estimate: ModelEstimate, name: str, batch: int = 1, memory: int | None = None) -> None:
    """``BadInputError`` (exit 2) when the model cannot run here: weights (``WEIGHT_COPIES``
    copies) plus activations at ``batch`` exceed the available memory, or its MACs per sample
    exceed ``MAX_MACS_PER_SAMPLE``.

    Args:
        estimate: from ``estimate_model``.
        name: the architecture, for the message.
        batch: rows per forward. Defaults to 1.
        memory: bytes available. Defaults to ``available_memory()``.
    """
    memory = available_memory() if memory is None else memory
    weights = WEIGHT_COPIES * estimate.weight_bytes
    activations = ACTIVATION_COPIES * batch * (estimate.activation_bytes or 0)
    fix = "| Fix: check --arch-args (and the checkpoint's input size); use a machine with more memory for a real model this large"
    if weights + activations > memory:
        raise BadInputError(
            f"'{name}' needs about {_gib(weights + activations)} ({estimate.params:,} parameters, "
            f"{_gib(estimate.weight_bytes)} of weights held {WEIGHT_COPIES}x"
            + (f", {_gib(activations)} of activations at batch {batch}, input {list(estimate.input_size)}" if activations else "")
            + f") but this machine has {_gib(memory)} available | Note: sized on the meta device before allocating "
            + fix
        )
    if estimate.macs is not None and estimate.macs > MAX_MACS_PER_SAMPLE:
        raise BadInputError(
            f"'{name}' computes {estimate.macs:.3g} MACs per sample at input {list(estimate.input_size)} | Note: "
            f"expected at most {MAX_MACS_PER_SAMPLE:.0e} (a hundred ImageNet ResNet-50s) " + fix
        )


def _gib(value: int) -> str:
    return f"{value / 2**30:.3g} GiB"


def check_batch_memory(batch_sizes: Sequence[int], row_bytes: int, flag: str = "--batch") -> None:
    """``BadInputError`` when the inputs alone of the largest batch (``row_bytes`` per row, held
    twice: the feed and its copy) exceed the available memory."""
    largest = max(batch_sizes)
    needed = ACTIVATION_COPIES * largest * row_bytes
    memory = available_memory()
    if needed > memory:
        raise BadInputError(
            f"{flag} {largest} needs {_gib(needed)} for its inputs alone but this machine has {_gib(memory)} "
            f"available | Fix: pass a smaller {flag}"
        )


def check_export_options(
    samples: Any,
    batch_sizes: Sequence[Any],
    threads: Any,
    calib_size: Any = None,
    tolerances: Any = None,
) -> None:
    """The counts and tolerances ``export`` takes, checked before any work (``BadInputError``).

    Args:
        samples: parity samples.
        batch_sizes: parity batch sizes.
        threads: intra-op threads.
        calib_size: calibration samples, or None for the default. Defaults to None.
        tolerances: per-output (atol, rtol), or None for the default. Defaults to None.
    """
    from slimdeploy.tolerance import check_tolerances

    check_option("samples", samples)
    check_batch_sizes(list(batch_sizes))
    check_threads(threads)
    if calib_size is not None:
        check_option("calib_size", calib_size)
    if tolerances:
        check_tolerances(tolerances, "--atol/--rtol")
