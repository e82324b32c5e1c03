"""A screen exported for DeepProfiler (`<root>/inputs/...`) -> `layout.RawScreen`.

DeepProfiler's project layout (profiling_reference.md §1.2-1.6; cytomining/DeepProfiler):

  <root>/inputs/config/<name>.json        optional: dataset.images.channels / bits,
                                          dataset.metadata.label_field / control_value,
                                          prepare.compression.implement,
                                          train.partition.split_field and training_values /
                                          validation_values (older configs: training / validation)
  <root>/inputs/metadata/index.csv        one row per site: Metadata_Plate, Metadata_Well,
                                          Metadata_Site, one column per channel (path relative to
                                          inputs/images), the label column (Treatment, pert_name,
                                          ...), optional split / replicate / compound columns
  <root>/inputs/images/<Plate>/<file>.tif(f)          16-bit greyscale, one file per channel
  <root>/outputs/compressed/images/<Plate>/<file>.png 8-bit PNGs written by `prepare` (compressed
                                          mode: the index's .tif(f) paths are read as .png here)
  <root>/inputs/locations/<Plate>/<Well>-<Site>-Nuclei.csv
                                          Nuclei_Location_Center_X, Nuclei_Location_Center_Y
                                          (pixels); a missing file is a site without cells

Perturbations are the distinct values of the label column (DeepProfiler's `label_field`, e.g.
`DMSO@0` or `BRD-K...@10`); those named by the control value(s) are controls. MoA tables of
DeepProfilerExperiments (BBBC022/CDRP `*_MOA_MATCHES_official.csv`: Var1, Metadata_moa.x;
TA-ORF: broad_sample, pert_name, Metadata_moa, Metadata_Plate_Map_Name) fill the `moa` column,
multi-MoA values kept '|'-joined.
"""

import glob
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from data_builders.raw_screen import layout

PLATE, WELL, SITE = layout.PLATE, layout.WELL, layout.SITE
DEFAULT_CHANNELS = ("DNA", "RNA", "ER", "AGP", "Mito")  # Cell Painting CNN order (§1.6).
NUCLEI_X, NUCLEI_Y = layout.CENTER_X, layout.CENTER_Y
# MoA match tables: key column and MoA column, first present wins.
MOA_KEY_COLUMNS = ("Var1", "broad_sample", "Metadata_broad_sample")
MOA_VALUE_COLUMNS = ("Metadata_moa.x", "Metadata_moa", "moa")
_BROAD_ID = re.compile(r"^(BRD-[A-Z]\d{8})")
_BITS_OF_MODE = {"L": 8, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}


def read_csv_text(path: str, sep: str = ",") -> pd.DataFrame:
    """A table as strings ("" for empty cells; "NA" stays "NA"), errors naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing {path}.")
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"Cannot parse {path}: {e}") from e


def require_columns(table: pd.DataFrame, columns: Sequence[str], path: str, hint: str = ""
                    ) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}{hint}; it has {list(table.columns)}.")


def image_bits(path: str) -> int:
    """Bits per pixel of a greyscale image file, from its header where the mode says it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing image {path}.")
    try:
        with Image.open(path) as image:
            if image.mode in _BITS_OF_MODE:
                return _BITS_OF_MODE[image.mode]
            array = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Cannot read image {path}: corrupt or truncated? {e}") from e
    if np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() \
            and array.max() < 2**16:
        return 16  # 16-bit PNGs open as 32-bit "I" on some Pillow versions.
    return int(array.dtype.itemsize * 8)


def check_bit_depth(paths: dict[str, str], bit_depth: int, where: str) -> None:
    """Every file in `paths` (channel -> path) has `bit_depth` bits per pixel."""
    for channel, path in paths.items():
        bits = image_bits(path)
        if bits != bit_depth:
            raise ValueError(
                f"Image {path} (channel {channel!r}, {where}) is {bits}-bit; expected "
                f"{bit_depth}-bit images (raw Cell Painting TIFFs are 16-bit, DeepProfiler's "
                "compressed PNGs 8-bit: pass bit_depth / --compressed to match the files).")


