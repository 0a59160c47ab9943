"""Checkpoint → ``nn.Module``: slimdeploy's own format, foreign state_dicts, pickled modules.

Every checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain containers
only, no code runs. A file that holds pickled Python objects (a whole ``nn.Module``) is refused
unless the caller passes ``trust_pickle=True`` (CLI ``--trust-pickle``), because unpickling it
executes code from the file; the refusal names the global it met.

Before anything is unpickled, a zip checkpoint (what ``torch.save`` writes) has every member
read and checked against its CRC (PyTorch's own reader does not check them, so flipped bytes
inside a tensor would load silently), and a ``.safetensors`` file is read with the
``safetensors`` package (``pip install 'slimdeploy[safetensors]'``; a state_dict, so ``--arch``
names the architecture). slimdeploy's own fields are validated against ``OwnCheckpoint``
(pydantic), every floating tensor must be finite, and the model is sized on the meta device
before it is built (``limits.check_model_fits``): absurd ``arch_args`` are refused, not allocated.

slimdeploy's format (written by ``save_checkpoint``)::

    {"format": "slimdeploy.checkpoint", "format_version": 1,
     "arch": "spconv_resnet20_cifar", "arch_args": {...},
     "state_dict": {...},
     "preprocessing": {"input_size": [3, 32, 32], "mean": [...], "std": [...]},
     "meta": {"dataset": "digits", "accuracy": 0.97, ...}}

Foreign checkpoints (official SkipNet, CondenseNet, SPConv training scripts, plain state_dicts)
need ``arch`` unless they name a registered architecture themselves (SkipNet's ``arch`` field,
CondenseNet's ``model`` field, CondenseNetV2's ``arch``: ``cdnv2_a``...). ``state_dict_ema``
(the moving average, preferred as upstream evaluates it), ``state_dict`` and ``model`` entries
are unwrapped, a DataParallel ``module.`` prefix is stripped, missing ``num_batches_tracked``
buffers are tolerated (PyTorch < 0.4 did not save them) and the legacy non-zip container is read.

Your own code: ``arch="module.path:factory"`` or ``arch="path/to/file.py:factory"`` (CLI
``--arch``) imports the factory you name, calls it with the arch args and loads the checkpoint
into what it returns as a state_dict (``load_factory_model``): code you chose to run, never code
a file brings. A checkpoint that records such a factory (slimdeploy's format, or a bundle's
``reference.pt``) is refused unless the caller names the factory again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from slimdeploy._optional import optional_import
from slimdeploy.errors import ArchitectureError, CheckpointError, StateDictMismatchError
from slimdeploy.limits import check_model_fits, estimate_model

FORMAT_NAME = "slimdeploy.checkpoint"
FORMAT_VERSION = 1

# Normalisation used when a foreign checkpoint does not say: CIFAR statistics for 32x32 models
# (the official SkipNet/CondenseNet CIFAR scripts), ImageNet statistics otherwise.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# How many offending keys a mismatch message lists before summarising with a count.
_KEYS_SHOWN = 5
SAFETENSORS_SUFFIX = ".safetensors"
# Largest image side and channel count a checkpoint may declare.
MAX_SIDE = 16_384
MAX_CHANNELS = 4_096

# The parts of ``Preprocessing``, each recorded with where it came from.
PREPROCESSING_FIELDS = ("input_size", "mean", "std")

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Side = Annotated[StrictInt, Field(ge=1, le=MAX_SIDE)]


class PreprocessingFields(BaseModel):
    """``preprocessing`` of slimdeploy's checkpoint format: (C, H, W), and one finite mean and
    one finite, positive std per channel."""

    model_config = ConfigDict(extra="forbid")

    input_size: tuple[Annotated[StrictInt, Field(ge=1, le=MAX_CHANNELS)], Side, Side]
    mean: list[FiniteFloat]
    std: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]]

    @model_validator(mode="after")
    def _one_per_channel(self) -> PreprocessingFields:
        channels = self.input_size[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need one value per channel ({channels}), got {len(self.mean)} and {len(self.std)}")
        return self


class OwnCheckpoint(BaseModel):
    """The fields of slimdeploy's checkpoint format (``save_checkpoint``), validated before use.
    ``state_dict`` is checked separately (tensors, by ``_find_state_dict``)."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    format: Literal["slimdeploy.checkpoint"]
    format_version: Annotated[StrictInt, Field(ge=1)]
    arch: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    arch_args: dict[StrictStr, Any] = Field(default_factory=dict)
    state_dict: dict[StrictStr, Any]
    preprocessing: PreprocessingFields | None = None
    meta: dict[StrictStr, Any] = Field(default_factory=dict)


