"""Samplers: DDPM ancestral, DDIM, SDEdit image-to-image, DDIM inversion, classifier-free guidance.

DDIM follows Song et al. 2021 as implemented by CompVis `DDIMSampler` (the sampler MorphDiff
uses: 100 steps, eta 0 for gene-to-image; SDEdit strength 0.55 with 50 steps for
image-to-image). Every sampler runs its loop with `jax.lax.fori_loop`, so it compiles one model
call whatever the number of steps; all are jittable and shape-polymorphic in the batch, which may
be sharded. `model_fn(x, t, context)` takes int32 timesteps t of shape (B,).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from morphjax.diffusion.objectives import ModelFn, check_parameterization, eps_and_x0
from morphjax.diffusion.schedules import Schedule, gather, q_sample


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """CompVis `make_ddim_timesteps` "uniform": arange(0, T, T // steps) + 1, ascending.

    As in CompVis, when T is not a multiple of `steps` this gives more than `steps` timesteps
    (T=1000, steps=300 -> 334). steps == T would index timestep T and is refused.
    """
    if int(steps) != steps or not 1 <= steps < num_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_timesteps - 1}] for a "
                         f"{num_timesteps}-step schedule, got {steps!r}.")
    return np.arange(0, num_timesteps, num_timesteps // int(steps), dtype=np.int32) + 1


def _ddim_alphas(schedule: Schedule, timesteps: np.ndarray,
                 eta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CompVis `make_ddim_sampling_parameters`: alpha_bar at the DDIM timesteps, the previous
    ones ([alpha_bar[0]] + alphas[:-1]) and sigma = eta sqrt((1-a_prev)/(1-a) (1 - a/a_prev))."""
    ac = schedule.alphas_cumprod
    a = ac[timesteps]
    a_prev = jnp.concatenate([ac[:1], a[:-1]])
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
    return a, a_prev, sigma


def _is_one(scale: Any) -> bool:
    return isinstance(scale, (int, float, np.integer, np.floating)) and float(scale) == 1.0


def _check_guidance(guidance_scale: Any, null_context: Any) -> None:
    if not _is_one(guidance_scale) and null_context is None:
        raise ValueError(f"guidance_scale={guidance_scale} != 1 needs null_context "
                         "(the unconditional context).")


def guided_prediction(model_fn: ModelFn, x: jax.Array, t: jax.Array, context: Any,
                      null_context: Any, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond).

    A Python scale of 1 calls only the conditional model. Otherwise both branches run in one
    call on the concatenated batch (as CompVis does); `null_context` leaves broadcast against
    the context leaves.
    """
    if _is_one(scale):
        return model_fn(x, t, context)
    _check_guidance(scale, null_context)
    both_context = jax.tree.map(
        lambda c, n: jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)]),
        context, null_context)
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both_context)
    cond, uncond = jnp.split(out, 2)
    return uncond + scale * (cond - uncond)


def _initial_noise(shape: Sequence[int] | None, x_T: jax.Array | None,
                   rng: jax.Array) -> jax.Array:
    if x_T is not None:
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x_T shape {x_T.shape}.")
        return x_T
    if shape is None:
        raise ValueError("give the sample shape or x_T.")
    return jax.random.normal(rng, tuple(shape), jnp.float32)


def _ddim_decode(model_fn: ModelFn, schedule: Schedule, x: jax.Array, context: Any,
                 rng: jax.Array, timesteps: np.ndarray, num_steps: int, *, eta: float,
                 guidance_scale: Any, null_context: Any, parameterization: str) -> jax.Array:
    """DDIM updates from DDIM index num_steps - 1 down to 0 (CompVis `p_sample_ddim`)."""
    a, a_prev, sigma = _ddim_alphas(schedule, timesteps, eta)
    ts = jnp.asarray(timesteps, jnp.int32)
    batch = x.shape[0]

    def body(k, x):
        i = num_steps - 1 - k
        t = jnp.full((batch,), ts[i], jnp.int32)
        out = guided_prediction(model_fn, x, t, context, null_context, guidance_scale)
        eps, x0 = eps_and_x0(parameterization, schedule, x, t, out)
        x_prev = jnp.sqrt(a_prev[i]) * x0 + jnp.sqrt(1.0 - a_prev[i] - sigma[i] ** 2) * eps
        if eta != 0.0:
            x_prev = x_prev + sigma[i] * jax.random.normal(
                jax.random.fold_in(rng, i), x.shape, x.dtype)
        return x_prev.astype(x.dtype)

    return jax.lax.fori_loop(0, num_steps, body, x)


def ddim_sample(model_fn: ModelFn, schedule: Schedule, shape: Sequence[int] | None,
                context: Any, rng: jax.Array, *, steps: int = 100, eta: float = 0.0,
                guidance_scale: float = 1.0, null_context: Any = None,
                parameterization: str = "eps", x_T: jax.Array | None = None) -> jax.Array:
    """DDIM sampling from x_T ~ N(0, I) (or the given x_T) over `ddim_timesteps(T, steps)`.

    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z (Song et al.
    2021, eq. 12). The result sits at noise level alpha_bar[0], as CompVis returns it.
    """
    check_parameterization(parameterization)
    _check_guidance(guidance_scale, null_context)
    init_rng, noise_rng = jax.random.split(rng)
    x = _initial_noise(shape, x_T, init_rng)
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)
    return _ddim_decode(model_fn, schedule, x, context, noise_rng, timesteps, len(timesteps),
                        eta=float(eta), guidance_scale=guidance_scale,
                        null_context=null_context, parameterization=parameterization)


def ddpm_sample(model_fn: ModelFn, schedule: Schedule, shape: Sequence[int] | None,
                context: Any, rng: jax.Array, *, guidance_scale: float = 1.0,
                null_context: Any = None, parameterization: str = "eps",
                x_T: jax.Array | None = None, clip_denoised: bool = False) -> jax.Array:
    """Ancestral sampling over all T steps with the posterior q(x_{t-1} | x_t, x0_hat).

    x_{t-1} = coef1_t x0_hat + coef2_t x_t + [t > 0] exp(0.5 log var_t) z (DDPM Algorithm 2 in
    the posterior-mean form of CompVis `p_sample`); clip_denoised clips x0_hat to [-1, 1].
    """
    check_parameterization(parameterization)
    _check_guidance(guidance_scale, null_context)
    init_rng, noise_rng = jax.random.split(rng)
    x = _initial_noise(shape, x_T, init_rng)
    num = schedule.num_timesteps
    batch = x.shape[0]

    def body(k, x):
        step = num - 1 - k
        t = jnp.full((batch,), step, jnp.int32)
        out = guided_prediction(model_fn, x, t, context, null_context, guidance_scale)
        _, x0 = eps_and_x0(parameterization, schedule, x, t, out)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        mean = (gather(schedule.posterior_mean_coef1, t, x.ndim) * x0
                + gather(schedule.posterior_mean_coef2, t, x.ndim) * x)
        std = jnp.exp(0.5 * schedule.posterior_log_variance_clipped[step])
        z = jax.random.normal(jax.random.fold_in(noise_rng, step), x.shape, x.dtype)
        return (mean + jnp.where(step > 0, std, 0.0) * z).astype(x.dtype)

    return jax.lax.fori_loop(0, num, body, x)


def sdedit(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, context: Any,
           rng: jax.Array, *, strength: float = 0.55, steps: int = 50, eta: float = 0.0,
           guidance_scale: float = 1.0, null_context: Any = None, parameterization: str = "eps",
           compvis_encode_index: bool = False) -> jax.Array:
    """Image-to-image (SDEdit, Meng et al. 2022) as CompVis `stochastic_encode` + `decode`.

    t_enc = int(strength * steps); x0 is noised with q_sample to DDIM index t_enc - 1, the first
    step then decoded, and the last t_enc DDIM steps run down to index 0. Strength 0 returns x0.
    CompVis noises one DDIM index further (t_enc) than it decodes from; `compvis_encode_index`
    reproduces that (strength 1 is then out of range, as there).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}.")
    check_parameterization(parameterization)
    _check_guidance(guidance_scale, null_context)
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)
    t_enc = int(strength * steps)
    noise_index = t_enc if compvis_encode_index else t_enc - 1
    if noise_index >= len(timesteps):
        raise ValueError(f"strength {strength} with steps {steps} noises to DDIM index "
                         f"{noise_index}, past the last one ({len(timesteps) - 1}); lower it.")
    if noise_index < 0:
        return x0
    noise_rng, decode_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    t = jnp.full((x0.shape[0],), int(timesteps[noise_index]), jnp.int32)
    x = q_sample(schedule, x0, t, noise).astype(x0.dtype)
    return _ddim_decode(model_fn, schedule, x, context, decode_rng, timesteps, t_enc,
                        eta=float(eta), guidance_scale=guidance_scale,
                        null_context=null_context, parameterization=parameterization)


