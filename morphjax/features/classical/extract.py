"""Classical features of single-cell crops: names, the jitted batched array path, a DataFrame API.

One crop (H, W, C) in [0, 1] -> segmentation (segment.py) -> per compartment (Nuclei, Cells,
Cytoplasm) and channel: AreaShape, Intensity, Texture, Granularity, RadialDistribution,
Correlation, Neighbors. Column names follow CellProfiler, e.g. `Nuclei_AreaShape_Area`,
`Cells_Intensity_MeanIntensity_DNA`, `Cytoplasm_Texture_Contrast_Actin_1_00_8` (per angle) or
`..._1_avg_8` (mean over the four angles), `Cells_Granularity_3_DNA`,
`Cells_RadialDistribution_FracAtD_DNA_2of4`, `Cells_Correlation_Correlation_DNA_Actin`.
A crop without a nucleus has all features 0 and `Nuclei_Found` 0.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from morphjax.features.classical import intensity as intensity_lib
from morphjax.features.classical import segment as segment_lib
from morphjax.features.classical import shape as shape_lib
from morphjax.features.classical import texture as texture_lib

COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
SHAPE_COMPARTMENTS = ("Nuclei", "Cells")


@dataclasses.dataclass(frozen=True)
class ClassicalConfig:
    """Segmentation and measurement settings (defaults suit ~96 px crops at 20x)."""

    smoothing_sigma: float = 1.0  # Gaussian blur before each Otsu threshold (0: none).
    min_nucleus_area: int = 10  # Smaller nucleus components are ignored (debris, noise).
    fill_holes: bool = True  # Fill holes in nuclei and cells, as CellProfiler does.
    cell_radius: int = 10  # Cell = nucleus dilated by this (pixels) when there is no cell channel.
    convex_directions: int = 1024  # Support-line directions of the convex hull (Solidity).
    zernike_degree: int = 9  # Zernike magnitudes up to this degree (9: CellProfiler's 30).
    levels: int = 8  # Grey levels of the co-occurrence matrices.
    texture_distances: tuple[int, ...] = (1,)  # GLCM offsets (CellProfiler's texture scale).
    texture_per_angle: bool = False  # Report each of the 4 angles instead of their mean.
    granularity_radii: int = 8  # Granularity spectrum length.
    radial_rings: int = 4
    radial_wedges: int = 8  # Angular wedges of RadialCV.
    radial_directions: int = 32  # Sectors that estimate the cell edge for the normalised radius.

    def __post_init__(self):
        if not 2 <= self.levels <= 256:
            raise ValueError(f"levels must be in 2..256 (8-16 is usual), got {self.levels}")
        for name in ("min_nucleus_area", "cell_radius", "convex_directions", "granularity_radii",
                     "radial_rings", "radial_wedges", "radial_directions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.texture_distances or min(self.texture_distances) < 1:
            raise ValueError(f"texture_distances must be positive, got {self.texture_distances}")


@dataclasses.dataclass(frozen=True)
class _Channels:
    names: tuple[str, ...]
    nucleus: int
    cell: int | None


def _resolve_channels(channel_names: Sequence[str], nucleus_channel: str,
                      cell_channel: str | None) -> _Channels:
    names = tuple(channel_names)
    if not names:
        raise ValueError("channel_names is empty")
    lookup = {name.lower(): i for i, name in enumerate(names)}

    def find(channel, role):
        if channel.lower() not in lookup:
            raise ValueError(f"{role} {channel!r} is not among channel_names {list(names)}")
        return lookup[channel.lower()]

    cell = None if cell_channel is None else find(cell_channel, "cell_channel")
    return _Channels(names, find(nucleus_channel, "nucleus_channel"), cell)


def _texture_suffixes(config: ClassicalConfig) -> list[str]:
    angles = texture_lib.ANGLE_NAMES if config.texture_per_angle else ("avg",)
    return [f"{d}_{a}_{config.levels}" for d in config.texture_distances for a in angles]


def feature_names(channel_names: Sequence[str], config: ClassicalConfig = ClassicalConfig()
                  ) -> list[str]:
    """Column names, in the order of the feature vector."""
    names = []
    zernike = [f"Zernike_{n}_{m}" for n, m in shape_lib.zernike_indexes(config.zernike_degree)]
    for compartment in SHAPE_COMPARTMENTS:
        names += [f"{compartment}_AreaShape_{f}" for f in (*shape_lib.SHAPE_FEATURES, *zernike)]
    for compartment in COMPARTMENTS:
        names += [f"{compartment}_Intensity_{f}_{c}" for c in channel_names
                  for f in intensity_lib.INTENSITY_FEATURES]
    for compartment in COMPARTMENTS:
        names += [f"{compartment}_Texture_{f}_{c}_{s}" for c in channel_names
                  for s in _texture_suffixes(config) for f in texture_lib.TEXTURE_FEATURES]
    names += [f"Cells_Granularity_{k}_{c}" for c in channel_names
              for k in range(1, config.granularity_radii + 1)]
    names += [f"Cells_RadialDistribution_{f}_{c}_{k}of{config.radial_rings}"
              for c in channel_names for f in ("FracAtD", "MeanFrac", "RadialCV")
              for k in range(1, config.radial_rings + 1)]
    for a, b in itertools.combinations(channel_names, 2):
        names += [f"Cells_Correlation_Correlation_{a}_{b}", f"Cells_Correlation_Manders_{a}_{b}",
                  f"Cells_Correlation_Manders_{b}_{a}", f"Cells_Correlation_Overlap_{a}_{b}"]
    names += ["Nuclei_Neighbors_NumberOfNeighbors", "Nuclei_Found"]
    return names


def _texture_block(image, parts, config: ClassicalConfig) -> jax.Array:
    """(compartment, channel, distance, angle or 1, feature) Haralick features."""
    per_distance = []
    for distance in config.texture_distances:
        values = jax.vmap(lambda x, d=distance: texture_lib.texture(x, parts, config.levels, d))(
            image)  # (C, [Nuclei, Cytoplasm, Cells], 4, F)
        values = jnp.moveaxis(values[:, jnp.array([0, 2, 1])], 1, 0)  # compartment order
        if not config.texture_per_angle:
            values = values.mean(axis=2, keepdims=True)
        per_distance.append(values)
    return jnp.stack(per_distance, axis=2)


def crop_features(crop: jax.Array, channels: _Channels, config: ClassicalConfig) -> jax.Array:
    """(F,) features of one (H, W, C) crop in [0, 1], in feature_names order."""
    image = jnp.moveaxis(crop.astype(jnp.float32), -1, 0)  # (C, H, W)
    masks = segment_lib.segment(
        image[channels.nucleus], None if channels.cell is None else image[channels.cell],
        sigma=config.smoothing_sigma, min_area=config.min_nucleus_area, fill=config.fill_holes,
        cell_radius=config.cell_radius)
    shape = jax.vmap(lambda m: shape_lib.area_shape(
        m, directions=config.convex_directions, zernike_degree=config.zernike_degree))(
            jnp.stack([masks.nucleus, masks.cell]))
    stats = jax.vmap(lambda x: intensity_lib.intensity(x, masks.nucleus, masks.cytoplasm))(
        image)  # (C, compartment, F)
    stats = jnp.swapaxes(stats, 0, 1)
    texture = _texture_block(image, jnp.stack([masks.nucleus, masks.cytoplasm]), config)
    granularity = jax.vmap(lambda x: intensity_lib.granularity(
        x, masks.cell, config.granularity_radii))(image)
    centre = _centroid(masks.nucleus)
    ring, wedge = intensity_lib.radial_geometry(masks.cell, centre, config.radial_rings,
                                                config.radial_directions, config.radial_wedges)
    radial = intensity_lib.radial_distribution(image, masks.cell, ring, wedge,
                                               config.radial_rings, config.radial_wedges)
    pairs = list(itertools.combinations(range(image.shape[0]), 2))
    colocalization = (intensity_lib.colocalization(image, masks.cell, pairs) if pairs
                      else jnp.zeros((0,)))
    features = jnp.concatenate([
        shape.reshape(-1), stats.reshape(-1), texture.reshape(-1), granularity.reshape(-1),
        radial.reshape(-1), colocalization.reshape(-1),
        masks.neighbours.astype(jnp.float32)[None]])
    features = jnp.where(masks.found, features, 0.0)
    return jnp.concatenate([features, masks.found.astype(jnp.float32)[None]])


def _centroid(mask: jax.Array) -> jax.Array:
    h, w = mask.shape
    rows, cols = jnp.mgrid[0:h, 0:w].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1)
    return jnp.stack([jnp.sum(mask * rows) / n, jnp.sum(mask * cols) / n])


def _check_shape(image_shape: Sequence[int], channels: _Channels) -> None:
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {tuple(image_shape)}")
    h, w, c = (int(s) for s in image_shape)
    if c != len(channels.names):
        raise ValueError(f"image_shape {tuple(image_shape)} has {c} channels but channel_names "
                         f"names {len(channels.names)}: {list(channels.names)}")
    if min(h, w) < 8:
        raise ValueError(f"crops must be at least 8x8 pixels, got image_shape {tuple(image_shape)}")


def _config(levels: int, options: dict) -> ClassicalConfig:
    known = {f.name for f in dataclasses.fields(ClassicalConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown classical feature options {unknown}; known: {sorted(known)}")
    if "texture_distances" in options:
        options = {**options, "texture_distances": tuple(options["texture_distances"])}
    return ClassicalConfig(levels=levels, **options)


@functools.lru_cache(maxsize=None)
def _batched(channels: _Channels, config: ClassicalConfig) -> Callable[[jax.Array], jax.Array]:
    """One jitted function per (channels, config), shared by every caller so it compiles once."""

    @jax.jit
    def apply(images: jax.Array) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
        _check_shape(images.shape[1:], channels)
        return jax.vmap(lambda crop: crop_features(crop, channels, config))(images)

    return apply


def classical_feature_fn(image_shape: Sequence[int] | None, channel_names: Sequence[str],
                         nucleus_channel: str = "DNA", cell_channel: str | None = None, *,
                         levels: int = 8, **options
                         ) -> tuple[Callable[[jax.Array], jax.Array], list[str]]:
    """The jitted array path: float (B, H, W, C) in [0, 1] -> (B, F) float32, and the F names.

    Crops are independent (vmap), so a batch sharded over a mesh's data axis stays sharded.
    `image_shape` (H, W, C) is checked up front; None accepts any crop size. `options` are
    ClassicalConfig fields.
    """
    channels = _resolve_channels(channel_names, nucleus_channel, cell_channel)
    config = _config(levels, options)
    if image_shape is not None:
        _check_shape(image_shape, channels)
    return _batched(channels, config), feature_names(channels.names, config)


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1], got {images.dtype}")
    lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                         "pass uint8 or rescale (model outputs in [-1, 1]: (x + 1) / 2)")
    return images


def classical_features(images, channel_names: Sequence[str], nucleus_channel: str = "DNA",
                       cell_channel: str | None = None, *, batch_size: int = 256,
                       levels: int = 8, **options) -> pd.DataFrame:
    """One row of named float32 features per crop of `images` (B, H, W, C), uint8 or [0, 1].

    Crops go to the device `batch_size` at a time (the last batch padded, so one compilation).
    Warns with the count of crops where no nucleus was found (their features are 0).
    """
    images = _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fn, names = classical_feature_fn(images.shape[1:], channel_names, nucleus_channel,
                                     cell_channel, levels=levels, **options)
    n = len(images)
    size = max(min(batch_size, n), 1)
    scale = np.float32(255.0 if images.dtype == np.uint8 else 1.0)
    out = []
    for start in range(0, n, size):
        batch = images[start:start + size].astype(np.float32) / scale
        padded = np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:],
                                                 np.float32)])
        out.append(np.asarray(fn(padded))[:len(batch)])
    values = np.concatenate(out) if out else np.zeros((0, len(names)), np.float32)
    table = pd.DataFrame(values.astype(np.float32), columns=names)
    missing = int((table["Nuclei_Found"] == 0).sum())
    if missing:
        warnings.warn(f"no nucleus found in {missing} of {n} crops (channel "
                      f"{nucleus_channel!r}); their features are 0, flagged Nuclei_Found=0",
                      stacklevel=2)
    return table
