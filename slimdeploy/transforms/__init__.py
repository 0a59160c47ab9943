"""Model transforms applied before export (importing this package imports torch)."""

from slimdeploy.transforms.condense import condense

__all__ = ["condense"]
