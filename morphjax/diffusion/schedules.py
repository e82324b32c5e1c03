"""Noise schedules of the forward diffusion process q(x_t | x_0).

Ho et al. 2020 (DDPM) with the quantities CompVis latent-diffusion registers in
`DDPM.register_schedule` (MorphDiff is a fork of it): everything is computed in float64 NumPy and
cast to float32 once. Kinds:
  "linear"         betas = linspace(beta_start, beta_end)                       (Ho et al. 2020)
  "scaled_linear"  betas = linspace(sqrt(beta_start), sqrt(beta_end)) ** 2       (CompVis "linear";
                   MorphDiff uses beta_start 0.0015, beta_end 0.0155)
  "cosine"         alpha_bar(t) = cos((t/T + s) / (1 + s) * pi/2)^2, betas clipped at 0.999
                   (Nichol & Dhariwal 2021, s = 0.008)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("linear", "scaled_linear", "cosine")
MORPHDIFF_BETA_START = 0.0015
MORPHDIFF_BETA_END = 0.0155


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-timestep float32 arrays of shape (T,); a pytree, so it can be passed to `jax.jit`."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_betas(kind: str, num_timesteps: int, beta_start: float, beta_end: float,
               cosine_s: float = 0.008) -> np.ndarray:
    """float64 betas of shape (num_timesteps,)."""
    t = num_timesteps
    if kind == "linear":
        return np.linspace(beta_start, beta_end, t, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, t, dtype=np.float64) ** 2
    if kind == "cosine":
        steps = np.arange(t + 1, dtype=np.float64) / t + cosine_s
        alpha_bar = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


def make_schedule(kind: str = "scaled_linear", num_timesteps: int = 1000, *,
                  beta_start: float | None = None, beta_end: float | None = None,
                  cosine_s: float = 0.008) -> Schedule:
    """Builds a `Schedule`; linear kinds default to beta_start 1e-4, beta_end 0.02 (Ho et al.)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}.")
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("beta_start/beta_end do not apply to the cosine schedule; "
                             "leave them unset (cosine_s sets its shape).")
        beta_start, beta_end = 0.0, 0.0
    else:
        beta_start = 1e-4 if beta_start is None else float(beta_start)
        beta_end = 0.02 if beta_end is None else float(beta_end)
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, "
                             f"beta_end={beta_end}.")

    betas = make_betas(kind, int(num_timesteps), beta_start, beta_end, cosine_s)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        posterior_variance=posterior_variance,
        # posterior_variance[0] is 0; CompVis clips the log at 1e-20.
        posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )
    return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


def gather(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """values[t] reshaped to (B, 1, ..., 1) with `ndim` dims, to broadcast against x."""
    return values[t].reshape((t.shape[0],) + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4); t int (B,)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} must equal x0 shape {x0.shape}.")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape (B,) = ({x0.shape[0]},), got {t.shape}.")
    return (gather(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)
