"""Generative-model metrics: FID, KID, Inception Score, RBF MMD, precision/recall/density/coverage.

Each metric reproduces a reference package (named in its docstring) on the same features. Kernels
are jitted, accept features sharded along the sample axis, and work on row blocks so that no
N x N matrix is ever built, on device or on the host. Distances and kernels are float32 with
`precision=HIGHEST`; the FID trace-sqrt and the final sums run in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from morphjax.metrics.stats import Moments, _as_features, mean_cov, moments

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_same_dim(x: jax.Array, y: jax.Array, x_name: str, y_name: str) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{x_name} has {x.shape[1]} features but {y_name} has {y.shape[1]}; "
                         "both must come from the same feature space")


# ---------------------------------------------------------------------------------------------
# FID


def _stats(features, name: str) -> tuple[jax.Array, jax.Array]:
    if isinstance(features, Moments):
        return mean_cov(features)
    x = _as_features(features, name)
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {x.shape[0]}")
    return mean_cov(moments(x))


@jax.jit
def _frechet_f64(mu1, sigma1, mu2, sigma2):
    # tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)); the sandwich is symmetric PSD, so eigh
    # applies. Negative round-off eigenvalues give 0, as Re(sqrt) does in torch-fidelity.
    w, v = jnp.linalg.eigh(sigma1)
    root = jnp.matmul(v * jnp.sqrt(jnp.maximum(w, 0.0)), v.T, precision=_HIGHEST)
    sandwich = jnp.matmul(jnp.matmul(root, sigma2, precision=_HIGHEST), root, precision=_HIGHEST)
    sandwich = 0.5 * (sandwich + sandwich.T)
    tr_covmean = jnp.sum(jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(sandwich), 0.0)))
    diff = mu1 - mu2
    return jnp.dot(diff, diff) + jnp.trace(sigma1) + jnp.trace(sigma2) - 2.0 * tr_covmean


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), computed in float64 on device.

    Same value as pytorch-fid's `calculate_frechet_distance` (scipy sqrtm) and torch-fidelity's
    eigenvalue route, without their eps retry: float32 eigendecompositions lose up to 1e-3
    relative accuracy at FID ~1, float64 keeps 1e-8.
    """
    mu1, mu2 = (np.asarray(m, np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, np.float64) for s in (sigma1, sigma2))
    d = mu1.shape[-1]
    for name, m in (("mu1", mu1), ("mu2", mu2)):
        if m.shape != (d,):
            raise ValueError(f"{name} must have shape ({d},), got {m.shape}")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {s.shape}")
    with jax.enable_x64(True):
        return float(_frechet_f64(jnp.asarray(mu1), jnp.asarray(sigma1), jnp.asarray(mu2),
                                  jnp.asarray(sigma2)))


def fid(real_features, fake_features) -> float:
    """Frechet Inception Distance (Heusel et al. 2017) between two feature sets.

    Each argument is an (N, d) array or a `Moments` accumulated with `update_moments`. Statistics
    follow pytorch-fid / torch-fidelity: mean and unbiased (ddof 1) covariance.
    """
    mu1, sigma1 = _stats(real_features, "real_features")
    mu2, sigma2 = _stats(fake_features, "fake_features")
    if mu1.shape != mu2.shape:
        raise ValueError(f"real_features have {mu1.shape[0]} features but fake_features have "
                         f"{mu2.shape[0]}; both must come from the same feature space")
    return frechet_distance(mu1, sigma1, mu2, sigma2)


# ---------------------------------------------------------------------------------------------
# KID


@functools.partial(jax.jit, static_argnames=("degree",))
def _kid_row_sums(x, y, idx_x, idx_y, gamma, coef0, degree):
    """Per subset: off-diagonal row sums of K_XX and K_YY and row sums of K_XY, each (m,)."""

    def one(idx):
        a = x[idx[0]]
        b = y[idx[1]]
        kernel = lambda u, v: (jnp.matmul(u, v.T, precision=_HIGHEST) * gamma + coef0) ** degree
        k_xx, k_yy, k_xy = kernel(a, a), kernel(b, b), kernel(a, b)
        return (k_xx.sum(1) - jnp.diagonal(k_xx), k_yy.sum(1) - jnp.diagonal(k_yy), k_xy.sum(1))

    return jax.lax.map(one, (idx_x, idx_y))


