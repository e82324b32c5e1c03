"""MorphDiff two-stage training: AE -> cached latents -> LDM, adaptive GAN weight, sharded step,
G2I / I2I sampling, errors, schedules and the paper presets (morphdiff.txt Methods; notes 1, 2)."""

import dataclasses
import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from morphjax import cli
from morphjax import config as cfg
from morphjax import diffusion
from morphjax import latents
from morphjax import morphdiff_eval
from morphjax import morphdiff_sample
from morphjax import parallel
from morphjax.runs import load_run
from morphjax.train import loop
from morphjax.train import morphdiff as md
from morphjax.train.optim import learning_rate_schedule, optimizer_config
from morphjax.train.state import FrozenParam
from conftest import build_tiny_screen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MD = os.path.join(ROOT, "configs", "morphdiff.py")
QUIET = ("train.eval_every=0", "train.sample_every=0", "train.async_checkpoint=False")
# Plain SGD where parameters are compared: Adam's first steps divide by |g| and magnify noise,
# and the LDM's warm-up starts at 1e-6 x lr, which would leave the parameters unchanged.
SGD = ("optimizer.name=sgd", "optimizer.momentum=0.0", "optimizer.learning_rate=0.01",
       "optimizer.schedule=constant", "optimizer.weight_decay=0.0")


def ae_config(ds, *overrides):
    return cfg.load_config(f"{MD}:tiny,autoencoder", (f"data.path={ds}", *QUIET, *overrides))


def ldm_config(ds, ae, *overrides):
    return cfg.load_config(f"{MD}:tiny", (f"data.path={ds}", f"model.autoencoder={ae}", *QUIET,
                                          *overrides))


def flat(module, kind=nnx.Param) -> dict:
    return {path: np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(module, kind))}


def cache_files(ae_dir: str, split: str = "train") -> tuple[str, str]:
    (step_dir,) = os.listdir(os.path.join(ae_dir, "latents"))
    base = os.path.join(ae_dir, "latents", step_dir, split)
    return base + ".array_record", base + ".json"


def read_records(path: str, indices) -> np.ndarray:
    """Cached moments read straight from the ArrayRecord file and its JSON."""
    with open(path.replace(".array_record", ".json")) as f:
        shape = tuple(json.load(f)["shape"])
    source = grain.sources.ArrayRecordDataSource([path])
    return np.stack([np.frombuffer(source[int(i)], np.float32).reshape(shape) for i in indices])


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """The tiny screen, a 6-step AE run and a 6-step LDM run on it (8 devices, data=8)."""
    ds = build_tiny_screen(tmp_path_factory, "cellpainting_like")
    root = tmp_path_factory.mktemp("morphdiff")
    ae_dir, ldm_dir = str(root / "ae"), str(root / "ldm")
    ae_result = loop.train(ae_config(ds), ae_dir)
    ldm_result = loop.train(ldm_config(ds, ae_dir), ldm_dir)
    perts = pd.read_csv(os.path.join(ds, "perturbations.csv"))
    treated = perts.loc[perts["is_control"].astype(int) == 0, "perturbation"].astype(str)
    return dict(ds=ds, ae=ae_dir, ldm=ldm_dir, ae_result=ae_result, ldm_result=ldm_result,
                perturbation=treated.iloc[0])


@pytest.fixture(scope="session")
def ldm_run(runs):
    return load_run(runs["ldm"])


# -- 1. two stages -------------------------------------------------------------------------------

