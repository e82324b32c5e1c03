"""IMPA / GRAPE training task: loss terms, R1, sharded step, GRAPE mode, conditions, CLI verbs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from morphjax import config as cfg
from morphjax import parallel
from morphjax.data import conditions
from morphjax.train import impa as impa_task
from morphjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPA = os.path.join(ROOT, "configs", "impa.py")
GRAPE = os.path.join(ROOT, "configs", "grape.py")


def tiny(spec, path, *overrides):
    return cfg.load_config(spec + ":tiny", [f"data.path={path}", "train.eval_every=0",
                                            "train.sample_every=0", *overrides])


def first_batch(task, n_processes=1):
    return next(iter(task.train_dataset(0, n_processes)))


# Plain SGD where parameters are compared across meshes: Adam with b1 = 0 divides by |g| and so
# magnifies float reordering noise in near-zero gradients.
SGD = ("optimizer.name=sgd", "optimizer.momentum=0.0", "optimizer.learning_rate=0.01")


@pytest.fixture(scope="session")
def impa_step(tiny_screen):
    """(setup, compiled step, host batch) of the tiny IMPA config on one device, compiled once."""
    s = loop.setup(tiny(IMPA, tiny_screen, *SGD), devices=jax.devices()[:1])
    return s, loop.compile_train_step(s), first_batch(s.task)


@pytest.fixture(scope="session")
def grape_step(ops_screen):
    """GRAPE tiny with only the style loss acting on the generator side, no weight decay."""
    config = tiny(GRAPE, ops_screen, "optimizer.weight_decay=0.0", "loss.adversarial=0.0",
                  "loss.cycle=0.0")
    s = loop.setup(config, devices=jax.devices()[:1])
    return s, loop.compile_train_step(s), first_batch(s.task)


# -- loss terms ----------------------------------------------------------------------------------

def test_bce_matches_numpy():
    logits = np.array([-3.0, -0.5, 0.0, 0.7, 4.0], np.float32)
    np.testing.assert_allclose(impa_task.bce_with_logits(jnp.asarray(logits), 1.0),
                               np.mean(np.log1p(np.exp(-logits.astype(np.float64)))), rtol=1e-6)
    np.testing.assert_allclose(impa_task.bce_with_logits(jnp.asarray(logits), 0.0),
                               np.mean(np.log1p(np.exp(logits.astype(np.float64)))), rtol=1e-6)


def test_r1_equals_finite_differences():
    """0.5 * E_b ||d critic_b / d x_b||^2 against central differences of a NumPy critic."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4, 2))
    x = rng.standard_normal((3, 4, 4, 2))

    def critic_np(v):  # per-sample score, float64
        return (np.sin(v) * w + 0.3 * v ** 2).sum(axis=(1, 2, 3))

    critic = lambda v: (jnp.sin(v) * w + 0.3 * v ** 2).sum(axis=(1, 2, 3))  # noqa: E731
    h = 1e-5
    grads = np.zeros_like(x)
    for idx in np.ndindex(x.shape[1:]):
        step = np.zeros_like(x)
        step[(slice(None), *idx)] = h
        grads[(slice(None), *idx)] = (critic_np(x + step) - critic_np(x - step)) / (2 * h)
    expected = 0.5 * (grads ** 2).reshape(3, -1).sum(1).mean()
    np.testing.assert_allclose(impa_task.r1_penalty(critic, jnp.asarray(x, jnp.float32)),
                               expected, rtol=1e-4)


def test_diversity_weight_decays_linearly_to_zero():
    steps = jnp.array([0, 250, 500, 1000, 5000])
    np.testing.assert_allclose(impa_task.diversity_weight(2.0, 1000, steps),
                               [2.0, 1.5, 1.0, 0.0, 0.0], atol=1e-6)


