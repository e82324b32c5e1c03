"""Reads and validates a raw screen laid out as data_builders/RAW_LAYOUT.md describes.

The layout is DeepProfiler's `inputs/` (profiling_reference.md §1.4-1.5) plus `screen.json`,
so real exports and the synthetic screen go through the same checks. Every problem is an
error naming the file, row, column or value, raised before any image is processed where it
can be (missing files, columns, unknown perturbations); corrupt images are found on reading.

Builders of real layouts (BBBC021, RxRx1, JUMP, ...) parse their files into the same tables and
call `make_screen`, which applies the same checks to in-memory tables; they can also supply the
nucleus centres in memory, a reader for multi-channel image files, or pre-cut crops.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
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

# PIL modes of greyscale files by bit depth (16-bit PNGs open as "I" on older Pillow).
BIT_DEPTH_MODES = {8: ("L",), 16: ("I;16", "I;16B", "I;16L", "I")}

_DNA_NAMES = ("dna", "dapi", "hoechst", "nuclei", "nucleus", "nuclear")


@dataclasses.dataclass(frozen=True)
class RawScreen:
    """A validated raw screen: the spec, one index row per site, one row per perturbation.

    `index` keeps the raw metadata as strings (plate, well) with `Metadata_Site` as int,
    `Metadata_Dose` as float (NaN where empty) and `Metadata_Batch` / `Metadata_CellLine`
    filled with "" where absent; `perturbation_id` is the row of the perturbation table.

    Screens made by `make_screen` may carry `locations` (every cell's centre, in memory:
    columns site_row, x, y, perturbation, and crop_path / split when given), a `site_reader`
    (site_row -> float32 (H, W, C)) for images that are not one file per channel, and are
    `precropped` when every cell comes as its own crop file.
    """

    raw_dir: str
    spec: dict[str, Any]
    channels: tuple[str, ...]
    index: pd.DataFrame
    perturbations: pd.DataFrame
    extra_columns: tuple[str, ...]
    source: str = "index.csv"
    images_dir: str | None = None
    locations: pd.DataFrame | None = None
    site_reader: Callable[["RawScreen", int], np.ndarray] | None = None
    precropped: bool = False
    expression: np.ndarray | None = None
    image_modes: tuple[str, ...] | None = None  # PIL modes the screen's files must have.
    image_description: str = ""  # What they must be, for the error (e.g. "16-bit TIFF").

    @property
    def name(self) -> str:
        return str(self.spec.get("name") or os.path.basename(os.path.normpath(self.raw_dir)))

    def image_path(self, site_row: int, channel: str) -> str:
        images_dir = self.images_dir or os.path.join(self.raw_dir, "images")
        return os.path.join(images_dir, self.index.at[site_row, channel])

    def site_label(self, site_row: int) -> str:
        row = self.index.loc[site_row]
        return (f"plate {row[PLATE]} well {row[WELL]} site {row[SITE]} "
                f"({self.source} row {site_row})")

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
    return check_spec(spec, path)


def check_spec(spec: dict[str, Any], path: str) -> dict[str, Any]:
    """`channels` (required, unique names) and `image_size` ([H, W], optional)."""
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
    return check_perturbations(_read_csv_as_text(path), path)


def check_perturbations(table: pd.DataFrame, path: str) -> pd.DataFrame:
    """Validates a perturbation table of strings (RAW_LAYOUT.md); `path` names it in errors."""
    table = table.reset_index(drop=True)
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
    return check_index(_read_csv_as_text(path), channels, perturbation_ids, path)


def check_index(index: pd.DataFrame, channels, perturbation_ids: pd.Index, path: str
                ) -> pd.DataFrame:
    """Validates a site table of strings (RAW_LAYOUT.md); `path` names it in errors. `channels`
    are the image-path columns it must have (none for screens read otherwise)."""
    index = index.reset_index(drop=True)
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
    screen = _screen(raw_dir, spec, index, perturbations, "index.csv")
    _check_images_exist(screen)
    return screen


def _screen(raw_dir, spec, index, perturbations, source, **fields) -> RawScreen:
    channels = tuple(spec["channels"])
    index["perturbation_id"] = pd.Index(perturbations["perturbation"]).get_indexer(
        index[PERTURBATION])
    known = set(REQUIRED_INDEX_COLUMNS) | {BATCH, CELL_LINE, DOSE, "perturbation_id"}
    extra = tuple(c for c in index.columns if c not in known and c not in channels)
    return RawScreen(raw_dir, spec, channels, index, perturbations, extra, source, **fields)


def _check_images_exist(screen: RawScreen) -> None:
    for site_row in range(len(screen.index)):
        for channel in screen.channels:
            path = screen.image_path(site_row, channel)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Missing image {path} for channel {channel!r} of "
                    f"{screen.site_label(site_row)}.")


def _as_text(table: pd.DataFrame, keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """A copy with every column as str ("" for missing), except the columns in `keep`."""
    table = table.copy()
    for column in table.columns:
        if column in keep:
            continue
        values = table[column]
        text = values.astype(object).where(values.notna(), "")
        table[column] = [v if isinstance(v, str) else _format(v) for v in text]
    return table


def _format(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def make_screen(
    spec: dict[str, Any],
    index: pd.DataFrame,
    perturbations: pd.DataFrame,
    *,
    source: str,
    images_dir: str | os.PathLike | None = None,
    locations: pd.DataFrame | None = None,
    site_reader: Callable[[RawScreen, int], np.ndarray] | None = None,
    expression: np.ndarray | None = None,
    image_modes: Sequence[str] | None = None,
    image_description: str = "",
) -> RawScreen:
    """A validated screen from in-memory tables, for builders of real layouts.

    Args:
      spec: as screen.json: `channels` (required), `name`, `image_size` [H, W], ...
      index: one row per site, the columns of index.csv (RAW_LAYOUT.md); channel columns hold
        image paths relative to `images_dir` (or absolute). Not needed with a `site_reader` or
        pre-cut crops. Values other than Metadata_Site and Metadata_Dose are used as text.
      perturbations: the columns of perturbations.csv.
      source: the file the tables came from, named in errors.
      images_dir: base of relative image paths (default: the working directory).
      locations: every cell, replacing the locations files: `site_row` (row of `index`), `x`,
        `y` (pixels); optional `Metadata_Perturbation` (per-cell perturbation, "" keeps the
        site's), `crop_path` (an HWC uint8 .npy holding the cell's crop: the screen is then
        pre-cropped and x, y may be NaN) and `split` ("train"/"test", for split="given").
      site_reader: a picklable function (screen, site_row) -> float32 (H, W, C) in channel
        order, for images that are not one greyscale file per channel.
      expression: float32 (n_perturbations, n_genes), rows in `perturbations` order (MorphDiff's
        L1000 vectors; data_builders/expression.py); written to the dataset as expression.npy.
      image_modes: the PIL modes every image file must have (the published bit depth: e.g.
        ("I;16", "I;16B") for 16-bit TIFFs, ("L",) for 8-bit PNGs); another mode is an error
        naming the file, the mode and `image_description`.
    """
    spec = check_spec(dict(spec), source)
    channels = tuple(spec["channels"])
    perturbations = check_perturbations(_as_text(perturbations), source)
    precropped = locations is not None and "crop_path" in locations.columns
    needs_paths = site_reader is None and not precropped
    keep = tuple(c for c in (SITE, DOSE) if c in index.columns)
    index = _as_text(index, keep)
    if SITE in index.columns:
        index[SITE] = index[SITE].astype(str)
    if DOSE in index.columns:
        index[DOSE] = ["" if pd.isna(v) else str(v) for v in index[DOSE]]
    index = check_index(index, channels if needs_paths else (),
                        pd.Index(perturbations["perturbation"]), source)
    images_dir = os.path.abspath(os.fspath(images_dir)) if images_dir is not None else ""
    if expression is not None:
        expression = np.asarray(expression, np.float32)
        if expression.ndim != 2 or len(expression) != len(perturbations):
            raise ValueError(f"expression has shape {expression.shape}; expected "
                             f"({len(perturbations)}, n_genes), one row per perturbation.")
    spec.setdefault("name", os.path.splitext(os.path.basename(source))[0] or "screen")
    screen = _screen("", spec, index, perturbations, source, images_dir=images_dir,
                     site_reader=site_reader, precropped=precropped, expression=expression,
                     image_modes=None if image_modes is None else tuple(image_modes),
                     image_description=image_description)
    if locations is not None:
        screen = dataclasses.replace(screen, locations=check_locations(screen, locations))
    if needs_paths:
        _check_images_exist(screen)
    return screen


def with_locations(screen: RawScreen, locations: pd.DataFrame) -> RawScreen:
    """`screen` with its nucleus centres (make_screen's `locations`), e.g. once a detector has
    found them on the screen's own images; the tables are not checked again."""
    if "crop_path" in locations.columns:
        raise ValueError("Pre-cut crops (crop_path) must be given to make_screen.")
    return dataclasses.replace(screen, locations=check_locations(screen, locations))


def check_locations(screen: RawScreen, locations: pd.DataFrame) -> pd.DataFrame:
    """In-memory cells -> columns site_row, x, y, perturbation (+ crop_path, split), ordered by
    site (stable); errors name the row and value."""
    where = f"locations of {screen.source}"
    _require_columns(locations, ("site_row", "x", "y"), where)
    table = locations.reset_index(drop=True)
    site_row = pd.to_numeric(table["site_row"], errors="coerce")
    bad = site_row.isna() | (site_row < 0) | (site_row >= len(screen.index))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where} row {i}: site_row {table['site_row'][i]} is not a row of "
                         f"the site table (0..{len(screen.index) - 1}).")
    xy = table[["x", "y"]].apply(pd.to_numeric, errors="coerce")
    bad = xy.isna().any(axis=1)
    if not screen.precropped and bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where} row {i}: nucleus centre {tuple(table.loc[i, ['x', 'y']])} is "
                         "not a pair of numbers.")
    site_row = site_row.to_numpy(np.int64)
    perturbation = screen.index[PERTURBATION].to_numpy(dtype=object)[site_row]
    if PERTURBATION in table.columns:
        override = _as_text(table[[PERTURBATION]])[PERTURBATION].to_numpy(dtype=object)
        given = override != ""
        unknown = given & ~np.isin(override, screen.perturbations["perturbation"].to_numpy())
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise ValueError(f"{where} row {i}: {PERTURBATION} {override[i]!r} is not a "
                             "perturbation id.")
        perturbation[given] = override[given]
    cells = pd.DataFrame({"site_row": site_row, "x": xy["x"].to_numpy(np.float64),
                          "y": xy["y"].to_numpy(np.float64), "perturbation": perturbation})
    if screen.precropped:
        paths = _as_text(table[["crop_path"]])["crop_path"].to_numpy(dtype=object)
        for i, path in enumerate(paths):
            if not path or not os.path.isfile(path):
                raise FileNotFoundError(f"{where} row {i}: missing crop file {path!r}.")
        cells["crop_path"] = paths
    if "split" in table.columns:
        split = _as_text(table[["split"]])["split"].to_numpy(dtype=object)
        bad = ~np.isin(split, ["train", "test"])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where} row {i}: split {split[i]!r} is not 'train' or 'test'.")
        cells["split"] = split
    return cells.iloc[np.argsort(site_row, kind="stable")].reset_index(drop=True)


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


