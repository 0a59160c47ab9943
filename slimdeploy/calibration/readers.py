"""Calibration data: the inputs INT8 calibration runs the model on.

    calib = load_calibration("digits", input_size=(3, 32, 32), mean=..., std=..., size=100)
    calib.inputs    # [N, C, H, W] float32, preprocessed like the model's inputs
    calib.source    # "digits:calib[:100]", for the manifest and the report

Sources (``--calib``):
- ``digits``: the calibration split of the digits demo set (``slimdeploy.data``), 100 images;
- a folder of PNG/JPEG images: decoded with Pillow, resized (bilinear, like
  ``data.resize_bilinear``), scaled to [0, 1] and normalised with the model's mean and std;
- an ``.npy`` file or an ``.npz`` with an ``input`` array, already preprocessed;
- ``synthetic``: standard-normal noise, only when asked for by name. Ranges calibrated on noise
  are not the ranges of real images, so the result is flagged (``synthetic=True``) and the
  manifest and report say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimdeploy.errors import BadInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIGITS = "digits"
SYNTHETIC = "synthetic"
DEFAULT_SIZE = 100  # the digits calibration split holds 100 images
SYNTHETIC_SEED = 0


@dataclass
class CalibrationSet:
    """Preprocessed calibration inputs and where they came from."""

    inputs: np.ndarray
    source: str
    synthetic: bool = False

    def __len__(self) -> int:
        return len(self.inputs)

    def describe(self) -> dict[str, object]:
        """The manifest's record of the data: source, size, synthetic."""
        return {"source": self.source, "size": len(self.inputs), "synthetic": self.synthetic}


def load_calibration(
    source: str | Path,
    input_size: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    size: int | None = DEFAULT_SIZE,
) -> CalibrationSet:
    """Calibration inputs from ``source``.

    Args:
        source: ``"digits"``, ``"synthetic"``, an image folder, or an .npy/.npz file.
        input_size: (C, H, W) of the model input.
        mean: per-channel mean subtracted after scaling images to [0, 1].
        std: per-channel std divided by.
        size: use at most this many samples (the first ones, in file-name order for folders);
            None for all. Defaults to 100.
    """
    if size is not None and size < 1:
        raise BadInputError(f"--calib-size must be a positive integer, got {size}")
    text = str(source)
    if text == DIGITS:
        from slimdeploy.data import digits_inputs

        inputs, _ = digits_inputs("calib", input_size, mean, std, count=size)
        return CalibrationSet(inputs, f"digits:calib[:{len(inputs)}]")
    if text == SYNTHETIC:
        count = size or DEFAULT_SIZE
        noise = np.random.default_rng(SYNTHETIC_SEED).standard_normal((count, *input_size))
        return CalibrationSet(noise.astype(np.float32), f"synthetic[{count}]", synthetic=True)
    path = Path(source)
    if path.is_dir():
        inputs = read_image_folder(path, input_size, mean, std, size)
    elif path.is_file():
        inputs = read_array_file(path, input_size, size)
    else:
        raise BadInputError(
            f"calibration source '{source}' is neither a file nor a folder | Fix: pass an image "
            "folder, an .npy/.npz file, 'digits', or 'synthetic' (random data, flagged)"
        )
    return CalibrationSet(inputs, f"{path.name}[:{len(inputs)}]")


def read_array_file(path: Path, input_size: tuple[int, int, int], size: int | None) -> np.ndarray:
    """Preprocessed inputs from an .npy, or the ``input`` array of an .npz."""
    from slimdeploy.files import read_arrays

    arrays = read_arrays(path)
    if "input" not in arrays:
        raise BadInputError(
            f"'{path}' has no array 'input' (has {sorted(arrays)}) | Fix: np.savez(path, input=x) "
            "with x preprocessed like the model's inputs"
        )
    inputs = arrays["input"]
    if inputs.ndim != 4 or tuple(inputs.shape[1:]) != tuple(input_size):
        raise BadInputError(
            f"calibration array in '{path}' has shape {list(inputs.shape)} | Note: expected "
            f"[N, {', '.join(map(str, input_size))}] (preprocessed model inputs)"
        )
    if not np.issubdtype(inputs.dtype, np.floating):
        raise BadInputError(f"calibration array in '{path}' is {inputs.dtype} | Note: expected float32 model inputs")
    return np.ascontiguousarray(inputs[:size], dtype=np.float32)


def read_image_folder(
    folder: Path,
    input_size: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    size: int | None,
) -> np.ndarray:
    """PNG/JPEG files of ``folder`` (sorted by name) as normalised NCHW float32 inputs."""
    from slimdeploy._optional import optional_import
    from slimdeploy.data import resize_bilinear

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:size]
    if not files:
        raise BadInputError(f"'{folder}' holds no {'/'.join(IMAGE_SUFFIXES)} images | Fix: point --calib at a folder of images")
    image_module = optional_import("PIL.Image", "read calibration images")
    channels, height, width = input_size
    if channels not in (1, 3):
        raise BadInputError(f"image calibration needs a 1- or 3-channel input, the model takes {channels} | Fix: pass an .npz of inputs")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for file in files:
        try:
            with image_module.open(file) as image:
                pixels = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
        except OSError as exc:
            raise BadInputError(f"cannot read image '{file}' ({exc}) | Fix: remove it or re-save it as PNG/JPEG") from exc
        planes = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        images.append(resize_bilinear(planes, height, width))  # [C, H, W]: channels resize like a batch
    batch = np.stack(images)
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((batch - mean_arr) / std_arr).astype(np.float32)
