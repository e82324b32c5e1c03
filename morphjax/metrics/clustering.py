"""Clustering, neighbourhood and batch-mixing metrics as jitted block kernels.

These score embeddings the way the papers do: k-means + purity/NMI/ARI against known groups
(grape.txt 3.7 and Fig. 4: k-means run 100 times), silhouette, silhouette-batch and iLISI for
batch correction (impa.txt "Average Silhouette Width", "iLISI", from the scIB package), batch
entropy and Gini impurity over clusters (impa.txt "Entropy and Gini index"), kNN classification
accuracy (lumic.txt 3.1) and Tanimoto similarity of fingerprints (impa.txt eq. 15).

Distance-based metrics run on device in blocks of query rows against all samples, so nothing
N x N is ever held (on device or host); pass features sharded along the sample axis to spread
the work over a mesh. Label-only metrics (purity, NMI, ARI, entropy, Gini) are O(N) counts and
run in NumPy float64 so that they match scikit-learn to rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
_METRICS = ("euclidean", "cosine")


# ---------------------------------------------------------------------------------------------
# Input handling.

def _features(x: Any, name: str) -> jax.Array:
    """float32 (N, d) device array; keeps the sharding of a jax.Array."""
    x = jnp.asarray(x, dtype=jnp.float32)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"`{name}` must be an (N, d) matrix with N >= 2, got shape {x.shape}.")
    return x


def _codes(labels: Any, n: int | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels of any type -> (sorted unique values, int32 codes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"`{name}` must be one label per sample (1-D), got shape {labels.shape}.")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"`{name}` has {labels.shape[0]} entries but there are {n} samples.")
    values, codes = np.unique(labels, return_inverse=True)
    return values, codes.astype(np.int32)


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"`metric` must be one of {_METRICS}, got {metric!r}.")


def _prepare(x: jax.Array, metric: str) -> jax.Array:
    """L2-normalises rows (cosine), then centres them. Both distances below are functions of
    ||u - v||^2, which is translation invariant, and the dot-product form of it loses far
    less float32 precision on centred rows (features are often far from the origin)."""
    if metric == "cosine":
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x - jnp.mean(x, axis=0, keepdims=True)


def _block_distances(q: jax.Array, x: jax.Array, x_sq: jax.Array, metric: str) -> jax.Array:
    """Distances from a block of query rows to all rows prepared by `_prepare`: Euclidean, or
    cosine distance 1 - cos = ||u - v||^2 / 2 for unit vectors u, v."""
    dots = jnp.matmul(q, x.T, precision=HIGHEST)
    q_sq = jnp.sum(q * q, axis=1)
    sq = jnp.maximum(q_sq[:, None] + x_sq[None, :] - 2.0 * dots, 0.0)
    return 0.5 * sq if metric == "cosine" else jnp.sqrt(sq)


def _map_row_blocks(fn, n: int, block: int, *row_arrays):
    """Applies fn(start, *row_blocks) to consecutive row blocks with `lax.map` and concatenates
    the outputs over the first n rows. Rows past n are zero padding."""
    n_blocks = -(-n // block)
    padded = [jnp.pad(a, [(0, n_blocks * block - n)] + [(0, 0)] * (a.ndim - 1))
              for a in row_arrays]

    def body(i):
        start = i * block
        blocks = [jax.lax.dynamic_slice_in_dim(a, start, block, axis=0) for a in padded]
        return fn(start, *blocks)

    out = jax.lax.map(body, jnp.arange(n_blocks))
    return jax.tree.map(lambda o: o.reshape((n_blocks * block,) + o.shape[2:])[:n], out)


def _block_size(n: int, block: int) -> int:
    return max(1, min(block, n))


# ---------------------------------------------------------------------------------------------
# k-means.

class KMeansResult(NamedTuple):
    """Best restart (lowest inertia) plus the labels and inertia of every restart (GRAPE reports
    the mean and standard deviation of metrics over the restarts)."""
    labels: np.ndarray        # (N,) cluster of each sample in the best restart
    centers: np.ndarray       # (k, d)
    inertia: float            # sum of squared distances to the assigned centre
    run_labels: np.ndarray    # (n_init, N)
    run_inertia: np.ndarray   # (n_init,)


def _sq_dist_to(c: jax.Array, x: jax.Array, x_sq: jax.Array) -> jax.Array:
    """Squared Euclidean distances (len(c), N)."""
    c_sq = jnp.sum(c * c, axis=1)
    dots = jnp.matmul(c, x.T, precision=HIGHEST)
    return jnp.maximum(c_sq[:, None] + x_sq[None, :] - 2.0 * dots, 0.0)


def _kmeans_plusplus(x, x_sq, key, k: int, n_trials: int):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, scikit-learn's variant): each new centre
    is the best of `n_trials` candidates drawn with probability proportional to D^2."""
    n = x.shape[0]
    key_first, key_rest = jax.random.split(key)
    first = jax.random.randint(key_first, (), 0, n)
    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    closest = _sq_dist_to(x[first][None], x, x_sq)[0]

    def step(c, carry):
        centers, closest = carry
        u = jax.random.uniform(jax.random.fold_in(key_rest, c), (n_trials,))
        cumulative = jnp.cumsum(closest)
        candidates = jnp.searchsorted(cumulative, u * cumulative[-1])
        candidates = jnp.clip(candidates, 0, n - 1)
        to_candidates = jnp.minimum(closest[None], _sq_dist_to(x[candidates], x, x_sq))
        best = jnp.argmin(jnp.sum(to_candidates, axis=1))
        return centers.at[c].set(x[candidates[best]]), to_candidates[best]

    centers, _ = jax.lax.fori_loop(1, k, step, (centers, closest))
    return centers


