"""Intensity, granularity, radial distribution and colocalisation of one object, per channel.

CellProfiler's MeasureObjectIntensity, MeasureGranularity, MeasureObjectIntensityDistribution and
MeasureColocalization, with the choices a single-cell crop allows (all stated where made).
Images are float in [0, 1]; every ratio is 0 when its denominator is.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from morphjax.features.classical import morph
from morphjax.features.classical.morph import safe_div
from morphjax.features.classical.segment import otsu_threshold

INTENSITY_FEATURES = ("IntegratedIntensity", "MeanIntensity", "StdIntensity", "MinIntensity",
                      "MaxIntensity", "LowerQuartileIntensity", "MedianIntensity",
                      "UpperQuartileIntensity", "MADIntensity", "MeanIntensityEdge",
                      "MassDisplacement")
QUANTILE_BINS = 1024


def _histograms(values: jax.Array, group: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """(groups, QUANTILE_BINS) pixel counts and smallest values of `values` (~[0, 1]) per group;
    pixels of group -1 are left out."""
    index = jnp.clip(jnp.floor(values * QUANTILE_BINS), 0, QUANTILE_BINS - 1).astype(jnp.int32)
    slot = jnp.where(group >= 0, group * QUANTILE_BINS + index, groups * QUANTILE_BINS)
    size = groups * QUANTILE_BINS + 1
    counts = jnp.zeros(size, jnp.float32).at[slot].add(1.0)
    smallest = jnp.full(size, jnp.inf, jnp.float32).at[slot].min(values)
    shape = (groups, QUANTILE_BINS)
    return counts[:-1].reshape(shape), smallest[:-1].reshape(shape)


def _histogram_quantiles(counts: jax.Array, smallest: jax.Array, qs) -> jax.Array:
    """numpy.quantile (linear) of one group from its histogram; 0 for an empty group."""
    cumulative = jnp.cumsum(counts)
    n = cumulative[-1]
    last = jnp.maximum(n - 1, 0)
    position = jnp.asarray(qs, jnp.float32) * last
    lower = jnp.floor(position)
    frac = position - lower

    def order_statistic(rank):  # 0-based; the smallest value of the bin holding it
        return smallest[jnp.searchsorted(cumulative, rank + 1)]

    value = (order_statistic(lower) * (1 - frac)
             + order_statistic(jnp.minimum(lower + 1, last)) * frac)
    return jnp.where(n > 0, value, 0.0)


def _quantile_features(image: jax.Array, nucleus: jax.Array, cytoplasm: jax.Array
                       ) -> jax.Array:
    """(3, 4) lower quartile, median, upper quartile and MAD of Nuclei, Cells, Cytoplasm.

    From 1024-bin histograms (one scatter per pass instead of a sort per compartment): exact
    for 8-bit images, whose levels fall in distinct bins, within 1/1024 otherwise.
    """
    values = image.reshape(-1)
    group = jnp.where(nucleus, 0, jnp.where(cytoplasm, 1, -1)).reshape(-1)
    counts, smallest = _histograms(values, group, 2)
    counts = jnp.stack([counts[0], counts[0] + counts[1], counts[1]])
    smallest = jnp.stack([smallest[0], jnp.minimum(smallest[0], smallest[1]), smallest[1]])
    quartiles = jax.vmap(_histogram_quantiles, in_axes=(0, 0, None))(
        counts, smallest, (0.25, 0.5, 0.75))
    median = quartiles[:, 1]
    # Deviations from each compartment's median: nuclei and cytoplasm pixels once, cells again.
    own_median = jnp.where(group == 0, median[0], median[2])
    deviations = jnp.concatenate([jnp.abs(values - own_median), jnp.abs(values - median[1])])
    in_cell = jnp.where(group >= 0, 2, -1)
    counts, smallest = _histograms(deviations, jnp.concatenate([group, in_cell]), 3)
    order = jnp.array([0, 2, 1])  # groups (nuclei, cytoplasm, cells) -> compartment order
    mad = jax.vmap(_histogram_quantiles, in_axes=(0, 0, None))(
        counts[order], smallest[order], (0.5,))
    return jnp.concatenate([quartiles, mad], axis=1)


def _moment_features(image: jax.Array, mask: jax.Array) -> jax.Array:
    """Integrated, mean, std, min, max, edge mean and mass displacement of one object."""
    h, w = mask.shape
    weight = mask.astype(jnp.float32)
    n = jnp.sum(weight)
    total = jnp.sum(weight * image)
    mean = safe_div(total, n)
    std = jnp.sqrt(safe_div(jnp.sum(weight * (image - mean) ** 2), n))
    edge = morph.inner_boundary(mask).astype(jnp.float32)
    rows, cols = jnp.mgrid[0:h, 0:w].astype(jnp.float32)
    shift_r = safe_div(jnp.sum(weight * image * rows), total) - safe_div(jnp.sum(weight * rows), n)
    shift_c = safe_div(jnp.sum(weight * image * cols), total) - safe_div(jnp.sum(weight * cols), n)
    found = n > 0
    return jnp.stack([
        total, mean, std,
        jnp.where(found, jnp.min(jnp.where(mask, image, jnp.inf)), 0.0),
        jnp.where(found, jnp.max(jnp.where(mask, image, -jnp.inf)), 0.0),
        safe_div(jnp.sum(edge * image), jnp.sum(edge)),
        jnp.where(total > 0, jnp.sqrt(shift_r**2 + shift_c**2), 0.0),
    ])


def intensity(image: jax.Array, nucleus: jax.Array, cytoplasm: jax.Array) -> jax.Array:
    """(3, 11) INTENSITY_FEATURES of an (H, W) channel in Nuclei, Cells and Cytoplasm.

    The cytoplasm must not overlap the nucleus; the cell is their union. Edge pixels are an
    object's 4-connected inner boundary; MassDisplacement is the distance between its
    intensity-weighted and unweighted centroids. Standard deviations are population (ddof 0).
    """
    masks = jnp.stack([nucleus, nucleus | cytoplasm, cytoplasm])
    moments = jax.vmap(_moment_features, in_axes=(None, 0))(image, masks)
    quantiles = _quantile_features(image, nucleus, cytoplasm)
    return jnp.concatenate([moments[:, :5], quantiles, moments[:, 5:]], axis=1)


def granularity_openings(image: jax.Array, radii: int) -> jax.Array:
    """(radii, H, W) grey openings of a non-negative image by diamonds of radius 1..radii.

    The diamond of radius k is the 3x3 cross applied k times (as CellProfiler's granularity
    erodes with disk(1) repeatedly). Outside the image counts as 0, i.e. equal to
    scipy.ndimage.grey_opening(image, footprint=diamond(k), mode="constant", cval=0).
    """
    def erode_once(eroded, _):
        eroded = morph.erode(eroded)
        return eroded, eroded

    _, opened = jax.lax.scan(erode_once, image, None, length=radii)
    radius = jnp.arange(1, radii + 1)[:, None, None]

    def dilate_once(step, opened):
        return jnp.where(radius > step, morph.dilate(opened), opened)

    return jax.lax.fori_loop(0, radii, dilate_once, opened)


def granularity(image: jax.Array, mask: jax.Array, radii: int) -> jax.Array:
    """Granularity spectrum in percent: 100 (S_{k-1} - S_k) / S_0, with S_k the intensity summed
    over the mask after opening by radius k (S_0: the image).

    No background subtraction: the crops are illumination-corrected with a dark background, and
    the object is measured alone (pixels outside `mask` set to 0) so neighbours do not leak in.
    """
    masked = jnp.where(mask, image, 0.0)
    sums = jnp.sum(granularity_openings(masked, radii) * mask, axis=(1, 2))
    sums = jnp.concatenate([jnp.sum(masked)[None], sums])
    return 100.0 * safe_div(sums[:-1] - sums[1:], sums[0])


def radial_geometry(cell: jax.Array, centre: jax.Array, rings: int, directions: int,
                    wedges: int) -> tuple[jax.Array, jax.Array]:
    """Ring (0..rings-1) and wedge (0..wedges-1) index of every pixel of a cell.

    The normalised radius of a pixel is its distance to `centre` (the nucleus centroid) over the
    cell's extent in its direction, taken as the farthest cell pixel among `directions` angular
    sectors (+0.5 px). This approximates CellProfiler's d_centre / (d_centre + d_edge) for
    star-shaped cells without a distance transform.
    """
    h, w = cell.shape
    rows, cols = jnp.mgrid[0:h, 0:w].astype(jnp.float32)
    dy, dx = rows - centre[0], cols - centre[1]
    distance = jnp.sqrt(dx**2 + dy**2)
    turn = (jnp.arctan2(dy, dx) + jnp.pi) / (2 * jnp.pi)  # [0, 1]
    sector = jnp.minimum((turn * directions).astype(jnp.int32), directions - 1)
    in_sector = (sector[None] == jnp.arange(directions)[:, None, None]) & cell[None]
    extent = jnp.max(jnp.where(in_sector, distance[None], 0.0), axis=(1, 2)) + 0.5
    radius = distance / extent[sector]
    ring = jnp.minimum((radius * rings).astype(jnp.int32), rings - 1)
    wedge = jnp.minimum((turn * wedges).astype(jnp.int32), wedges - 1)
    return ring, wedge


def radial_distribution(image: jax.Array, cell: jax.Array, ring: jax.Array, wedge: jax.Array,
                        rings: int, wedges: int) -> jax.Array:
    """(C, 3, rings): FracAtD, MeanFrac and RadialCV of each channel of a (C, H, W) image.

    FracAtD: fraction of the cell's intensity in each ring; MeanFrac: that over the ring's
    fraction of pixels; RadialCV: coefficient of variation across `wedges` angular wedges of the
    ring's mean intensity (wedges without pixels left out). Sums per (ring, wedge) bin are one
    matmul with the bins' one-hot matrix.
    """
    bins = jnp.where(cell, ring * wedges + wedge, rings * wedges).reshape(-1)
    onehot = jax.nn.one_hot(bins, rings * wedges, dtype=jnp.float32)  # (HW, R*W), 0 outside
    sums = jnp.dot(image.reshape(image.shape[0], -1), onehot,
                   precision=jax.lax.Precision.HIGHEST).reshape(-1, rings, wedges)
    counts = jnp.sum(onehot, axis=0).reshape(rings, wedges)
    ring_sum = jnp.sum(sums, axis=2)  # (C, R)
    ring_count = jnp.sum(counts, axis=1)
    frac = safe_div(ring_sum, jnp.sum(ring_sum, axis=1, keepdims=True))
    mean_frac = safe_div(frac, safe_div(ring_count, jnp.sum(ring_count)))
    wedge_mean = safe_div(sums, counts)  # (C, R, W)
    present = (counts > 0).astype(jnp.float32)
    k = jnp.sum(present, axis=1)
    mu = safe_div(jnp.sum(present * wedge_mean, axis=2), k)
    sd = jnp.sqrt(safe_div(jnp.sum(present * (wedge_mean - mu[..., None]) ** 2, axis=2), k))
    return jnp.stack([frac, mean_frac, safe_div(sd, mu)], axis=1)


def _pair_colocalization(a, b, threshold_a, threshold_b, mask) -> jax.Array:
    weight = mask.astype(jnp.float32)
    n = jnp.sum(weight)
    da = a - safe_div(jnp.sum(weight * a), n)
    db = b - safe_div(jnp.sum(weight * b), n)
    pearson = safe_div(jnp.sum(weight * da * db),
                       jnp.sqrt(jnp.sum(weight * da**2) * jnp.sum(weight * db**2)))
    above_a = mask & (a > threshold_a)
    above_b = mask & (b > threshold_b)
    both = above_a & above_b
    m1 = safe_div(jnp.sum(both * a), jnp.sum(above_a * a))
    m2 = safe_div(jnp.sum(both * b), jnp.sum(above_b * b))
    overlap = safe_div(jnp.sum(weight * a * b),
                       jnp.sqrt(jnp.sum(weight * a**2) * jnp.sum(weight * b**2)))
    return jnp.stack([pearson, m1, m2, overlap])


def colocalization(image: jax.Array, mask: jax.Array, pairs: Sequence[tuple[int, int]]
                   ) -> jax.Array:
    """(pairs, 4) colocalisation of channel pairs (a, b) of a (C, H, W) image within a mask.

    Per pair: Pearson correlation; Manders M1 (fraction of a's above-threshold intensity where b is also
    above threshold) and M2 (vice versa) with each channel's Otsu threshold within the mask;
    overlap coefficient sum(ab) / sqrt(sum(a^2) sum(b^2)).
    """
    thresholds = jax.vmap(otsu_threshold, in_axes=(0, None))(image, mask)
    first, second = (jnp.asarray(index) for index in zip(*pairs))
    return jax.vmap(_pair_colocalization, in_axes=(0, 0, 0, 0, None))(
        image[first], image[second], thresholds[first], thresholds[second], mask)
