"""A built-in nucleus detector for screens published without nucleus centres.

Classical DNA-channel segmentation, as in CellProfiler-style pipelines (Ljosa et al. 2012 used
CellProfiler's IdentifyPrimaryObjects for BBBC021): Gaussian smoothing, an Otsu threshold,
hole filling, removal of small components, then one seed per local maximum of the distance
transform inside each component, which splits touching nuclei. Only the centres are needed:
the builder crops a fixed window around each one.
"""

import concurrent.futures
import multiprocessing
import os

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from data_builders.raw_screen import layout

OTSU_BINS = 256
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def otsu_threshold(image: np.ndarray, nbins: int = OTSU_BINS) -> float:
    """Otsu's threshold over a `nbins`-bin histogram of [min, max] (bin centres), as
    skimage.filters.threshold_otsu computes it for float images. Pixels above it are
    foreground. A constant image returns its value."""
    values = np.asarray(image, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(values, bins=nbins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2.0
    counts = counts.astype(np.float64)
    weight_below = np.cumsum(counts)
    weight_above = np.cumsum(counts[::-1])[::-1]
    mean_below = np.cumsum(counts * centers) / weight_below
    mean_above = (np.cumsum((counts * centers)[::-1]) / weight_above[::-1])[::-1]
    # Threshold after bin i: class 1 is bins 0..i, class 2 is bins i+1..end.
    between = weight_below[:-1] * weight_above[1:] * (mean_below[:-1] - mean_above[1:]) ** 2
    return float(centers[int(np.argmax(between))])


def _component_peaks(distance: np.ndarray, labels: np.ndarray, min_distance: int) -> np.ndarray:
    """Centres (row, col) of the distance-map maxima of every labelled component: maxima of a
    (2 * min_distance + 1)^2 window that sees only the component's own pixels, touching
    maxima (plateaus) merged into their centroid. Every component has at least one."""
    size = 2 * int(min_distance) + 1
    pad = int(min_distance)
    centres = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        rows = slice(max(box[0].start - pad, 0), min(box[0].stop + pad, labels.shape[0]))
        cols = slice(max(box[1].start - pad, 0), min(box[1].stop + pad, labels.shape[1]))
        inside = labels[rows, cols] == k
        own = np.where(inside, distance[rows, cols], 0.0)
        peaks = inside & (own == ndimage.maximum_filter(own, size=size, mode="constant"))
        peak_labels, n_peaks = ndimage.label(peaks, structure=_EIGHT_CONNECTED)
        found = ndimage.center_of_mass(peaks, peak_labels, range(1, n_peaks + 1))
        centres += [(r + rows.start, c + cols.start) for r, c in found]
    return np.asarray(centres, dtype=np.float64).reshape(-1, 2)


def detect_nuclei(
    image: np.ndarray,
    *,
    sigma: float = 2.0,
    min_distance: int = 7,
    min_area: int = 30,
    threshold: float | None = None,
) -> np.ndarray:
    """Nucleus centres of a DNA-channel image.

    Args:
      image: (H, W) greyscale image of any dtype (bright nuclei on a dark background).
      sigma: Gaussian smoothing before thresholding, pixels (0: none).
      min_distance: half-width of the window in which a distance-map maximum must be the
        largest; two nuclei of one component closer than this merge into one.
      min_area: components with fewer pixels are dropped (debris, noise).
      threshold: foreground threshold on the smoothed image; default Otsu's.

    Returns:
      float64 (N, 2) centres as [x (column), y (row)] in pixels, sorted by (y, x).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"detect_nuclei needs a 2-D image, got shape {image.shape}.")
    if min_distance < 1 or min_area < 0 or sigma < 0:
        raise ValueError(
            f"Need min_distance >= 1, min_area >= 0 and sigma >= 0; got {min_distance}, "
            f"{min_area}, {sigma}.")
    smooth = image.astype(np.float64)
    if sigma > 0:
        smooth = ndimage.gaussian_filter(smooth, sigma=float(sigma))
    cut = otsu_threshold(smooth) if threshold is None else float(threshold)
    mask = ndimage.binary_fill_holes(smooth > cut)
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n == 0:
        return np.zeros((0, 2), np.float64)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    small = areas < min_area
    small[0] = True
    labels[small[labels]] = 0
    if not labels.any():
        return np.zeros((0, 2), np.float64)
    distance = ndimage.distance_transform_edt(labels > 0)
    rows_cols = _component_peaks(distance, labels, min_distance)
    xy = rows_cols[:, ::-1].copy()
    order = np.lexsort((xy[:, 0], xy[:, 1]))
    return xy[order]


def detect_site(screen: layout.RawScreen, site_row: int, channel_index: int,
                **kwargs) -> np.ndarray:
    """Nucleus centres (N, 2) [x, y] of one site, detected on channel `channel_index`."""
    if screen.site_reader is not None:
        image = layout.read_site(screen, site_row)[..., channel_index]
    else:
        image = layout.read_channel(screen, site_row, screen.channels[channel_index])
    return detect_nuclei(image, **kwargs)


_worker_state = {}


def _init_worker(screen, channel_index, kwargs) -> None:
    """Sends the screen to a worker once, not with every site."""
    _worker_state.update(screen=screen, channel_index=channel_index, kwargs=kwargs)


def _detect_in_worker(site_row: int) -> np.ndarray:
    state = _worker_state
    return detect_site(state["screen"], site_row, state["channel_index"], **state["kwargs"])


def detect_locations(
    screen: layout.RawScreen,
    channel: str,
    *,
    workers: int | None = None,
    progress: bool = False,
    **kwargs,
) -> pd.DataFrame:
    """Detects the nuclei of every site of `screen` on `channel`.

    Returns a table with columns site_row, x, y (one row per nucleus, sites in index order),
    the `locations` argument of layout.make_screen. `workers` > 1 detects sites in a pool of
    spawned processes (default: all cores, 1 for screens under 32 sites); the result does
    not depend on it. `kwargs` go to detect_nuclei.
    """
    if channel not in screen.channels:
        raise ValueError(f"Channel {channel!r} is not one of the screen's channels "
                         f"{list(screen.channels)}.")
    channel_index = list(screen.channels).index(channel)
    sites = range(len(screen.index))
    if workers is None:
        workers = 1 if len(sites) < 32 else (os.cpu_count() or 1)
    workers = int(workers)
    bar = tqdm(total=len(sites), disable=not progress, unit="site", desc="detect nuclei")
    results = []
    if workers <= 1:
        for site_row in sites:
            results.append(detect_site(screen, site_row, channel_index, **kwargs))
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")  # No fork of a JAX-holding parent.
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker,
            initargs=(screen, channel_index, kwargs))
        try:
            for result in pool.map(_detect_in_worker, sites, chunksize=4):
                results.append(result)
                bar.update()
        finally:  # On an error or Ctrl-C, drop queued sites instead of detecting them.
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    counts = [len(r) for r in results]
    xy = np.concatenate(results, axis=0) if results else np.zeros((0, 2))
    return pd.DataFrame({
        "site_row": np.repeat(np.arange(len(results), dtype=np.int64), counts),
        "x": xy[:, 0],
        "y": xy[:, 1],
    })
