"""Reads and validates a raw screen laid out as data_builders/RAW_LAYOUT.md describes.

The layout is DeepProfiler's `inputs/` (profiling_reference.md §1.4-1.5) plus `screen.json`,
so real exports and the synthetic screen go through the same checks. Every problem is an
error naming the file, row, column or value, raised before any image is processed where it
can be (missing files, columns, unknown perturbations); corrupt images are found on reading.
"""

import dataclasses
import json
import os
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

PLATE, WELL, SITE = "Metadata_Plate", "Metadata_Well", "Metadata_Site"
PERTURBATION = "Metadata_Perturbation"
BATCH, CELL_LINE, DOSE = "Metadata_Batch", "Metadata_CellLine", "Metadata_Dose"
REQUIRED_INDEX_COLUMNS = (PLATE, WELL, SITE, PERTURBATION)
CENTER_X, CENTER_Y = "Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"

PERTURBATION_TYPES = ("compound", "crispr", "orf", "sirna", "control")
REQUIRED_PERTURBATION_COLUMNS = ("perturbation", "type", "is_control")
OPTIONAL_PERTURBATION_COLUMNS = ("moa", "smiles", "target_gene", "complex", "sequence")

_DNA_NAMES = ("dna", "dapi", "hoechst", "nuclei", "nucleus", "nuclear")


@dataclasses.dataclass(frozen=True)
class RawScreen:
    """A validated raw screen: the spec, one index row per site, one row per perturbation.

    `index` keeps the raw metadata as strings (plate, well) with `Metadata_Site` as int,
    `Metadata_Dose` as float (NaN where empty) and `Metadata_Batch` / `Metadata_CellLine`
    filled with "" where absent; `perturbation_id` is the row of the perturbation table.
    """

    raw_dir: str
    spec: dict[str, Any]
    channels: tuple[str, ...]
    index: pd.DataFrame
    perturbations: pd.DataFrame
    extra_columns: tuple[str, ...]

    @property
    def name(self) -> str:
        return str(self.spec.get("name") or os.path.basename(os.path.normpath(self.raw_dir)))

    def image_path(self, site_row: int, channel: str) -> str:
        return os.path.join(self.raw_dir, "images", self.index.at[site_row, channel])

    def site_label(self, site_row: int) -> str:
        row = self.index.loc[site_row]
        return f"plate {row[PLATE]} well {row[WELL]} site {row[SITE]} (index.csv row {site_row})"

    def locations_path(self, site_row: int) -> str:
        row = self.index.loc[site_row]
        return os.path.join(
            self.raw_dir, "locations", row[PLATE], f"{row[WELL]}-{row[SITE]}-Nuclei.csv")


def _read_csv_as_text(path: str) -> pd.DataFrame:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing {path}; see data_builders/RAW_LAYOUT.md.")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"Cannot parse {path}: {e}") from e


def _require_columns(table: pd.DataFrame, columns, path: str, hint: str = "") -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path} lacks column(s) {missing}{hint}; it has {list(table.columns)}.")


def read_spec(raw_dir: str) -> dict[str, Any]:
    path = os.path.join(raw_dir, "screen.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Missing {path}: a raw screen needs screen.json with at least "
            '{"channels": [...]} (data_builders/RAW_LAYOUT.md).')
    try:
        with open(path) as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Cannot parse {path}: {e}") from e
    channels = spec.get("channels") if isinstance(spec, dict) else None
    if (not isinstance(channels, list) or not channels
            or not all(isinstance(c, str) and c for c in channels)):
        raise ValueError(f"{path}: 'channels' must be a non-empty list of channel names.")
    if len(set(channels)) != len(channels):
        raise ValueError(f"{path}: duplicate channel names in {channels}.")
    size = spec.get("image_size")
    if size is not None and (not isinstance(size, list) or len(size) != 2):
        raise ValueError(f"{path}: 'image_size' must be [height, width], got {size!r}.")
    return spec


