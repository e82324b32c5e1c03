"""Raw screen -> TFDS dataset of single-cell crops in ArrayRecord shards, plus metadata tables.

Same builder for the synthetic screen and real screens (RAW_LAYOUT.md, or a real layout read
into a `layout.RawScreen` by its builder: data_builders/<screen>/). Steps: validate the layout;
read every nucleus centre and assign splits; per plate, estimate the illumination statistic per
channel; per site, correct to uint8, crop every nucleus, exclude border crops and QC failures
(all counted), and stream the kept crops into the split's ArrayRecord shards. Sites are cropped
by a pool of worker processes (all cores by default) in a bounded window, in site order, so the
output does not depend on the number of workers and memory stays flat for any screen size.

Output (`out_dir`):
  {name}/1.0.0/                 TFDS dataset: dataset_info.json, features.json and
                                {name}-{train,test}.array_record-NNNNN-of-NNNNN shards
  cells.csv                     one row per kept crop; row i is the example with cell_index i;
                                Metadata_Perturbation is the cell's own (per-cell in pooled screens)
  perturbations.csv             perturbation table; row i is perturbation_id i (+ moa_id)
  plates.csv wells.csv batches.csv cell_lines.csv moas.csv   vocabularies: id, name
  screen.json expression.npy gene_embeddings.npy             copied when present
  build_report.json             options, counts per filter / plate / split, held-out items

The examples are written with `tfds.features` encoders and `tfds.folder_dataset.
write_metadata`, so TFDS reads them back (`tfds.builder_from_directory`, `tfds.data_source`)
without TensorFlow. Images are stored as ZLIB-compressed `Tensor`s (`tfds.features.Image`
needs TensorFlow to encode). Everything is written into a temporary sibling directory that is
renamed to `out_dir` at the end, so an interrupted build leaves no half dataset.
"""

import collections
import concurrent.futures
import json
import multiprocessing
import os
import pickle
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from array_record.python import array_record_module
import numpy as np
import pandas as pd
import tensorflow_datasets as tfds

from data_builders.raw_screen import crops as crops_lib
from data_builders.raw_screen import illumination as illumination_lib
from data_builders.raw_screen import layout
from data_builders.raw_screen import splits as splits_lib
from morphjax import io

VERSION = "1.0.0"
SPLIT_NAMES = ("train", "test")
# Vocabulary tables: file name -> (column of the site/perturbation table it indexes).
VOCABULARIES = {
    "plates": layout.PLATE,
    "wells": layout.WELL,
    "batches": layout.BATCH,
    "cell_lines": layout.CELL_LINE,
    "moas": "moa",
}
_STRING_COLUMNS = (layout.PLATE, layout.WELL, layout.BATCH, layout.CELL_LINE, layout.PERTURBATION,
                   "perturbation", "type", "moa", "split")
_ILLUMINATION_STREAM = 7


def dataset_features(crop_size: int, num_channels: int) -> tfds.features.FeaturesDict:
    """Per-example features; all decode to NumPy without TensorFlow."""

    def scalar(dtype):
        return tfds.features.Tensor(shape=(), dtype=dtype)

    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(
            shape=(crop_size, crop_size, num_channels), dtype=np.uint8,
            encoding=tfds.features.Encoding.ZLIB),
        "perturbation_id": scalar(np.int32),
        "is_control": scalar(np.bool_),
        "plate_id": scalar(np.int32),
        "well_id": scalar(np.int32),
        "batch_id": scalar(np.int32),
        "cell_line_id": scalar(np.int32),
        "moa_id": scalar(np.int32),
        "site": scalar(np.int32),
        "dose": scalar(np.float32),
        "center": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "cell_index": scalar(np.int64),
    })


def _dataset_name(name: str) -> str:
    """A TFDS-safe dataset name: lower case letters, digits and underscores."""
    clean = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    if not clean:
        raise ValueError(f"Cannot make a dataset name from {name!r}; pass name='my_screen'.")
    return clean if clean[0].isalpha() else "screen_" + clean


