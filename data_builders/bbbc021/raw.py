"""BBBC021 v1 as published (Ljosa et al. 2012; Caie et al. 2010) -> layout.RawScreen.

On-disk layout (RAW_DIR is `--raw`):

  RAW_DIR/BBBC021_v1_image.csv[.gz]   one row per field of view (13,200 in the full screen):
      TableNumber, ImageNumber, Image_FileName_DAPI, Image_PathName_DAPI,
      Image_FileName_Tubulin, Image_PathName_Tubulin, Image_FileName_Actin,
      Image_PathName_Actin, Image_Metadata_Plate_DAPI (e.g. Week4_27481),
      Image_Metadata_Well_DAPI (e.g. G10), Replicate, Image_Metadata_Compound,
      Image_Metadata_Concentration (µM; DMSO 0).
  RAW_DIR/BBBC021_v1_moa.csv          compound, concentration, moa (the annotated subset).
  RAW_DIR/BBBC021_v1_compound.csv     compound, smiles (any table with these two columns).
  RAW_DIR/{PathName}/{FileName}       the images, e.g. Week4/Week4_27481/G10_s1_w1<UUID>.tif:
      single-page 16-bit greyscale TIFFs (1024 x 1280 in the real screen), one per stain;
      DAPI, Tubulin, Actin become channels DNA, Tubulin, Actin.

Sites: Metadata_Site is the k of `_s<k>_w` in the DAPI file name (four fields per well).
Batch is the week (first part of the PathName), plate Image_Metadata_Plate_DAPI, dose the
concentration, perturbation the compound name (DMSO is the control). A compound's MoA is the
one BBBC021_v1_moa.csv gives it; sites keep the MoA of their own compound-concentration
("" where that concentration is not annotated).

Nucleus centres come from `centers` (a CellProfiler object table, e.g. Ljosa's nuclei
measurements exported to CSV: TableNumber, ImageNumber, [ObjectNumber,]
Nuclei_Location_Center_X, Nuclei_Location_Center_Y, pixels; an image is identified by
(TableNumber, ImageNumber) of the image table; centres of sites left out by the compound
selection are skipped and counted) or are detected on the DNA channel with
raw_screen.nuclei (default).
"""

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from data_builders.raw_screen import layout
from data_builders.raw_screen import nuclei

IMAGE_TABLE = "BBBC021_v1_image.csv"
MOA_TABLE = "BBBC021_v1_moa.csv"
SMILES_TABLE = "BBBC021_v1_compound.csv"
CHANNELS = ("DNA", "Tubulin", "Actin")
STAINS = {"DNA": "DAPI", "Tubulin": "Tubulin", "Actin": "Actin"}
CONTROL = "DMSO"
CELL_LINE = "MCF7"
IMAGE_COLUMNS = (
    "TableNumber", "ImageNumber",
    "Image_FileName_DAPI", "Image_PathName_DAPI", "Image_FileName_Tubulin",
    "Image_PathName_Tubulin", "Image_FileName_Actin", "Image_PathName_Actin",
    "Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI", "Replicate",
    "Image_Metadata_Compound", "Image_Metadata_Concentration")
CENTER_COLUMNS = ("TableNumber", "ImageNumber", layout.CENTER_X, layout.CENTER_Y)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L")

# IMPA's BBBC021 five-drug subset (+ DMSO), impa_reference.md §3.1 `bbbc021_six` mol_list.
IMPA_SIX = ("AZ138", "AZ258", "cytochalasin B", "DMSO", "taxol", "vincristine")
# IMPA's unseen-compound set for BBBC021 (HEAD `bbbc021_all` ood_set), for
# split="perturbations" with holdout=IMPA_OOD.
IMPA_OOD = ("taxol", "ALLN", "bryostatin", "simvastatin", "MG-132", "methotrexate",
            "colchicine", "cytochalasin B", "AZ258", "cisplatin")
SUBSETS = {"impa_six": IMPA_SIX}

_SITE_IN_NAME = re.compile(r"_s(\d+)_w")


