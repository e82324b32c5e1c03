"""MorphDiff evaluation pieces against NumPy re-derivations (no training here)."""

import itertools

import numpy as np
import pandas as pd
import pytest

from morphjax import impa_eval, metrics
from morphjax import morphdiff_eval as me


def _shifted(rng, shift, n=40, f=12):
    control = rng.standard_normal((n, f))
    return control, control[::-1] + shift


def test_shift_cosine_closed_form():
    rng = np.random.default_rng(0)
    control = rng.standard_normal((50, 8))
    real = rng.standard_normal((30, 8)) + np.arange(8)
    generated = rng.standard_normal((20, 8)) + np.arange(8)[::-1]
    a = generated.mean(0) - control.mean(0)
    b = real.mean(0) - control.mean(0)
    expected = a @ b / np.sqrt((a @ a) * (b @ b))
    assert me.shift_cosine(generated, real, control) == pytest.approx(expected, rel=1e-10)
    # Generation that moves exactly toward the target (any scale) has cosine 1; away, -1.
    target = control.mean(0) + 3 * (real.mean(0) - control.mean(0))
    toward = rng.standard_normal((20, 8))
    toward += target - toward.mean(0)
    assert me.shift_cosine(toward, real, control) == pytest.approx(1.0, abs=1e-9)
    assert me.shift_cosine(2 * control.mean(0) - toward, real, control) == pytest.approx(
        -1.0, abs=1e-9)


def test_sign_agreement_counts_the_top_features():
    control = np.zeros((4, 12))
    true_shift = np.array([5, -4, 3, -2, 1, 0.5, -0.4, 0.3, 0.2, -0.1, 0.05, 0.01])
    real = control + true_shift
    pred = np.sign(true_shift).copy()
    pred[[0, 1, 11]] *= -1  # Two of the top 10 wrong; feature 11 is outside the top 10.
    assert me.sign_agreement(control + pred, real, control) == pytest.approx(0.8)
    assert me.sign_agreement(control + pred, real, control, top=3) == pytest.approx(1 / 3)
    assert me.sign_agreement(real, real, control) == 1.0


def test_retrieval_labels_moa_then_complex_then_first_target():
    table = pd.DataFrame({
        "perturbation": ["DMSO", "cpd_a", "cpd_b", "crispr", "orf", "bare", "both"],
        "moa": ["", "HDAC inhibitor", "", "", "", "", "kinase inhibitor"],
        "complex": ["", "", "", "CORUM:1", "CORUM:2", "", "CORUM:3"],
        "target_gene": ["", "HDAC1|HDAC2", "ABL1|BRAF", "TNNC1", "PDE4D", "", "KIT"],
    })
    np.testing.assert_array_equal(
        me.retrieval_labels(table),
        ["", "HDAC inhibitor", "ABL1", "CORUM:1", "CORUM:2", "", "kinase inhibitor"])


def _brute_topk(sim, labels, k):
    tokens = [set(lab.split("|")) for lab in labels]
    out = []
    for i in range(len(labels)):
        others = [j for j in range(len(labels)) if j != i]
        if not any(tokens[i] & tokens[j] for j in others):
            continue
        ranked = sorted(others, key=lambda j: (-sim[i, j], j))[:k]
        out.append(any(tokens[i] & tokens[j] for j in ranked))
    return np.mean(out)


def test_topk_accuracy_and_its_random_expectation():
    rng = np.random.default_rng(1)
    labels = ["a", "a", "b", "b", "b", "c", "a|c", "d"]
    sim = rng.standard_normal((8, 8))
    hits = me._hits(labels)
    for k in (1, 3, 5):
        assert me.topk_accuracy(sim, hits, k) == pytest.approx(_brute_topk(sim, labels, k))
    # Random expectation: the mean over every permutation of the other 7 ranks (exact).
    for k in (1, 2):
        accs = []
        for _ in range(3000):
            accs.append(me.topk_accuracy(rng.random((8, 8)), hits, k))
        assert me.random_topk_accuracy(hits, k) == pytest.approx(np.mean(accs), abs=0.02)


def test_cross_retrieval_perfect_and_shuffled_queries():
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((4, 16)) * 5
    labels = [f"m{i % 4}" for i in range(16)]
    reference = centres[np.arange(16) % 4] + 0.1 * rng.standard_normal((16, 16))
    queries = reference + 0.1 * rng.standard_normal((16, 16))
    good = me.retrieval_scores(queries, reference, labels)
    assert good["top1"] == 1.0 and good["map"] == pytest.approx(1.0)
    assert good["queries"] == 16
    bad = me.retrieval_scores(queries[rng.permutation(16)], reference, labels)
    assert bad["top1"] < 0.7
    chance = me.random_retrieval(labels, draws=5)
    assert chance["top1"] == pytest.approx(3 / 15)


