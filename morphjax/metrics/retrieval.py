"""Retrieval metrics for profiles: copairs mAP, interpolated MAP, precision@k, folds of enrichment.

Two families, both computed on device one block of queries at a time, so nothing N x N ever
reaches the host (N up to 50k profiles):

* `average_precision` / `mean_average_precision` follow copairs 0.5 (cytomining/copairs): a query's
  rank list holds every positive and negative *pair* it belongs to, defined by metadata columns;
  cosine similarities are float32, ranked by `1 - sim` with ties putting positives first; mAP
  p-values come from a permutation null per (n_pos_pairs, n_total_pairs) and are BH-corrected.
* `interpolated_map`, `precision_at_k` and `folds_of_enrichment` follow the Cell Painting CNN
  paper ("Evaluation metrics"; DeepProfilerExperiments `profiling/`): every other treatment is in
  a query's list, a hit shares at least one annotation with the query, and queries are the
  treatments with at least one other hit.

Query blocks are split over the mesh when the input arrays are sharded along their first axis;
the candidates are then replicated, and results equal the single-device ones.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

HIGHEST = jax.lax.Precision.HIGHEST

# Rows of a permutation-null block: rows x L entries are held at once.
_NULL_CHUNK_ELEMENTS = 1 << 25


# ----------------------------------------------------------------------------------------------
# Device placement: query blocks, optionally split over a mesh.
# ----------------------------------------------------------------------------------------------


def _sample_mesh(x: Any) -> tuple[Any, Any]:
    """(mesh, axis) when `x` is a jax.Array sharded along its first axis, else (None, None)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.spec) and sharding.spec[0]:
        mesh = sharding.mesh
        # Auto axes: the kernels gather query rows and let XLA place them (Explicit axes, the
        # jax.make_mesh default, would demand an output sharding on every gather).
        auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
        return auto, sharding.spec[0]
    return None, None


def _axis_size(mesh, axis) -> int:
    if mesh is None:
        return 1
    axes = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[a] for a in axes]))