def read_perturbations(raw_dir: str) -> pd.DataFrame:
    """perturbations.csv with the optional columns filled with "" and `is_control` as int."""
    path = os.path.join(raw_dir, "perturbations.csv")
    table = _read_csv_as_text(path)
    _require_columns(table, REQUIRED_PERTURBATION_COLUMNS, path)
    for column in OPTIONAL_PERTURBATION_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    duplicated = table["perturbation"][table["perturbation"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"{path}: duplicate perturbation ids {list(duplicated[:5])}.")
    if (table["perturbation"] == "").any():
        rows = list(np.flatnonzero(table["perturbation"] == "")[:5])
        raise ValueError(f"{path}: empty perturbation id in row(s) {rows}.")
    bad_type = ~table["type"].isin(PERTURBATION_TYPES)
    if bad_type.any():
        i = int(np.flatnonzero(bad_type)[0])
        raise ValueError(
            f"{path}: perturbation {table['perturbation'][i]!r} has type "
            f"{table['type'][i]!r}; expected one of {PERTURBATION_TYPES}.")
    bad_flag = ~table["is_control"].isin(["0", "1"])
    if bad_flag.any():
        i = int(np.flatnonzero(bad_flag)[0])
        raise ValueError(
            f"{path}: perturbation {table['perturbation'][i]!r} has is_control "
            f"{table['is_control'][i]!r}; expected 0 or 1.")
    table["is_control"] = table["is_control"].astype(np.int64)
    return table


def read_index(raw_dir: str, channels, perturbation_ids: pd.Index) -> pd.DataFrame:
    path = os.path.join(raw_dir, "index.csv")
    index = _read_csv_as_text(path)
    _require_columns(index, REQUIRED_INDEX_COLUMNS, path)
    _require_columns(
        index, channels, path,
        hint=" named after the channels of screen.json (one image path per channel)")
    if index.empty:
        raise ValueError(f"{path} has no rows (sites).")
    sites = pd.to_numeric(index[SITE], errors="coerce")
    bad = sites.isna() | (sites != sites.round())
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path} row {i}: {SITE} {index[SITE][i]!r} is not an integer.")
    index[SITE] = sites.astype(np.int64)
    keys = index[[PLATE, WELL, SITE]]
    duplicated = keys.duplicated()
    if duplicated.any():
        i = int(np.flatnonzero(duplicated)[0])
        raise ValueError(
            f"{path} row {i}: site {tuple(keys.iloc[i])} appears more than once.")
    unknown = ~index[PERTURBATION].isin(perturbation_ids)
    if unknown.any():
        values = list(index[PERTURBATION][unknown].unique()[:5])
        raise ValueError(
            f"{path}: {PERTURBATION} value(s) {values} (row {int(np.flatnonzero(unknown)[0])}) "
            "are not ids in perturbations.csv.")
    for column in (BATCH, CELL_LINE):
        if column not in index.columns:
            index[column] = ""
    if DOSE in index.columns:
        dose = pd.to_numeric(index[DOSE].replace("", np.nan), errors="coerce")
        bad = dose.isna() & (index[DOSE] != "")
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path} row {i}: {DOSE} {index[DOSE][i]!r} is not a number.")
        index[DOSE] = dose.astype(np.float64)
    else:
        index[DOSE] = 0.0
    for channel in channels:
        empty = index[channel] == ""
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise ValueError(f"{path} row {i}: no image path for channel {channel!r}.")
    return index


def read_screen(raw_dir: str | os.PathLike) -> RawScreen:
    """Reads and validates screen.json, perturbations.csv, index.csv; checks every image file
    exists (FileNotFoundError naming the path and the site)."""
    raw_dir = os.fspath(raw_dir)
    if not os.path.isdir(raw_dir):
        raise FileNotFoundError(f"Raw screen directory {raw_dir} does not exist.")
    spec = read_spec(raw_dir)
    channels = tuple(spec["channels"])
    perturbations = read_perturbations(raw_dir)
    index = read_index(raw_dir, channels, pd.Index(perturbations["perturbation"]))
    index["perturbation_id"] = pd.Index(perturbations["perturbation"]).get_indexer(
        index[PERTURBATION])
    known = set(REQUIRED_INDEX_COLUMNS) | {BATCH, CELL_LINE, DOSE, "perturbation_id"}
    extra = tuple(c for c in index.columns if c not in known and c not in channels)
    screen = RawScreen(raw_dir, spec, channels, index, perturbations, extra)
    for site_row in range(len(index)):
        for channel in channels:
            path = screen.image_path(site_row, channel)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Missing image {path} for channel {channel!r} of "
                    f"{screen.site_label(site_row)}.")
    return screen


