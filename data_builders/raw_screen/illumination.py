"""Illumination correction per plate and channel, and conversion to 8 bit.

`impa` follows impa.txt, "Illumination correction algorithm and normalization" (after Singh et
al. 2014): the flat field is the pixelwise 10th percentile of the plate's images, smoothed
by a Gaussian (sigma 50); each image is divided by it, clipped at a minimum of 1, logged,
clipped at a maximum of 5 and rescaled [0, 5] -> [0, 255].

The flat field is used as is, not normalised to mean 1: dividing by the raw 10th-percentile
background turns each pixel into "times the local background", so the clip at 1 sends
everything at or below background to 0 and the clip at log = 5 keeps signal up to ~148x the
background. (Normalising to mean 1 would leave 16-bit raw counts, whose logs of ~6-11 would
all saturate at 5.) The flat field is floored at 1 count so a dark (zero) background cannot
divide by zero.

`deepprofiler` follows DeepProfiler's `prepare` step (profiling_reference.md §1.5): the
illumination function is the plate's mean image, downscaled 4x, median filtered (disk of
diameter 24 at that scale), resized back, clipped below at its 2nd percentile and divided by
that robust minimum; each image is divided by it and stretched between its own 0.05 and 99.95
percentiles to uint8. (DeepProfiler also caps the stretch at a plate-wide upper percentile;
that cap is left out.) `none` is the per-image percentile stretch alone. The stretch
percentiles are an option: GRAPE (grape.txt 3.2) rescales 0.1..99.9 after the flat field.
"""

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

METHODS = ("impa", "deepprofiler", "none")
IMPA_PERCENTILE = 10.0
IMPA_LOG_MAX = 5.0
DEEPPROFILER_DOWNSCALE = 4
DEEPPROFILER_MEDIAN_SIZE = 24
DEEPPROFILER_ROBUST_MIN_PERCENTILE = 2.0
STRETCH_PERCENTILES = (0.05, 99.95)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown illumination correction {method!r}; expected one of {METHODS}.")


def impa_flat_field(images: Sequence[np.ndarray] | np.ndarray, sigma: float) -> np.ndarray:
    """Pixelwise 10th percentile of one plate's images of one channel, Gaussian-smoothed."""
    stack = np.asarray(images, dtype=np.float32)
    flat = np.percentile(stack, IMPA_PERCENTILE, axis=0).astype(np.float32)
    if sigma > 0:
        flat = ndimage.gaussian_filter(flat, sigma=float(sigma))
    return np.maximum(flat, 1.0)


def impa_to_uint8(image: np.ndarray, flat_field: np.ndarray) -> np.ndarray:
    """Divide by the flat field, clip at 1, natural log, clip at 5, rescale to 0..255."""
    ratio = np.maximum(image / flat_field, 1.0)
    scaled = np.minimum(np.log(ratio), IMPA_LOG_MAX) * (255.0 / IMPA_LOG_MAX)
    return np.round(scaled).astype(np.uint8)


def deepprofiler_illumination(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """DeepProfiler's illumination function from one plate's images of one channel (>= 1)."""
    mean = np.mean(np.asarray(images, dtype=np.float32), axis=0)
    height, width = mean.shape
    small = ndimage.zoom(mean, 1.0 / DEEPPROFILER_DOWNSCALE, order=1)
    radius = DEEPPROFILER_MEDIAN_SIZE / 2
    yy, xx = np.mgrid[-int(radius):int(radius) + 1, -int(radius):int(radius) + 1]
    disk = xx**2 + yy**2 <= radius**2
    small = ndimage.median_filter(small, footprint=disk, mode="nearest")
    illum = ndimage.zoom(small, (height / small.shape[0], width / small.shape[1]), order=1)
    robust_min = max(float(np.percentile(illum, DEEPPROFILER_ROBUST_MIN_PERCENTILE)), 1e-6)
    return np.maximum(illum, robust_min) / robust_min


def stretch_to_uint8(image: np.ndarray,
                     percentiles: Sequence[float] = STRETCH_PERCENTILES) -> np.ndarray:
    """Linear stretch of the image's percentile range (default 0.05..99.95) to 0..255 (clipped)."""
    lo, hi = np.percentile(image, tuple(percentiles))
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    scaled = np.clip((image - lo) / (hi - lo), 0.0, 1.0) * 255.0
    return np.round(scaled).astype(np.uint8)


def plate_statistic(method: str, images: np.ndarray, sigma: float) -> np.ndarray | None:
    """The per-plate, per-channel correction image of `method` (None for `none`)."""
    check_method(method)
    if method == "impa":
        return impa_flat_field(images, sigma)
    if method == "deepprofiler":
        return deepprofiler_illumination(images)
    return None


def correct(method: str, image: np.ndarray, statistic: np.ndarray | None,
            stretch: Sequence[float] = STRETCH_PERCENTILES) -> np.ndarray:
    """One raw single-channel image -> corrected uint8 image (`stretch`: the percentiles of
    the deepprofiler and none stretches)."""
    if method == "impa":
        return impa_to_uint8(image, statistic)
    if method == "deepprofiler":
        return stretch_to_uint8(image / statistic, stretch)
    return stretch_to_uint8(image, stretch)
