"""Export stage: torch.export → ONNX (``export_onnx``), then simplification (``simplify``);
rewrites that keep results and cut ONNX Runtime's work (``exporters.rewrite``).

Importing this package is torch-free; torch is imported inside ``export_onnx``.
"""

from slimdeploy.exporters.onnx_export import ExportSpec, check_onnx, export_onnx
from slimdeploy.exporters.rewrite import to_global_average_pool
from slimdeploy.exporters.simplify import simplify

__all__ = ["ExportSpec", "check_onnx", "export_onnx", "simplify", "to_global_average_pool"]
