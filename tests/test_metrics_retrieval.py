"""Retrieval metrics against copairs, scipy/sklearn references, and sharded vs single device."""

import numpy as np
import pandas as pd
import pytest
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy.stats import fisher_exact
from sklearn.metrics import precision_recall_curve

from morphjax.metrics import retrieval

copairs_map = pytest.importorskip("copairs.map")


def _design(seed, n, d=12, n_pert=12, duplicates=True):
    rng = np.random.default_rng(seed)
    meta = pd.DataFrame({
        "pert": rng.integers(0, n_pert, n).astype(str),
        "moa": rng.integers(0, 4, n),
        "plate": rng.choice(["P1", "P2", "P3"], n),
    })
    x = rng.normal(size=(n, d)).astype(np.float32)
    if duplicates:  # exact ties: identical profiles have identical similarities to everyone
        for a, b in [(1, 2), (3, 4), (3, 5), (7, 30), (8, 9), (40, 41)]:
            x[b] = x[a]
    return meta, x


RULES = {
    "replicates": (["pert"], [], [], ["pert"]),
    "moa_across_perts": (["moa"], ["pert"], ["plate"], ["moa"]),
    # A pair can be both positive (same pert) and negative (other plate): listed twice.
    "overlapping": (["pert"], [], [], ["plate"]),
}


def _copairs_ap(meta, x, rules):
    return copairs_map.average_precision(meta, x, *rules, progress_bar=False)


@pytest.mark.parametrize("seed,n,rule", [(0, 96, "replicates"), (1, 120, "moa_across_perts"),
                                         (2, 80, "overlapping"), (3, 150, "replicates")])
def test_average_precision_equals_copairs(seed, n, rule):
    meta, x = _design(seed, n)
    ours = retrieval.average_precision(x, meta, *RULES[rule], block_size=32)
    ref = _copairs_ap(meta, x, RULES[rule])
    assert list(ours.columns) == list(ref.columns)
    np.testing.assert_array_equal(ours.n_pos_pairs.to_numpy(), ref.n_pos_pairs.to_numpy())
    np.testing.assert_array_equal(ours.n_total_pairs.to_numpy(), ref.n_total_pairs.to_numpy())
    # Same ranks; only the float64 summation order of TP/k differs.
    np.testing.assert_allclose(ours.average_precision, ref.average_precision, rtol=1e-13,
                               atol=0)
    np.testing.assert_allclose(ours.normalized_average_precision,
                               ref.normalized_average_precision, rtol=1e-12, atol=1e-15)
    pd.testing.assert_frame_equal(ours[list(meta.columns)], ref[list(meta.columns)])


def test_tie_order_positives_first():
    # Query 0 is equally similar to a negative (1) and a positive (2): positive ranks first.
    x = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]], np.float32)
    meta = pd.DataFrame({"g": ["a", "b", "a", "a"]})
    ours = retrieval.average_precision(x, meta, ["g"], [], [], ["g"])
    ref = _copairs_ap(meta, x, (["g"], [], [], ["g"]))
    # Query 0: list [pos 2, neg 1 (tied), pos 3] -> AP = (1/1 + 2/3) / 2.
    assert ours.average_precision[0] == pytest.approx((1 + 2 / 3) / 2, abs=1e-15)
    np.testing.assert_allclose(ours.average_precision, ref.average_precision, rtol=1e-13)


@pytest.mark.parametrize("seed", [0, 5])
def test_mean_average_precision_equals_copairs(seed, tmp_path, monkeypatch):
    meta, x = _design(seed, 120)
    rules = RULES["replicates"]
    ours = retrieval.average_precision(x, meta, *rules)
    ref = _copairs_ap(meta, x, rules)
    # Small null chunks: the chunked stream must equal copairs' one-shot draw.
    monkeypatch.setattr(retrieval, "_NULL_CHUNK_ELEMENTS", 300)
    got = retrieval.mean_average_precision(ours, ["pert"], 400, 0.1, seed)
    want = copairs_map.mean_average_precision(ref, ["pert"], 400, 0.1, seed, progress_bar=False,
                                              cache_dir=tmp_path / "fresh")
    assert list(got.columns) == list(want.columns)
    np.testing.assert_array_equal(got.pert, want.pert)
    np.testing.assert_allclose(got.mean_average_precision, want.mean_average_precision,
                               rtol=1e-13)
    np.testing.assert_array_equal(got.p_value, want.p_value)
    np.testing.assert_allclose(got.corrected_p_value, want.corrected_p_value, rtol=1e-14)
    np.testing.assert_array_equal(got.below_p, want.below_p)
    np.testing.assert_array_equal(got.below_corrected_p, want.below_corrected_p)
    assert got.p_value.nunique() > 3  # the comparison is not vacuous


