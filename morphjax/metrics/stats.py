"""Streaming feature statistics (mean and covariance) accumulated on device.

FID needs the mean and covariance of tens of thousands of 2048-d features. Raw second moments
(E[xx^T] - mu mu^T) in float32 lose about 1e-5 relative accuracy to cancellation, so each batch is
centred on its own mean and batches are merged with the pairwise update of Chan, Golub & LeVeque
(1979) on (count, mean, M2), where M2 is the sum of centred outer products. Matmuls use
`precision=HIGHEST` (accelerators otherwise default to TF32/bfloat16 passes). A batch may be
sharded along the sample axis; XLA inserts the cross-device sums.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


class Moments(NamedTuple):
    """Running statistics of a feature stream: sample count, mean and centred M2 (d x d)."""
    count: jax.Array  # int32 scalar
    mean: jax.Array  # (d,) float32
    m2: jax.Array  # (d, d) float32, sum over samples of (x - mean)(x - mean)^T


def init_moments(dim: int) -> Moments:
    """Empty statistics for `dim`-dimensional features."""
    if int(dim) < 1:
        raise ValueError(f"dim must be a positive feature dimension, got {dim}")
    return Moments(jnp.zeros((), jnp.int32), jnp.zeros((dim,), jnp.float32),
                   jnp.zeros((dim, dim), jnp.float32))


def _batch_moments(batch: jax.Array, mask: jax.Array | None) -> Moments:
    x = batch.astype(jnp.float32)
    w = jnp.ones(x.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.sum(w)
    mean = jnp.sum(x * w[:, None], axis=0) / jnp.maximum(n, 1.0)
    centred = (x - mean) * w[:, None]  # Masked rows contribute nothing.
    m2 = jnp.matmul(centred.T, centred, precision=_HIGHEST)
    return Moments(n.astype(jnp.int32), mean, m2)


def _merge(a: Moments, b: Moments) -> Moments:
    na = a.count.astype(jnp.float32)
    nb = b.count.astype(jnp.float32)
    n = na + nb
    frac = nb / jnp.maximum(n, 1.0)
    delta = b.mean - a.mean
    mean = a.mean + delta * frac
    m2 = a.m2 + b.m2 + jnp.outer(delta, delta) * (na * frac)
    return Moments(a.count + b.count, mean, m2)


@jax.jit
def update_moments(state: Moments, batch: jax.Array, mask: jax.Array | None = None) -> Moments:
    """Adds a (B, d) batch to `state`; `mask` (B,) marks valid rows of a padded last batch."""
    return _merge(state, _batch_moments(batch, mask))


@jax.jit
def merge_moments(a: Moments, b: Moments) -> Moments:
    """Combines statistics of two disjoint streams (e.g. two hosts or two shards of a dataset)."""
    return _merge(a, b)


def moments(features, mask=None) -> Moments:
    """Statistics of a whole (N, d) feature array (NumPy or a possibly sharded jax.Array)."""
    x = _as_features(features, "features")
    return update_moments(init_moments(x.shape[1]), x, mask)


def mean_cov(state: Moments, ddof: int = 1) -> tuple[jax.Array, jax.Array]:
    """Mean and covariance with `ddof` (1, as np.cov and the FID references use)."""
    count = int(state.count)
    if count <= ddof:
        raise ValueError(f"need more than ddof={ddof} samples for a covariance, got {count}")
    return state.mean, state.m2 / jnp.float32(count - ddof)


def _as_features(x, name: str) -> jax.Array:
    """(N, d) float32 jax.Array; keeps an existing jax.Array (and its sharding) on device."""
    if not isinstance(x, jax.Array):
        x = jnp.asarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {tuple(x.shape)}")
    if x.dtype != jnp.float32:
        x = x.astype(jnp.float32)
    return x
