"""A small generated fluorescence-like classification dataset ("shapes").

Stands in for real single-cell crops while the foundation classifier is built and tested:
dark background, a few Gaussian "cells" per image, per-image gain, background and noise.
The class sets cell morphology, which the model must read from the cells, not from image
statistics that nuisance factors also move:
  * size:       small or large cells (class bit 0);
  * elongation: round or elongated, random orientation (class bit 1);
  * stain:      which channel is bright (class // 4, for more than 4 classes).
"""

from collections.abc import Sequence

import numpy as np

_MAX_CELLS = 4
# Relative spread of each channel around the nucleus centre (nucleus, cytoplasm, ...).
_CHANNEL_WIDTH = (1.0, 1.7, 1.3, 1.5, 1.15)


def _f32(values) -> np.ndarray:
    return np.asarray(values, np.float32)


def _class_counts(num_examples: int, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder split of `num_examples` in proportion to `weights`."""
    exact = num_examples * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = num_examples - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts


def make_shapes_dataset(
    num_examples: int,
    *,
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 4,
    class_weights: Sequence[float] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """`{"image": uint8 (N, H, W, C), "label": int32 (N,)}`, deterministic per seed.

    Class counts follow `class_weights` exactly (largest remainder); uniform by default.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}.")
    if not 1 <= channels <= len(_CHANNEL_WIDTH):
        raise ValueError(f"channels must be in 1..{len(_CHANNEL_WIDTH)}, got {channels}.")
    if not 2 <= num_classes <= 4 * channels:
        raise ValueError(
            f"num_classes must be in 2..{4 * channels} (size x elongation x bright channel) for "
            f"{channels} channels, got {num_classes}."
        )
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}.")
    if class_weights is None:
        weights = np.ones(num_classes)
    else:
        weights = np.asarray(class_weights, dtype=np.float64)
        if weights.shape != (num_classes,) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(
                f"class_weights must be {num_classes} non-negative numbers with a positive sum, "
                f"got {class_weights}."
            )

    rng = np.random.default_rng(seed)
    n, size, k = num_examples, image_size, _MAX_CELLS
    labels = np.repeat(np.arange(num_classes), _class_counts(n, weights))
    labels = rng.permutation(labels).astype(np.int32)

    large = (labels % 2).astype(bool)
    elongated = ((labels // 2) % 2).astype(bool)
    bright = (labels // 4) % channels

    scale = size / 32.0
    base_sigma = np.where(large, 2.8, 1.4)[:, None] * scale
    major = base_sigma * rng.uniform(0.9, 1.1, (n, k))
    ratio = np.where(
        elongated[:, None], rng.uniform(0.25, 0.4, (n, k)), rng.uniform(0.85, 1.0, (n, k)))
    minor = major * ratio
    angle = rng.uniform(0, np.pi, (n, k))
    margin = 0.15 * size
    centre_y = rng.uniform(margin, size - margin, (n, k))
    centre_x = rng.uniform(margin, size - margin, (n, k))
    present = np.arange(k)[None, :] < rng.integers(1, k + 1, (n, 1))

    stain = np.full((n, channels), 0.45)
    stain[np.arange(n), bright] = 0.9
    amplitude = stain[:, None, :] * rng.uniform(0.7, 1.1, (n, k, channels)) * present[..., None]
    width2 = np.asarray(_CHANNEL_WIDTH[:channels]) ** 2

    centre_y, centre_x, major, minor = _f32(centre_y), _f32(centre_x), _f32(major), _f32(minor)
    cos_a, sin_a, amplitude = _f32(np.cos(angle)), _f32(np.sin(angle)), _f32(amplitude)
    inv_width2 = _f32(0.5 / width2)
    grid = np.arange(size, dtype=np.float32)
    image = np.zeros((n, size, size, channels), np.float32)
    for cell in range(k):
        dy = grid[None, :, None] - centre_y[:, cell, None, None]
        dx = grid[None, None, :] - centre_x[:, cell, None, None]
        cos, sin = cos_a[:, cell, None, None], sin_a[:, cell, None, None]
        u = (dx * cos + dy * sin) / major[:, cell, None, None]
        v = (dy * cos - dx * sin) / minor[:, cell, None, None]
        profile = np.exp(-(u * u + v * v)[..., None] * inv_width2)
        image += amplitude[:, cell, None, None, :] * profile

    gain = _f32(rng.uniform(0.8, 1.2, (n, 1, 1, 1)))
    background = _f32(rng.uniform(0.02, 0.08, (n, 1, 1, channels)))
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(0.04)
    image = image * gain + background + noise
    image = np.clip(np.rint(image * np.float32(255.0)), 0, 255).astype(np.uint8)
    return {"image": image, "label": labels}