def _sharded(x):
    mesh = jax.make_mesh((8,), ("data",))
    return jax.device_put(x, NamedSharding(mesh, P("data")))


def test_average_precision_sharded_equals_single_device():
    meta, x = _design(4, 96)
    single = retrieval.average_precision(x, meta, *RULES["moa_across_perts"], block_size=24)
    sharded = retrieval.average_precision(_sharded(x), meta, *RULES["moa_across_perts"],
                                          block_size=24)
    pd.testing.assert_frame_equal(single, sharded)


# ----------------------------------------------------------------------------------------------
# Treatment-level metrics of the Cell Painting CNN paper.
# ----------------------------------------------------------------------------------------------


def _treatments(seed, n, d=10, n_moa=8, duplicates=True):
    rng = np.random.default_rng(seed)
    moas = [f"m{k}" for k in range(n_moa)]
    labels = []
    for _ in range(n):
        k = rng.choice([1, 1, 1, 2])
        labels.append("|".join(rng.choice(moas, k, replace=False)))
    centers = rng.normal(size=(n_moa, d))
    x = np.stack([centers[moas.index(lab.split("|")[0])] for lab in labels])
    x = x + 1.5 * rng.normal(size=(n, d))
    if duplicates:
        x[5] = x[6]
        x[10] = x[11] = x[12]
    sim = x @ x.T / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    match = np.array([[bool(set(a.split("|")) & set(b.split("|"))) for b in labels]
                      for a in labels])
    return x.astype(np.float32), sim, labels, match


def _others(i, n):
    return np.array([j for j in range(n) if j != i])


def _ref_folds(sim, match, top):
    folds = []
    for i in range(len(sim)):
        idx = _others(i, len(sim))
        row, hit = sim[i, idx], match[i, idx]
        if hit.sum() == 0:
            continue
        thr = np.percentile(row, 100 * (1 - top))
        table = [[np.sum((row > thr) & hit), np.sum((row > thr) & ~hit)],
                 [np.sum((row <= thr) & hit), np.sum((row <= thr) & ~hit)]]
        odds = fisher_exact(table, alternative="greater")[0]
        folds.append(table[1][1] if np.isinf(odds) else odds)
    return np.mean(folds)


@pytest.mark.parametrize("seed,n,top", [(0, 150, 0.01), (1, 90, 0.05), (2, 230, 0.01)])
def test_folds_of_enrichment_equals_fisher_reference(seed, n, top):
    x, sim, labels, match = _treatments(seed, n)
    got = retrieval.folds_of_enrichment(sim, labels, top, block_size=64)
    want = _ref_folds(sim, match, top)
    assert np.isfinite(want)
    assert got == pytest.approx(want, rel=1e-12)
    table = retrieval.folds_of_enrichment(sim, labels, top, return_table=True)
    for _, row in table.iterrows():
        q = int(row.query)
        assert row.threshold == np.percentile(sim[q, _others(q, n)], 100 * (1 - top))
        t = [[row.v11, row.v12], [row.v21, row.v22]]
        assert row.p_value == pytest.approx(fisher_exact(t, alternative="greater")[1],
                                            rel=1e-9)
    # Cosine similarities computed on device from the features give the same tables.
    assert retrieval.folds_of_enrichment(None, labels, top, features=x) == pytest.approx(
        got, rel=1e-12)