def _lloyd(x, x_sq, centers, max_iter: int, tol):
    """Lloyd iterations until the total squared centre shift is <= tol (scikit-learn's rule).
    An empty cluster keeps its previous centre."""
    k = centers.shape[0]

    def assign(centers):
        return jnp.argmin(_sq_dist_to(centers, x, x_sq), axis=0)

    def body(state):
        it, centers, _ = state
        onehot = jax.nn.one_hot(assign(centers), k, dtype=x.dtype)
        counts = jnp.sum(onehot, axis=0)
        sums = jnp.matmul(onehot.T, x, precision=HIGHEST)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)
        return it + 1, new, jnp.sum((new - centers) ** 2)

    def cond(state):
        it, _, shift = state
        return (it < max_iter) & (shift > tol)

    init = (jnp.int32(0), centers, jnp.asarray(jnp.inf, x.dtype))
    _, centers, _ = jax.lax.while_loop(cond, body, init)
    d2 = _sq_dist_to(centers, x, x_sq)
    labels = jnp.argmin(d2, axis=0)
    inertia = jnp.sum(jnp.min(d2, axis=0))
    return centers, labels, inertia


@functools.partial(jax.jit, static_argnames=("k", "n_init", "max_iter", "n_trials"))
def _kmeans_runs(x, key, tol_rel, *, k, n_init, max_iter, n_trials):
    mean = jnp.mean(x, axis=0, keepdims=True)
    xc = x - mean
    x_sq = jnp.sum(xc * xc, axis=1)
    tol = jnp.mean(jnp.var(xc, axis=0)) * tol_rel

    def run(key):
        centers = _kmeans_plusplus(xc, x_sq, key, k, n_trials)
        return _lloyd(xc, x_sq, centers, max_iter, tol)

    centers, labels, inertia = jax.vmap(run)(jax.random.split(key, n_init))
    best = jnp.argmin(inertia)
    # Exact inertia of the best run from differences, not the dot-product form.
    best_inertia = jnp.sum((xc - centers[best][labels[best]]) ** 2)
    return centers + mean[None], labels, inertia, best, best_inertia


def kmeans(features: Any, k: int, n_init: int = 100, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0) -> KMeansResult:
    """k-means with greedy k-means++ seeding and `n_init` restarts run in parallel (vmap) on
    device; the restart with the lowest inertia wins (scikit-learn `KMeans` semantics; GRAPE
    runs k-means 100 times, grape.txt 3.7). `tol` is relative to the mean feature variance,
    as in scikit-learn."""
    x = _features(features, "features")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"`k` must be in [1, {n}] (number of samples), got {k}.")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"`n_init` and `max_iter` must be >= 1, got {n_init}, {max_iter}.")
    n_trials = 2 + int(math.log(k))
    centers, labels, inertia, best, best_inertia = _kmeans_runs(
        x, jax.random.key(seed), jnp.float32(tol), k=k, n_init=n_init, max_iter=max_iter,
        n_trials=n_trials)
    best = int(best)
    labels = np.asarray(labels)
    return KMeansResult(labels=labels[best], centers=np.asarray(centers[best]),
                        inertia=float(best_inertia), run_labels=labels,
                        run_inertia=np.asarray(inertia, np.float64))


