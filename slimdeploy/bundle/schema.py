"""The one declared schema of a bundle's ``manifest.json`` (pydantic v2 models).

    manifest = validate_manifest(json.loads(text), where="bundle 'b/'")   # or BundleError

Every field that a command reads is modelled here, with its type and what it may hold: paths
are relative and stay inside the bundle (``RelativePath``), tolerances and thresholds are
finite, batch sizes positive, dtypes ones the runners know, and the fields must agree with
each other (a staged bundle has a graph for every piece its plan runs; every file a command
reads or runs is listed in ``files`` with its sha256). Validation is strict (no coercion: the
string ``"1"`` is not a batch size), so code that reads the validated JSON gets exactly the
types declared here. Unknown keys are allowed and ignored where no command reads them.

A violation is a ``BundleError`` (exit 2) of one line naming the field's path and what was
expected. Imports no torch.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from slimdeploy.errors import BundleError
from slimdeploy.forms import EXIT_FORMS, GATED_FORMS

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# Where ``slimdeploy build`` writes engines and the timing cache (engines.trt_build uses these).
ENGINE_DIR = "trt"
TIMING_CACHE = f"{ENGINE_DIR}/timing.cache"
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
PRECISIONS = ("fp32", "fp16", "int8")
# Bounds that keep a hostile manifest from asking for absurd work (a batch of 10**12 rows).
MAX_BATCH = 1 << 20
MAX_DIM = 1 << 31
MAX_PATH = 1024


def check_relative_path(value: str) -> str:
    """``value`` if it names a file inside a bundle: relative, POSIX separators, no ``..``,
    ``.`` or empty components, no NUL or backslash; ``ValueError`` saying why otherwise."""
    if not value:
        raise ValueError("expected a relative path inside the bundle, got an empty string")
    if len(value) > MAX_PATH:
        raise ValueError(f"expected a relative path inside the bundle, got {len(value)} characters")
    if "\0" in value or "\\" in value:
        raise ValueError(f"expected a relative path with '/' separators, got {value!r}")
    if value.startswith("/"):
        raise ValueError(f"expected a relative path inside the bundle, got the absolute path {value!r}")
    parts = value.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"expected a relative path inside the bundle (no '..', '.' or empty parts), got {value!r}")
    return value


RelativePath = Annotated[str, AfterValidator(check_relative_path)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(min_length=1, max_length=256)]
# Graph, piece and engine names become file names (trt/NAME.engine): no separators, no "..".
GraphName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
Count = Annotated[int, Field(ge=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
FiniteNonNegative = Annotated[float, Field(allow_inf_nan=False, ge=0)]
Rate = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]
Dim = Annotated[int, Field(ge=0, le=MAX_DIM)] | Annotated[str, Field(min_length=1, max_length=64)]


def _empty_as_none(value: Any) -> Any:
    """``gating`` and ``exits`` are ``{}`` when the model has no such plan."""
    return None if value == {} else value


class Open(BaseModel):
    """A manifest section: strict types; keys no command reads are allowed."""

    model_config = ConfigDict(strict=True, extra="allow")


class Closed(BaseModel):
    """A section handed on whole (as keyword arguments, or as graph inputs): no other keys."""

    model_config = ConfigDict(strict=True, extra="forbid")


class TensorSpec(Open):
    """A graph input or output: ``{"name", "dtype", "shape"}``; ``optional`` inputs (thresholds)
    have a ``default`` inside the graph."""

    name: Name
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: Annotated[list[Dim], Field(max_length=8)]
    optional: bool = False
    default: Finite | list[Finite] | None = None


def _onnx_file(value: str) -> str:
    if not value.endswith(".onnx"):
        raise ValueError(f"expected an .onnx file, got {value!r}")
    return value


OnnxFile = Annotated[RelativePath, AfterValidator(_onnx_file)]


class GraphFile(Open):
    """One ONNX graph of the bundle (``model``, or one per piece of a staged bundle)."""

    name: GraphName
    file: OnnxFile


class ModelInfo(Open):
    """What was exported (``inspect`` prints it)."""

    arch: Name
    arch_args: dict[str, Any]
    deployed_arch: Name
    transforms: list[str]
    folds: dict[str, Count]
    family: Name
    dynamic: bool
    source: str
    params: Count
    macs: Count
    graph_macs: Count
    meta: dict[str, Any]


class Preprocessing(Open):
    """Input size (C, H, W), mean and std per channel."""

    input_size: Annotated[list[Annotated[int, Field(ge=1, le=MAX_DIM)]], Field(min_length=1, max_length=4)]
    mean: list[Finite]
    std: list[Finite]


class DecisionSpec(Closed):
    """One decision output (``parity.DecisionSpec`` is built from these keys)."""

    name: Name
    probs: Name
    threshold: Finite | list[Finite]
    near_margin: FiniteNonNegative = 1e-3
    kind: Literal["gate", "exit"] = "gate"
    threshold_input: str = ""


class Thresholds(Closed):
    """Default thresholds by graph input name (fed to the engines of a single-graph bundle)."""

    gate_threshold: Finite | None = None
    exit_thresholds: Annotated[list[Finite], Field(min_length=1)] | None = None


class Decisions(Open):
    outputs: list[DecisionSpec]
    thresholds: Thresholds


class GatedPlan(Open):
    """How the pieces of a gated network connect (``exporters.gated.GatedPlan``): the staged
    controller follows it, ``bench`` predicts MACs from it."""

    kind: Literal["gated"]
    n_blocks: Annotated[int, Field(ge=1)]
    state: list[Name]
    # The staged controller allocates [batch, state_width] per state tensor: a recurrent gate's
    # hidden size (10 in the demo), never millions.
    state_width: Annotated[int, Field(ge=0, le=1 << 16)]
    skips: list[Annotated[int, Field(ge=1)]]
    graphs: list[Name]
    macs: dict[str, Count]

    def piece_names(self) -> list[str]:
        """The pieces the staged controller runs (``StagedGatedRunner.piece_names``)."""
        names = ["stem"]
        for k in range(1, self.n_blocks):
            names += [f"gate{k - 1}", f"exec{k}"] + ([f"skip{k}"] if k in self.skips else [])
        return [*names, "head"]

    @model_validator(mode="after")
    def _consistent(self) -> GatedPlan:
        if any(k >= self.n_blocks for k in self.skips) or len(set(self.skips)) != len(self.skips):
            raise ValueError(f"expected skips to be distinct blocks 1..{self.n_blocks - 1}, got {self.skips}")
        # Two MACs entries per block at least: check the count before listing the pieces, so
        # a huge n_blocks costs nothing.
        if self.n_blocks > len(self.macs):
            raise ValueError(f"expected MACs for every piece of {self.n_blocks} blocks, got {len(self.macs)} entries")
        missing = [name for name in self.piece_names() if name not in self.macs]
        if missing:
            raise ValueError(f"expected MACs for every piece, missing {missing[:5]}")
        return self


class ExitPlan(Open):
    """How the stages of an early-exit network connect (``exporters.early_exit.ExitPlan``)."""

    kind: Literal["early_exit"]
    n_stages: Annotated[int, Field(ge=1)]
    exit_rule: Literal["max_softmax", "entropy"]
    thresholds: list[Finite]
    needs: list[list[Name]]
    provides: list[list[Name]]
    reads_input: list[bool]
    graphs: list[Name]
    macs: dict[str, Count]

    def piece_names(self) -> list[str]:
        """The stage graphs the staged controller runs."""
        return [f"stage{stage}" for stage in range(self.n_stages)]

    @model_validator(mode="after")
    def _consistent(self) -> ExitPlan:
        n = self.n_stages
        for field in ("thresholds", "needs", "provides", "reads_input"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"expected {field} to have one entry per stage ({n}), got {len(getattr(self, field))}")
        if not self.reads_input[0]:
            raise ValueError("expected stage 0 to read the input image")
        provided: set[str] = set()
        for stage, (needs, provides) in enumerate(zip(self.needs, self.provides)):
            unknown = [name for name in needs if name not in provided]
            if unknown:
                raise ValueError(f"expected stage {stage} to read only features earlier stages provide, got {unknown}")
            provided.update(provides)
        missing = [name for name in self.piece_names() if name not in self.macs]
        if missing:
            raise ValueError(f"expected MACs for every stage, missing {missing[:5]}")
        return self


class Golden(Open):
    """The golden inputs and references that ``check`` compares with."""

    file: RelativePath
    samples: Annotated[int, Field(ge=1)]
    batch_sizes: Annotated[list[BatchSize], Field(min_length=1, max_length=64)]
    source: str
    labels: bool
    reference: str


class ParitySummary(Open):
    """The export's parity summary; ``check`` reuses its ``criteria`` (reduced precision)."""

    passed: bool
    reference: str
    candidate: str
    samples: Count
    batch_sizes: list[BatchSize]
    failures: Count
    criteria: dict[Literal["top1_agreement", "decision_agreement", "mismatch_fraction"], Rate] | None = None


