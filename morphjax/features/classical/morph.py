"""Array helpers of the feature modules: binary and grey-scale morphology on the last two axes as
shifted slices (jit/vmap friendly), and division that is 0 where the denominator is."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CROSS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
SQUARE = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1))


def safe_div(a, b):
    """a / b where b > 0, else 0 (no NaN or inf for empty objects, also not in gradients)."""
    return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)


def shift(x: jax.Array, dr: int, dc: int, fill=0) -> jax.Array:
    """out[..., i, j] = x[..., i + dr, j + dc], and `fill` where that falls outside the image."""
    h, w = x.shape[-2:]
    p = max(abs(dr), abs(dc))
    if p == 0:
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(p, p), (p, p)]
    padded = jnp.pad(x, pad, constant_values=fill)
    return padded[..., p + dr:p + dr + h, p + dc:p + dc + w]


def _reduce(x: jax.Array, offsets, op, fill) -> jax.Array:
    out = x
    for dr, dc in offsets:
        if (dr, dc) != (0, 0):
            out = op(out, shift(x, dr, dc, fill))
    return out


def erode(x: jax.Array, offsets=CROSS, fill=0) -> jax.Array:
    """Grey/binary erosion; `fill` is the value assumed outside the image."""
    op = jnp.logical_and if x.dtype == jnp.bool_ else jnp.minimum
    return _reduce(x, offsets, op, False if x.dtype == jnp.bool_ else fill)


def dilate(x: jax.Array, offsets=CROSS, fill=0) -> jax.Array:
    op = jnp.logical_or if x.dtype == jnp.bool_ else jnp.maximum
    return _reduce(x, offsets, op, False if x.dtype == jnp.bool_ else fill)


def inner_boundary(mask: jax.Array) -> jax.Array:
    """Pixels of `mask` with a 4-neighbour outside it (the image border counts as outside),
    the border image of skimage.measure.perimeter."""
    return mask & ~erode(mask)


def dilate_disc(mask: jax.Array, radius: int) -> jax.Array:
    """Binary dilation of an (H, W) mask by a Euclidean disc: per disc row, a horizontal window
    count from row prefix sums."""
    h, w = mask.shape
    padded = jnp.pad(mask.astype(jnp.int32), ((radius, radius), (radius + 1, radius)))
    prefix = jnp.cumsum(padded, axis=1)
    out = jnp.zeros((h, w), bool)
    for dy in range(-radius, radius + 1):
        half = int(np.floor(np.sqrt(radius**2 - dy**2)))
        rows = prefix[radius + dy:radius + dy + h]
        window = (rows[:, radius + 1 + half:radius + 1 + half + w]
                  - rows[:, radius - half:radius - half + w])
        out = out | (window > 0)
    return out