# ---------------------------------------------------------------------------------------------
# Label agreement (NumPy float64; O(N) work).

def _contingency(labels_true: Any, labels_pred: Any) -> np.ndarray:
    _, a = _codes(labels_true, None, "labels_true")
    _, b = _codes(labels_pred, a.shape[0], "labels_pred")
    table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
    np.add.at(table, (a, b), 1)
    return table


def purity(labels_true: Any, labels_pred: Any) -> float:
    """Fraction of samples in the majority true class of their cluster (grape.txt 3.7)."""
    table = _contingency(labels_true, labels_pred)
    return float(table.max(axis=0).sum() / table.sum())


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    total = counts.sum()
    return float(-np.sum((counts / total) * (np.log(counts) - np.log(total))))


def nmi(labels_true: Any, labels_pred: Any) -> float:
    """Normalised mutual information with the arithmetic-mean normaliser (scikit-learn's
    `normalized_mutual_info_score` default); 1.0 when both labelings have a single class."""
    table = _contingency(labels_true, labels_pred)
    if table.shape[0] == table.shape[1] == 1:
        return 1.0
    n = float(table.sum())
    rows, cols = table.sum(axis=1).astype(np.float64), table.sum(axis=0).astype(np.float64)
    i, j = np.nonzero(table)
    nij = table[i, j].astype(np.float64)
    mi = np.sum(nij / n * (np.log(nij) + np.log(n) - np.log(rows[i]) - np.log(cols[j])))
    mi = max(float(mi), 0.0)
    if mi == 0.0:
        return 0.0
    normaliser = 0.5 * (_entropy(rows) + _entropy(cols))
    return float(mi / max(normaliser, np.finfo(np.float64).eps))