def read_image(path: str, where: str, modes: Sequence[str] | None = None,
               description: str = "") -> np.ndarray:
    """One greyscale image (PNG or TIFF, 8/16-bit or float) as a 2-D array.

    A missing, truncated or corrupt file, or a colour / multi-page image, is an error naming
    the path and `where` (the site); so is a PIL mode outside `modes` when given (a screen
    published at one bit depth).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing image {path} ({where}).")
    try:
        with Image.open(path) as image:
            if modes is not None and image.mode not in modes:
                raise _ModeError(f"Image {path} ({where}) has mode {image.mode}; expected "
                                 f"{description or 'one of ' + str(list(modes))}.")
            if getattr(image, "n_frames", 1) != 1:
                raise ValueError(f"{image.n_frames} frames, expected one plane per file")
            if image.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(f"mode {image.mode}, expected a greyscale image")
            image.load()
            array = np.asarray(image)
    except _ModeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"Cannot read image {path} ({where}): corrupt or truncated? {e}") from e
    if array.ndim != 2:
        raise ValueError(f"Image {path} ({where}) has shape {array.shape}; expected 2-D.")
    return array


class _ModeError(ValueError):
    """An image of the wrong bit depth or colour mode for its screen."""


def read_channel(screen: RawScreen, site_row: int, channel: str) -> np.ndarray:
    """One channel image of a site, checked against the screen's image modes."""
    return read_image(screen.image_path(site_row, channel), screen.site_label(site_row),
                      screen.image_modes, screen.image_description)


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
    if screen.site_reader is not None:
        return tuple(read_site(screen, site_row, expected_shape).shape[:2])
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
    if screen.site_reader is not None:
        image = np.asarray(screen.site_reader(screen, site_row), np.float32)
        if image.ndim != 3 or image.shape[-1] != len(screen.channels):
            raise ValueError(f"Images of {where} have shape {image.shape}; expected (H, W, "
                             f"{len(screen.channels)}) for channels {screen.channels}.")
        if expected_shape is not None and tuple(image.shape[:2]) != tuple(expected_shape):
            raise ValueError(f"Images of {where} have shape {image.shape[:2]} but the "
                             f"screen's image_size is {list(expected_shape)}.")
        return image
    planes = [read_channel(screen, site_row, c) for c in screen.channels]
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