def test_two_stage_run_loads_trained_autoencoder_and_scale_and_resumes(runs, ldm_run):
    assert runs["ae_result"].step == 6 and runs["ldm_result"].step == 6
    for d in (runs["ae"], runs["ldm"]):
        steps = sorted(os.listdir(os.path.join(d, "checkpoints")))
        assert any(s.endswith("6") for s in steps) and any(s.endswith("3") for s in steps), steps

    ae_run = load_run(runs["ae"])
    trained = flat(ae_run.state.eval_model("autoencoder"))
    frozen = flat(ldm_run.state.frozen["autoencoder"], FrozenParam)
    assert set(frozen) == set(trained) and len(trained) > 10
    for path, value in trained.items():
        np.testing.assert_array_equal(frozen[path], value, err_msg=str(path))
    # The newest weights: the step-3 checkpoint's differ.
    earlier = flat(load_run(runs["ae"], step=3).state.eval_model("autoencoder"))
    assert any(not np.allclose(earlier[p], trained[p]) for p in trained)

    # scale_factor = 1 / std of posterior samples of the cached training latents (NumPy).
    record, meta = cache_files(runs["ae"])
    rows = ldm_run.task.spec.training_rows("train")
    index = np.sort(rows["split_index"].to_numpy())
    moments = read_records(record, index)
    mean, logvar = np.split(moments, 2, axis=-1)
    rng = np.random.default_rng(ldm_run.config.seed)
    z = mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * rng.standard_normal(mean.shape)
    stored = float(ldm_run.state.models["ldm"].scale_factor.get_value())
    np.testing.assert_allclose(stored, 1.0 / z.std(), rtol=1e-5)
    assert float(ldm_run.state.ema["ldm"].scale_factor.get_value()) == stored
    assert abs(stored - 1.0) > 1e-3

    # Re-running the LDM resumes from its checkpoint and reuses the cache: no re-encoding.
    mtimes = [os.stat(p).st_mtime_ns for p in (record, meta)]
    assert loop.train(ldm_config(runs["ds"], runs["ae"]), runs["ldm"]).step == 6
    assert [os.stat(p).st_mtime_ns for p in (record, meta)] == mtimes


# -- 2. latent cache -----------------------------------------------------------------------------

def test_latent_cache_holds_encoder_moments_and_rebuilds_on_mismatch(runs, ldm_run, tmp_path):
    ae = load_run(runs["ae"]).state.eval_model("autoencoder")
    spec = ldm_run.task.spec
    indices = np.array([0, 3, 7])
    images = morphdiff_sample.read_cells(ldm_run, "train", indices)
    assert images.shape == (3, 16, 16, len(spec.channels))
    posterior = ae.encode(jnp.asarray(images))
    expected = np.concatenate([posterior.mean, posterior.logvar], axis=-1)
    record, _ = cache_files(runs["ae"])
    np.testing.assert_allclose(read_records(record, indices), expected, atol=1e-5, rtol=1e-5)

    # A copy of the AE run: its cache is reused as is, and rebuilt when its JSON disagrees.
    copy = str(tmp_path / "ae")
    shutil.copytree(runs["ae"], copy)
    record, meta = cache_files(copy)
    before = os.stat(record).st_mtime_ns
    cache = latents.ensure_cache(copy, spec, "train")
    assert os.stat(record).st_mtime_ns == before and len(cache) == len(spec.split_rows("train"))
    with open(meta) as f:
        info = json.load(f)
    with open(meta, "w") as f:
        json.dump({**info, "count": info["count"] + 1}, f)
    cache = latents.ensure_cache(copy, spec, "train")
    assert os.stat(record).st_mtime_ns != before
    with open(meta) as f:
        assert json.load(f)["count"] == info["count"]
    np.testing.assert_allclose(cache.moments(indices), expected, atol=1e-5, rtol=1e-5)


# -- 3. adaptive GAN weight ----------------------------------------------------------------------

