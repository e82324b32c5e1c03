"""`morphjax bench metrics` / `bench features`: morphjax kernels against the field's references,
side by side, one run.

Each row times morphjax (jitted, on the default device) and the reference the field uses today on
the same inputs: SciPy `sqrtm` FID (pytorch-fid's formula), a NumPy KID (torch-fidelity's
estimator), the `prdc` package and the `copairs` package when installed; classical cell features
against the same families computed per crop with scikit-image (threshold_otsu, label,
regionprops, graycomatrix) and SciPy (grey_opening). Timings are the best of `repeats` runs after
one warm-up (compilation excluded); the value columns show both agree.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import pandas as pd
import scipy.linalg
import scipy.ndimage

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



# ------------------------------------------------------------------------------------------
# `morphjax bench features`: classical features, morphjax (jit, batched) vs scikit-image.
# ------------------------------------------------------------------------------------------

# Crops per channel count: the tiny synthetic screen with that many channels, and its cell stain.
_FEATURE_SCREENS = {3: ("bbbc021_like", "Tubulin"), 5: ("cellpainting_like", "AGP")}


def synthetic_crops(n: int, size: int = 96, channels: int = 3, seed: int = 0
                    ) -> tuple[np.ndarray, tuple[str, ...], str]:
    """`n` uint8 single-cell crops (N, size, size, C) of a tiny synthetic screen, repeated with
    rotations and flips when it has fewer cells; also its channel names and cell channel."""
    import tempfile

    from data_builders.raw_screen import build_raw_screen, open_split
    from data_builders.synthetic_screen import simulate_screen

    if channels not in _FEATURE_SCREENS:
        raise ValueError(f"channels must be one of {sorted(_FEATURE_SCREENS)} (the bbbc021_like "
                         f"or cellpainting_like screen), got {channels}")
    preset, cell_channel = _FEATURE_SCREENS[channels]
    with tempfile.TemporaryDirectory() as tmp:
        simulate_screen(preset, "tiny", f"{tmp}/raw", seed=seed, progress=False)
        report = build_raw_screen(f"{tmp}/raw", f"{tmp}/dataset", crop_size=size, progress=False)
        crops = np.stack([example["image"] for split in ("train", "test")
                          for example in open_split(f"{tmp}/dataset", split)])
    turned = [np.rot90(crops, k, axes=(1, 2)) for k in range(4)]
    pool = np.concatenate(turned + [t[:, :, ::-1] for t in turned])
    crops = np.concatenate([pool] * (-(-n // len(pool))))[:n]
    return np.ascontiguousarray(crops), tuple(report["channels"]), cell_channel


def _diamond(radius: int) -> np.ndarray:
    r = np.abs(np.arange(-radius, radius + 1))
    return r[:, None] + r[None, :] <= radius


def _skimage_masks(image: np.ndarray, nucleus: int, cell: int, min_area: int = 10):
    """The morphjax segmentation with scikit-image: blur, Otsu, fill holes, 8-connected labels,
    size filter, the nucleus nearest the centre, its component of cell | nuclei foreground."""
    from skimage import filters, measure

    def foreground(channel):
        smooth = filters.gaussian(channel, sigma=1, mode="nearest", preserve_range=True)
        return smooth > filters.threshold_otsu(smooth)

    nuclei = scipy.ndimage.binary_fill_holes(foreground(image[..., nucleus]))
    labels = measure.label(nuclei, connectivity=2)
    big = (labels > 0) & (np.bincount(labels.ravel())[labels] >= min_area)
    if not big.any():
        return None
    rows, cols = np.nonzero(big)
    h, w = nuclei.shape
    centre = np.argmin((rows - h // 2) ** 2 + (cols - w // 2) ** 2)
    seed = rows[centre], cols[centre]
    union = scipy.ndimage.binary_fill_holes(nuclei | foreground(image[..., cell]))
    union_labels = measure.label(union, connectivity=2)
    nucleus_mask = labels == labels[seed]
    return nucleus_mask, union_labels == union_labels[seed]


def _haralick_numpy(p: np.ndarray) -> np.ndarray:
    """The 13 Haralick features (CellProfiler/mahotas definitions) of a normalised GLCM."""
    levels = len(p)
    i, j = np.mgrid[0:levels, 0:levels]
    k, s = np.arange(levels), np.arange(2 * levels - 1)
    px, py = p.sum(axis=1), p.sum(axis=0)
    mux, muy = px @ k, py @ k
    sd = np.sqrt((px @ (k - mux) ** 2) * (py @ (k - muy) ** 2))
    p_sum = np.bincount((i + j).ravel(), p.ravel(), 2 * levels - 1)
    p_diff = np.bincount(np.abs(i - j).ravel(), p.ravel(), levels)

    def entropy(q):
        q = q[q > 0]
        return -(q * np.log2(q)).sum()

    outer = np.outer(px, py)
    hxy, hxy1 = entropy(p), -(p[outer > 0] * np.log2(outer[outer > 0])).sum()
    sum_average, diff_mean = p_sum @ s, p_diff @ k
    return np.array([
        (p**2).sum(), ((i - j) ** 2 * p).sum(),
        ((i * j * p).sum() - mux * muy) / sd if sd > 0 else 1.0,
        px @ (k - mux) ** 2, (p / (1 + (i - j) ** 2)).sum(), sum_average,
        p_sum @ (s - sum_average) ** 2, entropy(p_sum), hxy, p_diff @ (k - diff_mean) ** 2,
        entropy(p_diff), (hxy - hxy1) / max(entropy(px), entropy(py), 1e-12),
        np.sqrt(max(0.0, 1 - np.exp(-2 * (entropy(outer) - hxy))))])


def _zernike_numpy(mask: np.ndarray, degree: int = 9) -> np.ndarray:
    import math

    coords = np.argwhere(mask).astype(np.float64)
    dy, dx = (coords - coords.mean(axis=0)).T
    radius = max(np.sqrt(dx**2 + dy**2).max(), 0.5)
    rho, phi = np.hypot(dx, dy) / radius, np.arctan2(dy, dx)
    out = []
    for n in range(degree + 1):
        for m in range(n % 2, n + 1, 2):
            radial = sum((-1) ** t * math.factorial(n - t) * rho ** (n - 2 * t)
                         / (math.factorial(t) * math.factorial((n + m) // 2 - t)
                            * math.factorial((n - m) // 2 - t)) for t in range((n - m) // 2 + 1))
            out.append(abs(np.sum(radial * np.exp(1j * m * phi))) / (np.pi * radius**2))
    return np.array(out)


def _skimage_crop_features(crop: np.ndarray, nucleus: int, cell: int, levels: int = 8,
                           radii: int = 8) -> np.ndarray:
    """One crop's classical features with scikit-image / SciPy / NumPy, per crop on the CPU:
    the same families and definitions as morphjax.features.classical (not its column order)."""
    from skimage import feature, filters, measure

    image = crop.astype(np.float64) / 255.0
    masks = _skimage_masks(image, nucleus, cell)
    if masks is None:
        return np.zeros(1)
    nucleus_mask, cell_mask = masks
    out = []
    for mask in (nucleus_mask, cell_mask):  # AreaShape
        props = measure.regionprops(mask.astype(np.uint8))[0]
        out += [props.area, props.perimeter, props.solidity, props.extent, props.eccentricity,
                props.axis_major_length, props.axis_minor_length, props.orientation]
        out += list(_zernike_numpy(mask))
    compartments = (nucleus_mask, cell_mask, cell_mask & ~nucleus_mask)
    for c in range(image.shape[-1]):
        channel = image[..., c]
        for mask in compartments:  # Intensity
            values = channel[mask]
            if not values.size:
                continue
            edge = mask & ~scipy.ndimage.binary_erosion(mask)
            out += [values.sum(), values.mean(), values.std(), values.min(), values.max(),
                    *np.quantile(values, [0.25, 0.5, 0.75]),
                    np.median(np.abs(values - np.median(values))), channel[edge].mean(),
                    np.linalg.norm(np.array(scipy.ndimage.center_of_mass(channel * mask))
                                   - np.array(scipy.ndimage.center_of_mass(mask)))]
        lo, hi = channel[cell_mask].min(), channel[cell_mask].max()
        grey = np.clip(np.floor((channel - lo) / max(hi - lo, 1e-12) * levels), 0, levels - 1)
        for mask in compartments:  # Texture: level 0 marks pixels outside the object
            coded = np.where(mask, grey + 1, 0).astype(np.uint8)
            glcm = feature.graycomatrix(coded, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
                                        levels=levels + 1, symmetric=True)[1:, 1:, 0]
            glcm = glcm / np.maximum(glcm.sum(axis=(0, 1)), 1)
            out += list(np.mean([_haralick_numpy(glcm[..., a]) for a in range(4)], axis=0))
        masked = np.where(cell_mask, channel, 0.0)  # Granularity
        sums = [masked.sum()] + [scipy.ndimage.grey_opening(
            masked, footprint=_diamond(k), mode="constant", cval=0.0)[cell_mask].sum()
            for k in range(1, radii + 1)]
        out += list(-np.diff(sums) / max(sums[0], 1e-12) * 100)
    centre = scipy.ndimage.center_of_mass(nucleus_mask)  # RadialDistribution
    rows, cols = np.nonzero(cell_mask)
    distance = np.hypot(rows - centre[0], cols - centre[1])
    turn = (np.arctan2(rows - centre[0], cols - centre[1]) + np.pi) / (2 * np.pi)
    sector = np.minimum((turn * 32).astype(int), 31)
    extent = np.zeros(32)
    np.maximum.at(extent, sector, distance)
    ring = np.minimum((distance / (extent[sector] + 0.5) * 4).astype(int), 3)
    counts = np.bincount(ring, minlength=4)
    for c in range(image.shape[-1]):
        values = image[rows, cols, c]
        frac = np.bincount(ring, values, 4) / max(values.sum(), 1e-12)
        out += list(frac) + list(frac / np.maximum(counts / counts.sum(), 1e-12))
    for a, b in itertools.combinations(range(image.shape[-1]), 2):  # Correlation
        x, y = image[..., a][cell_mask], image[..., b][cell_mask]
        above = (x > filters.threshold_otsu(x)) & (y > filters.threshold_otsu(y))
        out += [np.corrcoef(x, y)[0, 1], x[above].sum() / max(x.sum(), 1e-12),
                (x * y).sum() / np.sqrt((x**2).sum() * (y**2).sum())]
    return np.asarray(out, np.float64)


def bench_features(n: int = 1024, size: int = 96, channels: int = 3, repeats: int = 1,
                   batch_size: int = 256, reference_n: int | None = None) -> pd.DataFrame:
    """Crops/s of morphjax's jitted batched classical features against a scikit-image per-crop
    pipeline of the same feature families, on the same synthetic-screen crops.

    morphjax is timed over all `n` crops in batches of `batch_size` after one warm-up batch
    (compilation excluded); the reference over `reference_n` crops (default `n`) and scaled.
    """
    from morphjax.features import classical_feature_fn

    crops, names, cell_channel = synthetic_crops(n, size, channels)
    batch_size = min(batch_size, n)
    fn, columns = classical_feature_fn(crops.shape[1:], names, names[0], cell_channel)
    batches = [crops[i:i + batch_size] for i in range(0, n, batch_size)]
    batches[-1] = np.concatenate([batches[-1], crops[:batch_size - len(batches[-1])]])

    def ours():
        return [fn(jax.device_put(batch.astype(np.float32) / 255.0)) for batch in batches]

    t_ours, values = _best_time(ours, repeats)
    area = np.concatenate([np.asarray(v) for v in values])[:n, columns.index(
        "Nuclei_AreaShape_Area")]
    reference_n = n if reference_n is None else min(reference_n, n)
    nucleus, cell = 0, names.index(cell_channel)
    start = time.perf_counter()
    reference = [_skimage_crop_features(crop, nucleus, cell) for crop in crops[:reference_n]]
    t_reference = (time.perf_counter() - start) * n / reference_n
    reference_area = np.mean([r[0] for r in reference])
    device = jax.devices()[0]
    rows = [dict(implementation=f"morphjax jit+vmap (batch {batch_size})",
                 device=f"{device.device_kind} ({device.platform})", crops=n, seconds=t_ours,
                 mean_nucleus_area=float(area[:reference_n].mean())),
            dict(implementation="scikit-image per crop", device="CPU (1 process)", crops=n,
                 seconds=t_reference, mean_nucleus_area=float(reference_area))]
    table = pd.DataFrame(rows)
    table["crops_per_s"] = table["crops"] / table["seconds"]
    table["ratio"] = table["seconds"] / t_ours
    print(f"classical features: {n} crops {size}x{size}x{channels} ({', '.join(names)}; cell "
          f"channel {cell_channel}), {len(columns)} features; jax {jax.__version__}, "
          f"{jax.device_count()} device(s); scikit-image timed on {reference_n} crops")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table