def dna_channel_index(channels, dna_channel: str | None = None) -> int:
    """The channel QC measures on: `dna_channel` if given, else the first channel whose name
    looks nuclear (DNA, DAPI, Hoechst, ...), else channel 0."""
    if dna_channel is not None:
        if dna_channel not in channels:
            raise ValueError(f"dna_channel {dna_channel!r} is not one of the channels {channels}.")
        return list(channels).index(dna_channel)
    for i, name in enumerate(channels):
        if any(key in name.lower() for key in _DNA_NAMES):
            return i
    return 0


def read_image(path: str, where: str) -> np.ndarray:
    """One greyscale image (PNG or TIFF, 8/16-bit or float) as a 2-D array.

    A missing, truncated or corrupt file, or a colour / multi-page image, is an error naming
    the path and `where` (the site).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing image {path} ({where}).")
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) != 1:
                raise ValueError(f"{image.n_frames} frames, expected one plane per file")
            if image.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(f"mode {image.mode}, expected a greyscale image")
            image.load()
            array = np.asarray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"Cannot read image {path} ({where}): corrupt or truncated? {e}") from e
    if array.ndim != 2:
        raise ValueError(f"Image {path} ({where}) has shape {array.shape}; expected 2-D.")
    return array


def image_shape(path: str, where: str) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding the pixels."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing image {path} ({where}).")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Cannot read image {path} ({where}): corrupt or truncated? {e}") from e
    return height, width


def site_shape(screen: RawScreen, site_row: int, expected_shape=None) -> tuple[int, int]:
    """The common (height, width) of a site's channel images, read from their headers; an
    error naming the site and every channel's shape if they disagree (or differ from
    screen.json's image_size)."""
    where = screen.site_label(site_row)
    shapes = {c: image_shape(screen.image_path(site_row, c), where) for c in screen.channels}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"Channels of {where} disagree in shape: {shapes}.")
    shape = next(iter(shapes.values()))
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise ValueError(
            f"Images of {where} have shape {tuple(shape)} but screen.json image_size is "
            f"{list(expected_shape)}.")
    return shape


def read_site(screen: RawScreen, site_row: int, expected_shape=None) -> np.ndarray:
    """All channels of a site stacked to float32 (H, W, C), in screen.json channel order."""
    where = screen.site_label(site_row)
    planes = [read_image(screen.image_path(site_row, c), where) for c in screen.channels]
    shapes = {c: p.shape for c, p in zip(screen.channels, planes)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"Channels of {where} disagree in shape: {shapes}.")
    shape = planes[0].shape
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise ValueError(
            f"Images of {where} have shape {tuple(shape)} but screen.json image_size is "
            f"{list(expected_shape)}.")
    return np.stack(planes, axis=-1).astype(np.float32)


def read_locations(screen: RawScreen, site_row: int) -> pd.DataFrame | None:
    """The site's nucleus centres as columns x, y, perturbation (one row per cell, file order).

    None when the locations file is missing: DeepProfiler treats that as a site without
    cells; the builder counts such sites. An optional per-cell `Metadata_Perturbation`
    column (optical pooled screens) overrides the site's perturbation where not empty.
    """
    path = screen.locations_path(site_row)
    if not os.path.isfile(path):
        return None
    table = _read_csv_as_text(path)
    _require_columns(table, (CENTER_X, CENTER_Y), path)
    xy = table[[CENTER_X, CENTER_Y]].apply(pd.to_numeric, errors="coerce")
    bad = xy.isna().any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path} row {i}: nucleus centre {tuple(table.loc[i, [CENTER_X, CENTER_Y]])} is "
            "not a pair of numbers.")
    site_perturbation = screen.index.at[site_row, PERTURBATION]
    perturbation = np.full(len(table), site_perturbation, dtype=object)
    if PERTURBATION in table.columns:
        override = table[PERTURBATION].to_numpy(dtype=object)
        given = override != ""
        unknown = given & ~np.isin(override, screen.perturbations["perturbation"].to_numpy())
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise ValueError(
                f"{path} row {i}: {PERTURBATION} {override[i]!r} is not an id in "
                "perturbations.csv.")
        perturbation[given] = override[given]
    return pd.DataFrame({
        "x": xy[CENTER_X].to_numpy(np.float64),
        "y": xy[CENTER_Y].to_numpy(np.float64),
        "perturbation": perturbation,
    })