class CalibrationInfo(Open):
    """How a reduced-precision bundle was made; ``ranges`` names its ``calibration.json``."""

    ranges: RelativePath | None = None


class RuntimeChoice(Open):
    """The CPU runtime the bundle runs on by default (``--device auto``) and whether it was
    timed at export (``export.runtime``); bundles without it run on ONNX Runtime."""

    default: Literal["onnxruntime", "openvino"]
    measured: bool


Shape = Annotated[list[Annotated[int, Field(ge=1, le=MAX_DIM)]], Field(min_length=1, max_length=8)]


class ProfileShapes(Closed):
    """Min/opt/max shape of one engine input (axis 0 is the batch)."""

    min: Shape
    opt: Shape
    max: Shape

    @model_validator(mode="after")
    def _ordered(self) -> ProfileShapes:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError("expected min, opt and max shapes of one rank")
        if any(not lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f"expected min <= opt <= max on every axis, got {self.min} / {self.opt} / {self.max}")
        return self


class EngineEntry(Open):
    """One engine of the build plan: the graph it is built from and where it goes."""

    name: GraphName
    onnx: OnnxFile
    engine: RelativePath
    shapes: dict[str, ProfileShapes]
    trtexec: str


def _check_order(low: int, mid: int, high: int, rule: str) -> None:
    if not low <= mid <= high:
        raise ValueError(f"expected {rule}, got {low} / {mid} / {high}")