def _dataset_dir(out_dir: str) -> str:
    """The TFDS version directory inside a built `out_dir`."""
    report_path = os.path.join(out_dir, "build_report.json")
    if not os.path.isfile(report_path):
        raise FileNotFoundError(
            f"{out_dir} is not a built screen (no build_report.json); run build_raw_screen first.")
    with open(report_path) as f:
        name = json.load(f)["name"]
    return os.path.join(out_dir, name, VERSION)


def open_split(out_dir: str | os.PathLike, split: str) -> Sequence[dict[str, Any]]:
    """Random-access source over one split of a built screen, for `grain.MapDataset.source`.

    Items are dicts of NumPy values (`image` uint8 HWC, ids, `center`, `cell_index`, ...);
    reading needs no TensorFlow.
    """
    builder = tfds.builder_from_directory(_dataset_dir(os.fspath(out_dir)))
    splits = builder.info.splits
    if split not in splits:
        raise ValueError(f"Unknown split {split!r} of {out_dir}; it has {list(splits)}.")
    if splits[split].num_examples == 0:
        raise ValueError(
            f"Split {split!r} of {out_dir} is empty; see build_report.json for what was held "
            "out and filtered.")
    return builder.as_data_source(split)


def read_build_report(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The build report of a built screen (channels, options, counts)."""
    _dataset_dir(os.fspath(out_dir))  # Clear error if this is not a built screen.
    with open(os.path.join(os.fspath(out_dir), "build_report.json")) as f:
        return json.load(f)


def read_tables(out_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The metadata tables of a built screen: cells, perturbations and the vocabularies."""
    out_dir = os.fspath(out_dir)
    _dataset_dir(out_dir)  # Clear error if this is not a built screen.
    dtypes = {c: str for c in _STRING_COLUMNS + ("name", "smiles", "target_gene", "complex",
                                                 "sequence")}
    tables = {}
    for name in ("cells", "perturbations", *VOCABULARIES):
        tables[name] = pd.read_csv(
            os.path.join(out_dir, f"{name}.csv"), dtype=dtypes, keep_default_na=False,
            na_values=["NaN"])
    return tables


class _SplitWriter:
    """Streams serialized examples of one split into ArrayRecord shards of ~`shard_bytes`."""

    def __init__(self, directory: str, prefix: str, shard_bytes: int):
        self._directory = directory
        self._prefix = prefix
        self._shard_bytes = shard_bytes
        self._paths: list[str] = []
        self._lengths: list[int] = []
        self._writer = None
        self._bytes_in_shard = 0
        self.num_examples = 0

    def _open_shard(self) -> None:
        path = os.path.join(self._directory, f".{self._prefix}.shard{len(self._paths):05d}")
        self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        self._paths.append(path)
        self._lengths.append(0)
        self._bytes_in_shard = 0

    def write(self, record: bytes) -> int:
        """Writes one record; returns its index within the split."""
        if self._writer is None or self._bytes_in_shard >= self._shard_bytes:
            self.close_shard()
            self._open_shard()
        self._writer.write(record)
        self._lengths[-1] += 1
        self._bytes_in_shard += len(record)
        self.num_examples += 1
        return self.num_examples - 1

    def close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self, split: str) -> tfds.core.SplitInfo:
        """Closes the last shard, gives the shards their TFDS names, returns the SplitInfo."""
        if not self._paths:  # An empty split still gets one (empty) shard.
            self._open_shard()
        self.close_shard()
        num_bytes = 0
        for i, path in enumerate(self._paths):
            final = os.path.join(
                self._directory,
                f"{self._prefix}.array_record-{i:05d}-of-{len(self._paths):05d}")
            num_bytes += os.path.getsize(path)
            os.replace(path, final)
        return tfds.core.SplitInfo(name=split, shard_lengths=list(self._lengths),
                                   num_bytes=num_bytes)


def _vocabulary(values) -> list[str]:
    return sorted(set(str(v) for v in values))