class _Placement:
    """Puts candidates (replicated) and query blocks (split over the mesh) on device."""

    def __init__(self, mesh, axis, n: int, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.mesh, self.axis, self.n = mesh, axis, n
        size = _axis_size(mesh, axis)
        block = min(block_size, n)
        self.block = -(-block // size) * size

    def full(self, x: Any) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, NamedSharding(self.mesh, P()))

    def part(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        spec = P(self.axis, *([None] * (np.ndim(x) - 1)))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def blocks(self) -> Iterator[tuple[int, int, jax.Array]]:
        """Yields (start, stop, query indices); the last block is padded with index n - 1."""
        for start in range(0, self.n, self.block):
            stop = min(start + self.block, self.n)
            idx = np.minimum(np.arange(start, start + self.block), self.n - 1).astype(np.int32)
            yield start, stop, self.part(idx)


def _check_features(features: Any, name: str = "features") -> None:
    if np.ndim(features) != 2:
        raise ValueError(f"{name} must be 2-D (profiles x features), got shape "
                         f"{np.shape(features)}")


@jax.jit
def _unit_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows scaled to unit norm (float32), and whether any row is non-finite or all zero."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    bad = ~jnp.isfinite(x).all(axis=1) | (norm[:, 0] == 0)
    return x / norm, bad


def _unit_features(features: Any, place: _Placement, name: str = "features") -> jax.Array:
    unit, bad = _unit_rows(place.full(features))
    bad = np.asarray(bad)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(f"{name} rows {rows} (of {int(bad.sum())}) are all zero or contain "
                         "NaN/inf; cosine similarity is undefined for them. Drop or fix them.")
    return unit


# ----------------------------------------------------------------------------------------------
# copairs average precision.
# ----------------------------------------------------------------------------------------------


def _pair_mask(q_codes, codes, same: tuple[int, ...], diff: tuple[int, ...]) -> jax.Array:
    """(B, N): equal on every `same` column and different on every `diff` column (copairs)."""
    mask = jnp.ones((q_codes.shape[0], codes.shape[0]), bool)
    for c in same:
        mask &= q_codes[:, c][:, None] == codes[None, :, c]
    for c in diff:
        mask &= q_codes[:, c][:, None] != codes[None, :, c]
    return mask


@functools.partial(jax.jit, static_argnames=("rules",))
def _ap_block(unit, codes, idx, *, rules):
    """Per-query AP over the query's positive and negative pairs, copairs ranking.

    copairs sorts a query's pairs by `1 - sim` (float32) with a stable sort over the positives
    listed before the negatives, so within a tie all positives come first. A pair that satisfies
    both rules is listed twice (once as each). So for a positive at sorted position t,
    rank = TP(t) + #negatives with a strictly smaller key, whatever the order inside a tie.
    """
    pos_same, pos_diff, neg_same, neg_diff = rules
    n = unit.shape[0]
    sim = jnp.matmul(unit[idx], unit.T, precision=HIGHEST)
    q_codes = codes[idx]
    not_self = idx[:, None] != jnp.arange(n)[None, :]
    pos = _pair_mask(q_codes, codes, pos_same, pos_diff) & not_self
    neg = _pair_mask(q_codes, codes, neg_same, neg_diff) & not_self
    key = jnp.where(pos | neg, 1.0 - sim, jnp.inf)
    key, pos, neg = jax.lax.sort((key, pos.astype(jnp.int32), neg.astype(jnp.int32)),
                                 dimension=1, num_keys=1)
    tp = jnp.cumsum(pos, axis=1)
    neg_excl = jnp.cumsum(neg, axis=1) - neg
    t = jnp.arange(n)[None, :]
    is_start = jnp.concatenate(
        [jnp.ones_like(key[:, :1], bool), key[:, 1:] != key[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(is_start, t, 0), axis=1)
    neg_before = jnp.take_along_axis(neg_excl, start, axis=1)
    tp64 = tp.astype(jnp.float64)
    prec = tp64 / jnp.maximum(tp64 + neg_before.astype(jnp.float64), 1.0)
    n_pos = tp[:, -1]
    ap = jnp.sum(jnp.where(pos == 1, prec, 0.0), axis=1) / n_pos.astype(jnp.float64)
    return ap, n_pos, n_pos + jnp.sum(neg, axis=1)


def _as_columns(cols: Any, name: str) -> list[str]:
    if isinstance(cols, str):
        return [cols]
    if isinstance(cols, dict):
        raise ValueError(f"{name}: dict ({{'all': ..., 'any': ...}}) rules are not supported; "
                         "pass a list of metadata column names")
    return list(cols)


def _check_rule(meta: pd.DataFrame, same: list[str], diff: list[str], prefix: str) -> None:
    for col in same + diff:
        if col not in meta.columns:
            raise ValueError(f"{prefix}_sameby/{prefix}_diffby column {col!r} is not in metadata "
                             f"(columns: {list(meta.columns)})")
    if not (same or diff):
        raise ValueError(f"{prefix}_sameby and {prefix}_diffby are both empty; give at least one "
                         "column")
    if set(same) & set(diff):
        raise ValueError(f"{prefix}_sameby and {prefix}_diffby must be disjoint, both have "
                         f"{sorted(set(same) & set(diff))}")


def _harmonic(n: np.ndarray) -> np.ndarray:
    """H_n for an integer array, summed in the same order as copairs (1/1 + 1/2 + ...)."""
    top = int(n.max()) if n.size else 0
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, top + 1))])
    return table[n]


def _normalized_ap(ap: np.ndarray, m: np.ndarray, total: np.ndarray) -> np.ndarray:
    """copairs 0.5 normalised AP: (AP - mu0) / (1 - mu0), mu0 = expected AP of a random ranking,
    mu0 = (1/L) [ (M-1)/(L-1) (L - H_L) + H_L ], clipped to [-1, 1]."""
    m = m.astype(np.int64)
    total = total.astype(np.int64)
    h = _harmonic(total)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = (1.0 / total) * (((m - 1.0) / (total - 1.0)) * (total - h) + h)
    mu0 = np.where(total == 1, (m == 1).astype(float), mu0)
    mu0 = np.where(m == 0, 0.0, mu0)
    mu0 = np.where((m == total) & (total > 1), 1.0, mu0)
    out = (ap - mu0) / np.maximum(1 - mu0, 1e-10)
    return np.clip(out, -1.0, 1.0)