def test_adaptive_gan_weight_and_d_loss_match_full_graph_rederivation(runs):
    run = load_run(runs["ae"])  # The trained AE and discriminator, on one device.
    config, s, state = run.config, run.setup, nnx.state(run.state)
    batch = jax.tree.map(jnp.asarray, next(iter(s.task.train_dataset(0, 1))))
    rng = jax.random.key(5)

    @jax.jit
    def step_metrics(state, batch, rng):
        return s.task.train_step(nnx.merge(s.graphdef, state), batch, rng)

    reported = step_metrics(state, batch, rng)

    x = batch["image"]
    ts = nnx.merge(s.graphdef, state)
    ae_graph, ae_state = nnx.split(ts.models["autoencoder"])
    d_graph, d_state = nnx.split(ts.models["discriminator"])
    kernel = ts.models["autoencoder"].decoder.conv_out.kernel.get_value()

    def terms(kernel):  # The whole AE graph, the same posterior sample as the step.
        ae = nnx.merge(ae_graph, ae_state, copy=True)
        ae.decoder.conv_out.kernel.set_value(kernel)
        xrec = ae.decode(ae.encode(x).sample(rng))
        nll = jnp.abs(x - xrec).sum() / x.shape[0]
        # Train-mode BatchNorm, as the reference: real and fake batches normalised apart.
        disc = nnx.merge(d_graph, d_state, copy=True)
        real, fake = disc(x, train=True), disc(xrec, train=True)
        return nll, -fake.mean(), real, fake

    g_nll = np.asarray(jax.grad(lambda k: terms(k)[0])(kernel), np.float64)
    g_gan = np.asarray(jax.grad(lambda k: terms(k)[1])(kernel), np.float64)
    ratio = np.linalg.norm(g_nll) / (np.linalg.norm(g_gan) + 1e-4)
    expected = config.loss.disc_weight * np.clip(ratio, 0.0, 1e4)
    np.testing.assert_allclose(float(reported["d_weight"]), expected, rtol=1e-4)
    # The D step: hinge loss on the same logits (the run is past disc_start, factor 1).
    _, _, real, fake = (np.asarray(v, np.float64) for v in terms(kernel))
    hinge = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
    np.testing.assert_allclose(float(reported["d_loss"]), hinge, rtol=1e-4)
    np.testing.assert_allclose(float(reported["logits_fake"]), fake.mean(), rtol=1e-4, atol=1e-6)


# -- 4. sharded LDM step, 7. EMA warm-up ---------------------------------------------------------

@pytest.fixture(scope="session")
def ldm_steps(runs):
    """One SGD step of the LDM from the same init state and batch, on 1 and on 8 devices."""
    config = ldm_config(runs["ds"], runs["ae"], *SGD)
    s1 = loop.setup(config, devices=jax.devices()[:1])
    s8 = loop.setup(config)
    assert dict(s8.mesh.shape)["data"] == 8
    init = jax.device_get(s1.init_state())
    host_batch = next(iter(s1.task.train_dataset(0, 1)))
    assert host_batch["moments"].shape[0] == 8
    out = {}
    for name, s in (("one", s1), ("eight", s8)):
        batch = parallel.global_batch(host_batch, parallel.batch_sharding(s.mesh))
        state, metrics = loop.compile_train_step(s)(jax.device_put(init, s.shardings), batch)
        out[name] = (nnx.merge(s.graphdef, jax.device_get(state)), jax.device_get(metrics))
    return nnx.merge(s1.graphdef, init), out


def test_sharded_ldm_step_equals_single_device(ldm_steps):
    init, out = ldm_steps
    (one, m1), (eight, m8) = out["one"], out["eight"]
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-4)
    p0, p1, p8 = (flat(t.models["ldm"]) for t in (init, one, eight))
    assert any(not np.allclose(p1[k], p0[k]) for k in p0)  # the step moved the parameters
    for key in p1:
        np.testing.assert_allclose(p8[key] - p0[key], p1[key] - p0[key], rtol=1e-4, atol=1e-7,
                                   err_msg=str(key))


