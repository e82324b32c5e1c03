"""`morphjax bench metrics`: metric kernels against the field's references, side by side, one run.

Each row times morphjax (jitted, on the default device) and the reference the field uses today on
the same inputs: SciPy `sqrtm` FID (pytorch-fid's formula), a NumPy KID (torch-fidelity's
estimator), the `prdc` package and the `copairs` package when installed. Timings are the best of
`repeats` runs after one warm-up (compilation excluded); the value columns show both agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import pandas as pd
import scipy.linalg

from morphjax import metrics


def _best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    value = fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        value = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, value


def scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """pytorch-fid's formula in float64 with scipy.linalg.sqrtm."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def numpy_kid(real: np.ndarray, fake: np.ndarray, subsets: int, subset_size: int,
              seed: int) -> float:
    """torch-fidelity's unbiased polynomial-kernel MMD^2, averaged over the same random subsets."""
    rng = np.random.RandomState(seed)
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), subset_size, replace=False)].astype(np.float64)
        y = fake[rng.choice(len(fake), subset_size, replace=False)].astype(np.float64)
        kxx, kyy, kxy = [(a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
        m = subset_size
        values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                      + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(values))


def _features(n: int, d: int, shift: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 64)).astype(np.float32)
    w = rng.standard_normal((64, d)).astype(np.float32) / 8
    return np.maximum(z @ w + shift + 0.1 * rng.standard_normal((n, d)).astype(np.float32), 0)


def _profiles(n: int, d: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, max(n // 5, 2), n)
    centres = rng.standard_normal((groups.max() + 1, d)).astype(np.float32)
    x = centres[groups] + rng.standard_normal((n, d)).astype(np.float32)
    meta = pd.DataFrame({"Metadata_Perturbation": groups, "Metadata_Plate": rng.integers(0, 4, n)})
    return x, meta


def bench_metrics(fid_sizes: Sequence[int] = (10_000, 50_000), map_sizes: Sequence[int] = (5_000, 20_000),
                  dim: int = 2048, repeats: int = 1) -> pd.DataFrame:
    rows = []

    def add(metric, size, ours, reference_name, reference):
        t_ours, v_ours = _best_time(ours, repeats)
        row = dict(metric=metric, n=size, morphjax_s=t_ours, morphjax_value=_scalar(v_ours),
                   reference=reference_name, reference_s=float("nan"), reference_value=float("nan"))
        if reference is not None:
            t_ref, v_ref = _best_time(reference, max(1, repeats // 2))
            row.update(reference_s=t_ref, reference_value=_scalar(v_ref))
        row["speedup"] = row["reference_s"] / row["morphjax_s"]
        row["items_per_s"] = size / row["morphjax_s"]
        rows.append(row)
        print(_format_row(row), flush=True)

    print(_HEADER)
    for n in fid_sizes:
        real, fake = _features(n, dim, 0.0, 0), _features(n, dim, 0.05, 1)
        add("fid", n, lambda: metrics.fid(real, fake), "scipy sqrtm f64",
            lambda: scipy_fid(real, fake))
        add("kid", n, lambda: metrics.kid(real, fake, subsets=100, subset_size=1000, seed=0)[0],
            "numpy (torch-fidelity)", lambda: numpy_kid(real, fake, 100, 1000, 0))
    n = min(fid_sizes)
    real, fake = _features(n, 64, 0.0, 0), _features(n, 64, 0.05, 1)
    try:
        import prdc as prdc_package
        reference = lambda: prdc_package.compute_prdc(real, fake, nearest_k=5)["coverage"]  # noqa: E731
    except ImportError:
        reference = None
    add("density/coverage (d=64)", n, lambda: metrics.prdc(real, fake, k=5)["coverage"],
        "prdc package", reference)
    for n in map_sizes:
        x, meta = _profiles(n, 256, 0)
        args = dict(pos_sameby=["Metadata_Perturbation"], pos_diffby=[],
                    neg_sameby=[], neg_diffby=["Metadata_Perturbation"])
        try:
            import copairs.map as copairs_map
            reference = lambda: copairs_map.average_precision(meta, x, **args)["average_precision"].mean()  # noqa: E731
        except ImportError:
            reference = None
        add("mAP per query (d=256)", n,
            lambda: metrics.average_precision(x, meta, **args)["average_precision"].mean(),
            "copairs", reference)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} x{jax.device_count()} ({device.platform}), jax {jax.__version__}")
    return pd.DataFrame(rows)


_HEADER = (f"{'metric':<26}{'n':>8}{'morphjax s':>12}{'reference':>24}{'ref s':>10}"
           f"{'speedup':>9}{'items/s':>11}{'value (ours / ref)':>26}")


def _scalar(value) -> float:
    return float(np.asarray(value))


def _format_row(row: dict) -> str:
    return (f"{row['metric']:<26}{row['n']:>8}{row['morphjax_s']:>12.3f}{row['reference']:>24}"
            f"{row['reference_s']:>10.3f}{row['speedup']:>9.1f}{row['items_per_s']:>11.0f}"
            f"{row['morphjax_value']:>13.6g} / {row['reference_value']:<11.6g}")