def read_table(path: str, columns: Sequence[str], what: str) -> pd.DataFrame:
    """A CSV (optionally .gz) as text, with the required `columns`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing {what} {path}.")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"Cannot parse {what} {path}: {e}") from e
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {list(table.columns)}.")
    return table


def numbers(table: pd.DataFrame, column: str, path: str, rows=None) -> np.ndarray:
    """A column as float64; an error naming the first row (`rows[i]`, default i) that is not
    a number."""
    values = pd.to_numeric(table[column], errors="coerce")
    bad = values.isna()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = i if rows is None else rows[i]
        raise ValueError(f"{path} row {row}: {column} {table[column].iloc[i]!r} is not a "
                         "number.")
    return values.to_numpy(np.float64)


def select_compounds(available, compounds, subset, path: str) -> list[str] | None:
    """The compounds to keep (None: all). `subset` names a preset of SUBSETS (members the
    table lacks are ignored); `compounds` is an explicit list, and naming a compound the
    table does not have is an error."""
    if subset is not None and compounds is not None:
        raise ValueError("Give either compounds or subset, not both.")
    if subset is not None:
        if subset not in SUBSETS:
            raise ValueError(f"Unknown subset {subset!r}; expected one of {list(SUBSETS)}.")
        return list(SUBSETS[subset])
    if compounds is None:
        return None
    compounds = [str(c) for c in compounds]
    unknown = sorted(set(compounds) - set(available))
    if unknown:
        raise ValueError(f"Compound(s) {unknown} are not in {path}.")
    return compounds


def read_smiles(path: str) -> dict[str, str]:
    """compound -> SMILES from a table with columns compound, smiles (empty = none)."""
    table = read_table(path, ("compound", "smiles"), "compound SMILES table")
    table = table[table["smiles"].str.strip() != ""]
    duplicated = table["compound"][table["compound"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"{path}: compound(s) {list(duplicated)} appear more than once.")
    return dict(zip(table["compound"], table["smiles"].str.strip()))


def check_smiles(compounds, smiles: dict[str, str], path: str, fix: str) -> None:
    """Every treated compound needs a SMILES (molecule embeddings, scaffold splits)."""
    missing = sorted(c for c in set(compounds) if c != CONTROL and c not in smiles)
    if missing:
        raise ValueError(f"{len(missing)} compound(s) have no SMILES in {path}: {missing}. "
                         f"{fix}")


def read_moa(path: str) -> tuple[dict[tuple[str, float], str], dict[str, str]]:
    """BBBC021_v1_moa.csv as (compound, concentration) -> moa and compound -> moa."""
    table = read_table(path, ("compound", "concentration", "moa"), "MoA table")
    concentration = numbers(table, "concentration", path)
    by_dose, by_compound = {}, {}
    for i, (compound, dose, moa) in enumerate(zip(table["compound"], concentration,
                                                  table["moa"])):
        if by_compound.setdefault(compound, moa) != moa:
            raise ValueError(f"{path} row {i}: compound {compound!r} has MoA {moa!r} here and "
                             f"{by_compound[compound]!r} in an earlier row.")
        by_dose[(compound, _dose_key(dose))] = moa
    return by_dose, by_compound


def _dose_key(dose: float) -> float:
    return round(float(dose), 6)


def _find_table(raw_dir: str, name: str) -> str:
    path = os.path.join(raw_dir, name)
    if not os.path.isfile(path) and os.path.isfile(path + ".gz"):
        return path + ".gz"
    return path


def read_bbbc021(
    raw_dir: str | os.PathLike,
    *,
    image_table: str | os.PathLike | None = None,
    moa_table: str | os.PathLike | None = None,
    smiles_table: str | os.PathLike | None = None,
    compounds: Sequence[str] | None = None,
    subset: str | None = None,
    annotated_only: bool = False,
    centers: str | os.PathLike | None = None,
    detect_workers: int | None = None,
    detect_options: dict | None = None,
    progress: bool = False,
) -> layout.RawScreen:
    """BBBC021 v1 in its published layout (module docstring) as a screen for build_raw_screen.

    Args:
      raw_dir: the folder holding the Week*/ image folders (and, by default, the tables).
      image_table, moa_table, smiles_table: default RAW_DIR/BBBC021_v1_image.csv (or .csv.gz),
        RAW_DIR/BBBC021_v1_moa.csv, RAW_DIR/BBBC021_v1_compound.csv.
      compounds: keep only these compounds (include DMSO to keep the controls).
      subset: a named compound subset instead: "impa_six" (IMPA_SIX).
      annotated_only: keep only the compound-concentrations of the MoA table (the BBBC021
        MoA benchmark); DMSO is annotated there.
      centers: CSV of nucleus centres (module docstring); default: detect them on DNA.
      detect_workers: processes for detection (default 1).
      detect_options: keyword arguments of nuclei.detect_nuclei.
      progress: progress bar over sites while detecting.

    Every kept treated compound needs a SMILES, else an error lists the compounds lacking one
    (pass `compounds` without them, or a fuller SMILES table). What was left out is counted in
    the screen's spec["notes"].
    """
    raw_dir = os.fspath(raw_dir)
    if not os.path.isdir(raw_dir):
        raise FileNotFoundError(f"BBBC021 directory {raw_dir} does not exist.")
    image_path = os.fspath(image_table or _find_table(raw_dir, IMAGE_TABLE))
    moa_path = os.fspath(moa_table or os.path.join(raw_dir, MOA_TABLE))
    smiles_path = os.fspath(smiles_table or os.path.join(raw_dir, SMILES_TABLE))
    table = read_table(image_path, IMAGE_COLUMNS, "BBBC021 image table")
    if table.empty:
        raise ValueError(f"{image_path} has no rows.")
    table.insert(0, "table_row", np.arange(len(table)))
    all_images = set(zip(table["TableNumber"], table["ImageNumber"]))
    table["dose"] = numbers(table, "Image_Metadata_Concentration", image_path)
    moa_by_dose, moa_by_compound = read_moa(moa_path)
    smiles = read_smiles(smiles_path)
    notes = []

    keep = select_compounds(table["Image_Metadata_Compound"].unique(), compounds, subset,
                            image_path)
    if keep is not None:
        dropped = ~table["Image_Metadata_Compound"].isin(keep)
        notes.append(f"{int(dropped.sum())} sites of compounds outside the selection left out")
        table = table[~dropped]
    site_moa = np.array([moa_by_dose.get((c, _dose_key(d)), "") for c, d in
                         zip(table["Image_Metadata_Compound"], table["dose"])], dtype=object)
    if annotated_only:
        annotated = site_moa != ""
        notes.append(f"{int((~annotated).sum())} sites of compound-concentrations without an "
                     "MoA left out (annotated_only)")
        table, site_moa = table[annotated], site_moa[annotated]
    if table.empty:
        raise ValueError(f"No site of {image_path} is left after the compound selection.")
    table = table.reset_index(drop=True)
    check_smiles(table["Image_Metadata_Compound"], smiles, smiles_path,
                 "Pass compounds=[...] (--compounds) without them, or a SMILES table that "
                 "covers them (--smiles-table).")

    index = _site_index(table, image_path, raw_dir)
    index[layout.PERTURBATION] = table["Image_Metadata_Compound"].to_numpy()
    index["Metadata_MoA"] = site_moa
    perturbations = _perturbations(index[layout.PERTURBATION], moa_by_compound, smiles)
    unannotated = [p for p, m in zip(perturbations["perturbation"], perturbations["moa"])
                   if m == ""]
    notes.append(f"{len(unannotated)} compound(s) without an MoA (moa ''): {unannotated}")
    spec = {"name": "bbbc021", "channels": list(CHANNELS), "bit_depth": 16, "notes": notes}
    images = dict(image_modes=SIXTEEN_BIT_MODES,
                  image_description="a single-page 16-bit greyscale TIFF (BBBC021)")
    screen = layout.make_screen(spec, index, perturbations, source=image_path,
                                images_dir=raw_dir, **images)
    if centers is not None:
        locations, skipped = read_centers(os.fspath(centers), table, all_images)
        notes.append(f"nucleus centres from {os.fspath(centers)}; {skipped} centres of "
                     "left-out sites skipped")
    else:
        locations = nuclei.detect_locations(
            screen, "DNA", workers=detect_workers, progress=progress, **(detect_options or {}))
        notes.append(f"nucleus centres detected on DNA ({len(locations)} nuclei)")
    screen = layout.with_locations(screen, locations)
    return dataclasses.replace(screen, spec={**screen.spec, "notes": notes})


def _site_index(table: pd.DataFrame, path: str, raw_dir: str) -> pd.DataFrame:
    """The index.csv columns of the kept rows of the image table; checks every TIFF exists."""
    index = pd.DataFrame({
        layout.PLATE: table["Image_Metadata_Plate_DAPI"].to_numpy(),
        layout.WELL: table["Image_Metadata_Well_DAPI"].to_numpy(),
    })
    for channel, stain in STAINS.items():
        names = table[f"Image_FileName_{stain}"]
        folders = table[f"Image_PathName_{stain}"]
        empty = (names == "") | (folders == "")
        if empty.any():
            i = int(table["table_row"].iloc[int(np.flatnonzero(empty)[0])])
            raise ValueError(f"{path} row {i}: no {stain} image (Image_FileName_{stain} / "
                             f"Image_PathName_{stain} empty).")
        index[channel] = [f"{folder}/{name}" for folder, name in zip(folders, names)]
    sites = []
    for row, name in zip(table["table_row"], table["Image_FileName_DAPI"]):
        match = _SITE_IN_NAME.search(name)
        if match is None:
            raise ValueError(f"{path} row {row}: cannot read the site from "
                             f"Image_FileName_DAPI {name!r} (expected '_s<k>_w').")
        sites.append(int(match.group(1)))
    index[layout.SITE] = sites
    index[layout.BATCH] = [p.split("/")[0] for p in table["Image_PathName_DAPI"]]
    index[layout.CELL_LINE] = CELL_LINE
    index[layout.DOSE] = table["dose"].to_numpy()
    index["Metadata_Replicate"] = table["Replicate"].to_numpy()
    index["Metadata_TableNumber"] = table["TableNumber"].to_numpy()
    index["Metadata_ImageNumber"] = table["ImageNumber"].to_numpy()
    for i, row in enumerate(table["table_row"]):
        for channel, stain in STAINS.items():
            file = os.path.join(raw_dir, index[channel].iat[i])
            if not os.path.isfile(file):
                raise FileNotFoundError(f"Missing image {file}: the {stain} image of {path} "
                                        f"row {row}.")
    return index


def _perturbations(site_compounds, moa_by_compound, smiles) -> pd.DataFrame:
    ids = sorted(set(site_compounds))
    return pd.DataFrame({
        "perturbation": ids,
        "type": ["control" if c == CONTROL else "compound" for c in ids],
        "is_control": [int(c == CONTROL) for c in ids],
        "moa": [moa_by_compound.get(c, "") for c in ids],
        "smiles": [smiles.get(c, "") for c in ids],
    })


def read_centers(path: str, table: pd.DataFrame, all_images) -> tuple[pd.DataFrame, int]:
    """Nucleus centres of the kept sites (rows of `table`) as locations (site_row, x, y), and
    how many centres belong to images of the image table that were left out (skipped).

    A centre whose (TableNumber, ImageNumber) is not in the image table (`all_images`) at all
    is an error naming its row.
    """
    centers = read_table(path, CENTER_COLUMNS, "nucleus centre table")
    site_of = {}
    for site_row, key in enumerate(zip(table["TableNumber"], table["ImageNumber"])):
        if key in site_of:
            raise ValueError(f"The image table lists (TableNumber, ImageNumber) {key} twice; "
                             "centres cannot be assigned to images.")
        site_of[key] = site_row
    center_keys = list(zip(centers["TableNumber"], centers["ImageNumber"]))
    site_row = np.array([site_of.get(k, -1) for k in center_keys], dtype=np.int64)
    left_out = site_row < 0
    unknown = np.flatnonzero(left_out & ~np.array([k in all_images for k in center_keys],
                                                  dtype=bool))
    if len(unknown):
        i = int(unknown[0])
        raise ValueError(f"{path} row {i}: image (TableNumber, ImageNumber) {center_keys[i]} "
                         "is not in the image table.")
    x = numbers(centers, layout.CENTER_X, path)
    y = numbers(centers, layout.CENTER_Y, path)
    keep = ~left_out
    locations = pd.DataFrame({"site_row": site_row[keep], "x": x[keep], "y": y[keep]})
    return locations, int(left_out.sum())
