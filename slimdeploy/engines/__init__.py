"""Runners: one ``infer(feed) -> dict`` contract over PyTorch, ONNX Runtime and TensorRT.

    with OrtRunner("model.onnx") as runner:
        outputs = runner.infer({"input": x})

Importing this package imports no backend; each runner imports its own at activation.
"""

from slimdeploy.engines.base import Runner, TensorMeta, check_feed
from slimdeploy.engines.ort_runner import OrtRunner
from slimdeploy.engines.torch_runner import TorchRunner

__all__ = ["OrtRunner", "Runner", "TensorMeta", "TorchRunner", "check_feed"]