@dataclass
class Preprocessing:
    """How images become the model's ``input`` tensor: resize to ``input_size``, scale to [0, 1],
    subtract ``mean`` and divide by ``std`` per channel."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(tuple(data["input_size"]), tuple(data["mean"]), tuple(data["std"]))

    @classmethod
    def default_for(cls, input_size: tuple[int, int, int]) -> Preprocessing:
        """CIFAR statistics for inputs of 64 pixels or less, ImageNet statistics above."""
        small = input_size[-1] <= 64
        mean, std = (CIFAR_MEAN, CIFAR_STD) if small else (IMAGENET_MEAN, IMAGENET_STD)
        return cls(tuple(input_size), mean, std)

    def describe(self) -> str:
        """``3x32x32, mean 0.491/0.482/0.447, std 0.247/0.243/0.262``: what the export prints."""
        def values(numbers: tuple[float, ...]) -> str:
            return "/".join(f"{v:.3g}" for v in numbers)

        return f"{'x'.join(map(str, self.input_size))}, mean {values(self.mean)}, std {values(self.std)}"


@dataclass(frozen=True)
class PreprocessingChoice:
    """The preprocessing an export or inspect uses, where each part came from
    (``"checkpoint"``, ``"default"`` or ``"option"``: --input-size/--mean/--std), and notes."""

    preprocessing: Preprocessing
    sources: dict[str, str]
    notes: tuple[str, ...] = ()


def choose_preprocessing(loaded: LoadedModel, input_size: tuple[int, ...] | None = None,
                         mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                         batch: int = 1) -> PreprocessingChoice:
    """``loaded``'s preprocessing with the options given applied (validated ones: finite
    means, positive stds, sizes in range; ``ExportOptions`` checks them).

    Args:
        loaded: the loaded checkpoint (its preprocessing, and where that came from).
        input_size: (S,) a square side, (H, W), or (C, H, W). Defaults to the checkpoint's.
        mean: one value per channel, or one for all. Defaults to the checkpoint's.
        std: one value per channel, or one for all. Defaults to the checkpoint's.
        batch: rows the model will run at once, for the memory check of a new input size.
            Defaults to 1.

    Raises:
        BadInputError: a mean or std whose length is neither 1 nor the channel count.
    """
    from slimdeploy.errors import BadInputError

    base, given = loaded.preprocessing, loaded.preprocessing_source
    size = tuple(base.input_size)
    if input_size:
        size = (size[0], input_size[0], input_size[0]) if len(input_size) == 1 else (
            (size[0], *input_size) if len(input_size) == 2 else tuple(input_size))
    channels = size[0]

    def per_channel(values: tuple[float, ...] | None, current: tuple[float, ...], option: str) -> tuple[float, ...]:
        if not values:
            return current if len(current) == channels else tuple([current[0]] * channels)
        if len(values) not in (1, channels):
            raise BadInputError(f"{option} takes one value or one per channel ({channels}), got {len(values)} | "
                                f"Fix: e.g. {option} {','.join(['0.5'] * channels)}")
        return tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)

    if input_size:
        _check_runs_at(loaded, size, batch)
    chosen = Preprocessing(size, per_channel(mean, base.mean, "--mean"), per_channel(std, base.std, "--std"))  # type: ignore[arg-type]
    sources = {"input_size": "option" if input_size else given["input_size"],
               "mean": "option" if mean else given["mean"], "std": "option" if std else given["std"]}
    notes = []
    defaulted = [name for name in ("mean", "std") if sources[name] == "default"]
    if defaulted:
        which = "CIFAR" if base.mean == CIFAR_MEAN else "ImageNet"
        notes.append(f"'{Path(loaded.source).name}' records no normalisation: using the {which} {'/'.join(defaulted)} "
                     f"({chosen.describe()}) | Fix: pass --mean and --std (and --input-size) as the model was trained")
    return PreprocessingChoice(chosen, sources, tuple(notes))


@dataclass
class LoadedModel:
    """A model ready for export: the module in eval mode and what describes it."""

    module: Any  # torch.nn.Module; typed loosely so this module imports without torch
    arch: str
    arch_args: dict[str, Any]
    preprocessing: Preprocessing
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Sizes read on the meta device before building (``limits.ModelEstimate``); None for a
    # pickled module.
    estimate: Any = None
    # Where each part of ``preprocessing`` (input_size, mean, std) came from: "checkpoint"
    # (slimdeploy's format records it), "default" (a foreign checkpoint: CIFAR or ImageNet
    # statistics by input size) or "option" (``choose_preprocessing``).
    preprocessing_source: dict[str, str] = field(default_factory=lambda: dict.fromkeys(PREPROCESSING_FIELDS, "default"))


def _check_runs_at(loaded: LoadedModel, size: tuple[int, ...], batch: int) -> None:
    """``BadInputError`` unless ``loaded``'s model fits this machine at ``size`` and ``batch``
    rows (sized on the meta device first) and runs one zero image of that size."""
    import torch

    from slimdeploy.errors import BadInputError
    from slimdeploy.models.registry import find_arch

    info = find_arch(loaded.arch)
    if info is not None:
        _, estimate = estimate_model(lambda: info.build(**loaded.arch_args), size)
        check_model_fits(estimate, loaded.arch, batch=batch)
    try:
        with torch.inference_mode():
            loaded.module(torch.zeros(1, *size))
    except Exception as exc:  # a size the layers cannot take: shape errors of every kind
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise BadInputError(
            f"--input-size {'x'.join(map(str, size))}: '{loaded.arch}' cannot run on inputs of this size ({first}) "
            f"| Fix: pass the size the model was trained at (C,H,W, e.g. {','.join(map(str, loaded.preprocessing.input_size))})"
        ) from None


def save_checkpoint(
    path: str | Path | BinaryIO,
    module: Any,
    arch: str,
    arch_args: Mapping[str, Any],
    preprocessing: Preprocessing,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write ``module``'s weights in slimdeploy's checkpoint format (readable with weights_only).

    Args:
        path: destination file (its parent must exist) or a binary file object.
        module: the trained ``nn.Module``.
        arch: registered architecture name.
        arch_args: constructor arguments (JSON-compatible values).
        preprocessing: input size and normalisation the model was trained with.
        meta: free-form JSON-compatible facts (dataset, accuracy, training command). Defaults to {}.
    """
    torch = optional_import("torch", "save a checkpoint")
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_args": dict(arch_args),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
        "preprocessing": preprocessing.to_dict(),
        "meta": dict(meta or {}),
    }
    torch.save(payload, path if hasattr(path, "write") else str(path))


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> Any:
    """``torch.load`` the file safely; every way it can fail becomes a ``CheckpointError``.

    Args:
        path: the checkpoint file.
        trust_pickle: allow unpickling arbitrary objects (runs code from the file). Defaults to False.
    """
    torch = optional_import("torch", "load a checkpoint")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist or is not a file | Fix: check the path")
    if _is_safetensors(path):
        return _read_safetensors(path)
    if zipfile.is_zipfile(path):
        _verify_zip(path)
        if _is_torchscript(path):
            raise CheckpointError(
                f"'{path}' is a TorchScript archive, which slimdeploy cannot export (torch.export needs "
                "the Python module) | Fix: save the model's state_dict (torch.save(model.state_dict(), "
                "'model.pt')) and pass --arch"
            )
    elif _starts_like_zip(path):
        raise CheckpointError(
            f"'{path}' starts like a zip archive (what torch.save writes) but has no readable central "
            "directory: it is truncated or corrupt | Fix: re-download or re-save the checkpoint"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names a refused class or function as "GLOBAL module.name";
        # any other unpickling error means the bytes are not a pickle at all.
        refused = _refused_global(str(exc))
        if refused is None:
            raise _unreadable(path, exc) from exc
        if not trust_pickle:
            raise CheckpointError(
                f"'{path}' holds pickled Python objects (refused global {refused}), not just tensors; "
                "loading it with --trust-pickle would run code from the file | Fix: re-save it as a "
                "state_dict, or pass --trust-pickle only if you trust where it came from"
            ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, zip errors...
        raise _unreadable(path, exc) from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def _refused_global(message: str) -> str | None:
    """The global the weights-only unpickler refused (``GLOBAL posix.system``), or None."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def _starts_like_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _verify_zip(path: Path) -> None:
    """Read every member of a zip checkpoint and check its CRC; ``CheckpointError`` naming the
    first corrupt member, or the archive's own defect (central directory, truncation)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"'{path}' is a corrupt zip archive ({str(exc)[:160] or type(exc).__name__}) | Note: expected a "
            "file written by torch.save | Fix: re-download or re-save the checkpoint"
        ) from exc
    if bad is not None:
        raise CheckpointError(
            f"'{path}' is corrupt: member '{bad}' fails its CRC check (its bytes changed after it was "
            "written) | Fix: re-download or re-save the checkpoint"
        )


def _is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or the format's header: 8-byte length, then a JSON object."""
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` file as a state_dict (needs the ``safetensors`` package)."""
    safetensors_torch = optional_import("safetensors.torch", "read .safetensors checkpoints")
    try:
        return dict(safetensors_torch.load_file(str(path), device="cpu"))
    except Exception as exc:  # SafetensorError, OSError, ValueError on a malformed header
        raise CheckpointError(
            f"cannot read '{path}' as safetensors ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}) "
            "| Note: expected a file written by safetensors.torch.save_file | Fix: re-download or re-save it"
        ) from exc


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    text = str(exc).split("WeightsUnpickler error:")[-1].strip()
    reason = text.splitlines()[0][:160] if text else type(exc).__name__
    return CheckpointError(
        f"cannot read '{path}' as a PyTorch checkpoint ({reason}) | Note: expected a file written "
        "by torch.save (zip or legacy container); it may be truncated, corrupt or another format "
        "| Fix: re-download or re-save the checkpoint"
    )


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_checkpoint(
    path: str | Path,
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load any supported checkpoint into an eval-mode module of a registered architecture.

    Args:
        path: checkpoint file.
        arch: registered architecture name; needed when the checkpoint does not name one.
            Defaults to the checkpoint's own.
        arch_args: constructor arguments; override the checkpoint's and those inferred from its
            keys. Defaults to none.
        trust_pickle: accept a pickled ``nn.Module`` (runs code). Defaults to False.
    """
    torch = optional_import("torch", "load a checkpoint")
    from slimdeploy.models.registry import get_arch

    if arch is not None and is_factory_spec(arch):
        return load_factory_model(path, arch, arch_args)
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    source = str(path)

    if isinstance(obj, torch.nn.Module):
        module = obj.eval()
        name = arch or type(obj).__name__
        size = tuple(getattr(module, "input_size", (3, 224, 224)))
        return LoadedModel(module, name, dict(arch_args or {}), Preprocessing.default_for(size),
                           source, notes=["loaded a pickled nn.Module (--trust-pickle)"])
    weights = _read_weights(obj, path, torch)
    own = weights.own
    named_arch = own.arch if own is not None else _named_arch(obj)
    name = arch or named_arch
    if is_factory_spec(name):
        raise ArchitectureError(
            f"'{path}' holds a model built by user code ({name}); slimdeploy imports code only where you name it | "
            f"Fix: pass --arch {name} if you trust that code")
    if not name:
        raise _no_arch_error(path, weights.state_dict)
    info = get_arch(name)
    notes: list[str] = []
    if own is None and isinstance(obj.get("state_dict_ema"), Mapping) and obj["state_dict_ema"]:
        notes.append("loaded the moving-average weights (state_dict_ema), as the official evaluation does")
    if weights.stripped:
        notes.append(f"stripped the '{weights.stripped}' key prefix")

    inferred = info.infer_args(weights.state_dict) if info.infer_args is not None else {}
    args = weights.arguments(arch_args, inferred)
    module, estimate = _build_sized(lambda: info.build(**args), weights.declared_input_size or info.input_size, info.name)
    missing_tracked = _load_state_dict(module, weights.state_dict, info.name, path)
    if missing_tracked:
        notes.append(f"{missing_tracked} num_batches_tracked buffers were missing (pre-0.4 checkpoint); kept defaults")
    module.eval()

    preprocessing, sources = weights.preprocessing(getattr(module, "input_size", info.input_size))
    return LoadedModel(module, info.name, args, preprocessing, source, weights.meta, notes, estimate, sources)


@dataclass
class CheckpointWeights:
    """A state_dict checkpoint read and checked by ``_read_weights``: slimdeploy's own fields
    (None for a foreign checkpoint), its finite weights with any DataParallel prefix stripped,
    and that prefix ("" when none)."""

    own: OwnCheckpoint | None
    state_dict: dict[str, Any]
    stripped: str

    @property
    def recorded(self) -> PreprocessingFields | None:
        """The preprocessing slimdeploy's format records; None when it records none."""
        return self.own.preprocessing if self.own is not None else None

    @property
    def declared_input_size(self) -> tuple[int, int, int] | None:
        """The (C, H, W) the checkpoint records, for sizing the model; None when it records none."""
        return self.recorded.input_size if self.recorded is not None else None

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.own.meta) if self.own is not None else {}

    def arguments(self, given: Mapping[str, Any] | None, inferred: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Constructor arguments: ``inferred`` (from the keys), overridden by the checkpoint's own,
        overridden by ``given`` (the caller's). Both default to none."""
        own_args = self.own.arch_args if self.own is not None else {}
        return {**dict(inferred or {}), **own_args, **dict(given or {})}

    def preprocessing(self, input_size: Any) -> tuple[Preprocessing, dict[str, str]]:
        """The preprocessing the checkpoint records, else the default statistics for
        ``input_size`` (C, H, W); with where each part came from (``"checkpoint"`` or ``"default"``)."""
        if self.recorded is not None:
            return Preprocessing.from_dict(self.recorded.model_dump()), dict.fromkeys(PREPROCESSING_FIELDS, "checkpoint")
        return Preprocessing.default_for(tuple(input_size)), dict.fromkeys(PREPROCESSING_FIELDS, "default")


def _read_weights(obj: Any, path: str | Path, torch: Any) -> CheckpointWeights:
    """What every state_dict checkpoint passes, in this order, for a registered architecture and
    for ``--arch module:factory`` alike: a mapping; slimdeploy's own fields validated (when it
    says it is in that format); the state_dict found; every floating tensor finite. Then the
    DataParallel ``module.`` prefix is stripped."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"'{path}' holds a {type(obj).__name__}, not a state_dict or checkpoint dict | Fix: "
            "save model.state_dict() or a dict with a 'state_dict' entry"
        )
    own = _own_fields(obj, path) if obj.get("format") == FORMAT_NAME else None
    state_dict = _find_state_dict(obj, path, torch)
    _refuse_nonfinite(state_dict, path, torch)
    state_dict, stripped = _strip_prefix(state_dict)
    return CheckpointWeights(own, state_dict, stripped)


def _build_sized(build: Callable[[], Any], input_size: Any, name: str, meta_may_fail: bool = False) -> tuple[Any, Any]:
    """``build()``'s module and its estimate, sized on the meta device first: absurd arguments
    are refused (``check_model_fits``), never allocated. With ``meta_may_fail`` (user code, which
    may need real tensors) an ``ArchitectureError`` on the meta device leaves the estimate None
    and the real build says what failed. Defaults to False."""
    try:
        _, estimate = estimate_model(build, input_size)
    except ArchitectureError:
        if not meta_may_fail:
            raise
        estimate = None
    if estimate is not None:
        check_model_fits(estimate, name)
    return build(), estimate


def _no_arch_error(path: str | Path, state_dict: Mapping[str, Any]) -> ArchitectureError:
    """The error for a checkpoint that names no architecture, naming those its keys (prefix
    already stripped) point to."""
    from slimdeploy.models.suggest import suggest_archs

    names = suggest_archs(dict(state_dict))
    if not names:
        return ArchitectureError(
            f"'{path}' does not say which architecture it holds, and its keys match none registered | Fix: pass "
            "--arch NAME (slimdeploy zoo list shows the names)"
        )
    others = f" (its keys fit {', '.join(names[1:])} as well)" if len(names) > 1 else ""
    return ArchitectureError(
        f"'{path}' does not say which architecture it holds; its keys match {names[0]}{others} | Fix: pass --arch {names[0]}"
    )


def _own_fields(obj: Mapping[str, Any], path: str | Path) -> OwnCheckpoint:
    """slimdeploy's own checkpoint fields, validated; ``CheckpointError`` naming each bad field."""
    version = obj.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"'{path}' is in slimdeploy checkpoint format {version}; this slimdeploy reads format "
            f"{FORMAT_VERSION} | Fix: upgrade slimdeploy (pip install -U slimdeploy)"
        )
    try:
        return OwnCheckpoint.model_validate(dict(obj))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'checkpoint'}: {error['msg']}"
            for error in exc.errors()[:_KEYS_SHOWN]
        )
        raise CheckpointError(
            f"'{path}' has invalid slimdeploy checkpoint fields: {problems} | Note: expected arch (str), "
            "arch_args (dict), preprocessing {input_size: [C, H, W], mean, std: one finite number per channel, "
            "std > 0}, meta (dict) | Fix: re-save it with slimdeploy.loading.save_checkpoint"
        ) from None


def _refuse_nonfinite(state_dict: Mapping[str, Any], path: str | Path, torch: Any) -> None:
    """``CheckpointError`` when a floating tensor holds NaN or inf: such weights compute broken
    numbers, and parity against them would prove nothing."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(
                    f"'{path}' holds {bad} non-finite value(s) (NaN/inf) in '{name}' | Note: a model with "
                    "NaN or inf weights computes broken numbers | Fix: use a checkpoint saved before "
                    "training diverged, or re-save the weights"
                )


def _find_state_dict(obj: Mapping[str, Any], path: str | Path, torch: Any) -> dict[str, Any]:
    """The mapping of tensors inside a checkpoint: ``state_dict_ema``, ``state_dict``, ``model``,
    or the dict itself."""
    # timm-style training checkpoints (CondenseNetV2's train.py) hold the weights' moving
    # average next to the raw ones; the official evaluation and converter use the average.
    for key in ("state_dict_ema", "state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and _all_tensors(inner, torch):
            return dict(inner)
    if obj and _all_tensors(obj, torch):
        return dict(obj)
    raise CheckpointError(
        f"no state_dict found in '{path}' | Note: expected a mapping of tensors, at the top level or "
        f"under 'state_dict' or 'model'; top-level keys are {sorted(map(str, obj))[:8]} | Fix: save "
        "model.state_dict()"
    )


def _all_tensors(mapping: Mapping[str, Any], torch: Any) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())


def _named_arch(obj: Mapping[str, Any]) -> str | None:
    """The architecture a foreign checkpoint names, if registered (SkipNet ``arch``,
    CondenseNet ``model``)."""
    from slimdeploy.models.registry import get_arch

    for key in ("arch", "model"):
        value = obj.get(key)
        if isinstance(value, str):
            try:
                return get_arch(value).name
            except ArchitectureError:
                continue
    return None


def _strip_prefix(state_dict: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove a ``module.`` prefix (DataParallel) shared by every key."""
    prefix = "module."
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}, prefix
    return state_dict, ""


def _load_state_dict(module: Any, state_dict: dict[str, Any], arch: str, path: str | Path) -> int:
    """Copy weights in after checking keys and shapes; returns the count of tolerated
    missing ``num_batches_tracked`` buffers. Mismatches raise with the first few keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    tolerated = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape (checkpoint vs model)", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:_KEYS_SHOWN])
            more = f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else ""
            problems.append(f"{len(keys)} {label}: {shown}{more}")
    if problems:
        raise StateDictMismatchError(
            f"'{path}' does not match architecture '{arch}': {'; '.join(problems)} | Fix: check "
            "--arch (and --arch-args), or that the checkpoint is the one you meant"
        )
    module.load_state_dict({**{k: expected[k] for k in tolerated}, **state_dict}, strict=True)
    return len(tolerated)


def weights_digest(module: Any) -> str:
    """SHA-256 of a module's state (names, shapes, dtypes, raw bytes, in name order): identifies
    the checkpoint that calibration ranges were collected on."""
    import hashlib

    torch = optional_import("torch", "hash a model's weights")
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # Raw bytes whatever the dtype (bfloat16 has no numpy type).
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- your own code: --arch module.path:factory or path/to/file.py:factory ----------------------

_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_factory_spec(name: Any) -> bool:
    """True when ``name`` names user code (``module.path:factory`` or ``file.py:factory``)
    rather than a registered architecture (registered names hold no ``:``)."""
    if not isinstance(name, str) or ":" not in name:
        return False
    where, _, factory = name.rpartition(":")
    return bool(where) and factory.isidentifier()


def import_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names, imported; every way that fails is an ``ArchitectureError``
    (exit 2) saying what to fix."""
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        module = _import_file(Path(where), spec)
    elif not _MODULE_PATH.match(where):
        raise ArchitectureError(f"--arch {spec}: '{where}' is neither a module path nor a .py file | Note: expected "
                                "package.module:factory or path/to/file.py:factory | Fix: correct --arch")
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise ArchitectureError(
                f"cannot import '{where}' (--arch {spec}): {_one_line(exc)} | Note: a module path must be importable "
                "here (installed, or on PYTHONPATH) | Fix: install it or set PYTHONPATH, or name the file: --arch "
                "path/to/file.py:" + name) from exc
    factory = getattr(module, name, None)
    if factory is None:
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)[:6]
        raise ArchitectureError(f"'{where}' has no '{name}' (--arch {spec}) | Note: it defines {defined} | Fix: name the "
                                "function that builds your model")
    if not callable(factory):
        raise ArchitectureError(f"'{name}' in '{where}' is a {type(factory).__name__}, not callable (--arch {spec}) | "
                                "Fix: name the function (or class) that builds your model")
    return factory


def _import_file(file: Path, spec: str) -> Any:
    """Import a .py file once per process, under a name made from its resolved path."""
    if not file.is_file():
        raise ArchitectureError(f"--arch {spec}: no file '{file}' | Fix: check the path (relative to the current folder)")
    resolved = file.resolve()
    stem = re.sub(r"\W", "_", resolved.stem)
    module_name = f"slimdeploy_arch_{stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:10]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise ArchitectureError(f"--arch {spec}: cannot load '{file}' as Python | Fix: name a .py file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        loader_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[module_name]
        raise ArchitectureError(f"importing '{file}' (--arch {spec}) failed: {_one_line(exc)} | Fix: run "
                                f"python {file} to see the error, and correct the file") from exc
    return module


def build_from_factory(spec: str, arch_args: Mapping[str, Any] | None = None) -> Any:
    """The ``nn.Module`` the factory ``spec`` builds with ``arch_args`` (in eval mode)."""
    torch = optional_import("torch", "build a model")
    factory = import_factory(spec)
    try:
        module = factory(**dict(arch_args or {}))
    except (Exception, SystemExit) as exc:
        raise ArchitectureError(f"{spec}(**{dict(arch_args or {})}) raised {_one_line(exc)} | Fix: check the factory and "
                                "--arch-args") from exc
    if not isinstance(module, torch.nn.Module):
        raise ArchitectureError(f"{spec} returned a {type(module).__name__}, not an nn.Module | Fix: make the factory "
                                "return the model")
    return module.eval()


def load_factory_model(path: str | Path, spec: str, arch_args: Mapping[str, Any] | None = None) -> LoadedModel:
    """Build the model with the factory ``spec`` and load the checkpoint at ``path`` into it as
    a state_dict (read with weights_only; pickled objects are refused).

    Arguments are the checkpoint's (slimdeploy format) overridden by ``arch_args``. The input size
    and normalisation are the checkpoint's (slimdeploy format), else the model's ``input_size``
    attribute with the default statistics, else 3x224x224.
    """
    torch = optional_import("torch", "load a checkpoint")
    # The same reader as a registered architecture's checkpoint: the declared schema, finite
    # weights; then the model sized on the meta device before anything is allocated.
    weights = _read_weights(read_checkpoint(path), path, torch)
    args = weights.arguments(arch_args)
    module, estimate = _build_sized(lambda: build_from_factory(spec, args), weights.declared_input_size, spec,
                                    meta_may_fail=True)
    notes = [f"built by {spec} (--arch: your code)"]
    if weights.stripped:
        notes.append(f"stripped the '{weights.stripped}' key prefix")
    missing_tracked = _load_state_dict(module, weights.state_dict, spec, path)
    if missing_tracked:
        notes.append(f"{missing_tracked} num_batches_tracked buffers were missing; kept defaults")
    module.eval()
    input_size = getattr(module, "input_size", None)
    if input_size is None:
        input_size = (3, 224, 224)
        if weights.recorded is None:
            notes.append("the input size is not known: assumed 3x224x224 (set input_size = (C, H, W) on the model, or "
                         "save the checkpoint with slimdeploy.loading.save_checkpoint)")
    preprocessing, sources = weights.preprocessing(input_size)
    return LoadedModel(module, spec, args, preprocessing, str(path), weights.meta, notes, estimate, sources)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
