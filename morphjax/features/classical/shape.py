"""AreaShape features of one binary object, as CellProfiler's MeasureObjectSizeShape names them.

Moments follow skimage.measure.regionprops (inertia tensor of the pixel centres: axis lengths
4 sqrt(eigenvalue), eccentricity sqrt(1 - l2 / l1), orientation in degrees), the perimeter is
skimage.measure.perimeter's weighted 4-neighbourhood boundary count, and Zernike magnitudes follow
CellProfiler (centrosome.zernike): |sum over the object of V_nm| / (pi r^2) on the unit disc.

Two approximations:
* Convex area: skimage counts the pixel centres inside the convex hull of the object's pixel-edge
  midpoints. Here the hull is replaced by the polygon of its support lines in `directions` evenly
  spaced directions, which contains it, and the centres inside are counted row by row. With the
  default 1024 directions the convex area is at most 0.2% larger than skimage's (0.15% worst on
  random blobs, usually equal; 4096 directions were exact on all of them), so Solidity is within
  0.002 below skimage's.
* Zernike disc: centred on the centroid with radius the farthest pixel centre, instead of the
  minimum enclosing circle (identical for centrally symmetric objects).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from morphjax.features.classical import morph
from morphjax.features.classical.morph import safe_div

SHAPE_FEATURES = ("Area", "Perimeter", "FormFactor", "Solidity", "Extent", "Compactness",
                  "Eccentricity", "MajorAxisLength", "MinorAxisLength", "Orientation")

# skimage.measure.perimeter: each border pixel is coded 10 x (diagonal border neighbours) +
# 2 x (4-connected border neighbours) + 1 and weighted by its local boundary length.
_PERIMETER_WEIGHTS = np.zeros(50, np.float32)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = math.sqrt(2.0)
_PERIMETER_WEIGHTS[[13, 23]] = (1.0 + math.sqrt(2.0)) / 2.0


def zernike_indexes(degree: int) -> list[tuple[int, int]]:
    """(n, m) with 0 <= m <= n <= degree and n - m even: 30 for degree 9, as CellProfiler."""
    return [(n, m) for n in range(degree + 1) for m in range(n % 2, n + 1, 2)]


def _radial_coefficients(indexes: list[tuple[int, int]]) -> np.ndarray:
    """(K, degree + 1) coefficients of rho^p in the Zernike radial polynomials R_nm."""
    degree = max(n for n, _ in indexes)
    table = np.zeros((len(indexes), degree + 1), np.float32)
    for row, (n, m) in enumerate(indexes):
        for s in range((n - m) // 2 + 1):
            table[row, n - 2 * s] = ((-1) ** s * math.factorial(n - s) / (
                math.factorial(s) * math.factorial((n + m) // 2 - s)
                * math.factorial((n - m) // 2 - s)))
    return table


def perimeter(mask: jax.Array) -> jax.Array:
    """skimage.measure.perimeter(mask, neighborhood=4)."""
    border = morph.inner_boundary(mask).astype(jnp.int32)
    code = border
    for dr, dc in morph.SQUARE:
        if (dr, dc) != (0, 0):
            code = code + (10 if dr and dc else 2) * morph.shift(border, dr, dc)
    weights = jnp.asarray(_PERIMETER_WEIGHTS)
    return jnp.sum(jnp.where(border > 0, weights[code], 0.0))


def _convex_area(mask, dy, dx, directions: int) -> jax.Array:
    """Pixel centres inside the support-line polygon of the pixel-edge midpoints.

    The hull only depends on the leftmost and rightmost pixel of each row, and the polygon cuts
    each row in an interval, so the cost is O(directions x rows), not O(directions x pixels).
    """
    theta = np.arange(directions) * (2 * np.pi / directions)
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    has = mask.any(axis=1)
    row_dy = dy[:, 0]
    left = jnp.min(jnp.where(mask, dx, jnp.inf), axis=1)
    right = jnp.max(jnp.where(mask, dx, -jnp.inf), axis=1)
    ends = jnp.maximum(left[:, None] * cos, right[:, None] * cos) + row_dy[:, None] * sin
    support = (jnp.max(jnp.where(has[:, None], ends, -jnp.inf), axis=0)
               + 0.5 * np.maximum(np.abs(cos), np.abs(sin)) + 1e-3)  # (K,), boundary included
    # Row y meets half-plane k (x cos + y sin <= support) in x <= bound (cos > 0) or x >= bound.
    vertical = np.abs(cos) < 1e-6
    bound = (support - row_dy[:, None] * sin) / np.where(vertical, 1.0, cos)  # (H, K)
    upper = jnp.min(jnp.where(cos > 1e-6, bound, jnp.inf), axis=1)
    lower = jnp.max(jnp.where(cos < -1e-6, bound, -jnp.inf), axis=1)
    row_in = jnp.all(jnp.where(vertical, row_dy[:, None] * sin <= support, True), axis=1)
    offset = dx[0, 0]  # column 0 in centred coordinates
    width = mask.shape[1]
    first = jnp.clip(jnp.ceil(lower - offset), 0, width)
    last = jnp.clip(jnp.floor(upper - offset), -1, width - 1)
    return jnp.sum(jnp.where(row_in, jnp.maximum(last - first + 1, 0), 0))


def _zernike(mask, dy, dx, indexes) -> jax.Array:
    """Zernike magnitudes from the moments sum(rho^p e^{i m phi}) over the object (one matmul)."""
    radius = jnp.maximum(jnp.sqrt(jnp.max(jnp.where(mask, dx**2 + dy**2, 0.0))), 0.5)
    x, y = dx / radius, dy / radius
    rho = jnp.sqrt(x**2 + y**2)
    coefficients = _radial_coefficients(indexes)  # (K, P)
    degree = coefficients.shape[1] - 1
    inside = mask.astype(jnp.float32)  # all within the unit disc, by the choice of radius
    # rho^p, cos(m phi) and sin(m phi) by repeated products, without pow or trig per pixel.
    cos = jnp.where(rho > 0, x / jnp.where(rho > 0, rho, 1.0), 1.0)
    sin = jnp.where(rho > 0, y / jnp.where(rho > 0, rho, 1.0), 0.0)
    powers, cosines, sines = [inside], [jnp.ones_like(x)], [jnp.zeros_like(x)]
    for _ in range(degree):
        powers.append(powers[-1] * rho)
        cosines, sines = (cosines + [cosines[-1] * cos - sines[-1] * sin],
                          sines + [sines[-1] * cos + cosines[-1] * sin])
    powers = jnp.stack(powers).reshape(degree + 1, -1)
    angular = jnp.stack(cosines + sines).reshape(2 * (degree + 1), -1)
    moments = jnp.dot(powers, angular.T, precision=jax.lax.Precision.HIGHEST)  # (P, 2M)
    m = np.array([m for _, m in indexes])
    real = jnp.sum(coefficients * moments[:, m].T, axis=1)
    imag = jnp.sum(coefficients * moments[:, degree + 1 + m].T, axis=1)
    return jnp.sqrt(real**2 + imag**2) / (jnp.pi * radius**2)


def _bounding_box_area(mask) -> jax.Array:
    def extent(any_along):
        index = jnp.arange(any_along.shape[0])
        return (jnp.max(jnp.where(any_along, index, -1))
                - jnp.min(jnp.where(any_along, index, any_along.shape[0])) + 1)
    return (extent(mask.any(axis=1)) * extent(mask.any(axis=0))).astype(jnp.float32)


def area_shape(mask: jax.Array, *, directions: int = 1024, zernike_degree: int = 9) -> jax.Array:
    """SHAPE_FEATURES then the Zernike magnitudes of an (H, W) mask; zeros if it is empty."""
    h, w = mask.shape
    weight = mask.astype(jnp.float32)
    area = jnp.sum(weight)
    rows, cols = jnp.mgrid[0:h, 0:w].astype(jnp.float32)
    dy = rows - safe_div(jnp.sum(weight * rows), area)
    dx = cols - safe_div(jnp.sum(weight * cols), area)
    # skimage's inertia tensor [[a, b], [b, c]]: a = var(col), c = var(row), b = -cov.
    a = safe_div(jnp.sum(weight * dx**2), area)
    c = safe_div(jnp.sum(weight * dy**2), area)
    b = -safe_div(jnp.sum(weight * dx * dy), area)
    spread = jnp.sqrt(((a - c) / 2) ** 2 + b**2)
    major, minor = (a + c) / 2 + spread, jnp.maximum((a + c) / 2 - spread, 0.0)
    orientation = jnp.where(a == c, jnp.where(b < 0, jnp.pi / 4, -jnp.pi / 4),
                            0.5 * jnp.arctan2(-2 * b, c - a))
    length = perimeter(mask)
    values = [
        area,
        length,
        safe_div(4 * jnp.pi * area, length**2),
        safe_div(area, _convex_area(mask, dy, dx, directions).astype(jnp.float32)),
        safe_div(area, _bounding_box_area(mask)),
        safe_div(2 * jnp.pi * (a + c), area),
        jnp.sqrt(jnp.maximum(1.0 - safe_div(minor, major), 0.0)) * (major > 0),
        4 * jnp.sqrt(major),
        4 * jnp.sqrt(minor),
        jnp.degrees(orientation) * (area > 0),
    ]
    zernike = _zernike(mask, dy, dx, zernike_indexes(zernike_degree)) * (area > 0)
    return jnp.concatenate([jnp.stack(values), zernike])
