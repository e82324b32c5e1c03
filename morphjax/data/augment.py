"""Single-cell image augmentation, Cell Painting CNN paper (Methods, "Training cell
painting models").

The paper's three steps, applied in order to an HWC crop:
  1. random crop (p=0.5, side 80-100% of the image) resized back to the original size;
  2. random horizontal flip and 90-degree rotation;
  3. random brightness and contrast, each channel adjusted separately.
The paper gives no magnitudes for step 3; the defaults follow the authors' DeepProfiler
`random_illumination` (brightness shift in [-0.1, 0.1], contrast factor in [0.8, 1.2]).

Functions take a `np.random.Generator`, so they run inside `grain.MapDataset.random_map`,
which seeds it from (seed, index) and makes every augmentation reproducible on resume.
"""

from collections.abc import Callable, Mapping
import functools
import inspect
from typing import Any

import numpy as np
import scipy.ndimage

_OPTION_NAMES = ("flips", "rot90", "crop_prob", "crop_scale", "brightness", "contrast")


def to_float(image: np.ndarray) -> np.ndarray:
    """float32 image on the [0, 1] scale: uint8 / 255 (other unsigned ints by their max).

    Float input is taken to be on that scale already and is only cast.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(image.dtype, np.unsignedinteger):
        return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise TypeError(
        f"to_float expects an unsigned-integer or float image, got dtype {image.dtype}.")


def resized_crop(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """Crop `image[top:top+height, left:left+width]` and resize it back to the image size.

    Bilinear with pixel-centre alignment (as `tf.image.resize` and PIL), edges clamped.
    """
    full_h, full_w = image.shape[:2]
    crop = image[top : top + height, left : left + width]
    zoom = (full_h / height, full_w / width) + (1,) * (image.ndim - 2)
    out = scipy.ndimage.zoom(crop, zoom, order=1, grid_mode=True, mode="nearest")
    assert out.shape == image.shape, (out.shape, image.shape)
    return out


def _check_options(flips, rot90, crop_prob, crop_scale, brightness, contrast) -> None:
    del flips, rot90
    if not 0.0 <= crop_prob <= 1.0:
        raise ValueError(f"crop_prob must be in [0, 1], got {crop_prob}.")
    if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ValueError(
            f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale}.")
    if brightness < 0.0:
        raise ValueError(f"brightness must be >= 0, got {brightness}.")
    if not 0.0 <= contrast < 1.0:
        raise ValueError(f"contrast must be in [0, 1), got {contrast}.")


def augment_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    flips: bool = True,
    rot90: bool = True,
    crop_prob: float = 0.5,
    crop_scale: tuple[float, float] = (0.8, 1.0),
    brightness: float = 0.1,
    contrast: float = 0.2,
) -> np.ndarray:
    """Augment one HWC cell crop; returns float32 HWC of the same shape in [0, 1].

    Steps 1-3 of the paper, in order:
      1. with probability `crop_prob` (paper: 0.5) a crop whose side is a uniform fraction in
         `crop_scale` (paper: 80-100%) of each image side, at a uniform position, resized back
         bilinearly (`resized_crop`);
      2. a horizontal flip with probability 1/2 (`flips`) and a rotation by k*90 degrees,
         k uniform in {0, 1, 2, 3} ({0, 2} for non-square images) (`rot90`);
      3. per channel, independently: contrast factor c ~ U[1 - contrast, 1 + contrast] around
         the channel mean, plus brightness shift b ~ U[-brightness, brightness], i.e.
         x' = (x - mean) * c + mean + b. Magnitudes are not in the paper; the defaults are
         DeepProfiler's. The result is clipped to [0, 1] (not min-max rescaled, which
         would undo the adjustment).
    """
    _check_options(flips, rot90, crop_prob, crop_scale, brightness, contrast)
    image = to_float(image)
    if image.ndim != 3:
        raise ValueError(f"augment_crop expects an HWC image, got shape {image.shape}.")
    height, width, channels = image.shape

    if crop_prob > 0 and rng.random() < crop_prob:
        scale = rng.uniform(crop_scale[0], crop_scale[1])
        crop_h = int(np.clip(round(scale * height), 1, height))
        crop_w = int(np.clip(round(scale * width), 1, width))
        top = int(rng.integers(height - crop_h + 1))
        left = int(rng.integers(width - crop_w + 1))
        image = resized_crop(image, top, left, crop_h, crop_w)

    if flips and rng.random() < 0.5:
        image = np.flip(image, axis=1)
    if rot90:
        k = int(rng.integers(4)) if height == width else 2 * int(rng.integers(2))
        image = np.rot90(image, k, axes=(0, 1))

    if brightness > 0 or contrast > 0:
        factor = rng.uniform(1.0 - contrast, 1.0 + contrast, size=channels).astype(np.float32)
        shift = rng.uniform(-brightness, brightness, size=channels).astype(np.float32)
        mean = image.mean(axis=(0, 1))
        image = (image - mean) * factor + mean + shift
        image = np.clip(image, 0.0, 1.0)
    return np.ascontiguousarray(image, dtype=np.float32)


def _convert_item(item: dict, rng: np.random.Generator | None = None, *, image_key: str) -> dict:
    del rng
    return {**item, image_key: to_float(_get_image(item, image_key))}


def _augment_item(item: dict, rng: np.random.Generator, *, image_key: str, options: dict) -> dict:
    return {**item, image_key: augment_crop(_get_image(item, image_key), rng, **options)}


def _get_image(item: dict, image_key: str) -> np.ndarray:
    if image_key not in item:
        raise KeyError(
            f"augmentation image_key {image_key!r} not in example; its keys are {sorted(item)}.")
    return item[image_key]


def make_augment(cfg: Mapping[str, Any]) -> Callable[[dict, np.random.Generator], dict]:
    """`(item, rng) -> item` applying `augment_crop` to `item[cfg.image_key]`, for `random_map`.

    `cfg` (ConfigDict or mapping) may hold `enabled` (default True), `image_key` (default
    "image") and any `augment_crop` keyword; unknown fields are an error. With
    `enabled=False` the function only converts the image to float32 in [0, 1].
    """
    options = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    enabled = bool(options.pop("enabled", True))
    image_key = options.pop("image_key", "image")
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        known = ["enabled", "image_key", *_OPTION_NAMES]
        raise ValueError(f"Unknown augmentation fields {unknown}; known fields: {known}.")
    if "crop_scale" in options:
        options["crop_scale"] = tuple(options["crop_scale"])
    if not enabled:
        return functools.partial(_convert_item, image_key=image_key)
    params = inspect.signature(augment_crop).parameters
    defaults = {name: params[name].default for name in _OPTION_NAMES}
    _check_options(**{**defaults, **options})
    return functools.partial(_augment_item, image_key=image_key, options=options)
