"""Export stage: torch.export → ONNX (``export_onnx``), then simplification (``simplify``);
exact rewrites for quantization (``reduce_mean_to_global_pool``).

Importing this package is torch-free; torch is imported inside ``export_onnx``.
"""

from slimdeploy.exporters.onnx_export import ExportSpec, check_onnx, export_onnx
from slimdeploy.exporters.rewrite import reduce_mean_to_global_pool
from slimdeploy.exporters.simplify import simplify

__all__ = ["ExportSpec", "check_onnx", "export_onnx", "reduce_mean_to_global_pool", "simplify"]