def test_step_losses_match_direct_computation(impa_step):
    """Every reported loss term re-derived from the models and the same noise and targets."""
    s, train_step, host_batch = impa_step
    config = s.config
    state = s.init_state()
    batch = parallel.global_batch(host_batch, parallel.batch_sharding(s.mesh))
    before = nnx.merge(s.graphdef, jax.tree.map(jnp.copy, state))
    new_state, m = train_step(state, batch)
    after = nnx.merge(s.graphdef, new_state)

    task, step = s.task, 0
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    k_target, k_z1, k_z2 = jax.random.split(rng, 3)
    z1, z2 = task.noise(k_z1, 8), task.noise(k_z2, 8)
    G, E = before.models["generator"], before.models["style_encoder"]
    D, F = before.models["discriminator"], before.models["mapping"]
    x, real, ids = batch["control"], batch["treated"], batch["perturbation_id"]
    dom = task._domain_of[ids]
    s1 = F(ids, z1)
    fake = G(x, s1)[1]
    sp = lambda v: np.log1p(np.exp(np.asarray(v, np.float64)))  # noqa: E731
    np.testing.assert_allclose(m["d_real"], sp(-D(real, dom)).mean(), rtol=1e-4)
    np.testing.assert_allclose(m["d_fake"], sp(D(fake, dom)).mean(), rtol=1e-4)
    grads = jax.grad(lambda v: D(v, dom).sum())(real)
    np.testing.assert_allclose(m["r1"], 0.5 * np.mean(np.sum(np.square(grads), (1, 2, 3))),
                               rtol=1e-3)
    np.testing.assert_allclose(m["style"], np.abs(E(fake) - s1).mean(), rtol=1e-4)
    np.testing.assert_allclose(m["diversity"], np.abs(fake - G(x, F(ids, z2))[1]).mean(), rtol=1e-4)
    np.testing.assert_allclose(m["cycle"], np.abs(G(fake, E(x))[1] - x).mean(), rtol=1e-4)
    # The generator step sees the discriminator after its update (reference order).
    d_new = after.models["discriminator"]
    np.testing.assert_allclose(m["g_adv"], sp(-d_new(fake, dom)).mean(), rtol=1e-4)
    np.testing.assert_allclose(
        m["loss_g"], m["g_adv"] + m["style"] - m["lambda_ds"] * m["diversity"] + m["cycle"],
        rtol=1e-5)


def test_sharded_step_equals_single_device(impa_step, tiny_screen):
    single, single_step, host_batch = impa_step
    sharded = loop.setup(cfg.load_config(IMPA + ":tiny", [f"data.path={tiny_screen}",
                                                          "mesh.data=8", *SGD]))
    results = []
    for s, step in ((single, single_step), (sharded, loop.compile_train_step(sharded))):
        state = s.init_state()
        for _ in range(2):
            state, metrics = step(state, parallel.global_batch(host_batch,
                                                               parallel.batch_sharding(s.mesh)))
        results.append((jax.device_get(state["models"]), jax.device_get(metrics)))
    (a_state, a_metrics), (b_state, b_metrics) = results
    for key in a_metrics:
        np.testing.assert_allclose(a_metrics[key], b_metrics[key], rtol=2e-4, atol=1e-5)
    for x, y in zip(jax.tree.leaves(a_state), jax.tree.leaves(b_state)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


# -- GRAPE ---------------------------------------------------------------------------------------

def test_grape_has_no_noise_and_its_style_loss_trains_only_the_style_encoder(grape_step):
    s, train_step, host_batch = grape_step
    assert s.config.model.noise_dim == 0 and s.config.loss.diversity == 0.0
    assert s.task.noise(jax.random.key(0), 4) is None
    state = s.init_state()
    encoder = nnx.merge(s.graphdef, state).models["mapping"].encoders[0]
    with pytest.raises(ValueError):
        encoder(jnp.zeros((2, s.config.model.learned_embedding_dim)), jnp.zeros((2, 4)))
    before = jax.device_get(state["models"])
    state, m = train_step(state, parallel.global_batch(host_batch,
                                                       parallel.batch_sharding(s.mesh)))
    after = jax.device_get(state["models"])
    assert float(m["style"]) > 0 and float(m["diversity"]) == 0.0

    def changed(name):
        return any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                   zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))

    # Only the (detached) style loss reaches the generator side: E moves, G and f do not.
    assert changed("style_encoder") and changed("discriminator")
    assert not changed("generator") and not changed("mapping")


