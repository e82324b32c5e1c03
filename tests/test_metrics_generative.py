"""Generative metrics against float64 NumPy/SciPy references and the `prdc` package."""

import jax
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from morphjax import metrics

prdc_package = pytest.importorskip("prdc")


def _gaussian(rng, n, mean, cov):
    return rng.multivariate_normal(mean, cov, size=n).astype(np.float32)


def _random_cov(rng, d, scale=1.0):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return scale * (a @ a.T + 0.1 * np.eye(d))


def _fid_reference(x, y):
    """pytorch-fid: np.cov + scipy.linalg.sqrtm, all float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)


def _sharded(x):
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Auto,))
    return jax.device_put(x, NamedSharding(mesh, P("data")))


# --------------------------------------------------------------------------------------------
# Streaming statistics


def test_streaming_moments_match_np_cov():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(1000, 24)) * 3.0 + 50.0).astype(np.float32)  # Large offset on purpose.
    state = metrics.init_moments(24)
    for start, stop in [(0, 7), (7, 300), (300, 301), (301, 1000)]:
        state = metrics.update_moments(state, x[start:stop])
    mean, cov = metrics.mean_cov(state)
    x64 = x.astype(np.float64)
    assert int(state.count) == 1000
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(cov, np.cov(x64, rowvar=False), rtol=2e-5, atol=2e-5)


def test_masked_padded_batch_and_merge():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 5)).astype(np.float32)
    padded = np.concatenate([x[60:], np.full((34, 5), 1e3, np.float32)])  # 30 valid + 34 junk.
    mask = np.arange(64) < 30
    a = metrics.moments(x[:60])
    b = metrics.update_moments(metrics.init_moments(5), padded, mask)
    merged = metrics.merge_moments(a, b)
    mean, cov = metrics.mean_cov(merged)
    assert int(merged.count) == 90
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-5,
                               atol=1e-6)
    _, cov0 = metrics.mean_cov(merged, ddof=0)
    np.testing.assert_allclose(cov0, np.cov(x.astype(np.float64), rowvar=False, ddof=0),
                               rtol=1e-5, atol=1e-6)


def test_moments_sharded_equal_single():
    x = np.random.default_rng(2).normal(size=(512, 16)).astype(np.float32)
    single = metrics.moments(x)
    sharded = metrics.moments(_sharded(x))
    np.testing.assert_allclose(sharded.mean, single.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sharded.m2, single.m2, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# FID


@pytest.mark.parametrize("case", ["far", "near"])
def test_fid_matches_scipy_sqrtm(case):
    rng = np.random.default_rng(3)
    d, n = 32, 4000
    cov = _random_cov(rng, d)
    x = _gaussian(rng, n, np.zeros(d), cov)
    if case == "far":  # FID ~ 100.
        y = _gaussian(rng, n, np.full(d, 1.5), _random_cov(rng, d, 2.0))
    else:  # FID ~ 1: same covariance, slightly shifted mean, plus sampling noise.
        y = _gaussian(rng, n, np.full(d, 0.15), cov)
    ref = _fid_reference(x, y)
    assert (60 < ref < 200) if case == "far" else (0.3 < ref < 3)
    np.testing.assert_allclose(metrics.fid(x, y), ref, rtol=1e-6)
    # From streamed statistics, and with sample-sharded features.
    np.testing.assert_allclose(metrics.fid(metrics.moments(x), metrics.moments(y)), ref, rtol=1e-6)
    np.testing.assert_allclose(metrics.fid(_sharded(x), _sharded(y)), ref, rtol=1e-6)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(4)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 4.0, size=d), rng.uniform(0.1, 4.0, size=d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2.0 * np.sqrt(v1 * v2))
    got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    np.testing.assert_allclose(got, closed, rtol=1e-12)
    assert abs(metrics.frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1))) < 1e-10


def test_fid_bad_arguments():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="fake_features"):
        metrics.fid(x, np.zeros((10, 5), np.float32))
    with pytest.raises(ValueError, match="real_features must be 2-D"):
        metrics.fid(np.zeros(10), x)
    with pytest.raises(ValueError, match="sigma2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# --------------------------------------------------------------------------------------------
# KID


def _kid_reference(x, y, subsets, subset_size, seed):
    """torch-fidelity's estimator (metric_kid.py) in float64 NumPy."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    rng = np.random.RandomState(seed)
    m, gamma = subset_size, 1.0 / x.shape[1]
    mmds = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        k_xx, k_yy = (a @ a.T * gamma + 1) ** 3, (b @ b.T * gamma + 1) ** 3
        k_xy = (a @ b.T * gamma + 1) ** 3
        off = lambda k: k.sum() - np.trace(k)
        mmds.append((off(k_xx) + off(k_yy)) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))
    return np.mean(mmds), np.std(mmds)


@pytest.mark.parametrize("n_x,n_y,d,subsets,subset_size,seed,shift", [
    (300, 250, 16, 20, 100, 0, 0.5),
    (1200, 1100, 48, 100, 1000, 2020, 0.2),  # torch-fidelity defaults.
    (64, 80, 8, 5, 64, 7, 0.0),  # Subset = whole real set; same distribution.
])
def test_kid_matches_torch_fidelity_estimator(n_x, n_y, d, subsets, subset_size, seed, shift):
    rng = np.random.default_rng(n_x)
    x = np.abs(rng.normal(size=(n_x, d))).astype(np.float32)
    y = (np.abs(rng.normal(size=(n_y, d))) * 1.1 + shift).astype(np.float32)
    ref_mean, ref_std = _kid_reference(x, y, subsets, subset_size, seed)
    mean, std = metrics.kid(x, y, subsets=subsets, subset_size=subset_size, seed=seed)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(std, ref_std, rtol=1e-5, atol=1e-8)