def _check_options(crop_size, resize_to, illumination, illumination_sigma,
                   illumination_max_sites, qc_min_std, qc_min_sharpness, shard_bytes,
                   stretch_percentiles) -> None:
    lo, hi = stretch_percentiles
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"stretch_percentiles must be 0 <= low < high <= 100, got "
                         f"{tuple(stretch_percentiles)}.")
    if int(crop_size) != crop_size or crop_size < 2:
        raise ValueError(f"crop_size must be an integer >= 2, got {crop_size}.")
    if resize_to is not None and (int(resize_to) != resize_to or resize_to < 1):
        raise ValueError(f"resize_to must be a positive integer or None, got {resize_to}.")
    illumination_lib.check_method(illumination)
    if illumination_sigma < 0:
        raise ValueError(f"illumination_sigma must be >= 0, got {illumination_sigma}.")
    if illumination_max_sites < 1:
        raise ValueError(f"illumination_max_sites must be >= 1, got {illumination_max_sites}.")
    if qc_min_std < 0 or qc_min_sharpness < 0:
        raise ValueError(
            f"QC thresholds must be >= 0 (0 = off), got qc_min_std={qc_min_std}, "
            f"qc_min_sharpness={qc_min_sharpness}.")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}.")


def _find_cells(screen: layout.RawScreen) -> tuple[pd.DataFrame, int]:
    """Every nucleus of every site: site_row, location_row, x, y, perturbation_id (and
    crop_path / split when the screen's in-memory locations have them)."""
    if screen.locations is not None:
        cells = screen.locations.copy()
        cells.insert(1, "location_row", cells.groupby("site_row").cumcount().to_numpy())
        sites_without_locations = len(screen.index) - cells["site_row"].nunique()
        return _finish_cells(screen, cells), sites_without_locations
    parts = []
    sites_without_locations = 0
    for site_row in range(len(screen.index)):
        locations = layout.read_locations(screen, site_row)
        if locations is None:
            sites_without_locations += 1
            continue
        locations.insert(0, "location_row", np.arange(len(locations)))
        locations.insert(0, "site_row", site_row)
        parts.append(locations)
    if not parts:
        raise FileNotFoundError(
            f"No locations files under {os.path.join(screen.raw_dir, 'locations')}: expected "
            "locations/{Plate}/{Well}-{Site}-Nuclei.csv per site (RAW_LAYOUT.md).")
    return _finish_cells(screen, pd.concat(parts, ignore_index=True)), sites_without_locations


def _finish_cells(screen: layout.RawScreen, cells: pd.DataFrame) -> pd.DataFrame:
    lookup = pd.Index(screen.perturbations["perturbation"])
    cells["perturbation_id"] = lookup.get_indexer(cells["perturbation"])
    cells = cells.drop(columns="perturbation")
    cells[layout.PLATE] = screen.index[layout.PLATE].to_numpy()[cells["site_row"].to_numpy()]
    return cells


def _check_plate_shapes(screen, site_rows, expected_shape) -> None:
    """Every channel of every site of a plate has one shape (headers only), so the plate
    statistic can stack them."""
    shapes = {}
    for site_row in site_rows:
        shapes.setdefault(layout.site_shape(screen, site_row, expected_shape), site_row)
    if len(shapes) > 1:
        (shape_a, site_a), (shape_b, site_b) = list(shapes.items())[:2]
        raise ValueError(
            f"Sites of plate {screen.index.at[site_a, layout.PLATE]} differ in image shape: "
            f"{screen.site_label(site_a)} is {shape_a}, {screen.site_label(site_b)} is "
            f"{shape_b}.")


def _channel_statistic(screen, site_rows, channel, method, sigma) -> np.ndarray:
    images = np.stack([layout.read_channel(screen, s, channel) for s in site_rows])
    return illumination_lib.plate_statistic(method, images, sigma)


