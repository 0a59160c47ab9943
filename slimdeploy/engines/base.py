"""The Runner contract shared by every backend (after Polygraphy's ``backend/base/runner.py``).

A runner is activated once (``with runner:`` or ``activate()``), then ``infer(feed)`` takes a
dict of numpy arrays keyed by input name and returns a dict of numpy arrays keyed by output
name. ``infer`` validates the feed against ``input_metadata()`` first (names, then dtypes, then
shapes) and raises ``InputValidationError`` saying what was expected. Subclasses implement
``_activate``, ``_infer``, ``_deactivate`` and ``input_metadata``/``output_names``.

A feed of 0 rows gets empty outputs of the right shapes without running the backend (ONNX
Runtime aborts the process on some graphs given an empty batch): from ``output_metadata()``
where the runner knows its output shapes, else from one zero row run and cut to 0 rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from slimdeploy.errors import InputValidationError, SlimDeployError

# A dimension is a fixed size (int) or a named dynamic axis (str, e.g. "batch").
Dim = int | str


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and shape of a graph input or output; dynamic dims are strings.

    ``optional`` inputs have a default inside the graph (thresholds) and may be left out.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]
    optional: bool = False

    def describe(self) -> str:
        """``name: dtype[dims]``, as error messages list the expected inputs."""
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name}[{dims}]"


def check_feed(feed: Mapping[str, np.ndarray], metadata: Mapping[str, TensorMeta]) -> None:
    """Validate a feed: every input present and no other, then dtypes, then fixed dims.

    Dynamic dims must agree across inputs that share a name (one batch size per call).
    Raises ``InputValidationError`` listing every problem found.
    """
    problems: list[str] = []
    missing = [name for name, meta in metadata.items() if name not in feed and not meta.optional]
    extra = [name for name in feed if name not in metadata]
    if missing:
        problems.append(f"missing input(s) {missing}")
    if extra:
        problems.append(f"unexpected input(s) {extra}")
    bound: dict[str, int] = {}
    for name, meta in metadata.items():
        if name not in feed:
            continue
        array = np.asarray(feed[name])
        if array.dtype != meta.dtype:
            problems.append(f"'{name}' has dtype {array.dtype}, expected {np.dtype(meta.dtype).name}")
            continue
        if array.ndim != len(meta.shape):
            problems.append(f"'{name}' has shape {list(array.shape)}, expected rank {len(meta.shape)}")
            continue
        for axis, (got, want) in enumerate(zip(array.shape, meta.shape)):
            if isinstance(want, int) and got != want:
                problems.append(f"'{name}' has shape {list(array.shape)}: axis {axis} should be {want}")
                break
            if isinstance(want, str) and bound.setdefault(want, got) != got:
                problems.append(f"'{name}' axis {axis} ('{want}') is {got} but another input has {bound[want]}")
                break
    if problems:
        expected = "; ".join(meta.describe() + (" (optional)" if meta.optional else "") for meta in metadata.values())
        raise InputValidationError(f"invalid feed: {'; '.join(problems)} | Note: expected {expected}")


class Runner:
    """Base runner: state checks and feed validation around the backend's ``_infer``.

    Args:
        name: label used in reports. Defaults to the class's ``backend`` (``"onnxruntime"``,
            ``"torch"``, ``"tensorrt"``, ``"staged"``).
    """

    backend: str = "base"

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.backend
        self.is_active = False

    # -- lifecycle --------------------------------------------------------------------------
    def activate(self) -> Runner:
        """Load the backend (session, module, engine); raises if already active. Returns self."""
        if self.is_active:
            raise SlimDeployError(f"runner '{self.name}' is already active")
        self._activate()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        """Release the backend; does nothing when not active."""
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.deactivate()

    # -- inference --------------------------------------------------------------------------
    def infer(self, feed: Mapping[str, np.ndarray], check_inputs: bool = True) -> dict[str, np.ndarray]:
        """Run one batch. Outputs are numpy arrays keyed by output name, in graph order.

        Args:
            feed: input arrays by name.
            check_inputs: validate names, dtypes and shapes first. Defaults to True.
        """
        if not self.is_active:
            raise SlimDeployError(f"runner '{self.name}' is not active: use 'with runner:' or activate()")
        if check_inputs:
            check_feed(feed, self.input_metadata())
        if self._empty_batch(feed):
            return self._infer_empty(feed)
        return self._infer(feed)

    @staticmethod
    def _empty_batch(feed: Mapping[str, np.ndarray]) -> bool:
        """True when an input has 0 rows. Read from the arrays alone (this runs on every call,
        the hot path included): thresholds are 0-D or have one value per stage, never 0."""
        return any(np.ndim(value) and np.shape(value)[0] == 0 for value in feed.values())

    def _infer_empty(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of a 0-row feed: empty arrays shaped by ``output_metadata()`` when every
        output has a dynamic first axis and fixed others; otherwise one zero row is run and
        the outputs cut to 0 rows."""
        try:
            outputs = self.output_metadata()
        except NotImplementedError:
            outputs = {}
        if outputs and all(
            meta.shape and isinstance(meta.shape[0], str) and all(isinstance(d, int) for d in meta.shape[1:])
            for meta in outputs.values()
        ):
            return {name: np.zeros((0, *meta.shape[1:]), dtype=meta.dtype) for name, meta in outputs.items()}
        metadata = self.input_metadata()
        one_row = {
            name: np.zeros((1, *np.shape(value)[1:]), dtype=np.asarray(value).dtype)
            if name in metadata and metadata[name].shape and isinstance(metadata[name].shape[0], str) else value
            for name, value in feed.items()
        }
        return {name: value[:0] for name, value in self._infer(one_row).items()}

    # -- to implement -----------------------------------------------------------------------
    def input_metadata(self) -> dict[str, TensorMeta]:
        """Inputs by name, in the order the model takes them; optional ones (thresholds) last."""
        raise NotImplementedError

    def output_names(self) -> list[str]:
        """Output names, in the order ``infer`` returns them."""
        raise NotImplementedError

    def output_metadata(self) -> dict[str, TensorMeta]:
        """Outputs by name with dtype and shape, where the backend knows them."""
        raise NotImplementedError

    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass


def batched(
    feed: Mapping[str, np.ndarray],
    batch_size: int,
    batch_inputs: Sequence[str] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Split a feed into feeds of at most ``batch_size`` rows.

    Args:
        feed: arrays by name.
        batch_size: rows per piece; the last piece may be smaller.
        batch_inputs: names whose leading axis is the batch; other arrays (thresholds) are
            passed whole to every piece. Defaults to every array.
    """
    names = list(feed) if batch_inputs is None else list(batch_inputs)
    total = len(feed[names[0]])
    return [
        {
            name: np.ascontiguousarray(array[start:start + batch_size]) if name in names else array
            for name, array in feed.items()
        }
        for start in range(0, total, batch_size)
    ]