def _pairs(counts: np.ndarray) -> int:
    """Number of unordered pairs within each count, summed; Python ints, exact for any N."""
    return sum(int(v) * (int(v) - 1) // 2 for v in np.ravel(counts))


def ari(labels_true: Any, labels_pred: Any) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985), as scikit-learn's `adjusted_rand_score`;
    1.0 for identical partitions including the all-one-cluster case."""
    table = _contingency(labels_true, labels_pred)
    n = int(table.sum())
    same_both = _pairs(table)
    same_true = _pairs(table.sum(axis=1))
    same_pred = _pairs(table.sum(axis=0))
    total = n * (n - 1) // 2
    expected = same_true * same_pred / total if total else 0.0
    maximum = 0.5 * (same_true + same_pred)
    if maximum == expected:
        return 1.0
    return float((same_both - expected) / (maximum - expected))


def _cluster_batch_fractions(clusters: Any, batch: Any) -> np.ndarray:
    table = _contingency(clusters, batch).astype(np.float64)
    return table / table.sum(axis=1, keepdims=True)


def batch_entropy(clusters: Any, batch: Any, base: float = 2.0) -> float:
    """Mean over clusters of the entropy of batch frequencies, H_i = -sum_j p_ij log2 p_ij
    (impa.txt "Entropy and Gini index"); higher means better-mixed batches."""
    p = _cluster_batch_fractions(clusters, batch)
    logs = np.log(np.where(p > 0, p, 1.0)) / np.log(base)
    return float(np.mean(-np.sum(p * logs, axis=1)))


def gini(clusters: Any, batch: Any) -> float:
    """Mean over clusters of the Gini impurity of batch frequencies, G_i = 1 - sum_j p_ij^2
    (impa.txt "Entropy and Gini index")."""
    p = _cluster_batch_fractions(clusters, batch)
    return float(np.mean(1.0 - np.sum(p * p, axis=1)))


# ---------------------------------------------------------------------------------------------
# Silhouette.

@functools.partial(jax.jit, static_argnames=("n_clusters", "metric", "block"))
def _silhouette_samples(x, codes, cluster_group, *, n_clusters, metric, block):
    """Per-sample silhouette (b - a) / max(a, b) where b only looks at clusters of the same
    group (one group: plain silhouette; groups = cell types: scIB's silhouette-batch)."""
    n = x.shape[0]
    x = _prepare(x, metric)
    x_sq = jnp.sum(x * x, axis=1)
    onehot = jax.nn.one_hot(codes, n_clusters, dtype=x.dtype)
    counts = jnp.sum(onehot, axis=0)

    def block_fn(start, q, own):
        d = _block_distances(q, x, x_sq, metric)
        rows = start + jnp.arange(q.shape[0])
        d = jnp.where(rows[:, None] == jnp.arange(n)[None, :], 0.0, d)
        sums = jnp.matmul(d, onehot, precision=HIGHEST)                  # (b, C)
        own_count = counts[own]
        a = jnp.take_along_axis(sums, own[:, None], axis=1)[:, 0] / jnp.maximum(own_count - 1, 1)
        other = ((jnp.arange(n_clusters)[None, :] != own[:, None])
                 & (cluster_group[None, :] == cluster_group[own][:, None])
                 & (counts[None, :] > 0))
        b = jnp.min(jnp.where(other, sums / jnp.maximum(counts, 1.0)[None, :], jnp.inf), axis=1)
        s = (b - a) / jnp.maximum(a, b)
        # Singleton clusters score 0, as do degenerate rows (scikit-learn's nan_to_num).
        return jnp.where((own_count > 1) & jnp.isfinite(s), s, 0.0)

    return _map_row_blocks(block_fn, n, _block_size(n, block), x, codes)


def silhouette(features: Any, labels: Any, metric: str = "euclidean",
               block: int = 512) -> float:
    """Mean silhouette coefficient over samples (scikit-learn `silhouette_score`), computed
    on device in blocks of `block` rows."""
    _check_metric(metric)
    x = _features(features, "features")
    values, codes = _codes(labels, x.shape[0], "labels")
    if not 2 <= len(values) <= x.shape[0] - 1:
        raise ValueError(f"silhouette needs 2 <= number of labels <= N - 1, got {len(values)} "
                         f"labels for N = {x.shape[0]}.")
    s = _silhouette_samples(x, jnp.asarray(codes), jnp.zeros(len(values), jnp.int32),
                            n_clusters=len(values), metric=metric, block=block)
    return float(np.mean(np.asarray(s, np.float64)))


def silhouette_batch(features: Any, batch: Any, labels: Any, scale: bool = True,
                     metric: str = "euclidean", block: int = 512) -> float:
    """scIB's batch ASW (`scib.metrics.silhouette_batch`, impa.txt "Silhouette batch").

    Within each cell-type `labels` group, the silhouette of the *batch* labels is computed per
    cell, |s| taken and, with `scale`, turned into 1 - |s| (1 = batches perfectly mixed). Cells
    are averaged per group, then groups are averaged. Groups with one batch, or with every cell
    in its own batch, are skipped as in scIB.
    """
    _check_metric(metric)
    x = _features(features, "features")
    n = x.shape[0]
    _, batch_codes = _codes(batch, n, "batch")
    _, group_codes = _codes(labels, n, "labels")
    n_batches = int(batch_codes.max()) + 1
    combined, codes = np.unique(group_codes * n_batches + batch_codes, return_inverse=True)
    cluster_group = (combined // n_batches).astype(np.int32)
    kept = []
    for g in range(int(group_codes.max()) + 1):
        members = group_codes == g
        n_in_group = len(np.unique(batch_codes[members]))
        if n_in_group not in (1, int(members.sum())):
            kept.append(g)
    if not kept:
        raise ValueError("silhouette_batch: every `labels` group has a single batch (or one "
                         "cell per batch), so no group can be scored.")
    s = _silhouette_samples(x, jnp.asarray(codes.astype(np.int32)), jnp.asarray(cluster_group),
                            n_clusters=len(combined), metric=metric, block=block)
    s = np.abs(np.asarray(s, np.float64))
    if scale:
        s = 1.0 - s
    return float(np.mean([s[group_codes == g].mean() for g in kept]))


# ---------------------------------------------------------------------------------------------
# Nearest neighbours: kNN accuracy and iLISI.

@functools.partial(jax.jit, static_argnames=("k", "metric", "exclude_self", "block"))
def _knn(queries, refs, *, k, metric, exclude_self, block):
    """Indices and distances (ascending) of the k nearest `refs` of each query row. With
    `exclude_self`, queries are the refs and a row never returns itself."""
    if metric == "cosine":
        queries = queries / jnp.maximum(jnp.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        refs = refs / jnp.maximum(jnp.linalg.norm(refs, axis=1, keepdims=True), 1e-12)
    mean = jnp.mean(refs, axis=0, keepdims=True)
    queries, refs = queries - mean, refs - mean
    n_refs = refs.shape[0]
    r_sq = jnp.sum(refs * refs, axis=1)

    def block_fn(start, q):
        d = _block_distances(q, refs, r_sq, metric)
        if exclude_self:
            rows = start + jnp.arange(q.shape[0])
            d = jnp.where(rows[:, None] == jnp.arange(n_refs)[None, :], jnp.inf, d)
        neg, idx = jax.lax.top_k(-d, k)
        return idx, -neg

    return _map_row_blocks(block_fn, queries.shape[0], _block_size(queries.shape[0], block),
                           queries)


def knn_accuracy(features: Any, labels: Any, k: int = 5, metric: str = "euclidean",
                 query_features: Any = None, query_labels: Any = None,
                 block: int = 512) -> float:
    """Accuracy of a k-nearest-neighbour majority vote (ties go to the smallest label, as in
    scikit-learn's `KNeighborsClassifier`).

    Without queries it is leave-one-out over `features`; with `query_features` and
    `query_labels` the reference set classifies the queries (lumic.txt 3.1: classifier fitted on
    real embeddings, applied to generated ones).
    """
    _check_metric(metric)
    refs = _features(features, "features")
    values, codes = _codes(labels, refs.shape[0], "labels")
    loo = query_features is None
    if loo != (query_labels is None):
        raise ValueError("Pass both `query_features` and `query_labels`, or neither.")
    if loo:
        queries, truth = refs, codes
    else:
        queries = _features(query_features, "query_features")
        if queries.shape[1] != refs.shape[1]:
            raise ValueError(f"`query_features` has {queries.shape[1]} dims but `features` has "
                             f"{refs.shape[1]}.")
        query_labels = np.asarray(query_labels)
        if query_labels.shape != (queries.shape[0],):
            raise ValueError(f"`query_labels` must have one label per query row "
                             f"({queries.shape[0]}), got shape {query_labels.shape}.")
        # Labels never seen in the reference set can never be predicted: code -1.
        pos = np.searchsorted(values, query_labels).clip(0, len(values) - 1)
        truth = np.where(values[pos] == query_labels, pos, -1)
    max_k = refs.shape[0] - 1 if loo else refs.shape[0]
    if not 1 <= k <= max_k:
        raise ValueError(f"`k` must be in [1, {max_k}], got {k}.")
    idx, _ = _knn(queries, refs, k=k, metric=metric, exclude_self=loo, block=block)
    votes = jax.nn.one_hot(jnp.asarray(codes)[idx], len(values), dtype=jnp.int32).sum(axis=1)
    predicted = np.asarray(jnp.argmax(votes, axis=1))
    return float(np.mean(predicted == truth))


@functools.partial(jax.jit, static_argnames=("n_batches", "n_iter"))
def _inverse_simpson(distances, neighbour_batch, perplexity, *, n_batches, n_iter, tol):
    """Harmony's LISI kernel per row: Gaussian weights exp(-beta * d) over the neighbours with
    beta bisected until the entropy equals log(perplexity), then 1 / sum_b (sum of weights of
    neighbours in batch b)^2. Weights are computed relative to the nearest neighbour, which
    gives the same normalised weights without underflow."""
    log_u = jnp.log(perplexity)
    shifted = distances - distances[:, :1]

    def entropy(beta):
        w = jnp.exp(-shifted * beta[:, None])
        total = jnp.sum(w, axis=1)
        h = jnp.log(total) + beta * jnp.sum(shifted * w, axis=1) / total
        return h, w / total[:, None]

    def body(_, state):
        beta, lo, hi, h = state
        active = jnp.abs(h - log_u) >= tol
        up = h > log_u
        lo = jnp.where(active & up, beta, lo)
        hi = jnp.where(active & ~up, beta, hi)
        grown = jnp.where(jnp.isfinite(hi), 0.5 * (beta + hi), 2.0 * beta)
        shrunk = jnp.where(jnp.isfinite(lo), 0.5 * (beta + lo), 0.5 * beta)
        beta = jnp.where(active, jnp.where(up, grown, shrunk), beta)
        h, _ = entropy(beta)
        return beta, lo, hi, h

    n = distances.shape[0]
    beta = jnp.ones((n,), distances.dtype)
    h, _ = entropy(beta)
    init = (beta, jnp.full((n,), -jnp.inf), jnp.full((n,), jnp.inf), h)
    beta, _, _, _ = jax.lax.fori_loop(0, n_iter, body, init)
    _, w = entropy(beta)
    per_batch = jnp.sum(w[:, :, None] * jax.nn.one_hot(neighbour_batch, n_batches), axis=1)
    return 1.0 / jnp.sum(per_batch * per_batch, axis=1)


def ilisi(features: Any, batch: Any, perplexity: float = 30.0, scale: bool = False,
          per_cell: bool = False, block: int = 512) -> float | np.ndarray:
    """Integration LISI: the effective number of batches around each cell (impa.txt "iLISI").

    Follows Harmony's `compute_lisi` (Korsunsky et al. 2019; harmonypy): the 3 * perplexity
    nearest neighbours (Euclidean, self excluded), Gaussian weights on the distances with the
    bandwidth set by perplexity (tolerance 1e-5, at most 50 bisection steps), inverse Simpson
    index of the batch labels. Returns the median over cells as scIB reports it; with `scale`,
    scIB's normalisation (median - 1) / (n_batches - 1) to [0, 1]; with `per_cell`, the (N,)
    per-cell values instead.
    """
    x = _features(features, "features")
    n = x.shape[0]
    values, codes = _codes(batch, n, "batch")
    if perplexity <= 0:
        raise ValueError(f"`perplexity` must be > 0, got {perplexity}.")
    k = int(3 * perplexity)
    if not 1 <= k <= n - 1:
        raise ValueError(f"ilisi needs 3 * perplexity = {k} neighbours but there are only {n} "
                         f"cells; lower `perplexity`.")
    idx, dist = _knn(x, x, k=k, metric="euclidean", exclude_self=True, block=block)
    lisi = _inverse_simpson(dist, jnp.asarray(codes)[idx], jnp.float32(perplexity),
                            n_batches=len(values), n_iter=50, tol=1e-5)
    lisi = np.asarray(lisi, np.float64)
    if per_cell:
        return lisi
    median = float(np.median(lisi))
    if scale:
        if len(values) < 2:
            raise ValueError("ilisi(scale=True) needs at least 2 batches.")
        return (median - 1.0) / (len(values) - 1.0)
    return median


# ---------------------------------------------------------------------------------------------
# Fingerprints.

@functools.partial(jax.jit, static_argnames=("block",))
def _tanimoto(a, b, *, block):
    b_count = jnp.sum(b, axis=1)

    def block_fn(_, q):
        inter = jnp.matmul(q, b.T, precision=HIGHEST)
        union = jnp.sum(q, axis=1)[:, None] + b_count[None, :] - inter
        return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)

    return _map_row_blocks(block_fn, a.shape[0], _block_size(a.shape[0], block), a)


def tanimoto(a: Any, b: Any = None, block: int = 1024) -> np.ndarray:
    """Tanimoto similarity |A & B| / |A | B| between rows of two fingerprint bit matrices
    (impa.txt eq. 15), (Na, Nb); `b` defaults to `a`. Any nonzero counts as a set bit; two
    empty fingerprints score 0 (RDKit's convention, as `morphjax.chem.tanimoto`). Bit counts
    are exact in float32 up to 2^24 bits."""
    a = jnp.asarray(a)
    b = a if b is None else jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"tanimoto needs two (N, n_bits) matrices with equal n_bits, got "
                         f"{a.shape} and {b.shape}.")
    a = (a != 0).astype(jnp.float32)
    b = (b != 0).astype(jnp.float32)
    return np.asarray(_tanimoto(a, b, block=block), np.float64)
