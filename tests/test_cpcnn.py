"""Cell Painting CNN task: inputs, cell selection and splits, balanced epochs, paper variants,
weight initialisation, and train -> embed -> profile on the tiny synthetic screen."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from morphjax import config as cfg
from morphjax import morphdiff_eval, profiling
from morphjax.models.cpcnn import reverse_gradient
from morphjax.models.efficientnet import EfficientNet
from morphjax.train import cpcnn, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPCNN = os.path.join(ROOT, "configs", "cpcnn.py")


def tiny(path, *overrides):
    return cfg.load_config(CPCNN + ":tiny", [f"data.path={path}", *overrides])


# -- inputs --------------------------------------------------------------------------------------

def test_minmax_centre_crop_and_downsample_match_numpy():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    x = cpcnn.prepare_crop(image, np.array([2, 0]), image_size=4, crop_size=8)
    window = image[2:10, 2:10][..., [2, 0]].astype(np.float64)
    pooled = window.reshape(4, 2, 4, 2, 2).mean(axis=(1, 3))
    low, high = pooled.min((0, 1)), pooled.max((0, 1))
    np.testing.assert_allclose(x, (pooled - low) / (high - low + 1e-7), rtol=1e-6, atol=1e-6)
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rebuild the dataset"):
        cpcnn.center_crop(image, 16)
    with pytest.raises(ValueError, match="divides data.crop_size"):
        cpcnn.prepare_crop(image, np.arange(3), image_size=5)


# -- cells, classes, splits ----------------------------------------------------------------------

def test_leave_cells_out_keeps_max_dose_and_splits_every_well(tiny_screen):
    cs = cpcnn.select_cells(tiny(tiny_screen))
    cells = cs.cells
    assert cs.classes == ("DMSO", "nocodazole", "simvastatin", "taxol")
    doses = cells[cells["is_control"] == 0].groupby("Metadata_Perturbation")["Metadata_Dose"]
    assert (doses.nunique() == 1).all()  # Maximum concentration only.
    np.testing.assert_array_equal(cells["label"], [cs.classes.index(t) for t in cells["treatment"]])
    fraction = cells.groupby(["Metadata_Plate", "Metadata_Well"])["is_validation"].mean()
    counts = cells.groupby(["Metadata_Plate", "Metadata_Well"]).size()
    expected = np.floor(0.4 * counts + 1e-9) / counts  # rank <= 40% of each well
    assert np.all(np.abs(fraction - 0.4) <= 1.0 / counts + 1e-9), (fraction, expected)


def test_leave_plates_out_holds_out_the_last_replicate(tiny_screen):
    cs = cpcnn.select_cells(tiny(tiny_screen, "data.validation=plates"))
    cells = cs.cells
    last = cells["Metadata_Replicate"].max()
    np.testing.assert_array_equal(cells["is_validation"], cells["Metadata_Replicate"] == last)
    named = cpcnn.select_cells(tiny(tiny_screen, "data.validation=plates",
                                    "data.validation_plates=('P001',)")).cells
    assert set(named.loc[named["is_validation"], "Metadata_Plate"]) == {"P001"}
    with pytest.raises(ValueError, match="not plates of the dataset"):
        cpcnn.select_cells(tiny(tiny_screen, "data.validation=plates",
                                "data.validation_plates=('P999',)"))


def test_include_controls_channels_and_bad_names(tiny_screen):
    cs = cpcnn.select_cells(tiny(tiny_screen, "data.include=('taxol',)"))
    assert cs.classes == ("DMSO", "taxol")
    cs = cpcnn.select_cells(tiny(tiny_screen, "data.channels=('Actin','DNA')"))
    assert cs.channel_names == ("Actin", "DNA") and list(cs.channel_index) == [2, 0]
    for override, message in (("data.include=('aspirin',)", "not treatments"),
                              ("data.channels=('Mito',)", "not in the dataset's channels"),
                              ("data.controls=('EMPTY',)", "do not occur"),
                              ("data.validation=wells", "not one of")):
        with pytest.raises(ValueError, match=message):
            cpcnn.select_cells(tiny(tiny_screen, override))


def test_balanced_epoch_draws_the_median_count_from_every_class(tiny_screen):
    task = cpcnn.CpcnnTask(tiny(tiny_screen))
    labels = task.train_cells["label"].to_numpy()
    counts = np.bincount(labels)
    assert counts.min() != counts.max()  # Imbalanced to begin with (DMSO wells, cell counts).
    median = int(np.median(counts))
    epoch = len(counts) * median
    seen = []
    for batch in task.train_dataset(0, 1):
        seen += list(batch["label"])
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        if len(seen) >= 2 * epoch:
            break
    for e in range(2):
        np.testing.assert_array_equal(np.bincount(seen[e * epoch:(e + 1) * epoch]),
                                      np.full(len(counts), median))
    assert task.steps_per_epoch == -(-epoch // 8)


def test_epochs_set_total_steps(tiny_screen):
    config = tiny(tiny_screen, "train.epochs=3", "train.total_steps=0")
    task = cpcnn.CpcnnTask(config)
    assert config.train.total_steps == 3 * task.steps_per_epoch


# -- paper variants ------------------------------------------------------------------------------

def test_online_labels_update_at_epoch_end_like_numpy():
    rng = np.random.default_rng(0)
    k, alpha = 3, 0.03
    state = cpcnn.OnlineLabels(k)
    sums, counts = np.zeros((k, k)), np.zeros(k)
    for _ in range(3):
        logits = rng.normal(size=(16, k))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        labels = rng.integers(k, size=16)
        state.accumulate(jnp.asarray(probs, jnp.float32), jnp.asarray(labels))
        state.end_epoch(alpha, jnp.asarray(False))
        for p, y in zip(probs, labels):
            if p.argmax() == y:
                sums[y] += p
                counts[y] += 1
    np.testing.assert_array_equal(state.soft.get_value(), np.eye(k))  # Not yet an epoch end.
    state.end_epoch(alpha, jnp.asarray(True))
    expected = np.eye(k)
    hit = counts > 0
    expected[hit] = alpha * np.eye(k)[hit] + (1 - alpha) * sums[hit] / counts[hit, None]
    np.testing.assert_allclose(state.soft.get_value(), expected, rtol=1e-5, atol=1e-6)
    assert not np.any(state.sums.get_value()) and not np.any(state.counts.get_value())


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = jnp.array([1.0, -2.0, 3.0])
    assert jnp.array_equal(reverse_gradient(x, 0.5), x)
    g = jax.grad(lambda v: jnp.sum(reverse_gradient(v, 0.5) ** 2))(x)
    np.testing.assert_allclose(g, -0.5 * 2 * x)


def test_kernel_l2_counts_conv_and_dense_kernels_but_not_depthwise():
    model = EfficientNet("b0", in_channels=3, num_classes=4, width=0.25, depth=0.34,
                         rngs=nnx.Rngs(0))
    total = 0.0
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "kernel" and "dwconv" not in path:
            total += float(np.sum(np.square(np.asarray(value.get_value(), np.float64))))
    depthwise = sum(float(np.sum(np.square(np.asarray(b.dwconv.kernel.get_value()))))
                    for b in model.blocks)
    assert depthwise > 0
    np.testing.assert_allclose(float(cpcnn.kernel_l2(model)), total, rtol=1e-5)


@pytest.fixture(scope="module")
def variant_step(tiny_screen):
    """Label smoothing + online label smoothing + plate adversary, one compiled step."""
    config = tiny(tiny_screen, "loss.online_label_smoothing=True", "loss.label_smoothing=0.1",
                  "loss.domain_adversarial=True", "loss.domain_hidden=(16, 8)")
    s = loop.setup(config, devices=jax.devices()[:1])
    return s, loop.compile_train_step(s), next(iter(s.task.train_dataset(0, 1)))


def test_variants_train_and_online_labels_move_at_the_epoch_boundary(variant_step):
    s, step, batch = variant_step
    assert s.task.num_classes == 4 and len(s.task.cellset.domains) == 2
    state = s.init_state()
    for _ in range(s.task.steps_per_epoch):
        soft_before = np.asarray(state["models"][cpcnn.LABELS]["soft"].get_value())
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
        assert "domain_cross_entropy" in metrics and "domain_accuracy" in metrics
    soft = np.asarray(state["models"][cpcnn.LABELS]["soft"].get_value())
    np.testing.assert_array_equal(soft_before, np.eye(4))
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    assert not np.array_equal(soft, np.eye(4))  # Updated exactly at the epoch's last step.


# -- weights, training, embedding, profiling -----------------------------------------------------

def test_init_weights_come_from_the_file(tiny_screen, tmp_path):
    from morphjax.models.keras_weights import save_keras_weights

    donor = EfficientNet("b0", in_channels=3, num_classes=None, width=0.25, depth=0.34,
                         drop_connect_rate=0.0, rngs=nnx.Rngs(42))
    path = str(tmp_path / "donor.npz")
    save_keras_weights(donor, path)
    s = loop.setup(tiny(tiny_screen, f"model.init_weights={path}"), devices=jax.devices()[:1])
    model = nnx.merge(s.graphdef, s.init_state()).models[cpcnn.MODEL].backbone
    np.testing.assert_array_equal(model.stem_conv.kernel.get_value(),
                                  donor.stem_conv.kernel.get_value())
    np.testing.assert_array_equal(model.blocks[3].bn.var.get_value(),
                                  donor.blocks[3].bn.var.get_value())


def test_train_embed_profile_end_to_end(tiny_screen, tmp_path):
    from morphjax.embed import embedding_cells, embed_run
    from morphjax.runs import load_run

    workdir = str(tmp_path / "run")
    result = loop.train(tiny(tiny_screen), workdir)  # 8 fake devices: batch sharded 8 ways.
    assert result.step == 6 and set(result.eval_metrics) == {"loss", "accuracy", "top5_accuracy"}
    run = load_run(workdir)
    out = str(tmp_path / "features")
    report = embed_run(run, out, batch_size=64)  # Sharded over the 8 fake devices.
    table = profiling.read_table(report["table"])
    cells = embedding_cells(tiny_screen, ("train", "test"))  # Every dose, every cell.
    assert len(table) == report["cells"] == len(cells)
    features = profiling.feature_columns(table)
    backbone = run.state.models[cpcnn.MODEL].backbone
    block6a = next(b for b in backbone.specs if b.name == "block6a")
    assert len(features) == report["dim"] == block6a.filters_expanded
    # The DeepProfiler files hold the same features, site by site.
    npz = profiling.read_site_features(out)
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_X", "Metadata_Y"]
    merged = table.merge(npz, on=keys, suffixes=("", "_npz"))
    assert len(merged) == len(table)
    np.testing.assert_array_equal(merged[features].to_numpy(),
                                  merged[[f + "_npz" for f in features]].to_numpy())
    # The features are a direct forward pass of the trained model, mean-pooled.
    source = cpcnn.open_cells(tiny_screen, cells.iloc[:4])
    images = np.stack([cpcnn.prepare_crop(source[i]["image"], np.arange(3), 32)
                       for i in range(4)])
    direct = backbone.forward(jnp.asarray(images), outputs=("block6a_activation",))
    pooled = np.asarray(direct["block6a_activation"]).mean(axis=(1, 2))
    np.testing.assert_allclose(table[features].to_numpy()[:4], pooled, rtol=1e-4, atol=1e-5)
    # MorphDiff's CP-CNN feature space is the same forward pass on [-1, 1] generated cells whose
    # channels it picks by name (here given in reverse order).
    names = tuple(run.task.cellset.channel_names)
    extractor = morphdiff_eval.cpcnn_extractor(workdir, names[::-1])
    got = extractor.apply(jnp.asarray(2.0 * images[..., ::-1] - 1.0))
    np.testing.assert_allclose(np.asarray(got), pooled, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=f"needs channels.*{names[1]}"):
        morphdiff_eval.cpcnn_extractor(workdir, names[:1])
    # The table goes straight into the profiling pipeline.
    profiles = profiling.profile(table, lam=1e-2)
    assert profiles["report"]["treatments"] == 4  # taxol, nocodazole, simvastatin, DMSO