class BatchRange(Closed):
    """The batch range the engines accept (min, opt, max)."""

    min: BatchSize
    opt: BatchSize
    max: BatchSize

    @model_validator(mode="after")
    def _ordered(self) -> BatchRange:
        _check_order(self.min, self.opt, self.max, "min <= opt <= max")
        return self


class BuildSpecFields(Open):
    """``trt.spec``: the fields of ``engines.trt_build.BuildSpec``, as export records them."""

    min_batch: BatchSize
    opt_batch: BatchSize
    max_batch: BatchSize
    workspace_mb: Annotated[int, Field(ge=1, le=1 << 24)]
    tf32: bool

    @model_validator(mode="after")
    def _ordered(self) -> BuildSpecFields:
        _check_order(self.min_batch, self.opt_batch, self.max_batch, "min_batch <= opt_batch <= max_batch")
        return self


class Built(Open):
    """What ``slimdeploy build`` recorded: TensorRT version, time, the engines' parity."""

    tensorrt: str
    created: str
    seconds: FiniteNonNegative
    parity: dict[str, Any] | None = None


class TrtPlan(Open):
    """The ``trt`` section: the engine build plan, and the engines once built."""

    tensorrt: str
    strongly_typed: bool
    batch: BatchRange
    spec: BuildSpecFields
    timing_cache: RelativePath
    build_command: str
    trtexec: list[str]
    graphs: Annotated[list[EngineEntry], Field(min_length=1)]
    engines: dict[GraphName, RelativePath] | None = None
    built: Built | None = None
    notes: list[str] = []
    lint: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _inside_engine_dir(self) -> TrtPlan:
        # Engines and the cache go to trt/ only: a plan cannot make build overwrite a graph,
        # the golden file or anything outside the bundle.
        if self.timing_cache != TIMING_CACHE:
            raise ValueError(f"expected the timing cache at {TIMING_CACHE!r}, got {self.timing_cache!r}")
        engines = [entry.engine for entry in self.graphs] + list((self.engines or {}).values())
        for engine in engines:
            if not (engine.startswith(f"{ENGINE_DIR}/") and engine.endswith(".engine")):
                raise ValueError(f"expected engine files under {ENGINE_DIR}/ named *.engine, got {engine!r}")
        names = [entry.name for entry in self.graphs]
        if len(set(names)) != len(names) or len({entry.engine for entry in self.graphs}) != len(names):
            raise ValueError("expected one engine file per graph, each named once")
        if self.engines is not None and set(self.engines) != set(names):
            raise ValueError(f"expected an engine for every graph of the plan {sorted(names)}, got {sorted(self.engines)}")
        return self


