"""Reference architectures and their registry.

Importing this package is torch-free: the architecture modules (which import torch) register
themselves when the registry is first asked for a name (``get_arch``, ``list_models``); ``registry.ARCHITECTURE_MODULES``
lists them.
"""

from slimdeploy.models.registry import ArchInfo, find_arch, get_arch, list_models, register_model

__all__ = ["ArchInfo", "find_arch", "get_arch", "list_models", "register_model"]
