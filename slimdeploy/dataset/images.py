"""One image file → one model input, preprocessed as the bundle's manifest says.

The image is decoded with Pillow (the ``images`` extra), converted to grey or RGB for a 1- or
3-channel input, scaled to [0, 1], resized to the input size (bilinear, half-pixel centres:
``data.resize_bilinear``, as calibration images are) and normalised with the manifest's mean
and std. Images are untrusted: a file that is not a regular file, does not decode, or declares
more than ``MAX_PIXELS`` pixels (a decompression bomb) raises ``BadImageError`` with the reason,
which the source reports with the path.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

from slimdeploy.data import resize_bilinear
from slimdeploy.errors import BadInputError

# The suffixes torchvision's ImageFolder reads (compared in lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Pillow's own decompression-bomb limit (about 89 M pixels, a 9,459 x 9,459 image).
MAX_PIXELS = 89_478_485


class BadImageError(Exception):
    """An image that cannot become an input; ``str()`` says why (the caller adds the path)."""


def pillow() -> ModuleType:
    """``PIL.Image``, or exit 3 naming the ``images`` extra."""
    from slimdeploy._optional import optional_import

    return optional_import("PIL.Image", "read image folders")


def check_image_input(input_size: tuple[int, int, int]) -> None:
    """``BadInputError`` unless images can feed an input of this size (1 or 3 channels)."""
    if input_size[0] not in (1, 3):
        raise BadInputError(f"an image folder feeds 1- or 3-channel inputs, this bundle takes {input_size[0]} channels | "
                            "Fix: pass .npz shards of preprocessed inputs instead")


def read_image(
    path: Path,
    input_size: tuple[int, int, int],
    mean: np.ndarray,
    std: np.ndarray,
    image_module: ModuleType,
) -> np.ndarray:
    """The preprocessed [C, H, W] float32 input of the image at ``path``; ``BadImageError`` when it
    cannot be one. ``mean`` and ``std`` are [C, 1, 1] float32 arrays."""
    from slimdeploy.dataset.arrays import open_regular_file

    channels, height, width = input_size
    try:
        with open_regular_file(path) as handle, image_module.open(handle) as image:
            if image.width * image.height > MAX_PIXELS:
                raise BadImageError(f"{image.width}x{image.height} pixels, more than {MAX_PIXELS:,} (a decompression bomb?)")
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except BadImageError:
        raise
    except BadInputError as exc:
        raise BadImageError(str(exc).split(" | ")[0]) from None
    except Exception as exc:  # UnidentifiedImageError, OSError, DecompressionBombError, truncated data...
        # Pillow's messages can name the open handle (``<_io.BufferedReader name=3>``), which
        # differs from worker to worker: the reason must not, so reports of runs compare.
        detail = "not an image Pillow can read" if type(exc).__name__ == "UnidentifiedImageError" else str(exc)
        raise BadImageError(f"cannot decode ({type(exc).__name__}: {detail})") from None
    planes = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if planes.shape[1:] != (height, width):
        planes = resize_bilinear(planes, height, width)
    return ((planes - mean) / std).astype(np.float32)