def _ref_interpolated_map(sim, match, recall_points):
    aps = []
    for i in range(len(sim)):
        idx = _others(i, len(sim))
        n_pos = match[i, idx].sum()
        if n_pos == 0:
            continue
        prec, rec, _ = precision_recall_curve(match[i, idx], sim[i, idx])
        prec, rec = prec[:-1], rec[:-1]  # drop sklearn's appended (recall 0, precision 1)
        tp = np.rint(rec * n_pos).astype(int)
        # eq. 5 on the grid g / (R - 1); recall >= r_g compared exactly: TP (R-1) >= g M.
        aps.append(np.mean([prec[tp * (recall_points - 1) >= g * n_pos].max()
                            for g in range(recall_points)]))
    return np.mean(aps)


@pytest.mark.parametrize("seed,n,points", [(0, 120, None), (3, 77, 11), (4, 200, None)])
def test_interpolated_map_equals_paper_definition(seed, n, points):
    x, sim, labels, match = _treatments(seed, n)
    got = retrieval.interpolated_map(sim, labels, recall_points=points, block_size=50)
    want = _ref_interpolated_map(sim, match, n if points is None else points)
    assert got == pytest.approx(want, rel=1e-12)


def test_interpolated_map_ties_are_one_operating_point():
    # Query 0: a hit and a non-hit tied at the top, then a hit: points (0.5, 1/2), (1, 2/3).
    sim = np.array([[1, .9, .9, .5], [.9, 1, .1, .2], [.9, .1, 1, .3], [.5, .2, .3, 1.]])
    labels = ["a", "a", "b", "a"]
    match = np.array([[set(a) == set(b) for b in labels] for a in labels])
    got = retrieval.interpolated_map(sim, labels, recall_points=3)
    assert got == pytest.approx(_ref_interpolated_map(sim, match, 3), rel=1e-12)


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 5), (2, 10)])
def test_precision_at_k_equals_numpy(seed, k):
    x, sim, labels, match = _treatments(seed, 100)
    want = []
    for i in range(len(sim)):
        idx = _others(i, len(sim))
        if match[i, idx].sum() == 0:
            continue
        order = np.argsort(-sim[i, idx], kind="stable")
        want.append(match[i, idx][order[:k]].mean())
    got = retrieval.precision_at_k(sim, labels, k, block_size=40)
    assert got == pytest.approx(np.mean(want), rel=1e-12)


def test_treatment_metrics_sharded_equal_single_device():
    x, sim, labels, _ = _treatments(7, 96, duplicates=False)
    for fn, kw in [(retrieval.folds_of_enrichment, {}), (retrieval.interpolated_map, {}),
                   (retrieval.precision_at_k, {"k": 5})]:
        single = fn(None, labels, features=x, block_size=16, **kw)
        sharded = fn(None, labels, features=_sharded(x), block_size=16, **kw)
        assert np.isfinite(single) and single == sharded, fn.__name__
        from_matrix = fn(_sharded(sim), labels, block_size=16, **kw)
        assert from_matrix == pytest.approx(fn(sim, labels, **kw), rel=1e-12), fn.__name__


def test_clear_errors():
    meta, x = _design(0, 20, duplicates=False)
    with pytest.raises(ValueError, match="'dose' is not in metadata"):
        retrieval.average_precision(x, meta, ["dose"], [], [], ["pert"])
    bad = meta.copy()
    bad.loc[3, "pert"] = None
    with pytest.raises(ValueError, match="missing values"):
        retrieval.average_precision(x, bad, ["pert"], [], [], ["pert"])
    zero = x.copy()
    zero[4] = 0
    with pytest.raises(ValueError, match=r"features rows \[4\]"):
        retrieval.average_precision(zero, meta, ["pert"], [], [], ["pert"])
    with pytest.raises(ValueError, match="must be disjoint"):
        retrieval.average_precision(x, meta, ["pert"], ["pert"], [], ["pert"])
    with pytest.raises(ValueError, match="labels has 3 entries"):
        retrieval.folds_of_enrichment(np.eye(4), ["a", "a", "b"])
    with pytest.raises(ValueError, match="exactly one of"):
        retrieval.precision_at_k(np.eye(4), ["a"] * 4, 1, features=np.ones((4, 2)))