def test_grape_gene_table_is_exported_with_metadata(grape_step, tmp_path):
    from morphjax import predict
    from morphjax.runs import Run

    s, _, _ = grape_step
    run = Run(str(tmp_path), s.config, s, nnx.merge(s.graphdef, s.init_state()), 0)
    spec = s.task.spec
    assert spec.num_domains == len(spec.perturbations)
    paths = predict.embed(run, str(tmp_path / "emb"))
    table = pd.read_parquet(paths["learned"])
    assert len(table) == len(spec.perturbations)
    learned = table.filter(like="emb_").to_numpy()
    np.testing.assert_allclose(learned, np.asarray(
        run.state.eval_model("mapping").tables[0][...]), rtol=1e-6)
    assert list(table["Metadata_perturbation"]) == list(spec.perturbations["perturbation"])


# -- conditions and data --------------------------------------------------------------------------

def test_morgan_conditions_are_binary_fingerprints_of_the_smiles(tiny_screen):
    from morphjax import chem

    perts = pd.read_csv(os.path.join(tiny_screen, "perturbations.csv"), keep_default_na=False)
    tables = conditions.perturbation_embeddings(tiny_screen, perts, cache_dir=None)
    matrix = tables["compound"]
    treated = np.flatnonzero(perts["is_control"].to_numpy() == 0)
    expected = chem.morgan_fingerprints(perts["smiles"].iloc[treated].tolist(), 2, 1024)
    np.testing.assert_array_equal(matrix[treated], expected)
    assert not matrix[perts["is_control"].to_numpy() == 1].any()