def ddim_invert(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, context: Any, *,
                steps: int = 100, guidance_scale: float = 1.0, null_context: Any = None,
                parameterization: str = "eps") -> jax.Array:
    """Deterministic DDIM encoding x0 -> x_T, the reverse of `ddim_sample` with eta 0.

    Step i moves x from level a_prev[i] to a[i] with eps_hat = model(x, t_i) (CompVis
    `DDIMSampler.encode`); x0 is taken to sit at level alpha_bar[0], where `ddim_sample` ends.
    `ddim_sample(..., x_T=ddim_invert(...))` returns x0 up to discretisation error.
    """
    check_parameterization(parameterization)
    _check_guidance(guidance_scale, null_context)
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)
    a, a_prev, _ = _ddim_alphas(schedule, timesteps, 0.0)
    ts = jnp.asarray(timesteps, jnp.int32)
    batch = x0.shape[0]

    def body(i, x):
        t = jnp.full((batch,), ts[i], jnp.int32)
        out = guided_prediction(model_fn, x, t, context, null_context, guidance_scale)
        eps, _ = eps_and_x0(parameterization, schedule, x, t, out)
        x0_hat = (x - jnp.sqrt(1.0 - a_prev[i]) * eps) / jnp.sqrt(a_prev[i])
        return (jnp.sqrt(a[i]) * x0_hat + jnp.sqrt(1.0 - a[i]) * eps).astype(x.dtype)

    return jax.lax.fori_loop(0, len(timesteps), body, x0)
