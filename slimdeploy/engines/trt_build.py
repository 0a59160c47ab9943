"""TensorRT engine building (TensorRT 10.3 to 11.x), and the build plan a bundle records.

The plan (``build_plan``) is pure data made on any machine: per graph of the bundle, the
optimisation profile (min/opt/max shapes from the bundle's batch range), the engine file, and
the equivalent ``trtexec`` line. ``build_engine`` follows it on a machine with TensorRT and a
GPU (engines are tied to the GPU and TensorRT version that build them,
docs/tensorrt-facts.md "Versions"):

- a strongly typed network: precision comes from the ONNX (Cast nodes for FP16, Q/DQ pairs
  for INT8); no precision builder flags, which 11.x removed ("Precision");
- the ONNX parser's errors reported in full (every ``parser.get_error(i)``);
- one optimisation profile per engine, from the batch range;
- a workspace limit (``MemoryPoolType.WORKSPACE``);
- a timing cache kept in the bundle (``trt/timing.cache``), shared by every engine of a staged
  bundle and reused by the next build.

Defaults: batch range 1/8/32 (min/opt/max), workspace 1024 MiB, TF32 off (FP32 engines are
checked against FP32 tolerances). Importing this module imports no tensorrt.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slimdeploy._optional import is_available as _module_available
from slimdeploy._optional import optional_import
from slimdeploy.bundle.schema import ENGINE_DIR, TIMING_CACHE
from slimdeploy.errors import BackendUnavailableError, BadInputError, CheckFailedError

DEFAULT_MIN_BATCH = 1
DEFAULT_OPT_BATCH = 8
DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_MB = 1024
# TensorRT versions this code is written for (docs/tensorrt-facts.md "Versions").
TRT_MIN_VERSION = (10, 3)
TRT_MAX_VERSION = (12, 0)  # exclusive
TRT_VERSION_RANGE = ">=10.3,<12"
BUILD_README = "BUILD.md"
BUILD_SCRIPT = "build.sh"
# Staged pieces that see every row of a call; the other pieces (exec{k}, skip{k}) see only
# the rows routed to them, down to 1, so their profiles start at batch 1.
_FULL_BATCH_PIECE = re.compile(r"^(model|stem|head|gate\d+)$")


@dataclass(frozen=True)
class BuildSpec:
    """How engines are built.

    Attributes:
        min_batch: smallest batch the engines accept. Defaults to 1.
        opt_batch: batch TensorRT tunes its kernels for. Defaults to 8.
        max_batch: largest batch the engines accept. Defaults to 32.
        workspace_mb: workspace memory pool limit in MiB. Defaults to 1024.
        tf32: let TensorRT use TF32 in FP32 layers (faster on Ampere+, ~1e-3 relative error,
            outside the FP32 parity tolerances). Defaults to False.
    """

    min_batch: int = DEFAULT_MIN_BATCH
    opt_batch: int = DEFAULT_OPT_BATCH
    max_batch: int = DEFAULT_MAX_BATCH
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    tf32: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise BadInputError(
                f"batch range min {self.min_batch} / opt {self.opt_batch} / max {self.max_batch} is not "
                "ordered | Fix: choose 1 <= --min-batch <= --opt-batch <= --max-batch"
            )
        if self.workspace_mb < 1:
            raise BadInputError(f"--workspace must be a positive number of MiB, got {self.workspace_mb}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as the manifest records them (``trt.spec``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildSpec:
        """A spec from recorded fields; missing ones take the defaults, unknown keys are ignored."""
        return cls(**{key: data[key] for key in ("min_batch", "opt_batch", "max_batch", "workspace_mb", "tf32") if key in data})

    @classmethod
    def resolve(cls, base: Mapping[str, Any], overrides: Mapping[str, Any]) -> BuildSpec:
        """``base`` fields (a recorded spec, or none) with ``overrides`` on top; an ``opt_batch``
        that was not given is moved into the new [min, max] range (``--max-batch 4`` alone
        means opt 4, not an error)."""
        merged = {**cls().to_dict(), **base, **overrides}
        if "opt_batch" not in overrides:
            merged["opt_batch"] = min(max(merged["opt_batch"], merged["min_batch"]), merged["max_batch"])
        return cls.from_dict(merged)


# -- availability -------------------------------------------------------------------------------
def is_available() -> bool:
    """True when tensorrt imports and device buffers can be made (cuda-python or torch).
    Checked without importing either; a missing GPU shows only when a builder is created."""
    return _module_available("tensorrt") and (cuda_python_available() or _module_available("torch"))


def cuda_python_available() -> bool:
    """True when cuda-python's runtime bindings import (``cuda.bindings.runtime``, or
    ``cuda.cudart`` before 12.6); checked without importing them. Not the ``cuda`` namespace,
    which cuda-core and other NVIDIA packages also install."""
    return _module_available("cuda.bindings.runtime") or _module_available("cuda.cudart")


def trt_version(trt: Any = None) -> str | None:
    """The TensorRT version: the loaded module's ``__version__`` (the bindings that actually
    run; a pip wheel's metadata may sit beside JetPack's or an image's own TensorRT), else the
    distribution metadata."""
    from slimdeploy.versions import package_version

    found = getattr(trt, "__version__", None) if trt is not None else None
    return found or package_version("tensorrt")


def version_matches(installed: str, expected: str) -> bool:
    """True when every dotted part of ``expected`` equals the same part of ``installed``:
    ``10.3`` accepts any 10.3 build, ``10.3.0.30`` only that build (engines are tied to it)."""
    want = expected.strip().split(".")
    return installed.strip().split(".")[: len(want)] == want


def parse_version(text: str) -> tuple[int, int]:
    """``"10.3.0.30"`` → ``(10, 3)``."""
    match = re.match(r"^\s*(\d+)\.(\d+)", text)
    if not match:
        raise BadInputError(f"'{text}' is not a TensorRT version | Note: expected e.g. 10.3 or 11.4.0")
    return int(match.group(1)), int(match.group(2))


def check_version(version: str) -> None:
    """Refuse a TensorRT outside 10.3 to 11.x (BackendUnavailableError, exit 3)."""
    found = parse_version(version)
    if not TRT_MIN_VERSION <= found < TRT_MAX_VERSION:
        raise BackendUnavailableError(
            f"TensorRT {version} is installed; slimdeploy builds with TensorRT {TRT_VERSION_RANGE} | Fix: "
            "use a TensorRT 10.3+ container (docker/trt.Dockerfile, or docker/jetson.Dockerfile on JetPack 6)"
        )


# -- the plan ------------------------------------------------------------------------------------
def engine_file(graph_name: str) -> str:
    """Bundle-relative engine path of a graph (``trt/model.engine``, ``trt/exec3.engine``)."""
    return f"{ENGINE_DIR}/{graph_name}.engine"


def profile_shapes(model: Any, spec: BuildSpec, min_batch: int | None = None) -> dict[str, dict[str, list[int]]]:
    """Min/opt/max shapes of each runtime input of an ONNX graph: axis 0 is the batch, every
    other axis must be static. Inputs backed by an initializer (thresholds with a default) are
    not part of the profile.

    Args:
        model: an ``onnx.ModelProto``.
        spec: the batch range.
        min_batch: override of ``spec.min_batch`` (pieces that see routed subsets). Defaults to
            ``spec.min_batch``.
    """
    low = spec.min_batch if min_batch is None else min_batch
    initializers = {init.name for init in model.graph.initializer}
    shapes: dict[str, dict[str, list[int]]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims:  # 0-D runtime input: nothing to profile
            continue
        static = []
        for axis, dim in enumerate(dims[1:], start=1):
            if not dim.HasField("dim_value"):
                raise BadInputError(
                    f"graph input '{value.name}' has a dynamic axis {axis} ('{dim.dim_param}'); TensorRT profiles "
                    "here vary only the batch (axis 0) | Fix: export with a fixed input size"
                )
            static.append(int(dim.dim_value))
        if dims[0].HasField("dim_value"):  # a static batch: the profile is that size
            fixed = [int(dims[0].dim_value), *static]
            shapes[value.name] = {"min": fixed, "opt": fixed, "max": fixed}
            continue
        opt = max(low, spec.opt_batch)
        shapes[value.name] = {"min": [low, *static], "opt": [opt, *static], "max": [spec.max_batch, *static]}
    return shapes


def engine_batch_range(plan: Mapping[str, Any]) -> tuple[int, int]:
    """(min, max) batch that every engine of a plan accepts, from the recorded profiles: a
    static-batch graph is fixed at its ONNX batch whatever the plan's batch range, and staged
    pieces fed routed rows start lower than the stem. The plan's batch range when no graph has
    a profiled input."""
    profiles = [shape for entry in plan.get("graphs") or [] for shape in entry["shapes"].values()]
    if not profiles:
        return int(plan["batch"]["min"]), int(plan["batch"]["max"])
    return max(int(shape["min"][0]) for shape in profiles), min(int(shape["max"][0]) for shape in profiles)


def trtexec_command(onnx_file: str, engine: str, shapes: Mapping[str, Mapping[str, Sequence[int]]], spec: BuildSpec) -> str:
    """The ``trtexec`` line that builds the same engine as ``build_engine`` (run in the bundle
    directory). ``--stronglyTyped`` is needed on 10.12+ and does nothing on 11.x; no precision
    flags (11.x rejects ``--fp16``/``--int8``/``--best``); ``--skipInference``: the engine is
    all we want, not trtexec's timing run."""
    parts = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine}", "--stronglyTyped", "--skipInference"]
    for key, option in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
        if shapes:
            parts.append(f"{option}=" + ",".join(f"{name}:{'x'.join(str(d) for d in shape[key])}" for name, shape in shapes.items()))
    parts.append(f"--memPoolSize=workspace:{spec.workspace_mb}M")
    parts.append(f"--timingCacheFile={TIMING_CACHE}")
    if not spec.tf32:
        parts.append("--noTF32")
    return " ".join(shlex.quote(part) for part in parts)