def kid(real, fake, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) as torch-fidelity computes it.

    Per subset, `np.random.RandomState(seed).choice(n, subset_size, replace=False)` draws rows of
    `real` then of `fake` (torch-fidelity draws its input1 then input2, with seed 2020); the
    polynomial kernel (gamma x.y + coef0)^degree, gamma = 1/d by default, gives the unbiased MMD^2.
    Returns the mean and the population std (ddof 0) over subsets.
    """
    x = _as_features(real, "real")
    y = _as_features(fake, "fake")
    _check_same_dim(x, y, "real", "fake")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    for name, arr in (("real", x), ("fake", y)):
        if arr.shape[0] < subset_size:
            raise ValueError(f"{name} has {arr.shape[0]} samples, fewer than subset_size="
                             f"{subset_size}; lower subset_size or pass more samples")
    rng = np.random.RandomState(seed)
    idx_x = np.empty((subsets, subset_size), np.int32)
    idx_y = np.empty((subsets, subset_size), np.int32)
    for s in range(subsets):
        idx_x[s] = rng.choice(x.shape[0], subset_size, replace=False)
        idx_y[s] = rng.choice(y.shape[0], subset_size, replace=False)
    gamma = 1.0 / x.shape[1] if gamma is None else float(gamma)
    sums = _kid_row_sums(x, y, jnp.asarray(idx_x), jnp.asarray(idx_y), jnp.float32(gamma),
                         jnp.float32(coef0), int(degree))
    xx, yy, xy = (np.asarray(s, np.float64).sum(1) for s in sums)
    m = float(subset_size)
    mmd2 = (xx + yy) / (m * (m - 1.0)) - 2.0 * xy / (m * m)
    return float(mmd2.mean()), float(mmd2.std())


# ---------------------------------------------------------------------------------------------
# Inception Score


@functools.partial(jax.jit, static_argnames=("splits",))
def _split_scores(logits, segment, splits):
    log_p = jax.nn.log_softmax(logits, axis=1)
    p = jnp.exp(log_p)
    counts = jax.ops.segment_sum(jnp.ones_like(segment, logits.dtype), segment, splits)
    marginal = jax.ops.segment_sum(p, segment, splits) / counts[:, None]
    kl = jnp.sum(p * (log_p - jnp.log(marginal)[segment]), axis=1)
    return jnp.exp(jax.ops.segment_sum(kl, segment, splits) / counts)


def inception_score(logits, splits: int = 10, seed: int | None = None) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) per split, mean and std.

    Split i holds rows [i N / splits, (i + 1) N / splits), as in the original code and
    torch-fidelity; float64 like torch-fidelity. `seed=None` keeps the given order (original);
    an integer first permutes rows with `np.random.RandomState(seed).permutation(N)`, which with
    seed 2020 reproduces torch-fidelity's default shuffle. Std is ddof 0.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (samples, classes), got shape {logits.shape}")
    n = logits.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"splits must be between 1 and the number of samples ({n}), got {splits}")
    if seed is not None:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    bounds = (np.arange(splits + 1) * n) // splits
    segment = np.repeat(np.arange(splits, dtype=np.int32), np.diff(bounds))
    with jax.enable_x64(True):
        scores = np.asarray(_split_scores(jnp.asarray(logits), jnp.asarray(segment), splits))
    return float(scores.mean()), float(scores.std())


# ---------------------------------------------------------------------------------------------
# Row-blocked pairwise distances (never N x N)


def _blocks(a: jax.Array, block: int):
    """Pads rows to a multiple of `block`: (nb, block, d) rows, (nb, block) global row ids."""
    n = a.shape[0]
    nb = -(-n // block)
    padded = jnp.pad(a, ((0, nb * block - n), (0, 0)))
    rows = jnp.arange(nb * block, dtype=jnp.int32)
    return padded.reshape(nb, block, a.shape[1]), rows.reshape(nb, block)


def _sq_dists(a: jax.Array, b: jax.Array, b_sq: jax.Array) -> jax.Array:
    a_sq = jnp.sum(a * a, axis=1)
    d2 = a_sq[:, None] + b_sq[None, :] - 2.0 * jnp.matmul(a, b.T, precision=_HIGHEST)
    return jnp.maximum(d2, 0.0)


def _block_size(block_size: int, n_rows: int) -> int:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return min(int(block_size), n_rows)


# ---------------------------------------------------------------------------------------------
# MMD with an RBF kernel


@functools.partial(jax.jit, static_argnames=("block", "exclude_self"))
def _rbf_row_sums(a, b, inv_two_sigma_sq, block, exclude_self):
    """Sum over columns of exp(-|a_i - b_j|^2 / (2 sigma^2)) for every row i of `a`."""
    b_sq = jnp.sum(b * b, axis=1)
    cols = jnp.arange(b.shape[0], dtype=jnp.int32)
    blocks, rows = _blocks(a, block)

    def one(args):
        a_blk, r = args
        k = jnp.exp(-_sq_dists(a_blk, b, b_sq) * inv_two_sigma_sq)
        if exclude_self:
            k = jnp.where(r[:, None] == cols[None, :], 0.0, k)
        return k.sum(1)

    return jax.lax.map(one, (blocks, rows)).reshape(-1)[: a.shape[0]]


def mmd_rbf(x, y, sigma: float, block_size: int = 1024) -> float:
    """Unbiased MMD^2 with k(a, b) = exp(-|a - b|^2 / (2 sigma^2)), as in CMMD.

    MorphDiff Methods eq. 14 (within-set sums over i != j, divided by m(m-1) and n(n-1)); the
    cross term carries the factor 2 of the unbiased estimator (Gretton et al. 2012, eq. 3),
    which the printed equation drops. Rows are processed `block_size` at a time.
    """
    x = _as_features(x, "x")
    y = _as_features(y, "y")
    _check_same_dim(x, y, "x", "y")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"x and y need at least 2 samples each, got {m} and {n}")
    scale = jnp.float32(1.0 / (2.0 * float(sigma) ** 2))
    # Centre on x's mean: distances are unchanged and the |a|^2 + |b|^2 - 2ab expansion loses less.
    centre = jnp.mean(x, axis=0)
    x, y = x - centre, y - centre
    total = lambda a, b, same: float(np.asarray(
        _rbf_row_sums(a, b, scale, _block_size(block_size, a.shape[0]), same), np.float64).sum())
    k_xx = total(x, x, True)
    k_yy = total(y, y, True)
    k_xy = total(x, y, False)
    return k_xx / (m * (m - 1.0)) + k_yy / (n * (n - 1.0)) - 2.0 * k_xy / (m * float(n))


# ---------------------------------------------------------------------------------------------
# Precision, recall, density, coverage


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _knn_radius_sq(a, k, block):
    """Squared distance of each row to its (k+1)-th nearest row of `a`, self (at 0) included."""
    a_sq = jnp.sum(a * a, axis=1)
    cols = jnp.arange(a.shape[0], dtype=jnp.int32)
    blocks, rows = _blocks(a, block)

    def one(args):
        a_blk, r = args
        d2 = jnp.where(r[:, None] == cols[None, :], 0.0, _sq_dists(a_blk, a, a_sq))
        neg_smallest, _ = jax.lax.top_k(-d2, k + 1)
        return -neg_smallest[:, k]

    return jax.lax.map(one, (blocks, rows)).reshape(-1)[: a.shape[0]]


@functools.partial(jax.jit, static_argnames=("block",))
def _prdc_counts(real, fake, r2_real, r2_fake, block):
    """Per fake: #reals whose ball holds it; per real: covered by its ball, inside a fake ball."""
    n_real = real.shape[0]
    fake_sq = jnp.sum(fake * fake, axis=1)
    blocks, rows = _blocks(real, block)
    radii = jnp.pad(r2_real, (0, rows.size - n_real)).reshape(rows.shape)

    def step(fake_counts, args):
        real_blk, r, r2 = args
        d2 = _sq_dists(real_blk, fake, fake_sq)
        valid = (r < n_real)[:, None]
        in_real_ball = (d2 < r2[:, None]) & valid
        in_fake_ball = d2 < r2_fake[None, :]
        fake_counts = fake_counts + jnp.sum(in_real_ball, axis=0, dtype=jnp.int32)
        return fake_counts, (jnp.any(in_real_ball, axis=1), jnp.any(in_fake_ball, axis=1))

    init = jnp.zeros((fake.shape[0],), jnp.int32)
    fake_counts, (covered, recalled) = jax.lax.scan(step, init, (blocks, rows, radii))
    return fake_counts, covered.reshape(-1)[:n_real], recalled.reshape(-1)[:n_real]


