"""Clustering and batch metrics against scikit-learn, harmonypy, SciPy and morphjax.chem."""

import jax
import numpy as np
import pandas as pd
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from scipy import stats
from sklearn import metrics as skm
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from morphjax import chem
from morphjax.metrics import clustering

SEEDS = (0, 1, 2)


def sharded(x):
    """Rows split over a 1-D mesh of all (8 fake) devices."""
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Auto,))
    return jax.device_put(np.asarray(x, np.float32), NamedSharding(mesh, P("data")))


def design(seed, n=320, d=12, n_labels=4, n_batches=3):
    """Features with label structure plus a batch shift; labels and batches are strings."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n)
    batches = rng.integers(0, n_batches, n)
    centres = rng.normal(scale=2.0, size=(n_labels, d))
    shifts = rng.normal(scale=0.7, size=(n_batches, d))
    x = centres[labels] + shifts[batches] + rng.normal(size=(n, d)) + 5.0
    return (x.astype(np.float32), np.array([f"L{v}" for v in labels]),
            np.array([f"B{v}" for v in batches]))


# --- label agreement -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_nmi_ari_purity_match_references(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3 + seed, 200)
    b = np.where(rng.random(200) < 0.6, a, rng.integers(0, 5, 200))
    assert clustering.nmi(a, b) == pytest.approx(skm.normalized_mutual_info_score(a, b),
                                                 abs=1e-10)
    assert clustering.ari(a, b) == pytest.approx(skm.adjusted_rand_score(a, b), abs=1e-10)
    table = pd.crosstab(a, b).to_numpy()
    assert clustering.purity(a, b) == pytest.approx(table.max(axis=0).sum() / 200, abs=1e-12)


def test_nmi_ari_edge_cases():
    one, other = np.zeros(10), np.arange(10)
    for a, b in [(one, one), (one, other), (other, other), (other, one)]:
        assert clustering.nmi(a, b) == pytest.approx(skm.normalized_mutual_info_score(a, b),
                                                     abs=1e-10)
        assert clustering.ari(a, b) == pytest.approx(skm.adjusted_rand_score(a, b), abs=1e-10)
    # Labels are compared as partitions, whatever their type.
    assert clustering.ari(["x", "x", "y"], [2, 2, 7]) == 1.0
    with pytest.raises(ValueError, match="labels_pred"):
        clustering.nmi([0, 1, 1], [0, 1])


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_entropy_and_gini(seed):
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, 6, 300)
    batch = np.where(clusters % 2 == 0, rng.integers(0, 3, 300), clusters % 3)
    entropies, ginis = [], []
    for c in np.unique(clusters):
        p = np.bincount(batch[clusters == c], minlength=3) / np.sum(clusters == c)
        entropies.append(stats.entropy(p, base=2))
        ginis.append(1.0 - np.sum(p ** 2))
    assert clustering.batch_entropy(clusters, batch) == pytest.approx(np.mean(entropies), 1e-12)
    assert clustering.gini(clusters, batch) == pytest.approx(np.mean(ginis), 1e-12)


# --- silhouette ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_silhouette_matches_sklearn_and_sharded(seed, metric):
    x, labels, _ = design(seed)
    labels[0] = "singleton"  # a one-member cluster scores 0
    expected = skm.silhouette_score(x.astype(np.float64), labels, metric=metric)
    got = clustering.silhouette(x, labels, metric=metric, block=64)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert clustering.silhouette(sharded(x), labels, metric=metric, block=64) == pytest.approx(
        got, rel=1e-6, abs=1e-7)


def scib_silhouette_batch(x, batch, labels):
    """NumPy reference following scib.metrics.silhouette_batch (scale=True)."""
    per_group = []
    for group in np.unique(labels):
        members = labels == group
        n_batches = len(np.unique(batch[members]))
        if n_batches in (1, members.sum()):
            continue
        s = skm.silhouette_samples(x[members].astype(np.float64), batch[members])
        per_group.append(np.mean(1.0 - np.abs(s)))
    return np.mean(per_group)


@pytest.mark.parametrize("seed", SEEDS)
def test_silhouette_batch_matches_scib_definition(seed):
    x, labels, batches = design(seed)
    batches[labels == "L0"] = "B0"  # a group with a single batch is skipped
    expected = scib_silhouette_batch(x, batches, labels)
    got = clustering.silhouette_batch(x, batches, labels, block=48)
    assert got == pytest.approx(expected, rel=1e-6)
    assert clustering.silhouette_batch(sharded(x), batches, labels) == pytest.approx(got, 1e-6)


# --- k-means ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_kmeans_matches_sklearn_on_blobs(seed):
    x, _ = make_blobs(480, n_features=6, centers=5, cluster_std=1.0, random_state=seed)
    ours = clustering.kmeans(x, 5, n_init=100, seed=seed)
    ref = KMeans(5, n_init=10, random_state=seed).fit(x)
    assert ours.inertia <= ref.inertia_ * (1 + 1e-3)
    assert skm.adjusted_rand_score(ours.labels, ref.labels_) == 1.0
    assert ours.run_labels.shape == (100, 480) and ours.run_inertia.shape == (100,)
    assert ours.inertia == pytest.approx(ours.run_inertia.min(), rel=1e-4)
    got = clustering.kmeans(sharded(x), 5, n_init=100, seed=seed)
    np.testing.assert_array_equal(got.labels, ours.labels)
    assert got.inertia == pytest.approx(ours.inertia, rel=1e-5)


def test_kmeans_seeding_finds_separated_clusters_in_one_run():
    # One big and seven small far-apart blobs: D^2 seeding puts a seed in every blob in a
    # single restart, where uniform seeding would almost always miss small ones.
    x, y = make_blobs([330] + [10] * 7, n_features=4, cluster_std=0.05, center_box=(-50, 50),
                      random_state=3)
    result = clustering.kmeans(x, 8, n_init=1, max_iter=1, seed=0)
    assert skm.adjusted_rand_score(result.labels, y) == 1.0
    with pytest.raises(ValueError, match="`k`"):
        clustering.kmeans(x, 401)


# --- nearest neighbours ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_accuracy_matches_sklearn(seed, metric):
    x, labels, _ = design(seed, n=240)
    k = (5, 5, 4)[seed]  # an even k makes vote ties
    # Leave-one-out: the k nearest other samples, majority vote, ties to the smallest label.
    neighbours = NearestNeighbors(n_neighbors=k + 1, metric=metric).fit(x.astype(np.float64))
    idx = neighbours.kneighbors(return_distance=False)
    codes = np.unique(labels, return_inverse=True)[1]
    votes = np.stack([np.bincount(codes[row], minlength=codes.max() + 1) for row in idx[:, :k]])
    expected = np.mean(np.argmax(votes, axis=1) == codes)
    assert clustering.knn_accuracy(x, labels, k=k, metric=metric, block=64) == expected
    assert clustering.knn_accuracy(sharded(x), labels, k=k, metric=metric) == expected
    # Reference set -> queries (real -> generated), an unseen query label never counts.
    refs, queries = slice(0, 160), slice(160, 240)
    query_labels = labels[queries].copy()
    query_labels[0] = "unseen"
    clf = KNeighborsClassifier(n_neighbors=k, metric=metric).fit(x[refs], labels[refs])
    expected = np.mean(clf.predict(x[queries]) == query_labels)
    got = clustering.knn_accuracy(x[refs], labels[refs], k=k, metric=metric,
                                  query_features=x[queries], query_labels=query_labels)
    assert got == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_ilisi_matches_harmonypy(seed):
    harmonypy = pytest.importorskip("harmonypy")
    x, _, batches = design(seed, n=320, n_batches=2 + seed)
    perplexity = (30, 15, 15)[seed]
    expected = harmonypy.compute_lisi(x.astype(np.float64), pd.DataFrame({"batch": batches}),
                                      ["batch"], perplexity=perplexity)[:, 0]
    got = clustering.ilisi(x, batches, perplexity=perplexity, per_cell=True, block=64)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    n_batches = len(np.unique(batches))
    assert clustering.ilisi(sharded(x), batches, perplexity=perplexity, scale=True) == (
        pytest.approx((np.median(expected) - 1) / (n_batches - 1), rel=1e-4))


def test_ilisi_limits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 12))
    separated = np.concatenate([x, x + 100.0])
    batch = np.repeat([0, 1], 160)
    assert clustering.ilisi(separated, batch, perplexity=15) == pytest.approx(1.0)
    mixed = np.concatenate([x, rng.normal(size=(160, 12))])
    assert clustering.ilisi(mixed, batch, perplexity=15) > 1.5
    with pytest.raises(ValueError, match="perplexity"):
        clustering.ilisi(x[:20], np.zeros(20), perplexity=30)


# --- fingerprints ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_tanimoto_matches_chem(seed):
    rng = np.random.default_rng(seed)
    a = (rng.random((40, 256)) < 0.1 * (seed + 1)).astype(np.uint8)
    b = (rng.random((24, 256)) < 0.2).astype(np.uint8)
    a[0] = 0
    b[0] = 0  # two empty fingerprints score 0
    np.testing.assert_allclose(clustering.tanimoto(a, b, block=16), chem.tanimoto(a, b),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(clustering.tanimoto(sharded(a)), chem.tanimoto(a, a), rtol=1e-6,
                               atol=1e-7)
    with pytest.raises(ValueError, match="n_bits"):
        clustering.tanimoto(a, b[:, :100])


def test_bad_arguments_are_named():
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="metric"):
        clustering.silhouette(x, np.arange(20) % 2, metric="manhattan")
    with pytest.raises(ValueError, match="`labels`"):
        clustering.silhouette(x, np.arange(19) % 2)
    with pytest.raises(ValueError, match="query_labels"):
        clustering.knn_accuracy(x, np.arange(20) % 2, query_features=x)
