"""Reference architectures and their registry. Importing this package imports torch.

Each module registers its architectures with ``@register_model``; importing them here fills
the registry. ``get_arch(name)`` and ``list_models()`` are the doors.
"""

from slimdeploy.models import mobilenet, spconv_resnet  # noqa: F401  (registers architectures)
from slimdeploy.models import skipnet  # noqa: F401  (registers architectures)
from slimdeploy.models.registry import ArchInfo, get_arch, list_models, register_model

__all__ = ["ArchInfo", "get_arch", "list_models", "register_model"]
