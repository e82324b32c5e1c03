"""Training targets, parameterisation conversions and the denoising loss.

Three parameterisations of the network output at (x_t, t), with a = alpha_bar_t:
  "eps"  the noise (Ho et al. 2020; MorphDiff, CompVis `parameterization: eps`)
  "x0"   the clean sample
  "v"    v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, "Progressive distillation")
The loss is CompVis `p_losses` with `original_elbo_weight` 0 and logvar 0: the mean over all
elements of |pred - target| ("l1", MorphDiff) or (pred - target)^2 ("l2").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from morphjax.diffusion.schedules import Schedule, gather, q_sample

PARAMETERIZATIONS = ("eps", "x0", "v")
LOSS_TYPES = ("l1", "l2")
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _coefs(schedule: Schedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    return (gather(schedule.sqrt_alphas_cumprod, t, ndim),
            gather(schedule.sqrt_one_minus_alphas_cumprod, t, ndim))


def predict_x0_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
    """x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)."""
    sa, s1a = _coefs(schedule, t, x_t.ndim)
    return (x_t - s1a * eps) / sa


def predict_eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                        x0: jax.Array) -> jax.Array:
    """eps = (x_t - sqrt(a) x0) / sqrt(1 - a)."""
    sa, s1a = _coefs(schedule, t, x_t.ndim)
    return (x_t - sa * x0) / s1a


def v_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """v = sqrt(a) eps - sqrt(1 - a) x0."""
    sa, s1a = _coefs(schedule, t, x0.ndim)
    return sa * noise - s1a * x0


def predict_x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                      v: jax.Array) -> jax.Array:
    """x0 = sqrt(a) x_t - sqrt(1 - a) v."""
    sa, s1a = _coefs(schedule, t, x_t.ndim)
    return sa * x_t - s1a * v


def predict_eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                       v: jax.Array) -> jax.Array:
    """eps = sqrt(1 - a) x_t + sqrt(a) v."""
    sa, s1a = _coefs(schedule, t, x_t.ndim)
    return s1a * x_t + sa * v


def check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, "
                         f"got {parameterization!r}.")


def training_target(parameterization: str, schedule: Schedule, x0: jax.Array, t: jax.Array,
                    noise: jax.Array) -> jax.Array:
    """What the network regresses onto for a given parameterisation."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    return v_target(schedule, x0, t, noise)


def eps_and_x0(parameterization: str, schedule: Schedule, x_t: jax.Array, t: jax.Array,
               prediction: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Network output -> (eps estimate, x0 estimate), whatever it was trained to predict."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return prediction, predict_x0_from_eps(schedule, x_t, t, prediction)
    if parameterization == "x0":
        return predict_eps_from_x0(schedule, x_t, t, prediction), prediction
    return (predict_eps_from_v(schedule, x_t, t, prediction),
            predict_x0_from_v(schedule, x_t, t, prediction))


def drop_context(context: Any, null_context: Any, drop: jax.Array) -> Any:
    """Replaces the context of examples where `drop` (B,) is True by `null_context`.

    `null_context` leaves broadcast against the context leaves (e.g. shape (1, ...) or (...)).
    """
    def one(c, n):
        n = jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)
        return jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), n, c)
    return jax.tree.map(one, context, null_context)


def diffusion_loss(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, context: Any,
                   rng: jax.Array, *, parameterization: str = "eps", loss_type: str = "l1",
                   cond_drop_prob: float = 0.0,
                   null_context: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Denoising loss at a uniform random timestep per example (DDPM Algorithm 1).

    With cond_drop_prob > 0 a random fraction of the batch trains on `null_context`
    (classifier-free guidance, Ho & Salimans 2022); off by default, as in MorphDiff.
    Returns (scalar float32 loss, aux) with aux["t"] (B,) and aux["loss_per_example"] (B,).
    """
    check_parameterization(parameterization)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}.")
    if cond_drop_prob > 0.0 and null_context is None:
        raise ValueError("cond_drop_prob > 0 needs null_context (the unconditional context).")

    t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
    batch = x0.shape[0]
    t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_t = q_sample(schedule, x0, t, noise).astype(x0.dtype)
    if cond_drop_prob > 0.0:
        drop = jax.random.bernoulli(drop_rng, cond_drop_prob, (batch,))
        context = drop_context(context, null_context, drop)

    prediction = model_fn(x_t, t, context)
    target = training_target(parameterization, schedule, x0, t, noise)
    if prediction.shape != target.shape:
        raise ValueError(f"model_fn returned shape {prediction.shape}, expected {target.shape}.")
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    err = jnp.abs(diff) if loss_type == "l1" else jnp.square(diff)
    per_example = err.reshape(batch, -1).mean(axis=1)
    return per_example.mean(), {"t": t, "loss_per_example": per_example}