def build_plan(graphs: Mapping[str, tuple[str, Any]], spec: BuildSpec, form: str | None, bundle_name: str = "BUNDLE") -> dict[str, Any]:
    """The manifest's ``trt`` section: what ``slimdeploy build`` (or trtexec) does on the target.

    Args:
        graphs: graph name → (bundle-relative .onnx file, ``onnx.ModelProto``).
        spec: batch range and workspace.
        form: the bundle's dynamic form (None for static models).
        bundle_name: the bundle directory as the user will name it in the command. Defaults to
            ``"BUNDLE"``.
    """
    refuse_form(form)
    entries = []
    for name, (onnx_file, model) in graphs.items():
        # Staged pieces after the routing get any subset of the rows, down to one.
        low = spec.min_batch if _FULL_BATCH_PIECE.match(name) else 1
        shapes = profile_shapes(model, spec, min_batch=low)
        engine = engine_file(name)
        entries.append({"name": name, "onnx": onnx_file, "engine": engine, "shapes": shapes,
                        "trtexec": trtexec_command(onnx_file, engine, shapes, spec)})
    notes = [FORM_WARNINGS[form]] if form in FORM_WARNINGS else []
    return {
        "tensorrt": TRT_VERSION_RANGE,
        "strongly_typed": True,
        "batch": {"min": spec.min_batch, "opt": spec.opt_batch, "max": spec.max_batch},
        "spec": spec.to_dict(),
        "timing_cache": TIMING_CACHE,
        "build_command": f"slimdeploy build {shlex.quote(bundle_name)}",
        "trtexec": [entry["trtexec"] for entry in entries],
        "graphs": entries,
        "engines": None,  # graph name → engine file, once built
        "built": None,  # TensorRT version, time, parity of the engines, once built
        "notes": notes,
    }