def test_kid_sharded_equal_single_and_errors():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(256, 12)).astype(np.float32)
    y = (rng.normal(size=(256, 12)) + 0.3).astype(np.float32)
    single = metrics.kid(x, y, subsets=8, subset_size=100, seed=1)
    sharded = metrics.kid(_sharded(x), _sharded(y), subsets=8, subset_size=100, seed=1)
    np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="subset_size"):
        metrics.kid(x, y, subset_size=1000)


# --------------------------------------------------------------------------------------------
# Inception Score


def _is_reference(logits, splits):
    """Original improved-GAN code: softmax, contiguous splits, exp(mean KL)."""
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("n,classes,splits", [(1000, 1008, 10), (97, 12, 4)])
def test_inception_score_matches_numpy(n, classes, splits):
    logits = np.random.default_rng(n).normal(scale=3.0, size=(n, classes))
    np.testing.assert_allclose(metrics.inception_score(logits, splits),
                               _is_reference(logits, splits), rtol=1e-10)
    perm = np.random.RandomState(2020).permutation(n)  # torch-fidelity's shuffle.
    np.testing.assert_allclose(metrics.inception_score(logits, splits, seed=2020),
                               _is_reference(logits[perm], splits), rtol=1e-10)


def test_inception_score_limits():
    mean, std = metrics.inception_score(np.zeros((40, 7)), splits=4)
    assert abs(mean - 1.0) < 1e-12 and std < 1e-12
    confident = np.tile(np.eye(8) * 1e3, (5, 1))  # Every split sees all 8 classes, each certain.
    mean, _ = metrics.inception_score(confident, splits=5)
    np.testing.assert_allclose(mean, 8.0, rtol=1e-10)
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.zeros((5, 3)), splits=10)


# --------------------------------------------------------------------------------------------
# MMD (RBF)


def _mmd_reference(x, y, sigma):
    x, y = x.astype(np.float64), y.astype(np.float64)
    k = lambda a, b: np.exp(-scipy.spatial.distance.cdist(a, b, "sqeuclidean") / (2 * sigma ** 2))
    m, n = len(x), len(y)
    k_xx, k_yy = k(x, x), k(y, y)
    return ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy))
            / (n * (n - 1)) - 2 * k(x, y).sum() / (m * n))


@pytest.mark.parametrize("m,n,d,sigma,block", [(200, 150, 16, 4.0, 1024), (101, 77, 5, 1.0, 16),
                                               (64, 64, 32, 10.0, 7)])
def test_mmd_rbf_matches_numpy(m, n, d, sigma, block):
    rng = np.random.default_rng(m + d)
    x = (rng.normal(size=(m, d)) + 20.0).astype(np.float32)
    y = (rng.normal(size=(n, d)) * 1.2 + 20.3).astype(np.float32)
    ref = _mmd_reference(x, y, sigma)
    np.testing.assert_allclose(metrics.mmd_rbf(x, y, sigma, block_size=block), ref, rtol=1e-4,
                               atol=1e-7)


def test_mmd_rbf_sharded_and_unbiased():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (rng.normal(size=(128, 8)) + 0.5).astype(np.float32)
    single = metrics.mmd_rbf(x, y, 2.0)
    np.testing.assert_allclose(metrics.mmd_rbf(_sharded(x), _sharded(y), 2.0), single, rtol=1e-6)
    # Unbiased: averaged over disjoint same-distribution pairs it is ~0 (the biased one is not).
    same = [metrics.mmd_rbf(x[i::4], x[(i + 1) % 4::4], 2.0) for i in range(4)]
    assert abs(np.mean(same)) < 5e-3 < single


# --------------------------------------------------------------------------------------------
# Precision / recall / density / coverage


def _designs():
    rng = np.random.default_rng(7)
    yield (rng.normal(size=(500, 16)).astype(np.float32),
           (1.2 * rng.normal(size=(500, 16)) + 0.3).astype(np.float32), 5)
    yield (rng.normal(size=(300, 64)).astype(np.float32),
           (rng.normal(size=(220, 64)) + 0.1).astype(np.float32), 3)
    real = rng.normal(size=(257, 8)).astype(np.float32) * 5 + 100
    near = rng.normal(size=(100, 8)).astype(np.float32) * 5 + 101
    yield real, np.concatenate([real[:40], near]), 7  # Fakes that duplicate reals.
    # Integer lattice: many duplicates and exact distance ties, so strict < matters.
    yield (rng.integers(0, 4, size=(200, 4)).astype(np.float32),
           rng.integers(0, 5, size=(180, 4)).astype(np.float32), 4)


@pytest.mark.parametrize("design", range(4))
def test_prdc_equals_prdc_package(design):
    real, fake, k = list(_designs())[design]
    ref = prdc_package.compute_prdc(real, fake, nearest_k=k)
    for block in (1024, 33):
        got = metrics.prdc(real, fake, k, block_size=block)
        assert got == {key: float(v) for key, v in ref.items()}, (block, got, ref)


def test_prdc_sharded_equal_single():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(512, 16)).astype(np.float32)
    fake = (rng.normal(size=(256, 16)) * 1.1).astype(np.float32)
    assert metrics.prdc(_sharded(real), _sharded(fake), 5) == metrics.prdc(real, fake, 5)
    with pytest.raises(ValueError, match="k=5"):
        metrics.prdc(real[:5], fake, 5)
