"""Haralick texture features (Haralick et al. 1973) from grey-level co-occurrence matrices.

Definitions follow CellProfiler's MeasureTexture (mahotas.features.haralick): symmetric GLCM of
pixel pairs both inside the object at offsets (0, d), (d, d), (d, 0), (d, -d) (angles 0, 45, 90,
135 degrees), marginals indexed from 0, entropies in bits, Correlation 1 for a flat marginal.
DifferenceVariance is the variance of |i - j| under p_{x-y} (Haralick's f10; mahotas by default
takes the variance of the vector p_{x-y} itself).

Each channel is quantised to `levels` grey levels over the cell's intensity range,
floor((x - min) / (max - min) * levels), shared by the nucleus, cytoplasm and cell matrices
(CellProfiler quantises over a fixed range; a per-cell range keeps 8 levels informative for dim
stains and does not restate the intensity features).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from morphjax.features.classical import morph
from morphjax.features.classical.morph import safe_div

TEXTURE_FEATURES = ("AngularSecondMoment", "Contrast", "Correlation", "Variance",
                    "InverseDifferenceMoment", "SumAverage", "SumVariance", "SumEntropy",
                    "Entropy", "DifferenceVariance", "DifferenceEntropy", "InfoMeas1",
                    "InfoMeas2")
ANGLES = ((0, 1), (1, 1), (1, 0), (1, -1))  # (row, col) steps: 0, 45, 90, 135 degrees.
ANGLE_NAMES = ("00", "45", "90", "135")


def quantize(image: jax.Array, mask: jax.Array, levels: int) -> jax.Array:
    """Grey level 0..levels-1 of each pixel over the mask's intensity range (0 if flat)."""
    lo = jnp.min(jnp.where(mask, image, jnp.inf))
    hi = jnp.max(jnp.where(mask, image, -jnp.inf))
    scaled = safe_div(image - lo, hi - lo) * levels
    return jnp.clip(jnp.floor(scaled), 0, levels - 1).astype(jnp.int32)


def cooccurrence(grey: jax.Array, parts: jax.Array, levels: int, distance: int) -> jax.Array:
    """(P + 1, 4, L, L) symmetric, normalised GLCMs of disjoint objects and of their union.

    `parts` (P, H, W) are disjoint masks (e.g. nucleus and cytoplasm); pixel pairs are counted
    with one scatter, by the part of each end, so the union (the cell) costs nothing extra.
    Matrices without pairs are 0.
    """
    n_parts = parts.shape[0]
    part = jnp.argmax(parts, axis=0) + n_parts * (~parts.any(axis=0))  # n_parts: outside
    codes = []
    for angle, (dr, dc) in enumerate(ANGLES):
        other = morph.shift(part, dr * distance, dc * distance, fill=n_parts)
        other_grey = morph.shift(grey, dr * distance, dc * distance)
        pair = part * n_parts + other
        pixel = (pair * 4 + angle) * levels * levels + grey * levels + other_grey
        codes.append(jnp.where((part < n_parts) & (other < n_parts), pixel, -1))
    size = n_parts * n_parts * 4 * levels * levels
    code = jnp.stack(codes).reshape(-1)
    counts = jnp.zeros(size + 1, jnp.float32).at[jnp.where(code >= 0, code, size)].add(1.0)
    counts = counts[:-1].reshape(n_parts, n_parts, 4, levels, levels)
    within = jnp.diagonal(counts, axis1=0, axis2=1)  # (4, L, L, P)
    within = jnp.moveaxis(within, -1, 0)
    union = jnp.sum(counts, axis=(0, 1))[None]
    matrices = jnp.concatenate([within, union])
    matrices = matrices + jnp.swapaxes(matrices, -1, -2)
    return safe_div(matrices, jnp.sum(matrices, axis=(-1, -2), keepdims=True))


def _entropy(p: jax.Array) -> jax.Array:
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0))


def haralick(p: jax.Array) -> jax.Array:
    """TEXTURE_FEATURES of one normalised (L, L) co-occurrence matrix."""
    levels = p.shape[0]
    k = jnp.arange(levels, dtype=jnp.float32)
    i, j = k[:, None], k[None, :]
    px, py = p.sum(axis=1), p.sum(axis=0)
    mux, muy = px @ k, py @ k
    varx, vary = px @ k**2 - mux**2, py @ k**2 - muy**2
    sd = jnp.sqrt(jnp.maximum(varx, 0.0) * jnp.maximum(vary, 0.0))
    correlation = jnp.where(sd > 0, safe_div(jnp.sum(i * j * p) - mux * muy, sd), 1.0)
    total = jnp.arange(2 * levels - 1)
    p_sum = jnp.sum(jnp.where((i + j)[None] == total[:, None, None], p[None], 0.0), axis=(1, 2))
    p_diff = jnp.sum(jnp.where(jnp.abs(i - j)[None] == k[:, None, None], p[None], 0.0),
                     axis=(1, 2))
    sum_average = p_sum @ total
    diff_mean = p_diff @ k
    entropy = _entropy(p)
    hx, hy = _entropy(px), _entropy(py)
    outer = px[:, None] * py[None, :]
    hxy1 = -jnp.sum(jnp.where(outer > 0, p * jnp.log2(jnp.where(outer > 0, outer, 1.0)), 0.0))
    hxy2 = _entropy(outer)
    return jnp.stack([
        jnp.sum(p**2),
        jnp.sum((i - j) ** 2 * p),
        correlation,
        varx,
        jnp.sum(p / (1.0 + (i - j) ** 2)),
        sum_average,
        p_sum @ total**2 - sum_average**2,
        _entropy(p_sum),
        entropy,
        p_diff @ k**2 - diff_mean**2,
        _entropy(p_diff),
        safe_div(entropy - hxy1, jnp.maximum(hx, hy)),
        jnp.sqrt(jnp.maximum(1.0 - jnp.exp(-2.0 * (hxy2 - entropy)), 0.0)),
    ])


def texture(image: jax.Array, parts: jax.Array, levels: int, distance: int) -> jax.Array:
    """(P + 1, 4, 13) Haralick features per angle of one channel within each of the disjoint
    `parts` (P, H, W) and within their union, quantised over the union's intensity range."""
    grey = quantize(image, parts.any(axis=0), levels)
    matrices = cooccurrence(grey, parts, levels, distance)
    has_pairs = jnp.sum(matrices, axis=(-1, -2)) > 0
    return jax.vmap(jax.vmap(haralick))(matrices) * has_pairs[..., None]