def test_gene_embedding_files_text_and_csv(tmp_path):
    text = tmp_path / "gene2vec.txt"
    text.write_text("3 4\nTP53 0.1 0.2 0.3 0.4\nBRCA1 1 2 3 4\nMYC -1 0 1 2\n")
    table = conditions.read_gene_embeddings(text)
    assert list(table.index) == ["TP53", "BRCA1", "MYC"] and table.shape == (3, 4)
    csv = tmp_path / "genes.csv"
    table.to_csv(csv)
    again = conditions.read_gene_embeddings(csv)
    assert list(again.index) == list(table.index)
    np.testing.assert_array_equal(again.to_numpy(), table.to_numpy())
    bad = tmp_path / "bad.txt"
    bad.write_text("TP53 0.1 x\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        conditions.read_gene_embeddings(bad)


def test_kmer_profile_counts():
    profile = conditions.kmer_profile(["AAAC"], 2)
    assert profile[0, 0] == pytest.approx(2 / 3) and profile[0, 1] == pytest.approx(1 / 3)


def test_prepare_image_range_downsampling_and_flips():
    image = np.arange(4 * 4 * 1, dtype=np.uint8).reshape(4, 4, 1) * 16
    x = impa_task.prepare_image(image, 2, None, dequantize=True, flip_prob=0.0)
    expected = (image.astype(np.float64) + 0.5) / 255
    expected = expected.reshape(2, 2, 2, 2, 1).mean((1, 3)) * 2 - 1
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    rng = np.random.default_rng(0)
    y = impa_task.prepare_image(image, 4, rng, dequantize=True, flip_prob=1.0)
    base = (image.astype(np.float64)[::-1, ::-1] / 255) * 2 - 1
    assert np.all(y >= base - 1e-6) and np.all(y <= base + 2 / 255 + 1e-6)


def test_holdout_is_unseen_and_bad_names_are_reported(tiny_screen):
    perts = pd.read_csv(os.path.join(tiny_screen, "perturbations.csv"), keep_default_na=False)
    name = perts.loc[perts["is_control"] == 0, "perturbation"].iloc[0]
    spec = impa_task.load_screen(tiny(IMPA, tiny_screen, f"data.holdout=('{name}',)"))
    pid = int(perts.index[perts["perturbation"] == name][0])
    assert pid in spec.unseen and pid not in spec.seen
    with pytest.raises(ValueError, match="nonexistent"):
        impa_task.load_screen(tiny(IMPA, tiny_screen, "data.holdout=('nonexistent',)"))
    with pytest.raises(FileNotFoundError, match="morphjax build"):
        impa_task.load_screen(tiny(IMPA, "/nonexistent/dataset"))
    with pytest.raises(ValueError, match="image_size"):
        impa_task.load_screen(tiny(IMPA, tiny_screen, "data.image_size=24"))


def test_all_presets_load():
    for preset in ("tiny", "synthetic", "bbbc021", "bbbc021_large_fov", "rxrx1_batch", "cpg0000",
                   "ops"):
        impa = cfg.load_config(f"{IMPA}:{preset}")
        grape = cfg.load_config(f"{GRAPE}:{preset}")
        assert grape.loss.detach_style and grape.model.noise_dim == 0
        assert grape.model.mapping_layers == 3 and grape.data.balance_perturbations
        if preset not in ("tiny", "synthetic"):  # paper values
            assert impa.optimizer.learning_rate == 1e-4 and impa.optimizer.b1 == 0.0
            assert impa.optimizer.b2 == 0.99 and impa.optimizer.weight_decay == 1e-4
            assert impa.data.flip_prob == 0.3 and impa.model.style_dim == 64
            assert impa.data.image_size in (96, 128)
    assert cfg.load_config(f"{IMPA}:bbbc021").model.noise_dim == 16
    assert cfg.load_config(f"{IMPA}:rxrx1_batch").model.learned_embedding_dim == 100
    assert cfg.load_config(f"{GRAPE}:ops").train.batch_size == 256


def test_gene_embedding_metrics_rank_true_effects_above_random(grape_step, tmp_path):
    """GRAPE's evaluation (grape.txt 4): mAP and k-means scores of gene vectors vs complexes,
    with the screen's true effects as the upper reference and random vectors as the floor."""
    from morphjax import impa_eval
    from morphjax.runs import Run

    s, _, _ = grape_step
    run = Run(str(tmp_path), s.config, s, nnx.merge(s.graphdef, s.init_state()), 0)
    scores = impa_eval.gene_embedding_metrics(run)
    assert set(scores) == {"learned", "random", "true_effects"}
    assert set(scores["learned"]) == {"mean_ap", "purity", "nmi", "ari"}
    assert scores["true_effects"]["mean_ap"] > scores["random"]["mean_ap"]
    assert scores["true_effects"]["ari"] > scores["random"]["ari"]


def test_morgan_fingerprints_are_cached_on_disk(tmp_path, monkeypatch):
    from morphjax import chem

    smiles = ["CCO", "c1ccccc1O"]
    first = conditions.cached_morgan(smiles, 2, 1024, str(tmp_path))
    assert len(list(tmp_path.glob("morgan_r2_1024_*.npy"))) == 1

    def no_rdkit(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(chem, "morgan_fingerprints", no_rdkit)
    np.testing.assert_array_equal(conditions.cached_morgan(smiles, 2, 1024, str(tmp_path)), first)


def test_perturbations_without_smiles_or_gene_embedding_are_named(tmp_path):
    genes = tmp_path / "genes.txt"
    genes.write_text("TP53 0.1 0.2\nMYC 1 2\n")
    table = pd.DataFrame({"perturbation": ["DMSO", "nutlin", "sgTP53", "sgKRAS"],
                          "type": ["control", "compound", "crispr", "crispr"],
                          "is_control": [1, 0, 0, 0], "smiles": ["CS(C)=O", "", "", ""],
                          "target_gene": ["", "", "TP53", "KRAS"], "modality": ""})
    with pytest.raises(ValueError, match=r"without SMILES.*\['nutlin'\]"):
        conditions.perturbation_embeddings("", table, gene_embeddings=str(genes))
    table.loc[1, "smiles"] = "CC(C)OC1=CC=CC=C1"
    with pytest.raises(ValueError, match=r"no gene embedding for target genes \['KRAS'\]"):
        conditions.perturbation_embeddings("", table, gene_embeddings=str(genes))
    out = conditions.perturbation_embeddings("", table.iloc[:3], gene_embeddings=str(genes))
    assert sum(m.shape[0] for m in out.values()) == 3 * len(out)
