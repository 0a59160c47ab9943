"""One error hierarchy. Each class carries the CLI exit code of docs/design.md §8.

Messages follow "what happened | Note: expected ... | Fix: ..." so that the CLI prints one line
that says what was wrong and what to do; the CLI shows no traceback for these
(``SLIMDEPLOY_DEBUG=1`` shows it). Anything that is not a ``SlimDeployError`` is a bug.
"""

from __future__ import annotations


class SlimDeployError(Exception):
    """Base of every error slimdeploy raises on purpose. Exit code 2 unless a subclass says."""

    exit_code: int = 2


class BadInputError(SlimDeployError):
    """The user gave something unusable (a file, an option, an array). Exit code 2."""


class CheckpointError(BadInputError):
    """A checkpoint cannot be read, or is not what was asked for."""


class StateDictMismatchError(CheckpointError):
    """A state_dict's keys or shapes do not match the architecture."""


class ArchitectureError(BadInputError):
    """An unknown architecture name or bad architecture arguments."""


class InputValidationError(BadInputError):
    """An input array has the wrong name, shape or dtype for a model."""


class OutputExistsError(BadInputError):
    """The output directory exists and ``--force`` was not given."""


class BundleError(BadInputError):
    """A bundle directory is missing, incomplete or altered."""


class ExportError(SlimDeployError):
    """The model could not be exported (for example an unsupported layer). Exit code 2."""


class CheckFailedError(SlimDeployError):
    """A parity or lint check failed. Exit code 1."""

    exit_code = 1


class BackendUnavailableError(SlimDeployError):
    """A backend (torch, TensorRT, CUDA) is not installed or usable here. Exit code 3."""

    exit_code = 3


class DuplicateRegistrationError(SlimDeployError):
    """A registry name was registered twice: a programming error surfaced at import."""