COMPACT_REFUSED = (
    "the 'compact' form needs data-dependent output shapes (NonZero → Gather → ScatterND), which "
    "TensorRT runs only with an IOutputAllocator and without CUDA graphs | Fix: use --dynamic staged "
    "(the TensorRT default: one engine per piece, decisions on the host, savings per sample)"
)
IF_WARNING = (
    "the 'if' form builds one engine with IIfConditional per gated block; TensorRT evaluates "
    "branches lazily, but users report no speed-up in some versions and wrong results for "
    "If → Transpose → Resize on 11.1/11.2: check the engine (slimdeploy build runs check) and "
    "prefer --dynamic staged"
)
LOOP_WARNING = (
    "the 'loop' form builds one engine with an ILoop per run of like gated blocks, an "
    "IIfConditional per block inside it (TensorRT nests conditionals in loops) and convolutions "
    "whose weights are gathered per iteration (multi-input convolutions); the 'if' form's caveats "
    "apply to every iteration: check the engine (slimdeploy build runs check) and prefer --dynamic staged"
)
# What the build plan and the export say about a form TensorRT builds with a caveat.
FORM_WARNINGS = {"if": IF_WARNING, "loop": LOOP_WARNING}


def refuse_form(form: str | None) -> None:
    """Raise ``BadInputError`` for forms TensorRT is not offered (``compact``)."""
    if form == "compact":
        raise BadInputError(COMPACT_REFUSED)