def average_precision(features: Any, metadata: pd.DataFrame, pos_sameby: Sequence[str],
                      pos_diffby: Sequence[str], neg_sameby: Sequence[str],
                      neg_diffby: Sequence[str], *, block_size: int = 1024) -> pd.DataFrame:
    """Per-profile average precision with copairs semantics (`copairs.map.average_precision`).

    Positive pairs are equal on every `pos_sameby` column and different on every `pos_diffby`
    column; negative pairs likewise with `neg_*`. Each profile is a query ranked against the
    profiles it is paired with, by float32 cosine similarity; ties rank positives first.

    Returns `metadata` (index reset) plus `n_pos_pairs`, `n_total_pairs`, `average_precision`
    (NaN for profiles without positive pairs) and `normalized_average_precision`, as copairs.
    Similarities and ranks are computed on device, `block_size` queries at a time.
    """
    if not isinstance(metadata, pd.DataFrame):
        raise TypeError(f"metadata must be a pandas DataFrame, got {type(metadata).__name__}")
    _check_features(features)
    if len(metadata) != np.shape(features)[0]:
        raise ValueError(f"metadata has {len(metadata)} rows but features has "
                         f"{np.shape(features)[0]}; they must describe the same profiles")
    pos_same, pos_diff = _as_columns(pos_sameby, "pos_sameby"), _as_columns(pos_diffby,
                                                                             "pos_diffby")
    neg_same, neg_diff = _as_columns(neg_sameby, "neg_sameby"), _as_columns(neg_diffby,
                                                                             "neg_diffby")
    _check_rule(metadata, pos_same, pos_diff, "pos")
    _check_rule(metadata, neg_same, neg_diff, "neg")
    columns = list(dict.fromkeys(pos_same + pos_diff + neg_same + neg_diff))
    missing = metadata[columns].isna().any()
    if missing.any():
        raise ValueError(f"metadata columns {list(missing[missing].index)} have missing values; "
                         "fill or drop those rows first")

    meta = metadata.reset_index(drop=True).copy()
    n = len(meta)
    codes = np.stack([pd.factorize(meta[c])[0] for c in columns], axis=1).astype(np.int32)
    pos_of = {c: i for i, c in enumerate(columns)}
    rules = tuple(tuple(pos_of[c] for c in cols)
                  for cols in (pos_same, pos_diff, neg_same, neg_diff))

    mesh, axis = _sample_mesh(features)
    place = _Placement(mesh, axis, n, block_size)
    ap = np.full(n, np.nan)
    n_pos = np.zeros(n, np.int64)
    n_total = np.zeros(n, np.int64)
    with jax.enable_x64(True):
        unit = _unit_features(features, place)
        codes_dev = place.full(codes)
        for start, stop, idx in place.blocks():
            a, p, t = jax.device_get(_ap_block(unit, codes_dev, idx, rules=rules))
            ap[start:stop], n_pos[start:stop], n_total[start:stop] = (
                a[:stop - start], p[:stop - start], t[:stop - start])
    if n_pos.sum() == 0:
        raise ValueError("no positive pairs: no two profiles satisfy pos_sameby/pos_diffby")
    if (n_total - n_pos).sum() == 0:
        raise ValueError("no negative pairs: no two profiles satisfy neg_sameby/neg_diffby")

    paired = n_total > 0
    ap[~paired] = np.nan
    norm = np.full(n, np.nan)
    norm[paired] = _normalized_ap(ap[paired], n_pos[paired], n_total[paired])
    meta["n_pos_pairs"] = n_pos
    meta["n_total_pairs"] = n_total
    meta["average_precision"] = ap
    meta["normalized_average_precision"] = norm
    return meta


# ----------------------------------------------------------------------------------------------
# copairs mean average precision and permutation p-values.
# ----------------------------------------------------------------------------------------------