class Manifest(Open):
    """``manifest.json``: what the bundle holds and how to run and re-check it."""

    schema_version: Literal[SCHEMA_VERSION]  # type: ignore[valid-type]
    created: str
    versions: dict[str, str | None]
    model: ModelInfo
    preprocessing: Preprocessing
    target: Literal["ort", "trt"]
    dynamic: Literal[GATED_FORMS] | None  # type: ignore[valid-type]
    precision: Literal[PRECISIONS]  # type: ignore[valid-type]
    calibration: CalibrationInfo | None = None
    runtime: RuntimeChoice | None = None
    opset: Annotated[int, Field(ge=1, le=1000)]
    inputs: Annotated[list[TensorSpec], Field(min_length=1)]
    outputs: Annotated[list[TensorSpec], Field(min_length=1)]
    graphs: Annotated[list[GraphFile], Field(min_length=1)]
    decisions: Decisions
    gating: Annotated[GatedPlan | None, BeforeValidator(_empty_as_none)]
    exits: Annotated[ExitPlan | None, BeforeValidator(_empty_as_none)]
    stages: list[GraphName]
    golden: Golden
    tolerances: dict[str, Annotated[list[FiniteNonNegative], Field(min_length=2, max_length=2)]]
    parity: ParitySummary
    export: dict[str, Any]
    reference_weights: RelativePath | None
    trt: TrtPlan | None = None
    files: dict[RelativePath, Sha256]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        _check_tensors(self)
        _check_form(self)
        _check_decisions(self)
        _check_listed(self)
        return self