def test_ema_warmup_first_update_uses_decay_two_elevenths(ldm_steps):
    init, out = ldm_steps
    trained, _ = out["one"]
    assert int(trained.step.get_value()) == 1
    p0, p1, ema = (flat(m) for m in (init.models["ldm"], trained.models["ldm"],
                                     trained.ema["ldm"]))
    d = min(0.9999, (1 + 1) / (10 + 1))
    for key in p0:
        np.testing.assert_allclose(ema[key], d * p0[key] + (1 - d) * p1[key], rtol=1e-5,
                                   atol=1e-7, err_msg=str(key))


def test_warmup_constant_schedule_closed_form():
    lr, warmup = 4.8e-5, 200
    schedule = learning_rate_schedule(
        optimizer_config("adamw", lr, schedule="warmup_constant", warmup_steps=warmup), 1000)
    for step in (0, 1, 57, 199, 200, 201, 999):
        expected = (1e-6 * lr + (lr - 1e-6 * lr) * step / warmup) if step < warmup else lr
        # optax evaluates the ramp in float32 as lr - lr (1 - 1e-6)(1 - step / warmup).
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, atol=1e-7 * lr)


# -- 5. sampling ---------------------------------------------------------------------------------

def test_g2i_and_i2i_shapes_range_and_strength_zero_reconstruction(runs, ldm_run):
    spec = ldm_run.task.spec
    channels = len(spec.channels)
    expression = spec.expression[np.flatnonzero(~spec.is_control)[:2]]
    g2i = morphdiff_sample.generate_g2i(ldm_run, expression, steps=2, batch_size=2)
    assert g2i.shape == (2, 16, 16, channels) and g2i.dtype == np.float32
    assert g2i.min() >= -1.0 and g2i.max() <= 1.0 and np.isfinite(g2i).all()

    images = morphdiff_sample.control_cells(ldm_run, 2, seed=1)
    # Strength 0: decode(posterior sample of the controls), with the sampler's rng convention.
    again = [morphdiff_sample.generate_i2i(ldm_run, images, expression, strength=0.0, steps=2,
                                           batch_size=2, seed=3) for _ in range(2)]
    np.testing.assert_array_equal(again[0], again[1])
    ae = ldm_run.state.frozen["autoencoder"]
    enc_rng, _ = jax.random.split(jax.random.fold_in(jax.random.key(3), 0))
    posterior = ae.encode(jnp.asarray(images))
    z = posterior.mean + posterior.std * jax.random.normal(enc_rng, posterior.mean.shape)
    expected = np.clip(np.asarray(ae.decode(z)), -1.0, 1.0)
    assert again[0].shape == images.shape
    np.testing.assert_allclose(again[0], expected, atol=1e-4)
    # The round trip: from the diffusion run (latents scaled and unscaled) or from the
    # autoencoder run itself, the same decode(posterior sample) for the same seed.
    from_ldm = morphdiff_sample.reconstruct(ldm_run, images, seed=3, batch_size=2)
    from_ae = morphdiff_sample.reconstruct(load_run(runs["ae"]), images, seed=3, batch_size=2)
    posterior_sample = ae.encode(jnp.asarray(images)).sample(jax.random.fold_in(
        jax.random.key(3), 0))
    expected = np.clip(np.asarray(ae.decode(posterior_sample)), -1.0, 1.0)
    np.testing.assert_allclose(from_ldm, expected, atol=1e-4)
    np.testing.assert_allclose(from_ae, expected, atol=1e-4)


def test_sample_cli_writes_grids_and_arrays(runs, ldm_run, tmp_path, capsys):
    name = runs["perturbation"]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    for mode in ("i2i",):  # G2I goes through the same writer; its sampler is tested above.
        assert cli.main(["sample", "--workdir", runs["ldm"], "--mode", mode, "--perturbation",
                         name, "--n", "2", "--steps", "2", "--out", str(tmp_path)]) == 0
        stem = tmp_path / f"{safe}_{mode}"
        for path in (f"{stem}.png", f"{stem}_rgb.png", f"{stem}.npz"):
            assert os.path.getsize(path) > 0, path
        arrays = np.load(f"{stem}.npz")
        generated = arrays["generated"]
        assert generated.shape[:3] == (2, 16, 16) and generated.dtype == np.uint8
        assert str(arrays["mode"]) == mode
    with pytest.raises(ValueError, match="no_such_gene"):
        morphdiff_sample.sample(ldm_run, "no_such_gene", str(tmp_path))