def check_first_site_bit_depth(index: pd.DataFrame, channels: Sequence[str], images_dir: str,
                               bit_depth: int, source: str) -> None:
    """Bit depth of every channel of the first site of each plate (headers only)."""
    for _, first in index.groupby(PLATE, sort=True).head(1).iterrows():
        where = (f"plate {first[PLATE]} well {first[WELL]} site {first[SITE]} "
                 f"({source} row {first.name})")
        check_bit_depth({c: os.path.join(images_dir, first[c]) for c in channels}, bit_depth,
                        where)


def read_locations_folder(locations_dir: str, index: pd.DataFrame) -> pd.DataFrame:
    """Nucleus centres of every site from `{Plate}/{Well}-{Site}-Nuclei.csv` (DeepProfiler
    §1.4) as columns site_row, x, y; a site without a file has no cells."""
    parts = []
    for site_row, (plate, well, site) in enumerate(
            index[[PLATE, WELL, SITE]].itertuples(index=False)):
        path = os.path.join(locations_dir, str(plate), f"{well}-{site}-Nuclei.csv")
        if not os.path.isfile(path):
            continue
        table = read_csv_text(path)
        require_columns(table, (NUCLEI_X, NUCLEI_Y), path)
        xy = table[[NUCLEI_X, NUCLEI_Y]].apply(pd.to_numeric, errors="coerce")
        bad = xy.isna().any(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path} row {i}: nucleus centre "
                             f"{tuple(table.loc[i, [NUCLEI_X, NUCLEI_Y]])} is not numeric.")
        parts.append(pd.DataFrame({"site_row": site_row, "x": xy[NUCLEI_X].to_numpy(float),
                                   "y": xy[NUCLEI_Y].to_numpy(float)}))
    if not parts:
        raise FileNotFoundError(
            f"No locations files under {locations_dir}: expected "
            "{Plate}/{Well}-{Site}-Nuclei.csv with Nuclei_Location_Center_X/Y per site.")
    return pd.concat(parts, ignore_index=True)


def read_moa_table(path: str, key_column: str | None = None, moa_column: str | None = None
                   ) -> dict[str, str]:
    """key (broad id / sample) -> MoA string ('|'-joined when several) from a match table."""
    table = read_csv_text(path, sep="\t" if path.endswith((".tsv", ".txt")) else ",")
    key = key_column or next((c for c in MOA_KEY_COLUMNS if c in table.columns), None)
    moa = moa_column or next((c for c in MOA_VALUE_COLUMNS if c in table.columns), None)
    if key is None or moa is None or key not in table.columns or moa not in table.columns:
        raise ValueError(
            f"{path}: cannot find the key column ({key_column or MOA_KEY_COLUMNS}) and MoA "
            f"column ({moa_column or MOA_VALUE_COLUMNS}); it has {list(table.columns)}.")
    out: dict[str, str] = {}
    for k, value in zip(table[key], table[moa]):
        if not k:
            continue
        if k in out and out[k] != value:
            value = "|".join(sorted(set(out[k].split("|")) | set(value.split("|"))))
        out[k] = value
    return out


def lookup_moa(moas: dict[str, str], key: str) -> str | None:
    """The MoA of `key`: an exact match, else by its short Broad id (BRD-X12345678)."""
    if key in moas:
        return moas[key]
    match = _BROAD_ID.match(key)
    if match and match.group(1) in moas:
        return moas[match.group(1)]
    return None