def test_profile_retrieval_normalises_decoded_cells_on_decoded_controls():
    """A decoder that adds one bias to every cell keeps the real cells' retrieval exactly, since
    decoded profiles are z-scored on the decoded controls; on the real controls the common bias
    dominates every profile and the ranking degrades."""
    rng = np.random.default_rng(3)
    n_pert, cells, f = 12, 20, 10
    labels = np.array(["", *[f"moa{i % 4}" for i in range(1, n_pert)]], object)  # 0: controls
    effects = 2.0 * rng.standard_normal((4, f))
    owner = np.repeat(np.arange(1, n_pert), cells)
    real = rng.standard_normal((len(owner), f)) + effects[owner % 4]
    controls = rng.standard_normal((len(owner), f))
    bias = 25.0 * rng.standard_normal(f)
    feats = {"real": real, "reconstructed": real + bias, "controls": controls,
             "controls_reconstructed": controls + bias}
    kinds = ["reconstructed", "controls_reconstructed", "controls"]
    targets = list(range(1, n_pert))
    keep = np.arange(f)
    out = me.profile_retrieval(feats, owner, targets, labels, kinds, keep)
    assert set(out) == {"perturbations", "labels", "real", "random", "reconstructed"}
    assert out["reconstructed"] == pytest.approx(out["real"])
    assert out["real"]["top1"] == 1.0
    # Without the decoded controls the bias is measured against the real controls.
    del feats["controls_reconstructed"]
    biased = me.profile_retrieval(feats, owner, targets, labels, kinds[:1] + kinds[2:], keep)
    assert biased["reconstructed"]["map"] < out["real"]["map"] - 0.2


def _per(fids, gen_fids, cos):
    return {p: {"metrics": {"g2i": {"fid": g, "kid": g / 10},
                            "controls": {"fid": f, "kid": f / 10}},
                "shift_cosine": {"g2i": c}, "sign_agreement": {"g2i": 0.5}}
            for p, (f, g, c) in enumerate(zip(fids, gen_fids, cos))}


def test_summarize_groups_and_strong_within_group():
    control_fid = [1.0, 5.0, 3.0, 10.0, 2.0, 7.0]
    gen_fid = [0.5, 2.0, 1.0, 4.0, 3.0, 6.0]
    cos = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    seen = {0, 1, 2}
    out = me.summarize(_per(control_fid, gen_fid, cos), seen, strong_quantile=0.5)
    assert set(out) == {f"{g}/{s}" for g, s in itertools.product(me.GROUPS, ("all", "strong"))}
    # Strong is decided inside each group: seen median 3 -> {1, 2}; unseen median 7 -> {3, 5}.
    assert out["seen/strong"]["perturbations"] == [1, 2]
    assert out["unseen/strong"]["perturbations"] == [3, 5]
    assert out["all/strong"]["perturbations"] == [1, 3, 5]
    assert out["unseen/all"]["g2i"]["fid"] == pytest.approx(np.mean([4.0, 3.0, 6.0]))
    assert out["seen/strong"]["controls"]["kid"] == pytest.approx(np.mean([0.5, 0.3]))
    assert out["unseen/strong"]["g2i"]["shift_cosine"] == pytest.approx(0.5)
    assert "shift_cosine" not in out["all/all"]["controls"]


def test_inception_scores_per_kind_skip_missing_rows():
    from morphjax.features import get_extractor

    w = np.random.default_rng(0).normal(size=(3, 7)).astype(np.float32)
    logits = get_extractor("model", apply=lambda x: x.mean(axis=(1, 2)) @ w)
    rng = np.random.default_rng(1)
    images = {"g2i": rng.uniform(-1, 1, (12, 4, 4, 3)).astype(np.float32),
              "impa": np.full((12, 4, 4, 3), np.nan, np.float32)}
    images["impa"][:5] = images["g2i"][:5]  # IMPA knows 5 of the 12 perturbations.
    out = me.inception_scores(logits, images, splits=4)
    for kind, rows in (("g2i", 12), ("impa", 5)):
        expected = metrics.inception_score(impa_eval.extract(logits, images[kind][:rows]),
                                           splits=min(4, rows))
        np.testing.assert_allclose([out[kind]["mean"], out[kind]["std"]], expected, rtol=1e-6)
    assert out["g2i"]["mean"] > 1.0


def test_rgb_composite_cell_painting_weights_and_bbbc021_channels():
    from morphjax import morphdiff_sample as mds
    from morphjax.features import registry

    cell_painting = ("DNA", "ER", "RNA", "AGP", "Mito")
    np.testing.assert_array_equal(mds.composite_weights(cell_painting),
                                  registry.rgb_weight_matrix(cell_painting))
    # A channel set without MorphDiff weights: DNA blue, tubulin green, actin red.
    image = -np.ones((1, 2, 2, 3), np.float32)
    image[0, 0, 0, 0] = 1.0  # DNA only in pixel (0, 0); actin only in pixel (1, 1).
    image[0, 1, 1, 2] = 1.0
    rgb = mds.rgb_composite(image, ("DNA", "Tubulin", "Actin"))
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0, 0], [0, 0, 255])
    np.testing.assert_array_equal(rgb[0, 1, 1], [255, 0, 0])
    assert rgb[0, 0, 1].max() == 0 and rgb[..., 1].max() == 0