def test_evaluate_run_compares_every_kind_and_writes_tables(runs, tmp_path):
    out = tmp_path / "eval"
    result = morphdiff_eval.evaluate_run(runs["ldm"], str(out), samples_per_perturbation=4,
                                         max_seen=2)
    assert result["kinds"] == ["g2i", "i2i", "reconstructed", "controls_reconstructed",
                               "controls"]
    targets = result["perturbations"]
    assert len(targets) == 2 and all(info["seen"] for info in targets.values())
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2 * 5 and set(table["kind"]) == set(result["kinds"])
    assert np.isfinite(table[["fid", "kid", "mmd"]].to_numpy()).all()
    # Shift metrics compare a prediction with the controls: none for the controls themselves.
    assert table.loc[table["kind"] == "controls", "shift_cosine"].isna().all()
    assert table.loc[table["kind"] != "controls", "shift_cosine"].notna().all()
    header = morphdiff_eval.summary_table(result).splitlines()[0]
    assert header == ("| group | metric | G2I | I2I | AE round trip | controls via AE "
                      "| controls |")
    gain = result["conditioning_gain"]
    cells = sum(info["real_cells"] for info in targets.values())
    assert set(gain["summary"]) == {"all", "seen"} and gain["summary"]["all"]["cells"] == cells
    assert morphdiff_eval.gain_table(result).count("\n") == 3
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in morphdiff_eval.perturbation_table(result).splitlines()[2:]]
    fid = table.pivot(index="perturbation", columns="kind", values="fid")
    expected = fid.sort_values("controls", ascending=False)[result["kinds"]]
    assert [r[0] for r in rows] == expected.index.tolist()
    np.testing.assert_allclose([[float(v) for v in r[2:]] for r in rows], expected, rtol=1e-3)
    with open(out / "metrics.json") as f:
        assert json.load(f)["run"]["step"] == 6


def test_conditioning_gain_pairs_noise_and_is_zero_without_a_condition(runs, ldm_run,
                                                                       monkeypatch):
    spec = ldm_run.task.spec
    rows = spec.training_rows("test")
    rows = rows[~spec.is_control[rows["perturbation_id"]]].iloc[:10]
    gains = morphdiff_eval.conditioning_gain(ldm_run, rows, repeats=2, seed=3, batch_size=8)
    assert len(gains) == 20 and gains["repeat"].tolist() == [0] * 10 + [1] * 10
    ids = rows["perturbation_id"].to_numpy()
    np.testing.assert_array_equal(gains["perturbation_id"][:10], ids)
    np.testing.assert_allclose(gains["gain"], gains["loss_control_context"] - gains["loss"])

    # The first batch re-derived from the ArrayRecord cache: posterior means x scale factor,
    # the denoising loss with the batch's key and the cells' own expression.
    record, _ = cache_files(runs["ae"], "test")
    moments = read_records(record, rows["split_index"].to_numpy()[:8])
    ldm = ldm_run.state.eval_model("ldm")
    z = np.split(moments, 2, axis=-1)[0] * float(ldm.scale_factor.get_value())
    key = jax.random.fold_in(jax.random.key(3 * 1000), 0)
    loss = ldm_run.config.loss
    _, aux = diffusion.diffusion_loss(ldm.denoise, ldm_run.task.schedule, jnp.asarray(z),
                                      ldm.context(jnp.asarray(spec.expression[ids[:8]])), key,
                                      parameterization=loss.parameterization,
                                      loss_type=loss.loss_type)
    np.testing.assert_allclose(gains["loss"][:8], aux["loss_per_example"], rtol=1e-5)

    summary = morphdiff_eval.summarize_gain(gains, {"a": ids[:1], "b": ids})
    assert summary["b"]["cells"] == 10 and summary["b"]["gain"] == pytest.approx(
        gains["gain"].mean())
    per_cell = gains.groupby("cell")["gain"].mean()
    assert summary["b"]["gain_se"] == pytest.approx(per_cell.std(ddof=1) / np.sqrt(10))

    # The 6-step U-Net's zero-initialised layers (~1e-6 now) hide the context; random ones make
    # it matter. Then the gain is non-zero, and exactly 0 once every perturbation has the
    # controls' vector (the two contexts are equal).
    params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(ldm, nnx.Param)))
    rng = np.random.default_rng(0)
    nnx.update(ldm, jax.tree.map(
        lambda a: a if np.abs(a).max() > 1e-4 else 0.1 * rng.standard_normal(a.shape).astype(
            a.dtype), params))
    try:
        reading = morphdiff_eval.conditioning_gain(ldm_run, rows, repeats=1, seed=3, batch_size=8)
        assert np.abs(reading["gain"]).min() > 0
        same = np.repeat(spec.expression[spec.is_control][:1], len(spec.expression), axis=0)
        monkeypatch.setattr(ldm_run.task, "spec", dataclasses.replace(spec, expression=same))
        flat = morphdiff_eval.conditioning_gain(ldm_run, rows, repeats=1, seed=3, batch_size=8)
        np.testing.assert_array_equal(flat["gain"], 0.0)
    finally:
        nnx.update(ldm, params)


