"""morphjax.diffusion against NumPy closed forms and an exact Gaussian denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from morphjax import diffusion as d

T = 1000
DATA_STD = 0.5


@pytest.fixture(scope="module")
def morphdiff_schedule():
    return d.make_schedule("scaled_linear", T, beta_start=d.MORPHDIFF_BETA_START,
                           beta_end=d.MORPHDIFF_BETA_END)


def gaussian_eps_model(schedule, parameterization="eps"):
    """Exact E[eps | x_t] for x0 ~ N(mu, DATA_STD^2 I), mu = context broadcast over (H, W).

    x_t = sqrt(a) x0 + sqrt(1-a) eps is Gaussian, so E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu)
    / (a s^2 + 1 - a); the x0 and v outputs follow from x_t = sqrt(a) x0 + sqrt(1-a) eps.
    """
    def model(x, t, context):
        a = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
        mu = context[:, None, None, :]
        eps = jnp.sqrt(1 - a) / (a * DATA_STD ** 2 + 1 - a) * (x - jnp.sqrt(a) * mu)
        if parameterization == "eps":
            return eps
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        if parameterization == "x0":
            return x0
        return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
    return model


def _np(x):
    return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- schedules


def _check_derived(s, betas):
    """Every schedule array against the DDPM formulas, recomputed in float64 from `betas`."""
    alphas = 1 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    np.testing.assert_allclose(_np(s.alphas), alphas, rtol=1e-6)
    np.testing.assert_allclose(_np(s.alphas_cumprod), ac, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_np(s.alphas_cumprod_prev), ac_prev, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_np(s.sqrt_alphas_cumprod), np.sqrt(ac), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_np(s.sqrt_one_minus_alphas_cumprod), np.sqrt(1 - ac), rtol=1e-6)
    var = betas * (1 - ac_prev) / (1 - ac)
    np.testing.assert_allclose(_np(s.posterior_variance), var, rtol=1e-5)
    np.testing.assert_allclose(_np(s.posterior_log_variance_clipped)[1:], np.log(var[1:]),
                               rtol=1e-5)
    assert s.posterior_variance[0] == 0 and np.isclose(s.posterior_log_variance_clipped[0],
                                                       np.log(1e-20))
    for name in ("betas", "alphas_cumprod", "posterior_mean_coef1"):
        assert getattr(s, name).dtype == jnp.float32 and getattr(s, name).shape == (len(betas),)


def test_linear_schedule():
    s = d.make_schedule("linear", T)
    betas = np.linspace(1e-4, 0.02, T)
    np.testing.assert_allclose(_np(s.betas), betas, rtol=1e-6)
    _check_derived(s, betas)


def test_scaled_linear_schedule_is_morphdiff(morphdiff_schedule):
    s = morphdiff_schedule
    betas = np.linspace(np.sqrt(0.0015), np.sqrt(0.0155), T) ** 2
    np.testing.assert_allclose(_np(s.betas), betas, rtol=1e-6)
    np.testing.assert_allclose(float(s.betas[0]), 0.0015, rtol=1e-6)
    np.testing.assert_allclose(float(s.betas[-1]), 0.0155, rtol=1e-6)
    # Quadratic in the index, not linear: the midpoint beta is below the arithmetic mean.
    assert float(s.betas[T // 2]) < 0.5 * (0.0015 + 0.0155) - 1e-4
    _check_derived(s, betas)


def test_cosine_schedule_closed_form():
    s = d.make_schedule("cosine", T)
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    alpha_bar = f(np.arange(1, T + 1)) / f(0)  # alphas_cumprod[i] = alpha_bar(i + 1)
    np.testing.assert_allclose(_np(s.alphas_cumprod)[:-1], alpha_bar[:-1], rtol=1e-5, atol=1e-7)
    betas = np.minimum(1 - alpha_bar / np.concatenate([[1.0], alpha_bar[:-1]]), 0.999)
    assert np.isclose(float(s.betas[-1]), 0.999)  # alpha_bar(T) = 0 is clipped
    np.testing.assert_allclose(_np(s.betas), betas, rtol=1e-5)
    _check_derived(s, betas)


def test_posterior_mean_is_bayes_posterior(morphdiff_schedule):
    """coef1 x0 + coef2 x_t is the mean of N(sqrt(ab_prev) x0, 1-ab_prev) N(x_t; sqrt(al) x, b)."""
    s = morphdiff_schedule
    b, al = _np(s.betas), 1 - _np(s.betas)
    ab_prev = np.cumprod(al) / al
    x0, xt = 0.7, -1.3
    t = np.arange(1, T)
    precision = 1 / (1 - ab_prev[t]) + al[t] / b[t]
    mean = (np.sqrt(ab_prev[t]) * x0 / (1 - ab_prev[t]) + np.sqrt(al[t]) * xt / b[t]) / precision
    got = _np(s.posterior_mean_coef1)[t] * x0 + _np(s.posterior_mean_coef2)[t] * xt
    np.testing.assert_allclose(got, mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_np(s.posterior_variance)[t], 1 / precision, rtol=1e-4)


def test_schedule_errors():
    with pytest.raises(ValueError, match="kind"):
        d.make_schedule("quadratic")
    with pytest.raises(ValueError, match="cosine"):
        d.make_schedule("cosine", beta_start=0.001)
    with pytest.raises(ValueError, match="beta_start"):
        d.make_schedule("linear", beta_start=0.1, beta_end=0.01)


def test_q_sample(morphdiff_schedule):
    s = morphdiff_schedule
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (3, 2, 2, 1))
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 500, 999])
    ab = np.cumprod(1 - np.linspace(np.sqrt(0.0015), np.sqrt(0.0155), T) ** 2)[[0, 500, 999]]
    want = (np.sqrt(ab)[:, None, None, None] * _np(x0)
            + np.sqrt(1 - ab)[:, None, None, None] * _np(noise))
    np.testing.assert_allclose(_np(d.q_sample(s, x0, t, noise)), want, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------- objectives


def test_parameterization_round_trips(morphdiff_schedule):
    s = morphdiff_schedule
    k1, k2 = jax.random.split(jax.random.key(1))
    x0 = jax.random.normal(k1, (4, 3, 3, 2))
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 10, 400, 999])
    xt = d.q_sample(s, x0, t, eps)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d.predict_x0_from_eps(s, xt, t, eps), x0, **tol)
    np.testing.assert_allclose(d.predict_eps_from_x0(s, xt, t, x0), eps, **tol)
    v = d.v_target(s, x0, t, eps)
    ab = _np(s.alphas_cumprod)[_np(t).astype(int)][:, None, None, None]
    np.testing.assert_allclose(v, np.sqrt(ab) * _np(eps) - np.sqrt(1 - ab) * _np(x0), **tol)
    np.testing.assert_allclose(d.predict_x0_from_v(s, xt, t, v), x0, **tol)
    np.testing.assert_allclose(d.predict_eps_from_v(s, xt, t, v), eps, **tol)
    for p in d.PARAMETERIZATIONS:
        target = d.training_target(p, s, x0, t, eps)
        got_eps, got_x0 = d.eps_and_x0(p, s, xt, t, target)
        np.testing.assert_allclose(got_eps, eps, **tol)
        np.testing.assert_allclose(got_x0, x0, **tol)
    with pytest.raises(ValueError, match="parameterization"):
        d.training_target("score", s, x0, t, eps)


def _run_loss(schedule, model, x0, context, rng, **kwargs):
    """diffusion_loss under jit; also returns what it fed the model."""
    def run(x0, context, rng):
        seen = {}

        def recording_model(x, t, c):
            seen.update(x=x, t=t, c=c)
            return model(x, t, c)

        loss, aux = d.diffusion_loss(recording_model, schedule, x0, context, rng, **kwargs)
        return loss, aux, seen
    return jax.jit(run)(x0, context, rng)


@pytest.mark.parametrize("parameterization,loss_type", [("eps", "l1"), ("v", "l2"),
                                                        ("x0", "l1")])
def test_loss_matches_direct_computation(morphdiff_schedule, parameterization, loss_type):
    s = morphdiff_schedule
    x0 = jax.random.normal(jax.random.key(2), (16, 4, 4, 2))
    ctx = jax.random.normal(jax.random.key(3), (16, 2))
    loss, aux, seen = _run_loss(s, lambda x, t, c: 0.3 * x + c[:, None, None, :], x0, ctx,
                                jax.random.key(4), parameterization=parameterization,
                                loss_type=loss_type)
    t = _np(aux["t"]).astype(int)
    np.testing.assert_array_equal(t, _np(seen["t"]))
    assert t.min() >= 0 and t.max() < T and len(set(t)) > 8
    ab = np.cumprod(1 - _np(s.betas))[t][:, None, None, None]
    xt, x0n = _np(seen["x"]), _np(x0)
    eps = (xt - np.sqrt(ab) * x0n) / np.sqrt(1 - ab)  # the noise q_sample must have used
    assert abs(eps.std() - 1) < 0.2 and abs(eps.mean()) < 0.15
    target = {"eps": eps, "x0": x0n, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0n}
    diff = 0.3 * xt + _np(ctx)[:, None, None, :] - target[parameterization]
    err = np.abs(diff) if loss_type == "l1" else diff ** 2
    np.testing.assert_allclose(float(loss), err.mean(), rtol=2e-4)
    np.testing.assert_allclose(_np(aux["loss_per_example"]), err.mean(axis=(1, 2, 3)), rtol=2e-4)
    np.testing.assert_array_equal(_np(seen["c"]), _np(ctx))  # no dropout by default


def test_loss_timesteps_are_uniform_over_all_steps(morphdiff_schedule):
    x0 = jnp.zeros((20000, 1))
    _, aux = jax.jit(lambda x, r: d.diffusion_loss(lambda x, t, c: x, morphdiff_schedule, x,
                                                   None, r))(x0, jax.random.key(1))
    t = _np(aux["t"]).astype(int)
    assert t.min() == 0 and t.max() == T - 1  # P(missing an end) ~ 2 exp(-20)
    counts = np.bincount(t // 100, minlength=10)
    assert np.all(np.abs(counts - 2000) < 200), counts


def test_loss_context_dropout(morphdiff_schedule):
    s = morphdiff_schedule
    x0 = jnp.zeros((64, 2, 2, 1))
    ctx = jnp.arange(1.0, 65.0)[:, None] * jnp.ones((64, 3))
    null = jnp.full((3,), -1.0)
    identity = lambda x, t, c: x  # noqa: E731
    _, _, seen = _run_loss(s, identity, x0, ctx, jax.random.key(0), cond_drop_prob=0.5,
                           null_context=null)
    c = _np(seen["c"])
    dropped = np.all(c == -1.0, axis=1)
    kept = np.all(c == _np(ctx), axis=1)
    assert np.all(dropped | kept) and 16 < dropped.sum() < 48
    _, _, seen = _run_loss(s, identity, x0, ctx, jax.random.key(0), cond_drop_prob=1.0,
                           null_context=null)
    assert np.all(_np(seen["c"]) == -1.0)
    with pytest.raises(ValueError, match="null_context"):
        d.diffusion_loss(identity, s, x0, ctx, jax.random.key(0), cond_drop_prob=0.1)


# ---------------------------------------------------------------------------- samplers


def _numpy_ddim(schedule, x, mu, timesteps, num_steps, a_prev0=None):
    """CompVis DDIM, eta 0, float64, with the exact Gaussian eps model."""
    ac = np.cumprod(1 - _np(schedule.betas))
    a = ac[timesteps]
    a_prev = np.concatenate([[ac[0]], a[:-1]])
    x = _np(x)
    for i in reversed(range(num_steps)):
        eps = np.sqrt(1 - a[i]) / (a[i] * DATA_STD ** 2 + 1 - a[i]) * (x - np.sqrt(a[i]) * mu)
        x0 = (x - np.sqrt(1 - a[i]) * eps) / np.sqrt(a[i])
        x = np.sqrt(a_prev[i]) * x0 + np.sqrt(1 - a_prev[i]) * eps
    return x


def test_ddim_timesteps_compvis():
    np.testing.assert_array_equal(d.ddim_timesteps(1000, 100), np.arange(1, 1000, 10))
    np.testing.assert_array_equal(d.ddim_timesteps(1000, 50), np.arange(1, 1000, 20))
    assert len(d.ddim_timesteps(1000, 300)) == 334  # T // steps = 3, as CompVis
    with pytest.raises(ValueError, match="steps"):
        d.ddim_timesteps(1000, 1000)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_matches_numpy_and_is_deterministic(morphdiff_schedule, parameterization):
    s = morphdiff_schedule
    model = gaussian_eps_model(s, parameterization)
    mu = jax.random.normal(jax.random.key(5), (4, 2))
    x_T = jax.random.normal(jax.random.key(6), (4, 3, 3, 2))
    sample = jax.jit(lambda r: d.ddim_sample(model, s, None, mu, r, steps=20, x_T=x_T,
                                             parameterization=parameterization))
    out1, out2 = sample(jax.random.key(0)), sample(jax.random.key(1))
    np.testing.assert_array_equal(out1, out2)
    want = _numpy_ddim(s, x_T, _np(mu)[:, None, None, :], d.ddim_timesteps(T, 20), 20)
    np.testing.assert_allclose(_np(out1), want, rtol=1e-4, atol=1e-4)


def test_ddim_invert_then_decode_round_trips(morphdiff_schedule):
    s = morphdiff_schedule
    model = gaussian_eps_model(s)
    mu = jnp.ones((8, 2))
    x0 = 1.0 + DATA_STD * jax.random.normal(jax.random.key(7), (8, 4, 4, 2))

    @jax.jit
    def round_trip_error(x0):
        out = []
        for steps in (25, 100):
            x_T = d.ddim_invert(model, s, x0, mu, steps=steps)
            x_rec = d.ddim_sample(model, s, None, mu, jax.random.key(0), steps=steps, x_T=x_T)
            out.append(jnp.abs(x_rec - x0).max())
        return out, x_T

    (err25, err100), x_T = round_trip_error(x0)
    assert err100 < 0.08, err100
    assert err100 < 0.4 * err25  # first-order discretisation error shrinks with steps
    assert 0.85 < float(x_T.std()) < 1.15  # the encoding looks like unit noise


def test_sdedit(morphdiff_schedule):
    s = morphdiff_schedule
    model = gaussian_eps_model(s)
    mu = jnp.zeros((4, 2))
    x0 = jax.random.normal(jax.random.key(8), (4, 3, 3, 2))
    rng = jax.random.key(9)
    np.testing.assert_array_equal(d.sdedit(model, s, x0, mu, rng, strength=0.0), x0)
    out = jax.jit(lambda x: d.sdedit(model, s, x, mu, rng, strength=0.55, steps=50))(x0)
    timesteps = d.ddim_timesteps(T, 50)
    t_enc = 27  # int(0.55 * 50), MorphDiff's image-to-image
    noise = jax.random.normal(jax.random.split(rng)[0], x0.shape)
    ab = float(np.cumprod(1 - _np(s.betas))[timesteps[t_enc - 1]])
    x_t = np.sqrt(ab) * _np(x0) + np.sqrt(1 - ab) * _np(noise)
    want = _numpy_ddim(s, x_t, 0.0, timesteps, t_enc)
    np.testing.assert_allclose(_np(out), want, rtol=1e-4, atol=1e-4)
    # CompVis noises one DDIM index further than it decodes from.
    out_cv = d.sdedit(model, s, x0, mu, rng, strength=0.55, steps=50, compvis_encode_index=True)
    ab = float(np.cumprod(1 - _np(s.betas))[timesteps[t_enc]])
    x_t = np.sqrt(ab) * _np(x0) + np.sqrt(1 - ab) * _np(noise)
    np.testing.assert_allclose(_np(out_cv), _numpy_ddim(s, x_t, 0.0, timesteps, t_enc),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="strength"):
        d.sdedit(model, s, x0, mu, rng, strength=1.5)


def test_guidance(morphdiff_schedule):
    s = morphdiff_schedule
    batches = []

    def model(x, t, c):
        batches.append(x.shape[0])
        return gaussian_eps_model(s)(x, t, c)

    x = jax.random.normal(jax.random.key(10), (4, 2, 2, 2))
    t = jnp.array([5, 100, 500, 900])
    cond, null = jnp.ones((4, 2)), jnp.zeros((2,))
    plain = model(x, t, cond)
    uncond = model(x, t, jnp.zeros((4, 2)))
    batches.clear()
    np.testing.assert_array_equal(d.guided_prediction(model, x, t, cond, null, 1.0), plain)
    assert batches == [4]  # scale 1 runs only the conditional branch
    got = d.guided_prediction(model, x, t, cond, null, 3.0)
    np.testing.assert_allclose(got, uncond + 3.0 * (plain - uncond), rtol=1e-5, atol=1e-6)
    assert batches == [4, 8]
    with pytest.raises(ValueError, match="null_context"):
        d.ddim_sample(model, s, (4, 2, 2, 2), cond, jax.random.key(0), guidance_scale=2.0)


def test_sharded_ddim_equals_single_device(morphdiff_schedule):
    s = morphdiff_schedule
    model = gaussian_eps_model(s)
    mu = jax.random.normal(jax.random.key(11), (16, 2))
    x_T = jax.random.normal(jax.random.key(12), (16, 4, 4, 2))

    def sample(mu, x_T):
        return d.ddim_sample(model, s, None, mu, jax.random.key(3), steps=10, eta=0.5,
                             guidance_scale=2.0, null_context=jnp.zeros((2,)), x_T=x_T)

    single = jax.jit(sample)(mu, x_T)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    shard = NamedSharding(mesh, P("data"))
    sharded = jax.jit(sample)(jax.device_put(mu, shard), jax.device_put(x_T, shard))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(_np(sharded), _np(single), rtol=1e-5, atol=1e-5)


def _sampler_output_std(schedule, steps=None):
    """Exact std of x - sqrt(ab0) mu after the DDPM (steps None) or DDIM eta-1 sampler.

    With the exact Gaussian model each update is linear, x_prev = A x + (mu terms) + noise, so
    the variance follows var <- A^2 var + noise var from var(x_T) = 1. Both samplers are a little
    under-dispersed at finite step counts (the reverse step ignores Var(x0 | x_t)).
    """
    ac = np.cumprod(1 - _np(schedule.betas))
    if steps is None:  # DDPM: every t, a_prev = ab[t-1] (1 at t=0), posterior variance
        a = ac
        a_prev = np.concatenate([[1.0], ac[:-1]])
        noise_var = (1 - a / a_prev) * (1 - a_prev) / (1 - a)
    else:  # DDIM eta 1 over the CompVis timesteps
        a = ac[d.ddim_timesteps(T, steps)]
        a_prev = np.concatenate([[ac[0]], a[:-1]])
        noise_var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    var = 1.0
    for i in reversed(range(len(a))):
        gain = np.sqrt(1 - a[i]) / (a[i] * DATA_STD ** 2 + 1 - a[i])  # eps_hat / (x - .. mu)
        x0_gain = (1 - np.sqrt(1 - a[i]) * gain) / np.sqrt(a[i])
        if steps is None:  # coef1 x0_hat + coef2 x_t
            beta = 1 - a[i] / a_prev[i]
            gain_x = (beta * np.sqrt(a_prev[i]) * x0_gain
                      + (1 - a_prev[i]) * np.sqrt(1 - beta)) / (1 - a[i])
        else:  # sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat
            gain_x = np.sqrt(a_prev[i]) * x0_gain + np.sqrt(1 - a_prev[i] - noise_var[i]) * gain
        var = gain_x ** 2 * var + noise_var[i]
    return np.sqrt(var)


def test_ddpm_and_stochastic_ddim_sample_the_data_distribution(morphdiff_schedule):
    s = morphdiff_schedule
    model = gaussian_eps_model(s)
    mu = 2.0 * jax.random.normal(jax.random.key(13), (4096, 2))
    shape = (4096, 1, 1, 2)
    ddpm = jax.jit(lambda r: d.ddpm_sample(model, s, shape, mu, r))(jax.random.key(14))
    ddim = jax.jit(lambda r: d.ddim_sample(model, s, shape, mu, r, steps=100, eta=1.0))(
        jax.random.key(15))
    # Samples end at level alpha_bar[0] (ab0 s^2 + 1 - ab0 ~ s^2), centred on sqrt(ab0) mu.
    ab0 = 1 - d.MORPHDIFF_BETA_START
    for out, steps in ((ddpm, None), (ddim, 100)):
        z = _np(out)[:, 0, 0, :] - np.sqrt(ab0) * _np(mu)
        want_std = _sampler_output_std(s, steps)
        assert abs(want_std - DATA_STD) < 0.05
        assert abs(z.mean()) < 0.02  # 8192 values: standard error 0.0055
        assert abs(z.std() - want_std) < 0.015, (steps, z.std(), want_std)


# --------------------------------------------------------------------------------- EMA


def test_ema_warmup_matches_litema():
    params = {"w": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(3.0)}}
    ema = jax.tree.map(jnp.zeros_like, params)
    ref = np.zeros(2)
    update = jax.jit(d.ema_update, static_argnames="decay")
    for step in range(1, 6):
        params = jax.tree.map(lambda p: p + 1.0, params)
        ema = update(ema, params, step, decay=0.9999)
        decay_t = min(0.9999, (1 + step) / (10 + step))
        ref = decay_t * ref + (1 - decay_t) * _np(params["w"])
    np.testing.assert_allclose(_np(ema["w"]), ref, rtol=1e-6)
    np.testing.assert_allclose(float(d.ema_decay(1)), 2 / 11, rtol=1e-6)
    np.testing.assert_allclose(float(d.ema_decay(10 ** 6)), 0.9999, rtol=1e-7)
    np.testing.assert_allclose(float(d.ema_decay(100, decay=0.5)), 0.5)
