"""PyTorch runner: the reference every other runner is compared with (CPU, eval mode, no grad).

    with TorchRunner(module, inputs={"input": TensorMeta("input", np.float32, ("batch", 3, 32, 32))},
                     output_names=["logits"]) as runner:
        reference = runner.infer({"input": x})

The module's forward takes the inputs positionally in ``inputs`` order and returns a tensor, a
tuple of tensors (matched to ``output_names`` in order) or a dict keyed by output name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from slimdeploy._optional import optional_import
from slimdeploy.engines.base import Runner, TensorMeta
from slimdeploy.errors import SlimDeployError
from slimdeploy.limits import check_threads


def is_available() -> bool:
    """True when torch imports."""
    from slimdeploy._optional import is_available as importable

    return importable("torch")


class TorchRunner(Runner):
    """Runs an ``nn.Module`` on the CPU.

    Args:
        module: the model; put in eval mode on activation.
        inputs: metadata of each input, in the order ``forward`` takes them.
        output_names: names given to the forward's outputs, in order.
        threads: torch intra-op threads while inferring; 0 keeps torch's setting. Defaults to 0.
        name: label in reports. Defaults to ``"torch"``.
    """

    backend = "torch"

    def __init__(
        self,
        module: Any,
        inputs: Mapping[str, TensorMeta],
        output_names: Sequence[str],
        threads: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.module = module
        self._inputs = dict(inputs)
        self._output_names = list(output_names)
        self.threads = check_threads(threads)
        self._torch: Any = None

    def _activate(self) -> None:
        self._torch = optional_import("torch", "run the PyTorch reference")
        self.module.eval()
        if self.threads:
            self._torch.set_num_threads(self.threads)

    def input_metadata(self) -> dict[str, TensorMeta]:
        """The ``inputs`` given at construction."""
        return dict(self._inputs)

    def output_names(self) -> list[str]:
        """The ``output_names`` given at construction."""
        return list(self._output_names)

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        # Optional inputs (thresholds) left out of the feed fall back to forward's defaults, so
        # positional arguments stop at the first one missing.
        args = []
        for name in self._inputs:
            if name not in feed:
                break
            args.append(torch.from_numpy(np.ascontiguousarray(feed[name])))
        with torch.inference_mode():
            result = self.module(*args)
        if isinstance(result, Mapping):
            values = [result[name] for name in self._output_names]
        elif isinstance(result, (tuple, list)):
            values = list(result)
        else:
            values = [result]
        if len(values) != len(self._output_names):
            raise SlimDeployError(
                f"the module returned {len(values)} output(s), expected {len(self._output_names)} "
                f"({self._output_names})"
            )
        return {name: value.detach().cpu().numpy() for name, value in zip(self._output_names, values)}