def _null_ap(n_pos: int, n_total: int, null_size: int, seed: int) -> np.ndarray:
    """AP of `null_size` random rankings with n_pos positives among n_total (copairs' null).

    Reproduces copairs' random stream: `default_rng(seed).permuted` over rows of arange(L), the
    first M positions of each row sorted, AP = mean_j j / (r_j + 1) in float32. Rows are drawn
    in chunks (the row-by-row stream is the same) to bound memory.
    """
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if n_total < 2**16 else np.uint32
    out = np.empty(null_size, np.float32)
    rows = max(1, _NULL_CHUNK_ELEMENTS // n_total)
    numer = np.arange(1, n_pos + 1, dtype=np.float32)
    for start in range(0, null_size, rows):
        stop = min(start + rows, null_size)
        perm = np.tile(np.arange(n_total, dtype=dtype), (stop - start, 1))
        rng.permuted(perm, axis=1, out=perm)
        ranks = np.sort(perm[:, :n_pos], axis=1)
        out[start:stop] = (numer / (ranks + 1)).sum(axis=1) / n_pos
    return out


def _benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH step-up adjusted p-values (statsmodels `multipletests(method='fdr_bh')`)."""
    p = np.asarray(p, float)
    if p.size == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] / (np.arange(1, p.size + 1) / p.size)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.minimum(ranked, 1.0)
    return out


def mean_average_precision(ap_table: pd.DataFrame, sameby: Sequence[str], null_size: int,
                           threshold: float, seed: int | None) -> pd.DataFrame:
    """mAP per group and its permutation p-value, as `copairs.map.mean_average_precision`.

    Profiles with NaN AP or no positive pairs are dropped; mAP is the mean AP per `sameby` group.
    Its null is the element-wise mean of the members' null AP vectors, one per distinct
    (n_pos_pairs, n_total_pairs); p = (#{null > mAP} + 1) / (null_size + 1), then BH q-values
    (`corrected_p_value`) and `below_p` / `below_corrected_p` at `threshold`. With the same seed
    the numbers equal copairs run with a fresh cache directory (copairs' on-disk null cache is
    keyed without the per-configuration seed, so a warm cache can change its p-values).
    """
    need = ["average_precision", "n_pos_pairs", "n_total_pairs"]
    if not isinstance(ap_table, pd.DataFrame) or any(c not in ap_table.columns for c in need):
        raise ValueError(f"ap_table must be the DataFrame from average_precision (columns {need})")
    sameby = _as_columns(sameby, "sameby")
    for col in sameby:
        if col not in ap_table.columns:
            raise ValueError(f"sameby column {col!r} is not in ap_table")
    if int(null_size) < 1:
        raise ValueError(f"null_size must be >= 1, got {null_size}")
    null_size = int(null_size)

    table = ap_table[ap_table["average_precision"].notna() & (ap_table["n_pos_pairs"] > 0)]
    table = table.reset_index(drop=True)
    confs = table[["n_pos_pairs", "n_total_pairs"]].to_numpy().astype(np.int64)
    confs, conf_of = np.unique(confs, axis=0, return_inverse=True)
    conf_of = conf_of.reshape(-1)
    seeds = np.random.default_rng(seed).integers(8096, size=len(confs))
    nulls = np.empty((len(confs), null_size), np.float32)
    for i, (m, total) in enumerate(confs):
        nulls[i] = _null_ap(int(m), int(total), null_size, seeds[i])

    agg = {"average_precision": ["mean", lambda x: list(x.index)]}
    names = ["mean_average_precision", "indices"]
    if "normalized_average_precision" in table.columns:
        agg["normalized_average_precision"] = "mean"
        names.append("mean_normalized_average_precision")
    out = table.groupby(sameby, observed=True, as_index=False).agg(agg)
    out.columns = sameby + names
    p_values = []
    for score, members in zip(out["mean_average_precision"], out["indices"]):
        null = nulls[conf_of[members]].mean(axis=0)
        p_values.append((int((null > score).sum()) + 1) / (null_size + 1))
    out["p_value"] = np.asarray(p_values, float)
    out["corrected_p_value"] = _benjamini_hochberg(out["p_value"].to_numpy())
    out["below_p"] = out["p_value"] < threshold
    out["below_corrected_p"] = out["corrected_p_value"] < threshold
    return out


# ----------------------------------------------------------------------------------------------
# Treatment-level retrieval (Cell Painting CNN paper): similarity rows and annotation matches.
# ----------------------------------------------------------------------------------------------


def _multi_hot(labels: Any, n: int, sep: str) -> np.ndarray:
    """(N, T) float32 token indicators; a string label is split on `sep` (e.g. 'a|b')."""
    if isinstance(labels, (pd.Series, pd.Index)):
        labels = labels.tolist()
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries but there are {n} profiles")
    tokens = []
    for i, lab in enumerate(labels):
        if lab is None or (isinstance(lab, float) and np.isnan(lab)):
            raise ValueError(f"labels[{i}] is missing; drop unannotated profiles first")
        if isinstance(lab, str):
            tokens.append({t for t in lab.split(sep) if t})
        elif isinstance(lab, (list, tuple, set, frozenset)):
            tokens.append({str(t) for t in lab})
        else:
            tokens.append({str(lab)})
    vocab = {t: j for j, t in enumerate(sorted(set().union(*tokens)))}
    hot = np.zeros((n, max(len(vocab), 1)), np.float32)
    for i, toks in enumerate(tokens):
        hot[i, [vocab[t] for t in toks]] = 1.0
    return hot


@jax.jit
def _sim_from_unit(unit, idx):
    return jnp.matmul(unit[idx], unit.T, precision=HIGHEST)


@jax.jit
def _sim_from_matrix(sim, idx):
    return sim[idx]


@jax.jit
def _match_rows(hot, idx):
    return jnp.matmul(hot[idx], hot.T, precision=HIGHEST) > 0.5


def _query_rows(similarity: Any, features: Any, labels: Any, sep: str,
                block_size: int) -> Iterator[tuple[int, int, jax.Array, jax.Array, jax.Array]]:
    """Yields (start, stop, idx, similarity rows (B, N), match rows (B, N)) on device."""
    if (similarity is None) == (features is None):
        raise ValueError("give exactly one of similarity (N x N) or features (N x d)")
    if features is not None:
        _check_features(features)
        source = features
    else:
        if np.ndim(similarity) != 2 or np.shape(similarity)[0] != np.shape(similarity)[1]:
            raise ValueError(f"similarity must be a square N x N matrix, got shape "
                             f"{np.shape(similarity)}")
        source = similarity
    n = np.shape(source)[0]
    if n < 2:
        raise ValueError(f"need at least 2 profiles, got {n}")
    hot = _multi_hot(labels, n, sep)
    mesh, axis = _sample_mesh(source)
    place = _Placement(mesh, axis, n, block_size)
    hot = place.full(hot)
    if features is not None:
        unit = _unit_features(features, place)
        rows_of = lambda start, stop, idx: _sim_from_unit(unit, idx)
    elif isinstance(similarity, jax.Array):
        sim = similarity if mesh is None else place.full(similarity)
        rows_of = lambda start, stop, idx: _sim_from_matrix(sim, idx)
    else:
        sim_host = np.asarray(similarity)

        def rows_of(start, stop, idx):
            rows = sim_host[start:stop]
            pad = place.block - (stop - start)
            if pad:
                rows = np.concatenate([rows, np.repeat(rows[-1:], pad, axis=0)])
            return place.part(rows)
    for start, stop, idx in place.blocks():
        rows = rows_of(start, stop, idx)
        if not bool(jnp.isfinite(rows).all()):
            raise ValueError(f"similarity rows {start}..{stop - 1} contain NaN or inf")
        yield start, stop, idx, rows, _match_rows(hot, idx)


def _queries(n_matches: np.ndarray) -> np.ndarray:
    """Queries are profiles with at least one other hit (an MoA with >= 2 treatments)."""
    if not (n_matches > 0).any():
        raise ValueError("no profile shares an annotation with another one; there is no query")
    return n_matches > 0


@functools.partial(jax.jit, static_argnames=("lo", "hi"))
def _order_stats_block(rows, idx, *, lo, hi):
    """The lo-th and hi-th smallest similarity of each query to the other profiles."""
    n = rows.shape[1]
    not_self = idx[:, None] != jnp.arange(n)[None, :]
    ranked = jnp.sort(jnp.where(not_self, rows, -jnp.inf), axis=1)[:, 1:]
    return ranked[:, lo], ranked[:, hi]


@jax.jit
def _enrichment_block(rows, match, idx, thr):
    """2x2 table per query: hits / non-hits strictly above `thr`, and at or below it."""
    n = rows.shape[1]
    not_self = idx[:, None] != jnp.arange(n)[None, :]
    above = (rows.astype(jnp.float64) > thr[:, None]) & not_self
    below = (~above) & not_self
    count = lambda m: jnp.sum(m, axis=1, dtype=jnp.int64)
    return jnp.stack([count(above & match), count(above & ~match), count(below & match),
                      count(below & ~match)], axis=1)


def _lerp(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """numpy's 'linear' percentile interpolation, with its two-sided formula."""
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


def folds_of_enrichment(similarity: Any, labels: Any, top: float = 0.01, *,
                        features: Any = None, sep: str = "|", block_size: int = 512,
                        return_table: bool = False) -> float | pd.DataFrame:
    """Average folds of enrichment at the top `top` fraction (Cell Painting CNN paper).

    For each query, over all other profiles: threshold = its own `100 (1 - top)` percentile
    (numpy linear interpolation; per query, as DeepProfilerExperiments `enrichment_analysis`),
    a 2x2 table of hits / non-hits above (strictly) and at-or-below it, and the one-sided Fisher
    exact odds ratio v11 v22 / (v12 v21) (scipy `fisher_exact` semantics: NaN when a margin is 0,
    inf replaced by v22 as the reference code does). The score is the mean over queries, i.e.
    profiles sharing any `sep`-separated annotation with at least one other profile.

    `similarity` is an N x N matrix; or pass `similarity=None, features=...` to get cosine
    similarities computed on device in blocks. `return_table=True` returns the per-query tables,
    odds ratios and one-sided p-values instead of the mean.
    """
    if not 0.0 < top < 1.0:
        raise ValueError(f"top must be a fraction in (0, 1), got {top}")
    n = np.shape(similarity if features is None else features)[0]
    m = n - 1
    percentile = 100.0 * (1.0 - top)
    virtual = (m - 1) * (percentile / 100.0)
    lo = int(np.floor(virtual))
    hi = min(lo + 1, m - 1)
    gamma = float(virtual - lo)

    tables = np.zeros((n, 4), np.int64)
    thresholds = np.zeros(n)
    with jax.enable_x64(True):
        for start, stop, idx, rows, match in _query_rows(similarity, features, labels, sep,
                                                         block_size):
            a, b = jax.device_get(_order_stats_block(rows, idx, lo=lo, hi=hi))
            thr = _lerp(a.astype(np.float64), b.astype(np.float64), gamma)
            thr_dev = jax.device_put(thr, idx.sharding)
            counts = jax.device_get(_enrichment_block(rows, match, idx, thr_dev))
            tables[start:stop] = counts[:stop - start]
            thresholds[start:stop] = thr[:stop - start]
    v11, v12, v21, v22 = tables.T
    is_query = _queries(v11 + v21)
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = np.where((v21 > 0) & (v12 > 0), (v11 * v22) / (v21 * v12), np.inf)
    zero_margin = ((v11 + v12) == 0) | ((v21 + v22) == 0) | ((v11 + v21) == 0) | (
        (v12 + v22) == 0)
    odds = np.where(zero_margin, np.nan, odds)
    folds = np.where(np.isinf(odds), v22.astype(float), odds)
    if not return_table:
        return float(np.mean(folds[is_query]))
    from scipy.stats import hypergeom
    p_value = hypergeom.cdf(v12, v11 + v12 + v21 + v22, v11 + v12, v12 + v22)
    p_value = np.where(zero_margin, 1.0, p_value)
    frame = pd.DataFrame({"query": np.arange(n), "threshold": thresholds, "v11": v11,
                          "v12": v12, "v21": v21, "v22": v22, "odds_ratio": odds,
                          "folds": folds, "p_value": p_value})
    return frame[is_query].reset_index(drop=True)


@functools.partial(jax.jit, static_argnames=("k",))
def _precision_at_k_block(rows, match, idx, *, k):
    """Hits among each query's top k other profiles (ties broken by lower index first)."""
    n = rows.shape[1]
    not_self = idx[:, None] != jnp.arange(n)[None, :]
    key = jnp.where(not_self, -rows.astype(jnp.float64), jnp.inf)
    order = jnp.broadcast_to(jnp.arange(n), rows.shape)
    _, _, hit = jax.lax.sort((key, order, (match & not_self).astype(jnp.int32)), dimension=1,
                             num_keys=2)
    return jnp.sum(hit[:, :k], axis=1), jnp.sum(match & not_self, axis=1)


def precision_at_k(similarity: Any, labels: Any, k: int, *, features: Any = None,
                   sep: str = "|", block_size: int = 512) -> float:
    """Mean over queries of the fraction of hits among the k most similar other profiles.

    Queries and hits as in `folds_of_enrichment`; the query itself is excluded from its list
    (DeepProfilerExperiments ranks `ranking[1:]` after a stale index; we exclude self exactly).
    Equal similarities are ordered by profile index (a stable sort).
    """
    n = np.shape(similarity if features is None else features)[0]
    if not 1 <= int(k) <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] (the other profiles), got {k}")
    hits = np.zeros(n, np.int64)
    n_matches = np.zeros(n, np.int64)
    with jax.enable_x64(True):
        for start, stop, idx, rows, match in _query_rows(similarity, features, labels, sep,
                                                         block_size):
            h, c = jax.device_get(_precision_at_k_block(rows, match, idx, k=int(k)))
            hits[start:stop], n_matches[start:stop] = h[:stop - start], c[:stop - start]
    is_query = _queries(n_matches)
    return float(np.mean(hits[is_query] / int(k)))


@functools.partial(jax.jit, static_argnames=("recall_points",))
def _interpolated_ap_block(rows, match, idx, *, recall_points):
    """Mean over the recall grid of p_inter(r) = max_{r' >= r} p(r') for each query.

    Precision/recall are taken at each distinct similarity (a tie is one operating point, as in
    sklearn's `precision_recall_curve`); self sorts last and is left out. The grid is
    r_g = g / (R - 1); recall TP/M >= r_g is decided exactly in integers, TP >= ceil(g M / (R-1)).
    """
    n = rows.shape[1]
    not_self = idx[:, None] != jnp.arange(n)[None, :]
    key = jnp.where(not_self, -rows.astype(jnp.float64), jnp.inf)
    key, hit = jax.lax.sort((key, (match & not_self).astype(jnp.int64)), dimension=1,
                            num_keys=1)
    tp = jnp.cumsum(hit, axis=1)
    rank = jnp.arange(1, n + 1, dtype=jnp.float64)[None, :]
    last = jnp.arange(n)[None, :] == n - 1
    is_end = jnp.concatenate([key[:, 1:] != key[:, :-1], jnp.ones_like(key[:, :1], bool)],
                             axis=1) & ~last
    prec = jnp.where(is_end, tp.astype(jnp.float64) / rank, -jnp.inf)
    best_after = jax.lax.cummax(prec, axis=1, reverse=True)
    n_pos = tp[:, n - 2]
    g = jnp.arange(recall_points, dtype=jnp.int64)[None, :]
    need = (g * n_pos[:, None] + recall_points - 2) // (recall_points - 1)
    tp = jnp.where(last, n + 1, tp)
    first = jax.vmap(lambda t, v: jnp.searchsorted(t, v, side="left"))(tp, need)
    p_inter = jnp.take_along_axis(best_after, first, axis=1)
    return jnp.mean(p_inter, axis=1), n_pos


def interpolated_map(similarity: Any, labels: Any, *, features: Any = None,
                     recall_points: int | None = None, sep: str = "|",
                     block_size: int = 512) -> float:
    """Interpolated-precision mean average precision (Cell Painting CNN paper, eq. 3-5).

    Each query ranks all other profiles by similarity; precision and recall are taken down the
    list, interpolated as p_inter(r) = max_{r' >= r} p(r') on a common grid of `recall_points`
    recall values g / (R - 1), g = 0..R-1 (default R = N, the number of profiles, as the
    reference code's linspace), averaged over the grid per query and then over queries. Recall
    is compared with the grid exactly (integers), not in floating point. Not copairs' AP.
    """
    n = np.shape(similarity if features is None else features)[0]
    r = n if recall_points is None else int(recall_points)
    if r < 2:
        raise ValueError(f"recall_points must be >= 2, got {recall_points}")
    aps = np.zeros(n)
    n_pos = np.zeros(n)
    with jax.enable_x64(True):
        for start, stop, idx, rows, match in _query_rows(similarity, features, labels, sep,
                                                         block_size):
            a, p = jax.device_get(_interpolated_ap_block(rows, match, idx, recall_points=r))
            aps[start:stop], n_pos[start:stop] = a[:stop - start], p[:stop - start]
    is_query = _queries(n_pos)
    return float(np.mean(aps[is_query]))