def _unique(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise ValueError(f"expected distinct {what} names, got {names}")


def _check_tensors(manifest: Manifest) -> None:
    """The image input is ``input`` with the batch first; names are unique; outputs include
    ``logits``; stored tolerances cover every output."""
    _unique([spec.name for spec in manifest.inputs], "input")
    _unique([spec.name for spec in manifest.outputs], "output")
    image = next((spec for spec in manifest.inputs if spec.name == "input"), None)
    if image is None or image.shape[:1] != ["batch"] or image.optional:
        raise ValueError("expected a required input named 'input' whose first axis is 'batch'")
    outputs = {spec.name for spec in manifest.outputs}
    if "logits" not in outputs:
        raise ValueError(f"expected an output named 'logits', got {sorted(outputs)}")
    if manifest.tolerances and "" not in manifest.tolerances and not outputs <= set(manifest.tolerances):
        raise ValueError("expected tolerances with a default entry \"\" or one entry per output")


def _check_form(manifest: Manifest) -> None:
    """The dynamic form matches the plan; every graph a runner opens is there."""
    graphs = [graph.name for graph in manifest.graphs]
    _unique(graphs, "graph")
    plan = manifest.gating or manifest.exits
    if manifest.gating is not None and manifest.exits is not None:
        raise ValueError("expected a gating plan or an exit plan, not both")
    if plan is None and manifest.dynamic is not None:
        raise ValueError(f"expected a gating or exit plan for the dynamic form {manifest.dynamic!r}")
    if plan is not None and manifest.dynamic not in (GATED_FORMS if manifest.gating else EXIT_FORMS):
        raise ValueError(f"expected a dynamic form for the model's {'gating' if manifest.gating else 'exit'} plan, got {manifest.dynamic!r}")
    if manifest.dynamic == "staged":
        needed = plan.piece_names()  # type: ignore[union-attr]
        if len(graphs) < len(needed) or any(name not in graphs for name in needed):
            missing = [name for name in needed if name not in graphs]
            raise ValueError(f"expected a graph for every piece of the staged plan, missing {missing[:5]}")
    elif "model" not in graphs:
        raise ValueError(f"expected a graph named 'model', got {graphs[:5]}")
    if manifest.trt is not None:
        files = {graph.name: graph.file for graph in manifest.graphs}
        planned = {entry.name: entry.onnx for entry in manifest.trt.graphs}
        if planned != files:
            raise ValueError("expected the TensorRT build plan (trt.graphs) to cover exactly the bundle's graphs, "
                             "each built from its own .onnx file")


def _check_decisions(manifest: Manifest) -> None:
    """Decision outputs name real outputs; the exit thresholds have one value per stage."""
    outputs = {spec.name for spec in manifest.outputs}
    for spec in manifest.decisions.outputs:
        if spec.name not in outputs or spec.probs not in outputs:
            raise ValueError(f"expected the decision {spec.name!r} and its values {spec.probs!r} among the outputs")
    if manifest.exits is not None:
        thresholds = manifest.decisions.thresholds.exit_thresholds
        if thresholds is None or len(thresholds) != manifest.exits.n_stages:
            raise ValueError(f"expected decisions.thresholds.exit_thresholds with {manifest.exits.n_stages} values (one per stage)")


def _check_listed(manifest: Manifest) -> None:
    """Every file a command reads or runs is listed in ``files`` (and so verified)."""
    if MANIFEST in manifest.files:
        raise ValueError(f"expected files without {MANIFEST} (it cannot hold its own digest)")
    read = {f"graphs[{i}].file": graph.file for i, graph in enumerate(manifest.graphs)}
    read["golden.file"] = manifest.golden.file
    if manifest.reference_weights is not None:
        read["reference_weights"] = manifest.reference_weights
    if manifest.calibration is not None and manifest.calibration.ranges is not None:
        read["calibration.ranges"] = manifest.calibration.ranges
    if manifest.trt is not None:
        read.update({f"trt.engines.{name}": file for name, file in (manifest.trt.engines or {}).items()})
    for field, file in read.items():
        if file not in manifest.files:
            raise ValueError(f"expected {field} ({file!r}) to be listed in files with its sha256")


def validate_manifest(data: Any, where: str) -> Manifest:
    """The typed manifest, or ``BundleError`` of one line: the first violation's field path and
    what was expected (and how many more there are).

    Args:
        data: the parsed JSON.
        where: what holds the manifest, for the message (``"bundle 'b/'"``).
    """
    if not isinstance(data, dict):
        raise BundleError(
            f"{where}: {MANIFEST} holds a JSON {type(data).__name__}, not an object | Note: expected the "
            "manifest slimdeploy export writes | Fix: re-export the bundle, or restore its manifest.json"
        )
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        from slimdeploy import __version__

        raise BundleError(
            f"{where} has manifest schema {version}, newer than the schema {SCHEMA_VERSION} slimdeploy "
            f"{__version__} reads | Fix: upgrade slimdeploy (pip install -U slimdeploy) to read it"
        )
    if isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION:
        raise BundleError(
            f"{where} has manifest schema {version}, older than the schema {SCHEMA_VERSION} this slimdeploy "
            "reads | Fix: re-export it with this slimdeploy"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"{where}: {describe_violation(exc)}") from None
    except RecursionError:
        raise BundleError(f"{where}: {MANIFEST} is nested too deeply | Fix: re-export the bundle") from None


def describe_violation(exc: ValidationError) -> str:
    """One line: ``field 'a.b[0]': what was expected (got X) [and N more problems] | Fix: ...``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = field_path(first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    got = ""
    shown_already = first["type"] == "value_error" and "got " in message
    if first["type"] != "missing" and not shown_already and "input" in first and not isinstance(first["input"], dict | list):
        shown = repr(first["input"])
        got = f" (got {shown[:60]}{'...' if len(shown) > 60 else ''})"
    more = f" [and {len(errors) - 1} more problem(s)]" if len(errors) > 1 else ""
    field = f"field '{path}'" if path else "the manifest"
    return (f"{MANIFEST} {field}: {message}{got}{more} | Fix: re-export the bundle with slimdeploy export, "
            "or restore its manifest.json")


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("golden", "batch_sizes", 0)`` → ``golden.batch_sizes[0]``; keys that are not names
    (file names, the default tolerance ``""``) in brackets: ``files['model.onnx']``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "[key]":  # pydantic's marker for a dict key that failed
            text += " (the key)"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            text += f".{part}"
        else:
            text += f"[{part!r}]"
    return text.lstrip(".")