def build_script(plan: Mapping[str, Any]) -> str:
    """``build.sh``: the plan's trtexec lines, for a target without slimdeploy."""
    lines = [
        "#!/bin/sh",
        "# Build this bundle's TensorRT engines with trtexec (TensorRT " + plan["tensorrt"] + ").",
        "# Prefer `" + plan["build_command"] + "`: it also records the engines in manifest.json",
        "# (with their sha256) and checks them against the golden outputs.",
        "set -e",
        'cd "$(dirname "$0")"',
        f"mkdir -p {ENGINE_DIR}",
        *plan["trtexec"],
    ]
    return "\n".join(lines) + "\n"


def build_readme(plan: Mapping[str, Any], form: str | None) -> str:
    """``BUILD.md``: how to build the engines on the target, in the bundle itself."""
    batch = plan["batch"]
    engines = "one engine per piece (`stages/*.onnx` → `trt/*.engine`)" if form == "staged" else "one engine (`model.onnx` → `trt/model.engine`)"
    text = [
        "# Building the TensorRT engines",
        "",
        "Engines are tied to the GPU and TensorRT version that build them, so they are built on the",
        f"target (TensorRT {plan['tensorrt']}). This bundle's ONNX already passed its parity check in",
        "ONNX Runtime; precision is in the graph (strongly typed network, no precision flags).",
        "",
        "```bash",
        plan["build_command"] + "            # builds, records and checks the engines",
        plan["build_command"].replace("slimdeploy build", "slimdeploy check") + " --device tensorrt",
        "```",
        "",
        f"Batch range: min {batch['min']}, opt {batch['opt']}, max {batch['max']}; {engines}; the timing",
        f"cache `{plan['timing_cache']}` is kept in the bundle and reused by the next build.",
        "",
        "Without slimdeploy on the target, `sh build.sh` runs the equivalent trtexec lines (the",
        "engines are then not recorded in manifest.json: run `slimdeploy build` for that).",
    ]
    for note in plan.get("notes", []):
        text += ["", f"Note: {note}."]
    return "\n".join(text) + "\n"


# -- building (needs TensorRT and a GPU) ---------------------------------------------------------
def import_tensorrt(purpose: str = "build TensorRT engines") -> Any:
    """``tensorrt``, or ``BackendUnavailableError`` (exit 3) with the install command."""
    trt = optional_import("tensorrt", purpose)
    version = trt_version(trt)
    if version:
        check_version(version)
    return trt