def _plate_statistics(screen, site_rows, method, sigma, max_sites, seed, plate_number,
                      pool=None):
    """Per-channel illumination statistic of one plate from a seeded subsample of its sites
    (one channel per worker when a pool is given)."""
    if method == "none" or screen.precropped:
        return [None] * len(screen.channels), 0
    site_rows = np.asarray(site_rows)
    if len(site_rows) > max_sites:
        rng = np.random.default_rng([seed, _ILLUMINATION_STREAM, plate_number])
        site_rows = np.sort(rng.choice(site_rows, size=max_sites, replace=False))
    if screen.site_reader is not None:  # Multi-channel files: read each site once.
        sites = np.stack([layout.read_site(screen, s) for s in site_rows])
        return [illumination_lib.plate_statistic(method, sites[..., c], sigma)
                for c in range(len(screen.channels))], len(site_rows)
    if pool is not None:
        tasks = [(site_rows, channel, method, sigma) for channel in screen.channels]
        return list(pool.map(_worker_statistic, tasks)), len(site_rows)
    return [_channel_statistic(screen, site_rows, channel, method, sigma)
            for channel in screen.channels], len(site_rows)


def _read_crops(screen, paths, crop_size) -> np.ndarray:
    """Pre-cut crops (one HWC uint8 .npy per cell), checked against the screen's channels."""
    crops = []
    for path in paths:
        try:
            crop = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"Cannot read crop {path}: {e}") from e
        if crop.dtype != np.uint8 or crop.shape != (crop_size, crop_size, len(screen.channels)):
            raise ValueError(
                f"Crop {path} is {crop.dtype} {crop.shape}; expected uint8 "
                f"({crop_size}, {crop_size}, {len(screen.channels)}) for channels "
                f"{list(screen.channels)} (set crop_size to the crops' size).")
        crops.append(crop)
    return np.stack(crops)


def _site_crops(screen, site_row, centers, statistics, *, illumination, crop_size, resize_to,
                dna, qc_min_std, qc_min_sharpness, expected_shape, stretch_percentiles,
                crop_paths=None):
    """Corrected crops of one site's cells that pass, and every cell's fate: "kept",
    "border", "low_variance" or "blur" (the first filter that removes it)."""
    if crop_paths is not None:
        crops = _read_crops(screen, crop_paths, crop_size)
        inside = np.ones(len(crops), dtype=bool)
    else:
        raw = layout.read_site(screen, site_row, expected_shape)
        image = np.stack(
            [illumination_lib.correct(illumination, raw[..., c], statistics[c],
                                      stretch_percentiles)
             for c in range(raw.shape[-1])], axis=-1)
        origins, inside = crops_lib.crop_origins(centers, crop_size, image.shape)
        crops = crops_lib.extract_crops(image, origins[inside], crop_size)
    if resize_to is not None and resize_to != crop_size:
        crops = crops_lib.resize_crops(crops, int(resize_to))
    std = crops_lib.crop_std(crops, dna)
    sharpness = crops_lib.crop_sharpness(crops, dna)
    low_variance = std < qc_min_std
    blur = sharpness < qc_min_sharpness
    fate = np.full(len(centers), "border", dtype=object)
    fate[inside] = np.where(low_variance, "low_variance", np.where(blur, "blur", "kept"))
    keep = ~(low_variance | blur)
    return fate, crops[keep], std[keep], sharpness[keep]


_WORKER: dict[str, Any] = {}


def _init_worker(screen: layout.RawScreen, options: dict[str, Any]) -> None:
    _WORKER.update(screen=screen, options=options, statistics={})


def _worker_site(task) -> tuple:
    """One site in a worker process: the plate statistics come from a file (loaded once)."""
    site_row, centers, crop_paths, statistics_path = task
    cache = _WORKER["statistics"]
    if statistics_path not in cache:
        cache.clear()
        with open(statistics_path, "rb") as f:
            cache[statistics_path] = pickle.load(f)
    return _site_crops(_WORKER["screen"], site_row, centers, cache[statistics_path],
                       crop_paths=crop_paths, **_WORKER["options"])


def _worker_statistic(task) -> np.ndarray:
    return _channel_statistic(_WORKER["screen"], *task)


