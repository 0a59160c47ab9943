"""Real image data for demo training, parity checks and benchmarks: scikit-learn's digits.

The 1,797 8x8 grey digits are scaled to [0, 1], resized (bilinear) to the model's input size,
repeated to three channels and normalised with the model's mean and std. A fixed permutation
(seed 0) splits them once for everyone:

    train    1,197 images  (training the zoo models)
    calib      100 images  (INT8 calibration)
    heldout    500 images  (parity checks and benchmarks; never trained on)

Only numpy is needed to prepare images; scikit-learn is imported to read the data set.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from slimdeploy._optional import optional_import

SPLITS: dict[str, slice] = {
    "train": slice(0, 1197),
    "calib": slice(1197, 1297),
    "heldout": slice(1297, 1797),
}
SPLIT_SEED = 0
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    datasets = optional_import("sklearn.datasets", "read the digits data set")
    bunch = datasets.load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    return images[order], bunch.target[order].astype(np.int64)


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Grey 8x8 images in [0, 1] ([N, 8, 8] float32) and labels ([N] int64) of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split '{split}', expected one of {sorted(SPLITS)}")
    images, labels = _digits()
    return images[SPLITS[split]], labels[SPLITS[split]]


def resize_bilinear(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize [N, H, W] images with bilinear interpolation (half-pixel centres, like
    ``torch.nn.functional.interpolate(..., align_corners=False)``)."""

    def weights(size_in: int, size_out: int) -> np.ndarray:
        # Row i of the matrix holds the interpolation weights of output pixel i.
        centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
        centres = np.clip(centres, 0, size_in - 1)
        low = np.floor(centres).astype(int)
        high = np.minimum(low + 1, size_in - 1)
        frac = centres - low
        matrix = np.zeros((size_out, size_in), dtype=np.float64)
        matrix[np.arange(size_out), low] += 1 - frac
        matrix[np.arange(size_out), high] += frac
        return matrix

    rows = weights(images.shape[1], height)
    cols = weights(images.shape[2], width)
    return np.einsum("hi,nij,wj->nhw", rows, images, cols).astype(np.float32)


def prepare_images(
    grey: np.ndarray,
    input_size: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> np.ndarray:
    """Turn [N, h, w] grey images in [0, 1] into normalised NCHW float32 model inputs."""
    channels, height, width = input_size
    resized = resize_bilinear(grey, height, width)
    stacked = np.repeat(resized[:, None], channels, axis=1)
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((stacked - mean_arr) / std_arr).astype(np.float32)


def digits_inputs(
    split: str,
    input_size: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready inputs and labels of a digits split.

    Args:
        split: ``"train"``, ``"calib"`` or ``"heldout"``.
        input_size: (C, H, W) of the model input.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by.
        count: take the first ``count`` images of the split. Defaults to all.
    """
    grey, labels = digits_split(split)
    if count is not None:
        grey, labels = grey[:count], labels[:count]
    return prepare_images(grey, input_size, mean, std), labels


def digits_statistics() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of the training split's pixels, repeated for three channels."""
    grey, _ = digits_split("train")
    return (float(grey.mean()),) * 3, (float(grey.std()),) * 3
