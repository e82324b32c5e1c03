"""BBBC021 as IMPA preprocessed it (impa_reference.md §3.1) -> layout.RawScreen.

On-disk layout (IMAGES_DIR is `--raw`; the dataset folder of IMPA's Zenodo archive, e.g.
datasets/bbbc021_all):

  METADATA.csv   read with index_col=0 (IMPA's bbbc021_df_all.csv / bbbc021_df_six.csv):
      SAMPLE_KEY   one per cell; names its crop file (below)
      SPLIT        train / test
      STATE        control / trt, or 0 (control) / 1 (treated) as in the released CSVs
      CPD_NAME     compound (DMSO is the control)
      ANNOT        mechanism of action
      DOSE         µM
      optional: BATCH, PLATE (used when present), SMILES (used when no SMILES table is given)
  IMAGES_DIR/... one HWC uint8 .npy per cell (96 x 96 x 3: DNA, Tubulin, Actin), at the path
      IMPA's loader derives from SAMPLE_KEY: without '-': t = key.split('_'),
      t[0]/t[1]/'_'.join(t[2:]).npy (e.g. Week1_22123_B02_s1_7 -> Week1/22123/B02_s1_7.npy);
      with '-': t = key.split('-')[1].split('_'), (t[0]_t[1])/t[2]/'_'.join(t[3:]).npy.

The crops are used as they are (pre-cropped screen: no illumination correction, no
cropping). IMPA's cell files do not name their field of view, so each (plate, compound,
dose) becomes one site with an empty well; the plate is PLATE, else the crop's folder
(t[0]_t[1]), the batch BATCH, else t[0]. The SPLIT column goes to each cell's split
(build with split="given" to keep IMPA's train/test).
"""

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from data_builders.bbbc021 import raw
from data_builders.raw_screen import layout

METADATA_COLUMNS = ("SAMPLE_KEY", "SPLIT", "STATE", "CPD_NAME", "ANNOT", "DOSE")
CONTROL_STATES = ("control", "0")
TREATED_STATES = ("trt", "1")


def sample_key_path(key: str) -> tuple[str, str]:
    """(folder, file) of a cell's crop, relative to the images folder, by IMPA's rule."""
    if "-" in key:
        t = key.split("-")[1].split("_")
        if len(t) < 4:
            raise ValueError(f"SAMPLE_KEY {key!r} has too few '_' parts after '-'.")
        return f"{t[0]}_{t[1]}/{t[2]}", "_".join(t[3:]) + ".npy"
    t = key.split("_")
    if len(t) < 3:
        raise ValueError(f"SAMPLE_KEY {key!r} has too few '_' parts (expected batch_plate_...).")
    return f"{t[0]}/{t[1]}", "_".join(t[2:]) + ".npy"