def find_config(root: str, config: str | None) -> tuple[dict[str, Any], str]:
    """The DeepProfiler config (a file name in inputs/config/ or a path), or the only json
    there; ({}, "") when there is none."""
    config_dir = os.path.join(root, "inputs", "config")
    if config:
        path = config if os.path.isfile(config) else os.path.join(config_dir, config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DeepProfiler config {config} not found (looked in "
                                    f"{config_dir}).")
    else:
        found = sorted(glob.glob(os.path.join(config_dir, "*.json")))
        if not found:
            return {}, ""
        if len(found) > 1:
            raise ValueError(f"{config_dir} holds several configs {found}; pass config=NAME.")
        path = found[0]
    try:
        with open(path) as f:
            return json.load(f), path
    except json.JSONDecodeError as e:
        raise ValueError(f"Cannot parse DeepProfiler config {path}: {e}") from e


def _get(config: dict[str, Any], dotted: str, default=None):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _control_labels(index: pd.DataFrame, label_field: str, control: Sequence[str],
                    source: str) -> set[str]:
    """Labels that are controls: each control is a label value (`DMSO@0`) or `column=value`
    (every site with that value is a control; its labels become controls)."""
    labels = set(index[label_field])
    controls = set()
    for entry in control:
        if entry in labels:
            controls.add(entry)
            continue
        column, sep, value = entry.partition("=")
        if sep and column in index.columns:
            chosen = index[index[column] == value]
            if chosen.empty:
                raise ValueError(f"{source}: no site has {column} == {value!r} (control "
                                 f"{entry!r}).")
            controls |= set(chosen[label_field])
            continue
        examples = sorted(labels)[:5]
        raise ValueError(
            f"{source}: control {entry!r} is not a value of the label column {label_field!r} "
            f"(values like {examples}) nor a COLUMN=VALUE pair of the index; pass the control "
            "label, e.g. control=['DMSO@0'].")
    return controls


def read_deepprofiler(
    root: str | os.PathLike,
    *,
    config: str | None = None,
    metadata: str = "index.csv",
    channels: Sequence[str] | None = None,
    label_field: str | None = None,
    control: Sequence[str] | None = None,
    compressed: bool | None = None,
    bit_depth: int | None = None,
    perturbation_type: str = "compound",
    split_field: str | None = None,
    train_values: Sequence[str] | None = None,
    test_values: Sequence[str] | None = None,
    dose_field: str | None = None,
    name_field: str | None = None,
    moa_table: str | None = None,
    moa_key: str | None = None,
    name: str | None = None,
) -> layout.RawScreen:
    """Parses a DeepProfiler project into a screen for `build_raw_screen`.

    Args:
      root: the project root holding inputs/ (and outputs/compressed/ when compressed).
      config: DeepProfiler config in inputs/config/ (default: the only json there, if any);
        it supplies the defaults of channels, label_field, control, compressed, bit depth and
        the split.
      metadata: index file name in inputs/metadata/.
      channels: channel columns in order (default config dataset.images.channels, else
        DNA, RNA, ER, AGP, Mito).
      label_field: column whose values are the perturbations (Treatment, pert_name, ...).
      control: control label values (`DMSO@0`) or COLUMN=VALUE pairs; default the config's
        dataset.metadata.control_value.
      compressed: read `prepare`'s 8-bit PNGs under outputs/compressed/images (index .tif(f)
        paths read as .png); default config prepare.compression.implement.
      bit_depth: expected bits per pixel (default 8 when compressed, else config
        dataset.images.bits or 16), checked on the first site of every plate, and on every
        image as the build reads it.
      perturbation_type: type of the non-control perturbations (compound, orf, crispr, sirna).
      split_field: index column with DeepProfiler's split; sites whose value is in
        `train_values` go to train, in `test_values` to test (default the config's
        training_values / validation_values); other sites are left out (counted in
        spec["adapter_counts"]). Cells then carry `split` for build split="given".
      dose_field: index column with the dose in µM (e.g. Concentration) -> Metadata_Dose.
      name_field: index column with a readable name (e.g. pert_name, Compound) -> `name`.
      moa_table: MoA match table (BBBC022/CDRP/TA-ORF formats) -> the `moa` column, matched on
        the index column `moa_key` (default broad_sample, else the label), exactly or by
        short Broad id.
      name: dataset name (default the root folder's name).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"DeepProfiler project root {root} does not exist.")
    settings, config_path = find_config(root, config)
    source = os.path.join(root, "inputs", "metadata", metadata)
    index = read_csv_text(source)
    require_columns(index, (PLATE, WELL, SITE), source)
    channels = list(channels or _get(settings, "dataset.images.channels") or DEFAULT_CHANNELS)
    require_columns(index, channels, source, " (one image path per channel; set channels)")
    label_field = label_field or _get(settings, "dataset.metadata.label_field")
    if not label_field:
        raise ValueError(f"No label field: pass label_field (e.g. Treatment or pert_name); "
                         f"{source} has {list(index.columns)}.")
    require_columns(index, (label_field,), source, " (the label field)")
    empty = index[label_field] == ""
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(f"{source} row {i}: empty {label_field!r} (no perturbation).")
    if control is None:
        value = _get(settings, "dataset.metadata.control_value")
        control = [value] if value else []
    if compressed is None:
        compressed = bool(_get(settings, "prepare.compression.implement", False))
    if bit_depth is None:
        bit_depth = 8 if compressed else int(_get(settings, "dataset.images.bits", 16))
    counts: dict[str, int] = {}

    # Split: DeepProfiler's partition values -> train/test per site, others left out.
    split_field = split_field or (_get(settings, "train.partition.split_field")
                                  if train_values is None else None)
    site_split = None
    if split_field:
        require_columns(index, (split_field,), source, " (the split field)")
        partition = _get(settings, "train.partition", {}) or {}
        train = [str(v) for v in (train_values if train_values is not None else
                                  partition.get("training_values", partition.get("training",
                                                                                 [])))]
        test = [str(v) for v in (test_values if test_values is not None else
                                 partition.get("validation_values",
                                               partition.get("validation", [])))]
        if not train or not test:
            examples = sorted(set(index[split_field]))[:5]
            raise ValueError(f"split_field {split_field!r} needs train_values and test_values "
                             f"(values of that column, e.g. {examples}).")
        site_split = np.where(index[split_field].isin(train), "train",
                              np.where(index[split_field].isin(test), "test", ""))
        keep = site_split != ""
        counts["sites_outside_split"] = int((~keep).sum())
        index, site_split = index[keep].reset_index(drop=True), site_split[keep]

    # Perturbations: one per label value.
    controls = _control_labels(index, label_field, control, source)
    labels = sorted(set(index[label_field]))
    moas: dict[str, str] = {}
    if moa_table:
        moas = read_moa_table(moa_table)
        moa_key = moa_key or ("broad_sample" if "broad_sample" in index.columns else label_field)
        require_columns(index, (moa_key,), source, " (moa_key)")
    label_moa: dict[str, str] = {}
    if moas:
        for label, key in index[[label_field, moa_key]].drop_duplicates().itertuples(index=False):
            moa = lookup_moa(moas, key)
            if moa is None:
                continue
            if label_moa.get(label, moa) != moa:
                raise ValueError(f"{source}: label {label!r} maps to two MoAs "
                                 f"({label_moa[label]!r}, {moa!r}) through {moa_key}.")
            label_moa[label] = moa
        counts["perturbations_without_moa"] = sum(
            1 for label in labels if label not in label_moa and label not in controls)
    names = {}
    if name_field:
        require_columns(index, (name_field,), source, " (name_field)")
        names = dict(zip(index[label_field], index[name_field]))
    perturbations = pd.DataFrame({
        "perturbation": labels,
        "type": ["control" if label in controls else perturbation_type for label in labels],
        "is_control": [int(label in controls) for label in labels],
        "moa": [label_moa.get(label, "") for label in labels],
        "modality": perturbation_type,
        "name": [names.get(label, label) for label in labels],
    })

    sites = index.copy()
    sites[layout.PERTURBATION] = index[label_field]  # The label column is kept as well.
    if dose_field:
        require_columns(index, (dose_field,), source, " (dose_field)")
        sites[layout.DOSE] = index[dose_field]
    images_dir = os.path.join(root, "inputs", "images")
    if compressed:
        images_dir = os.path.join(root, "outputs", "compressed", "images")
        for channel in channels:
            sites[channel] = sites[channel].str.replace(r"\.tiff?$", ".png", regex=True,
                                                        flags=re.IGNORECASE)
    check_first_site_bit_depth(sites, channels, images_dir, bit_depth, source)
    locations = read_locations_folder(os.path.join(root, "inputs", "locations"), sites)
    if site_split is not None:
        locations["split"] = site_split[locations["site_row"].to_numpy()]
    spec = {"name": name or os.path.basename(os.path.normpath(root)), "channels": channels,
            "bit_depth": bit_depth, "source_layout": "deepprofiler",
            "label_field": label_field, "config": config_path, "adapter_counts": counts}
    return layout.make_screen(spec, sites, perturbations, source=source, images_dir=images_dir,
                              locations=locations,
                              image_modes=layout.BIT_DEPTH_MODES.get(bit_depth),
                              image_description=f"a {bit_depth}-bit greyscale image (pass "
                                                "bit_depth / --compressed to match the files)")
