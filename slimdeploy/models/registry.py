"""Registry of reference architectures, keyed by name.

Registering a name twice raises (as torchvision's ``register_model`` does) instead of silently
overwriting. The registry drives test parametrisation: tests/test_models.py checks that every
registered name is exercised.

    @register_model("spconv_resnet20_cifar", family="spconv", input_size=(3, 32, 32))
    def spconv_resnet20_cifar(num_classes: int = 10) -> nn.Module: ...
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimdeploy.errors import ArchitectureError, DuplicateRegistrationError


@dataclass(frozen=True)
class ArchInfo:
    """What the pipeline needs to know about an architecture, besides its weights.

    Attributes:
        name: registry name (the official factory name where one exists).
        builder: callable returning an ``nn.Module``; its keyword arguments are the arch args.
        family: ``"mobilenet"``, ``"spconv"``, ``"skipnet"``, ``"condensenet"``, ``"early_exit"``.
        input_size: default (C, H, W) of the image input.
        dynamic: True when the model makes data-dependent decisions (gates, exits).
        infer_args: optional callable ``state_dict -> dict`` that reads constructor arguments
            from a checkpoint's keys and shapes (CondenseNet); explicit arch args win.
        description: one line for ``zoo list`` and ``inspect``.
    """

    name: str
    builder: Callable[..., Any]
    family: str
    input_size: tuple[int, int, int]
    dynamic: bool = False
    infer_args: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    def default_args(self) -> dict[str, Any]:
        """Constructor keyword arguments with their defaults."""
        signature = inspect.signature(self.builder)
        return {
            key: param.default
            for key, param in signature.parameters.items()
            if param.default is not inspect.Parameter.empty
        }

    def build(self, **arch_args: Any) -> Any:
        """Build the module; unknown or bad arguments raise ``ArchitectureError``."""
        accepted = inspect.signature(self.builder).parameters
        unknown = sorted(set(arch_args) - set(accepted))
        if unknown:
            raise ArchitectureError(
                f"unknown argument(s) {unknown} for architecture '{self.name}' | Note: expected "
                f"some of {sorted(accepted)} | Fix: correct --arch-args"
            )
        try:
            return self.builder(**arch_args)
        except (TypeError, ValueError, RuntimeError, OverflowError, ZeroDivisionError, IndexError, KeyError) as exc:
            # Arguments of the wrong kind or size surface as any of these (a negative width is a
            # RuntimeError from torch, a zero divisor a ZeroDivisionError).
            raise ArchitectureError(
                f"cannot build '{self.name}' with arguments {arch_args}: {exc} | Fix: correct --arch-args"
            ) from exc


_REGISTRY: dict[str, ArchInfo] = {}


def register_model(
    name: str,
    *,
    family: str,
    input_size: tuple[int, int, int],
    dynamic: bool = False,
    infer_args: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    description: str = "",
    aliases: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a builder under ``name`` (and ``aliases``); duplicates raise."""

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        info = ArchInfo(
            name=name,
            builder=builder,
            family=family,
            input_size=tuple(input_size),  # type: ignore[arg-type]
            dynamic=dynamic,
            infer_args=infer_args,
            description=description or ((builder.__doc__ or "").strip().splitlines() or [""])[0],
            aliases=tuple(aliases),
        )
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise DuplicateRegistrationError(f"architecture '{key}' is already registered")
            _REGISTRY[key] = info
        return builder

    return wrap


def list_models(family: str | None = None) -> list[str]:
    """Registered architecture names (aliases excluded), sorted; optionally one family."""
    _ensure_loaded()
    return sorted(
        key
        for key, info in _REGISTRY.items()
        if key == info.name and (family is None or info.family == family)
    )


def get_arch(name: str) -> ArchInfo:
    """The ``ArchInfo`` for ``name`` or an alias; unknown names raise with close matches."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ArchitectureError(
            f"unknown architecture '{name}' | Note: {hint}known: {', '.join(list_models())} "
            f"| Fix: pass one of these with --arch (slimdeploy zoo list shows them)"
        ) from None


def find_arch(name: str) -> ArchInfo | None:
    """The ``ArchInfo`` for ``name`` or an alias, or None when it is not registered (a pickled
    module of an unregistered class)."""
    _ensure_loaded()
    return _REGISTRY.get(name)


# Modules whose import registers architectures (each imports torch).
ARCHITECTURE_MODULES = (
    "slimdeploy.models.mobilenet",
    "slimdeploy.models.spconv_resnet",
    "slimdeploy.models.skipnet",
    "slimdeploy.models.condensenet",
    "slimdeploy.models.condensenetv2",
    "slimdeploy.models.s2d",
    "slimdeploy.models.branchy",
)


def _ensure_loaded() -> None:
    # The registry fills lazily, on the first question, so that importing slimdeploy.models
    # stays torch-free (the runtime side imports it on edge images without torch).
    import importlib

    for module in ARCHITECTURE_MODULES:
        importlib.import_module(module)