_LOGGERS: dict[int, Any] = {}


def trt_logger(trt: Any) -> Any:
    """One ``trt.Logger`` (warnings and errors) per process: TensorRT keeps the first logger it is
    given and warns about every different one, and a staged bundle makes dozens of runtimes."""
    key = id(trt)
    if key not in _LOGGERS:
        _LOGGERS[key] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[key]


class ParseError(CheckFailedError):
    """TensorRT's ONNX parser rejected a graph (exit 1); the message lists every parser error."""


@dataclass
class BuiltEngine:
    """One built engine and the timing cache after building it."""

    engine: bytes
    timing_cache: bytes


def build_engine(
    onnx_path: str | Path,
    shapes: Mapping[str, Mapping[str, Sequence[int]]],
    spec: BuildSpec,
    timing_cache: bytes = b"",
    trt: Any = None,
) -> BuiltEngine:
    """Build one serialised engine from an ONNX file.

    Args:
        onnx_path: the .onnx file (read by the parser, so external weights next to it work).
        shapes: input name → {"min", "opt", "max"} shapes (``profile_shapes``).
        spec: workspace and TF32.
        timing_cache: a serialised timing cache to start from. Defaults to an empty one.
        trt: the tensorrt module. Defaults to importing it.
    """
    trt = trt or import_tensorrt()
    logger = trt_logger(trt)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # no GPU / no driver: TensorRT cannot create a builder
        raise BackendUnavailableError(
            f"TensorRT cannot create a builder ({exc}): no usable CUDA GPU here | Fix: run slimdeploy build on the GPU machine"
        ) from exc
    if builder is None:
        raise BackendUnavailableError("TensorRT cannot create a builder: no usable CUDA GPU here | Fix: run slimdeploy build on the GPU machine")
    # 10.x: strongly typed on request; 11.x: always, the flag is accepted and ignored.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        listing = "; ".join(errors) or "no error recorded"
        raise ParseError(
            f"TensorRT's ONNX parser rejected '{onnx_path}' ({len(errors)} error(s)): {listing} | Fix: run "
            "slimdeploy lint on the bundle, and re-export (a staged form keeps every graph flat)"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and not spec.tf32:
        # TF32 is on by default for FP32 layers on Ampere+; off keeps FP32 parity tolerances.
        config.clear_flag(tf32)
    cache = _timing_cache(config, timing_cache)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another GPU or TensorRT version: start afresh rather than mix timings.
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, shape in shapes.items():
            profile.set_shape(name, tuple(shape["min"]), tuple(shape["opt"]), tuple(shape["max"]))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckFailedError(
            f"TensorRT could not build an engine from '{onnx_path}' (its log above says why) | Fix: "
            "raise --workspace, or run slimdeploy lint on the bundle"
        )
    return BuiltEngine(bytes(serialized), bytes(cache.serialize()))


def _timing_cache(config: Any, data: bytes) -> Any:
    """The bundle's timing cache, or an empty one when there is none or it cannot be read."""
    if data:
        try:
            cache = config.create_timing_cache(bytes(data))
        except Exception:  # a corrupt or foreign cache is not worth failing the build for
            cache = None
        if cache is not None:
            return cache
    return config.create_timing_cache(b"")


class EngineFromOnnx:
    """A lazy loader: called, it builds and returns the serialised engine (for ``TrtRunner``).

    Args:
        onnx_path: the .onnx file.
        shapes: the optimisation profile (``profile_shapes``).
        spec: workspace and TF32. Defaults to ``BuildSpec()``.
    """

    def __init__(self, onnx_path: str | Path, shapes: Mapping[str, Mapping[str, Sequence[int]]], spec: BuildSpec | None = None) -> None:
        self.onnx_path = Path(onnx_path)
        self.shapes = shapes
        self.spec = spec or BuildSpec()

    def __call__(self) -> bytes:
        return build_engine(self.onnx_path, self.shapes, self.spec).engine