def test_guidance_zero_ignores_the_expression_and_needs_condition_dropout(runs):
    with pytest.raises(ValueError, match="cond_drop_prob"):
        morphdiff_sample.load(runs["ldm"], 2.0)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        cli.main(["sample", "--workdir", runs["ldm"], "--perturbation", runs["perturbation"],
                  "--guidance", "2"])
    # Scale 0 is the unconditional model (the null context): two expression sets, one output,
    # although random weights in the zero-initialised layers make the context matter.
    run = load_run(runs["ldm"], overrides={"loss.cond_drop_prob": 0.1,
                                           "sample.guidance_scale": 0.0})
    ldm = run.state.eval_model("ldm")
    params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(ldm, nnx.Param)))
    rng = np.random.default_rng(0)
    nnx.update(ldm, jax.tree.map(
        lambda a: a if np.abs(a).max() > 1e-4 else 0.1 * rng.standard_normal(a.shape).astype(
            a.dtype), params))
    spec = run.task.spec
    sets = [spec.expression[~spec.is_control][:2], spec.expression[~spec.is_control][1::-1]]
    ae = run.task.ae_config.autoencoder
    size = run.config.data.image_size // 2 ** (len(ae.ch_mult) - 1)
    x = jnp.asarray(rng.standard_normal((2, size, size, ae.embed_dim)), jnp.float32)
    t = jnp.array([500, 500])
    conditional = [ldm.denoise(x, t, ldm.context(jnp.asarray(e))) for e in sets]
    assert np.abs(np.asarray(conditional[0] - conditional[1])).max() > 1e-3
    outputs = [morphdiff_sample.generate_g2i(run, e, seed=0, steps=2) for e in sets]
    np.testing.assert_array_equal(*outputs)


# -- 6. errors -----------------------------------------------------------------------------------

def test_configuration_errors(runs, tmp_path):
    bare = str(tmp_path / "dataset")
    shutil.copytree(runs["ds"], bare)
    os.remove(os.path.join(bare, "expression.npy"))
    with pytest.raises(FileNotFoundError, match="expression"):
        md.MorphDiffLdmTask(ldm_config(bare, runs["ae"]))
    md.MorphDiffAutoencoderTask(ae_config(bare))  # Stage 1 does not need expression vectors.

    with pytest.raises(ValueError, match="model.autoencoder"):
        md.MorphDiffLdmTask(ldm_config(runs["ds"], ""))
    with pytest.raises(ValueError, match="not a MorphDiff autoencoder"):
        md.MorphDiffLdmTask(ldm_config(runs["ds"], runs["ldm"]))
    with pytest.raises(ValueError, match=r"data\.image_size"):
        md.MorphDiffLdmTask(ldm_config(runs["ds"], runs["ae"], "data.image_size=8"))