def _ordered_map(pool, fn, tasks: Iterable, window: int) -> Iterator:
    """pool.map in task order with at most `window` tasks in flight (bounded memory)."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.submit(fn, task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def build_raw_screen(
    raw_dir: str | os.PathLike | layout.RawScreen,
    out_dir: str | os.PathLike,
    *,
    crop_size: int = 96,
    resize_to: int | None = None,
    illumination: str = "impa",
    illumination_sigma: float = 50.0,
    illumination_max_sites: int = 100,
    stretch_percentiles: Sequence[float] = illumination_lib.STRETCH_PERCENTILES,
    qc_min_std: float = 1.0,
    qc_min_sharpness: float = 0.0,
    dna_channel: str | None = None,
    split: str = "random_cells",
    test_fraction: float = 0.2,
    holdout: Sequence[str] = (),
    seed: int = 0,
    name: str | None = None,
    shard_bytes: int = 256 * 2**20,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Builds single-cell crops of a raw screen into a TFDS ArrayRecord dataset at `out_dir`.

    Args:
      raw_dir: a raw screen in the layout of data_builders/RAW_LAYOUT.md, or a screen read by a
        real-layout builder (`layout.make_screen`).
      out_dir: the built dataset (layout in this module's docstring); must not exist unless
        `overwrite`.
      crop_size: side of the square crop centred on each nucleus (IMPA: 96); cells whose crop
        would cross the image border are excluded and counted.
      resize_to: resize crops to this side (IMPA large field of view: 256 -> 128).
      illumination: "impa", "deepprofiler" or "none" (see illumination.py).
      illumination_sigma: Gaussian sigma of the impa flat field, pixels (IMPA: 50).
      illumination_max_sites: plate statistics use a seeded subsample of at most this many
        sites of the plate (all of them when the plate has fewer).
      stretch_percentiles: per-image percentiles the deepprofiler and none corrections stretch
        to 0..255 (DeepProfiler 0.05, 99.95; GRAPE 0.1, 99.9).
      qc_min_std: drop crops whose DNA channel has a standard deviation (uint8 units) below
        this: a crop centred on a nucleus is never flat, an empty or saturated one is. The
        default 1.0 removes only near-constant crops; 0 turns the filter off.
      qc_min_sharpness: drop crops whose DNA-channel variance of the Laplacian is below this
        (blur). 0 (default) = off: a safe threshold depends on the screen's optics.
      dna_channel: channel QC measures on; default the first DNA/DAPI/Hoechst-named channel.
      split, test_fraction, holdout, seed: see splits.py.
      name: TFDS dataset name (default screen.json "name"), made lower-case / underscores.
      shard_bytes: start a new ArrayRecord shard after about this many bytes.
      overwrite: replace an existing `out_dir` (only once the new build is complete).
      progress: show a progress bar over sites.
      workers: processes cropping sites; default all cores (1 for screens under 32 sites).
        The output does not depend on it.

    Returns:
      The build report, also written to `out_dir/build_report.json`: counts of cells found,
      kept and excluded per filter (found = kept + border + low_variance + blur) overall and
      per plate, examples per split, what was held out, and the options.
    """
    start = time.perf_counter()
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_options(crop_size, resize_to, illumination, illumination_sigma,
                   illumination_max_sites, qc_min_std, qc_min_sharpness, shard_bytes,
                   stretch_percentiles)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass overwrite=True.")

    if isinstance(raw_dir, layout.RawScreen):
        screen, raw_dir = raw_dir, raw_dir.source
    else:
        raw_dir = os.fspath(raw_dir)
        screen = layout.read_screen(raw_dir)
    channels = screen.channels
    dna = layout.dna_channel_index(channels, dna_channel)
    expected_shape = screen.spec.get("image_size")
    dataset_name = _dataset_name(name or screen.name)
    expression_path = os.path.join(screen.raw_dir, "expression.npy")
    if screen.raw_dir and os.path.isfile(expression_path):
        expression = np.load(expression_path, mmap_mode="r")
        if expression.ndim != 2 or expression.shape[0] != len(screen.perturbations):
            raise ValueError(
                f"{expression_path} has shape {expression.shape}; expected "
                f"({len(screen.perturbations)}, n_genes), one row per perturbations.csv row.")

    cells, sites_without_locations = _find_cells(screen)
    is_test, split_info = splits_lib.assign_splits(
        cells, screen.perturbations, split=split, test_fraction=test_fraction,
        holdout=holdout, seed=seed)

    # Integer ids for every found cell; vocabularies cover the whole screen, not just kept cells.
    index, perturbations = screen.index, screen.perturbations
    vocabularies = {key: _vocabulary(index[col] if key != "moas" else perturbations[col])
                    for key, col in VOCABULARIES.items()}
    site_ids = {key: pd.Index(vocabularies[key]).get_indexer(index[col]).astype(np.int32)
                for key, col in VOCABULARIES.items() if key != "moas"}
    moa_of_perturbation = pd.Index(vocabularies["moas"]).get_indexer(perturbations["moa"])
    site_row = cells["site_row"].to_numpy()
    pid = cells["perturbation_id"].to_numpy()
    per_cell = {
        "perturbation_id": pid.astype(np.int32),
        "is_control": perturbations["is_control"].to_numpy().astype(bool)[pid],
        "plate_id": site_ids["plates"][site_row],
        "well_id": site_ids["wells"][site_row],
        "batch_id": site_ids["batches"][site_row],
        "cell_line_id": site_ids["cell_lines"][site_row],
        "moa_id": moa_of_perturbation[pid].astype(np.int32),
        "site": index[layout.SITE].to_numpy().astype(np.int32)[site_row],
        "dose": index[layout.DOSE].to_numpy().astype(np.float32)[site_row],
        "center": cells[["x", "y"]].to_numpy(np.float32),
    }
    centers = cells[["x", "y"]].to_numpy()
    crop_paths = cells["crop_path"].to_numpy() if screen.precropped else None
    if workers is None:
        workers = 1 if len(index) < 32 else (os.cpu_count() or 1)
    site_options = dict(
        illumination=illumination, crop_size=crop_size, resize_to=resize_to, dna=dna,
        qc_min_std=qc_min_std, qc_min_sharpness=qc_min_sharpness, expected_shape=expected_shape,
        stretch_percentiles=tuple(float(p) for p in stretch_percentiles))

    out_size = int(resize_to or crop_size)
    features = dataset_features(out_size, len(channels))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{secrets.token_hex(4)}")
    data_dir = os.path.join(tmp_dir, dataset_name, VERSION)
    os.makedirs(data_dir)
    pool = None
    try:
        writers = {s: _SplitWriter(data_dir, f"{dataset_name}-{s}", shard_bytes)
                   for s in SPLIT_NAMES}
        status = np.full(len(cells), "", dtype=object)  # each cell's fate, see _site_crops
        kept_rows, kept_split_index, kept_std, kept_sharpness = [], [], [], []
        illumination_sites = {}
        plates = vocabularies["plates"]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(index), desc=f"build {dataset_name}", unit="site")
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # No fork of a JAX-holding parent.
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker,
                initargs=(screen, site_options))
        for plate_number, plate in enumerate(plates):
            plate_sites = np.flatnonzero(index[layout.PLATE].to_numpy() == plate)
            if not screen.precropped:
                _check_plate_shapes(screen, plate_sites, expected_shape)
            statistics, n_used = _plate_statistics(
                screen, plate_sites, illumination, illumination_sigma, illumination_max_sites,
                seed, plate_number, pool)
            illumination_sites[plate] = n_used
            # Cells are in site order, so a site's cells are one contiguous run.
            runs = [np.arange(*np.searchsorted(site_row, [s, s + 1])) for s in plate_sites]
            if bar is not None:
                bar.update(int(sum(len(rows) == 0 for rows in runs)))
            runs = [(s, rows) for s, rows in zip(plate_sites, runs) if len(rows)]
            if pool is None:
                results = (_site_crops(
                    screen, s, centers[rows], statistics, **site_options,
                    crop_paths=None if crop_paths is None else crop_paths[rows])
                    for s, rows in runs)
            else:
                statistics_path = os.path.join(tmp_dir, f".illumination-{plate_number}.pkl")
                with open(statistics_path, "wb") as f:
                    pickle.dump(statistics, f)
                tasks = ((s, centers[rows], None if crop_paths is None else crop_paths[rows],
                          statistics_path) for s, rows in runs)
                results = _ordered_map(pool, _worker_site, tasks, window=4 * workers)
            for (s, rows), (fate, crops, std, sharpness) in zip(runs, results):
                if bar is not None:
                    bar.update(1)
                status[rows] = fate
                for row, crop, crop_std, crop_sharpness in zip(
                        rows[fate == "kept"], crops, std, sharpness):
                    example = {key: value[row] for key, value in per_cell.items()}
                    example["image"] = crop
                    example["cell_index"] = np.int64(len(kept_rows))
                    split_name = "test" if is_test[row] else "train"
                    kept_split_index.append(
                        writers[split_name].write(features.serialize_example(example)))
                    kept_rows.append(row)
                    kept_std.append(crop_std)
                    kept_sharpness.append(crop_sharpness)
            if pool is not None:
                os.remove(statistics_path)
        if bar is not None:
            bar.close()
        split_infos = [writers[s].finish(s) for s in SPLIT_NAMES]
        tfds.folder_dataset.write_metadata(
            data_dir=data_dir, features=features, split_infos=split_infos, check_data=False,
            description=f"Single-cell crops of the raw screen {screen.name} ({raw_dir}).",
            metadata=tfds.core.MetadataDict(channels=list(channels)))

        kept_rows = np.asarray(kept_rows, dtype=np.int64)
        cells_table = _cells_table(
            screen, cells, per_cell, kept_rows, is_test, kept_split_index, kept_std,
            kept_sharpness)
        _write_csv(os.path.join(tmp_dir, "cells.csv"), cells_table)
        perturbation_table = perturbations.copy()
        perturbation_table.insert(0, "perturbation_id", np.arange(len(perturbations)))
        perturbation_table["moa_id"] = moa_of_perturbation
        _write_csv(os.path.join(tmp_dir, "perturbations.csv"), perturbation_table)
        for key, values in vocabularies.items():
            _write_csv(os.path.join(tmp_dir, f"{key}.csv"),
                       pd.DataFrame({"id": np.arange(len(values)), "name": values}))
        if screen.raw_dir:
            for file_name in ("screen.json", "expression.npy", "expression_genes.csv",
                              "gene_embeddings.npy"):
                source = os.path.join(screen.raw_dir, file_name)
                if os.path.isfile(source):
                    shutil.copyfile(source, os.path.join(tmp_dir, file_name))
        else:  # A screen read by a real-layout builder.
            io.atomic_write_json(os.path.join(tmp_dir, "screen.json"), screen.spec)
            if screen.expression is not None:
                np.save(os.path.join(tmp_dir, "expression.npy"), screen.expression)

        report = _report(
            screen, cells, status, is_test, kept_rows, writers, split_info, illumination_sites,
            sites_without_locations, dna_channel=channels[dna], name=dataset_name,
            raw_dir=raw_dir, out_dir=out_dir, options=dict(
                crop_size=crop_size, resize_to=resize_to, illumination=illumination,
                illumination_sigma=illumination_sigma,
                illumination_max_sites=illumination_max_sites,
                stretch_percentiles=list(stretch_percentiles), qc_min_std=qc_min_std,
                qc_min_sharpness=qc_min_sharpness, split=split, test_fraction=test_fraction,
                holdout=list(holdout), seed=seed))
        for key in ("adapter_counts", "notes"):  # What a real-layout builder left out.
            if key in screen.spec:
                report[key] = screen.spec[key]
        report["seconds"] = round(time.perf_counter() - start, 3)
        io.atomic_write_json(os.path.join(tmp_dir, "build_report.json"), report)
        _replace_directory(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        if pool is not None:  # On an error or Ctrl-C, drop queued sites instead of cropping.
            pool.shutdown(wait=True, cancel_futures=True)
    return report


def _cells_table(screen, cells, per_cell, kept_rows, is_test, split_index, std, sharpness):
    site_row = cells["site_row"].to_numpy()[kept_rows]
    index = screen.index
    pid = per_cell["perturbation_id"][kept_rows]
    perturbations = screen.perturbations
    table = pd.DataFrame({
        "cell_index": np.arange(len(kept_rows)),
        "split": np.where(is_test[kept_rows], "test", "train"),
        "split_index": np.asarray(split_index, dtype=np.int64),
        layout.PLATE: index[layout.PLATE].to_numpy()[site_row],
        layout.WELL: index[layout.WELL].to_numpy()[site_row],
        layout.SITE: index[layout.SITE].to_numpy()[site_row],
        "location_row": cells["location_row"].to_numpy()[kept_rows],
        "x": cells["x"].to_numpy()[kept_rows],
        "y": cells["y"].to_numpy()[kept_rows],
        layout.PERTURBATION: perturbations["perturbation"].to_numpy()[pid],
        "perturbation_id": pid,
        "is_control": per_cell["is_control"][kept_rows].astype(np.int64),
        "type": perturbations["type"].to_numpy()[pid],
        "moa": perturbations["moa"].to_numpy()[pid],
    })
    for key in ("moa_id", "plate_id", "well_id", "batch_id", "cell_line_id"):
        table[key] = per_cell[key][kept_rows]
    for column in (layout.BATCH, layout.CELL_LINE, layout.DOSE, *screen.extra_columns):
        table[column] = index[column].to_numpy()[site_row]
    table["dna_std"] = np.asarray(std, np.float32)
    table["dna_sharpness"] = np.asarray(sharpness, np.float32)
    return table


def _write_csv(path: str, table: pd.DataFrame) -> None:
    io.atomic_write_text(path, table.to_csv(index=False, na_rep="NaN"))


def _counts(status: np.ndarray) -> dict[str, int]:
    return {
        "found": int(len(status)),
        "kept": int((status == "kept").sum()),
        "excluded_border": int((status == "border").sum()),
        "excluded_low_variance": int((status == "low_variance").sum()),
        "excluded_blur": int((status == "blur").sum()),
    }


def _report(screen, cells, status, is_test, kept_rows, writers, split_info, illumination_sites,
            sites_without_locations, **fields) -> dict[str, Any]:
    plates = cells[layout.PLATE].to_numpy()
    kept_test = is_test[kept_rows]
    pid = cells["perturbation_id"].to_numpy()[kept_rows]
    return {
        **{k: fields[k] for k in ("name", "raw_dir", "out_dir")},
        "version": VERSION,
        "channels": list(screen.channels),
        "dna_channel": fields["dna_channel"],
        "options": fields["options"],
        "sites": int(len(screen.index)),
        "sites_without_locations": int(sites_without_locations),
        "cells": _counts(status),
        "cells_per_plate": {p: _counts(status[plates == p]) for p in sorted(set(plates))},
        "examples": {s: int(writers[s].num_examples) for s in SPLIT_NAMES},
        "perturbations_per_split": {
            "train": int(len(np.unique(pid[~kept_test]))),
            "test": int(len(np.unique(pid[kept_test]))),
        },
        "split_info": split_info,
        "illumination_sites_per_plate": illumination_sites,
    }


def _replace_directory(tmp_dir: str, out_dir: str, overwrite: bool) -> None:
    """Renames the finished build into place; an old `out_dir` goes only after that."""
    if os.path.exists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} appeared during the build; not replacing it.")
        trash = f"{tmp_dir}.old"
        os.replace(out_dir, trash)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)