def prdc(real, fake, k: int = 5, block_size: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020), `prdc` package semantics.

    Euclidean distances; a point's radius is the distance to its (k+1)-th nearest point of its own
    set counting itself; all comparisons are strict (<). precision = fraction of fakes inside some
    real ball, recall = fraction of reals inside some fake ball, density = mean over fakes of the
    number of real balls holding it, divided by k, coverage = fraction of real balls holding a
    fake. Distances are compared squared, after translating both sets by the real mean rounded
    to integers: distances are unchanged, the |a|^2 + |b|^2 - 2ab expansion loses less to large
    offsets, and integer-valued features (exact ties) stay exact.
    """
    x = _as_features(real, "real")
    y = _as_features(fake, "fake")
    _check_same_dim(x, y, "real", "fake")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, arr in (("real", x), ("fake", y)):
        if arr.shape[0] <= k:
            raise ValueError(f"{name} has {arr.shape[0]} samples; k={k} needs more than k")
    centre = jnp.round(jnp.mean(x, axis=0))
    x, y = x - centre, y - centre
    r2_real = _knn_radius_sq(x, int(k), _block_size(block_size, x.shape[0]))
    r2_fake = _knn_radius_sq(y, int(k), _block_size(block_size, y.shape[0]))
    fake_counts, covered, recalled = _prdc_counts(x, y, r2_real, r2_fake,
                                                  _block_size(block_size, x.shape[0]))
    fake_counts = np.asarray(fake_counts)
    n_fake, n_real = y.shape[0], x.shape[0]
    return {
        "precision": int(np.count_nonzero(fake_counts)) / n_fake,
        "recall": int(np.count_nonzero(np.asarray(recalled))) / n_real,
        "density": (1.0 / float(k)) * (int(fake_counts.sum()) / n_fake),
        "coverage": int(np.count_nonzero(np.asarray(covered))) / n_real,
    }
