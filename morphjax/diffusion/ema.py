"""Exponential moving average of parameters with the CompVis `LitEma` warm-up (MorphDiff EMA)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_decay(step: int | jax.Array, decay: float = 0.9999) -> jax.Array:
    """decay_t = min(decay, (1 + step) / (10 + step))."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params: Any, params: Any, step: int | jax.Array,
               decay: float = 0.9999) -> Any:
    """ema <- ema - (1 - decay_t) (ema - params), leafwise over matching pytrees.

    `step` counts updates including this one: LitEma increments its counter before use, so its
    first update is step 1 (decay_t = 2/11). Leaves keep the dtype of `ema_params`.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    one_minus = 1.0 - ema_decay(step, decay)
    return jax.tree.map(
        lambda e, p: (e - one_minus * (e - p.astype(jnp.float32))).astype(e.dtype),
        ema_params, params)