def read_metadata(path: str) -> pd.DataFrame:
    """IMPA's metadata CSV (first column is the index) as text, required columns checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing IMPA metadata {path}.")
    try:
        table = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"Cannot parse IMPA metadata {path}: {e}") from e
    missing = [c for c in METADATA_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {list(table.columns)}.")
    if table.empty:
        raise ValueError(f"{path} has no rows.")
    table["row"] = np.arange(len(table))  # Row numbers for errors, before any selection.
    return table


def _is_control(table: pd.DataFrame, path: str) -> np.ndarray:
    state = table["STATE"].str.strip()
    bad = ~state.isin(CONTROL_STATES + TREATED_STATES)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path} row {table['row'].iloc[i]} (index {table.index[i]!r}): "
                         f"STATE {table['STATE'].iloc[i]!r} is not one of "
                         f"{CONTROL_STATES + TREATED_STATES}.")
    control = state.isin(CONTROL_STATES).to_numpy()
    both = sorted(set(table["CPD_NAME"][control]) & set(table["CPD_NAME"][~control]))
    if both:
        raise ValueError(f"{path}: compound(s) {both} appear as both control and treated "
                         "(STATE).")
    return control


def read_bbbc021_impa(
    images_dir: str | os.PathLike,
    metadata: str | os.PathLike,
    *,
    smiles_table: str | os.PathLike | None = None,
    compounds: Sequence[str] | None = None,
    subset: str | None = None,
    name: str = "bbbc021",
) -> layout.RawScreen:
    """IMPA's preprocessed BBBC021 (module docstring) as a pre-cropped screen.

    Args:
      images_dir: the folder the SAMPLE_KEY paths are relative to.
      metadata: IMPA's metadata CSV.
      smiles_table: CSV with columns compound, smiles; attached to the perturbations for
        molecule embeddings and split="scaffold". Then every treated compound needs one (an
        error lists those without). Default: the metadata's SMILES column if it has one,
        else no SMILES.
      compounds, subset: keep only these compounds / a named subset ("impa_six"), like
        IMPA's mol_list.
      name: dataset name.
    """
    images_dir = os.path.abspath(os.fspath(images_dir))
    path = os.fspath(metadata)
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"IMPA images folder {images_dir} does not exist.")
    table = read_metadata(path)
    notes = []
    keep = raw.select_compounds(table["CPD_NAME"].unique(), compounds, subset, path)
    if keep is not None:
        dropped = ~table["CPD_NAME"].isin(keep)
        notes.append(f"{int(dropped.sum())} cells of compounds outside the selection left out")
        table = table[~dropped]
    rows = table["row"].to_numpy()
    control = _is_control(table, path)
    split = table["SPLIT"].str.strip().to_numpy(dtype=object)
    bad = ~np.isin(split, ["train", "test"])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path} row {rows[i]} (index {table.index[i]!r}): SPLIT "
                         f"{split[i]!r} is not 'train' or 'test'.")
    dose = raw.numbers(table, "DOSE", path, rows)

    folders, crop_paths = [], []
    for i, key in enumerate(table["SAMPLE_KEY"]):
        try:
            folder, file = sample_key_path(key)
        except ValueError as e:
            raise ValueError(f"{path} row {rows[i]}: {e}") from e
        crop = os.path.join(images_dir, folder, file)
        if not os.path.isfile(crop):
            raise FileNotFoundError(f"Missing crop {crop} of {path} row {rows[i]} (SAMPLE_KEY "
                                    f"{key!r}).")
        folders.append(folder)
        crop_paths.append(crop)
    plate = (table["PLATE"].to_numpy(dtype=object) if "PLATE" in table.columns
             else np.array([f.replace("/", "_") for f in folders], dtype=object))
    batch = (table["BATCH"].to_numpy(dtype=object) if "BATCH" in table.columns
             else np.array([f.split("/")[0].split("_")[0] for f in folders], dtype=object))

    compound = table["CPD_NAME"].to_numpy(dtype=object)
    smiles = {}
    if smiles_table is not None:
        smiles = raw.read_smiles(os.fspath(smiles_table))
        source = os.fspath(smiles_table)
    elif "SMILES" in table.columns:
        smiles = {c: s for c, s in zip(compound, table["SMILES"]) if s.strip()}
        source = f"the SMILES column of {path}"
    if smiles_table is not None or "SMILES" in table.columns:
        check_compounds = compound[~control]
        raw.check_smiles(check_compounds, smiles, source,
                         "Pass compounds=[...] (--compounds) without them, or a SMILES table "
                         "that covers them (--smiles-table).")

    ids = sorted(set(compound))
    control_ids = set(compound[control])
    moa = {}
    annot = table["ANNOT"].to_numpy(dtype=object)
    for i, (c, m) in enumerate(zip(compound, annot)):
        if moa.setdefault(c, m) != m:
            raise ValueError(f"{path} row {rows[i]}: compound {c!r} has ANNOT {m!r} here and "
                             f"{moa[c]!r} in an earlier row.")
    perturbations = pd.DataFrame({
        "perturbation": ids,
        "type": ["control" if c in control_ids else "compound" for c in ids],
        "is_control": [int(c in control_ids) for c in ids],
        "moa": [moa[c] for c in ids],
        "smiles": [smiles.get(c, "") for c in ids],
    })

    # One site per (plate, compound, dose), numbered within the plate in order of appearance.
    groups = pd.DataFrame({"plate": plate, "compound": compound, "dose": dose,
                           "batch": batch})
    site_of_cell = groups.groupby(["plate", "compound", "dose"], sort=False).ngroup()
    sites = groups.drop_duplicates(["plate", "compound", "dose"]).reset_index(drop=True)
    batches = groups.groupby(["plate", "compound", "dose"], sort=False)["batch"].nunique()
    if (batches > 1).any():
        p, c, d = batches.index[int(np.flatnonzero(batches.to_numpy() > 1)[0])]
        raise ValueError(f"{path}: cells of plate {p!r}, compound {c!r}, dose {d} have more "
                         "than one BATCH.")
    index = pd.DataFrame({
        layout.PLATE: sites["plate"],
        layout.WELL: "",
        layout.SITE: sites.groupby("plate").cumcount() + 1,
        layout.PERTURBATION: sites["compound"],
        layout.BATCH: sites["batch"],
        layout.CELL_LINE: raw.CELL_LINE,
        layout.DOSE: sites["dose"],
        "Metadata_MoA": [moa[c] for c in sites["compound"]],
    })
    locations = pd.DataFrame({
        "site_row": site_of_cell.to_numpy(np.int64),
        "x": np.nan,
        "y": np.nan,
        "crop_path": crop_paths,
        "split": split,
    })
    notes.append(f"{len(table)} pre-cropped cells from {path}; one site per (plate, compound, "
                 "dose), wells unknown")
    spec = {"name": name, "channels": list(raw.CHANNELS), "notes": notes}
    return layout.make_screen(spec, index, perturbations, source=path, images_dir=images_dir,
                              locations=locations)
