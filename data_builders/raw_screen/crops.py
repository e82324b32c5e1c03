"""Single-cell crops centred on nuclei, optional resize, and crop quality control.

IMPA (impa.txt, "BBBC021 single cells") crops 96x96 patches around the published nucleus
centres and excludes objects closer than 48 px to the border, i.e. whose crop would leave the
image; its large field of view crops 256x256 and resizes to 128x128. Crops here are integer
windows: the nucleus centre, rounded to the nearest pixel, lands on pixel (S // 2, S // 2)
of an S x S crop.
"""

import numpy as np
from PIL import Image
from scipy import ndimage

_LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], np.float32)


def crop_origins(
    centers_xy: np.ndarray, crop_size: int, image_shape
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left (row, col) of each crop, and whether the whole crop lies inside the image."""
    centers_xy = np.asarray(centers_xy, np.float64).reshape(-1, 2)
    height, width = image_shape[:2]
    col0 = np.round(centers_xy[:, 0]).astype(np.int64) - crop_size // 2
    row0 = np.round(centers_xy[:, 1]).astype(np.int64) - crop_size // 2
    inside = (row0 >= 0) & (col0 >= 0) & (row0 + crop_size <= height) & (col0 + crop_size <= width)
    return np.stack([row0, col0], axis=1), inside


def extract_crops(image: np.ndarray, origins: np.ndarray, crop_size: int) -> np.ndarray:
    """(N, S, S, C) crops of an (H, W, C) image at in-bounds `origins` (row, col)."""
    if len(origins) == 0:
        return np.zeros((0, crop_size, crop_size, image.shape[-1]), image.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(image, (crop_size, crop_size), axis=(0, 1))
    # windows: (H - S + 1, W - S + 1, C, S, S)
    crops = windows[origins[:, 0], origins[:, 1]]
    return np.ascontiguousarray(crops.transpose(0, 2, 3, 1))


def resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
    """Resizes uint8 (N, S, S, C) crops to (N, size, size, C), per channel with Pillow's
    bilinear filter (antialiased when shrinking, so 256 -> 128 averages like an area resize)."""
    n, _, _, channels = crops.shape
    out = np.empty((n, size, size, channels), np.uint8)
    for i in range(n):
        for c in range(channels):
            plane = Image.fromarray(np.ascontiguousarray(crops[i, :, :, c]))
            out[i, :, :, c] = np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR))
    return out


def crop_std(crops: np.ndarray, channel: int) -> np.ndarray:
    """Standard deviation of one channel of each crop, in uint8 units."""
    return crops[..., channel].reshape(len(crops), -1).astype(np.float32).std(axis=1)


def crop_sharpness(crops: np.ndarray, channel: int) -> np.ndarray:
    """Variance of the Laplacian of one channel of each crop (low = blurred; Pech-Pacheco
    et al. 2000), the 4-neighbour kernel with reflected borders."""
    planes = crops[..., channel].astype(np.float32)
    if len(planes) == 0:
        return np.zeros(0, np.float32)
    laplacian = ndimage.correlate(planes, _LAPLACIAN[None], mode="reflect")
    return laplacian.reshape(len(planes), -1).var(axis=1)