# -- 8. configs ----------------------------------------------------------------------------------

def test_every_preset_loads_with_paper_values():
    module = cfg.load_module(MD)
    for preset in module.PRESETS:
        for stage in ("", ",autoencoder", ",ldm"):
            config = cfg.load_config(f"{MD}:{preset}{stage}")
            want = "morphdiff_autoencoder" if stage == ",autoencoder" else "morphdiff_ldm"
            assert config.task == want, (preset, stage)
    for preset in ("jump_orf", "cdrp", "lincs"):
        c = cfg.load_config(f"{MD}:{preset}")
        o, t = c.optimizer, c.train
        assert (o.name, o.learning_rate, o.schedule, o.warmup_steps) == (
            "adamw", 4.8e-5, "warmup_constant", 200)
        assert (t.batch_size, t.grad_accum_steps, t.ema_decay, t.ema_warmup) == (8, 1, 0.9999, True)
        assert (c.loss.loss_type, c.loss.parameterization) == ("l1", "eps")
        assert c.loss.cond_drop_prob == 0.0
        assert (c.diffusion.num_timesteps, c.diffusion.schedule, c.diffusion.beta_start,
                c.diffusion.beta_end) == (1000, "scaled_linear", 0.0015, 0.0155)
        assert (c.unet.model_channels, tuple(c.unet.channel_mult)) == (192, (1, 2, 2, 4, 4))
        assert (c.conditioning.num_tokens, c.conditioning.context_dim,
                c.conditioning.mode) == (1024, 12, "frozen_random")
        assert c.data.image_size == 128
        a = cfg.load_config(f"{MD}:{preset},autoencoder")
        o, t = a.optimizer, a.train
        assert (o.name, o.learning_rate, o.b1, o.b2, o.schedule) == ("adam", 2.4e-5, 0.5, 0.9,
                                                                     "constant")
        assert (t.batch_size, t.grad_accum_steps, t.batch_size // t.grad_accum_steps) == (16, 2, 8)
        assert (a.loss.kl_weight, a.loss.disc_weight, a.loss.disc_start) == (1e-6, 0.5, 50_001)
        assert (tuple(a.autoencoder.ch_mult), a.autoencoder.ch, a.autoencoder.embed_dim) == (
            (1, 2, 4), 128, 4)
        assert a.train.ema_decay == 0.0
    for bad in ("tiny,decoder", "nope"):
        with pytest.raises(ValueError, match="decoder|nope"):
            cfg.load_config(f"{MD}:{bad}")


def test_bbbc021_preset_holds_out_strong_compounds_of_seen_moas():
    """OOD compounds must be predictable: each MoA keeps a seen member; three are strong."""
    from data_builders.synthetic_screen import perturbations as pl
    from data_builders.synthetic_screen import presets

    c = cfg.load_config(f"{MD}:synthetic_bbbc021")
    assert c.data.path == "runs/data/bbbc021_like_small/dataset"
    screen = presets.get_preset("bbbc021_like", "small")
    library = pl.select_for_scale(pl.build_library(screen), screen)
    table = library.table.assign(tier=library.tier)
    held = table[table["perturbation"].isin(c.data.holdout)]
    assert sorted(held["perturbation"]) == sorted(c.data.holdout)
    seen = table[~table["perturbation"].isin(c.data.holdout) & (table["is_control"] == 0)]
    assert set(held["moa"]) <= set(seen["moa"])
    assert (held["tier"] == "strong").sum() >= 3
