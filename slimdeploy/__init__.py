"""slimdeploy: deploy slim and dynamic CNNs to ONNX Runtime and TensorRT, with parity checks.

Importing the package is cheap and never imports torch, tensorrt or cuda: the runtime half
(engines, bundle, parity, bench) runs on edge images that carry only numpy and ONNX Runtime.
"""

__version__ = "0.1.0"
