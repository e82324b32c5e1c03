"""RxRx1 (Recursion 2019; Sypetkowski et al. 2023) -> layout.RawScreen.

On-disk layout of the RxRx1 release (rxrx.ai/rxrx1, rxrx-datasets/rxrx1/README.md), `raw_dir`
being the unpacked `rxrx1/` folder:

  rxrx1/metadata.csv
      one row per site, columns site_id, well_id, cell_type, dataset, experiment, plate,
      well, site, well_type, sirna, sirna_id. experiment is e.g. "U2OS-01" (cell type and
      experiment number, the experimental batch); cell_type one of HEPG2, HUVEC, RPE, U2OS;
      dataset the CellSignal competition split (train/test); plate 1..4; well e.g. "B02";
      site 1 or 2; well_type treatment, negative_control or positive_control; sirna the
      ThermoFisher siRNA id (negative controls: "EMPTY"), sirna_id its integer code.
  rxrx1/images/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png
      512x512 8-bit greyscale PNG, one per channel, w1..w6 = Hoechst (DNA), ConA (ER),
      Phalloidin (actin), Syto14 (nucleoli/RNA), MitoTracker (mitochondria), WGA (Golgi and
      plasma membrane).

Mapping (IMPA batch-correction setting, impa.txt "RxRx1"): batch = experiment, plate id =
f"{experiment}_Plate{plate}", cell line = cell_type, perturbation = sirna (type "sirna";
the negative-control sirna, type "control"). IMPA keeps all 1,139 conditions (1,108 treatments,
30 positive-control siRNAs, the untreated control), so positive controls are kept by default
as ordinary siRNA perturbations (`Metadata_WellType` tells them apart). Cells are found by
Otsu segmentation of the Hoechst channel (nuclei.detect_locations), as IMPA does.

Only 8-bit greyscale PNGs are accepted: that is what the release holds, and the builder's
per-plate illumination statistics would silently mix scales if a 16-bit re-export slipped
into a plate. A 16-bit or colour file is an error naming it.
"""

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from data_builders.raw_screen import layout

CHANNELS = ("Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA")
DNA_CHANNEL = "Hoechst"
IMAGE_SIZE = (512, 512)
METADATA_COLUMNS = ("site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well",
                    "site", "well_type", "sirna", "sirna_id")
WELL_TYPES = ("treatment", "negative_control", "positive_control")
NEGATIVE_CONTROL_SIRNA = "EMPTY"
# metadata.csv columns carried into the built cells.csv.
CARRIED_COLUMNS = {
    "site_id": "Metadata_SiteId",
    "well_id": "Metadata_WellId",
    "dataset": "Metadata_RxRx1Split",
    "well_type": "Metadata_WellType",
    "sirna_id": "Metadata_SirnaId",
}


def image_relpath(experiment: str, plate: str, well: str, site: int, channel_number: int) -> str:
    """Path of one channel image relative to rxrx1/images (rxrx-datasets/rxrx1/README.md)."""
    return f"{experiment}/Plate{plate}/{well}_s{site}_w{channel_number}.png"


def read_metadata(path: str) -> pd.DataFrame:
    """metadata.csv as text, checked: columns, well_type values, integer plate/site, sirna."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Missing {path}: expected the RxRx1 release's rxrx1/metadata.csv.")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in METADATA_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {list(table.columns)}.")
    if table.empty:
        raise ValueError(f"{path} has no rows.")
    for column in ("plate", "site"):
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = numbers.isna() | (numbers != numbers.round())
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path} row {i}: {column} {table[column][i]!r} is not an integer.")
        table[column] = numbers.astype(np.int64).astype(str)
    bad = ~table["well_type"].isin(WELL_TYPES)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path} row {i}: well_type {table['well_type'][i]!r}; expected one of {WELL_TYPES}.")
    negative = table["well_type"] == "negative_control"
    table.loc[negative & (table["sirna"] == ""), "sirna"] = NEGATIVE_CONTROL_SIRNA
    empty = table["sirna"] == ""
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(f"{path} row {i}: empty sirna in a {table['well_type'][i]} well.")
    return table


def _select(table, path, cell_types, experiments, include_positive_controls):
    """The rows of the chosen cell types and experiments, and what the selection left out."""
    keep = np.ones(len(table), dtype=bool)
    for column, values in (("cell_type", cell_types), ("experiment", experiments)):
        if values:
            unknown = sorted(set(values) - set(table[column]))
            if unknown:
                raise ValueError(
                    f"{column} {unknown} not in {path}; it has {sorted(set(table[column]))}.")
            keep &= table[column].isin(list(values)).to_numpy()
    positive = (table["well_type"] == "positive_control").to_numpy()
    left_out = int((keep & positive).sum()) if not include_positive_controls else 0
    if not include_positive_controls:
        keep &= ~positive
    selected = table[keep].reset_index(drop=True)
    if selected.empty:
        raise ValueError(
            f"No sites of {path} left after selecting cell_types={list(cell_types)}, "
            f"experiments={list(experiments)}, "
            f"include_positive_controls={include_positive_controls}.")
    counts = {"sites_in_metadata": int(len(table)), "sites_selected": int(len(selected)),
              "positive_control_sites_left_out": left_out}
    return selected, counts


def perturbation_table(metadata: pd.DataFrame, path: str) -> pd.DataFrame:
    """One row per sirna: negative-control sirnas are type "control", the rest "sirna"."""
    negative = metadata["well_type"] == "negative_control"
    control_ids = set(metadata.loc[negative, "sirna"])
    clash = metadata[~negative & metadata["sirna"].isin(control_ids)]
    if len(clash):
        i = int(clash.index[0])
        raise ValueError(
            f"{path} row {i}: sirna {metadata['sirna'][i]!r} is a negative control elsewhere "
            f"but here has well_type {metadata['well_type'][i]!r}.")
    ids = sorted(set(metadata["sirna"]))
    is_control = np.array([s in control_ids for s in ids], dtype=np.int64)
    return pd.DataFrame({
        "perturbation": ids,
        "type": np.where(is_control == 1, "control", "sirna"),
        "is_control": is_control,
        "modality": "sirna",
    })


def site_index(metadata: pd.DataFrame) -> pd.DataFrame:
    """The builder's site index (contract of layout.make_screen) from metadata.csv rows."""
    index = pd.DataFrame({
        layout.PLATE: metadata["experiment"] + "_Plate" + metadata["plate"],
        layout.WELL: metadata["well"].to_numpy(),
        layout.SITE: metadata["site"].astype(np.int64).to_numpy(),
        layout.PERTURBATION: metadata["sirna"].to_numpy(),
        layout.BATCH: metadata["experiment"].to_numpy(),
        layout.CELL_LINE: metadata["cell_type"].to_numpy(),
        "Metadata_Modality": "sirna",
    })
    for number, channel in enumerate(CHANNELS, start=1):
        index[channel] = [
            image_relpath(e, p, w, s, number) for e, p, w, s in zip(
                metadata["experiment"], metadata["plate"], metadata["well"], metadata["site"])]
    for source, column in CARRIED_COLUMNS.items():
        index[column] = metadata[source].to_numpy()
    return index


def read_rxrx1(
    raw_dir: str | os.PathLike,
    *,
    cell_types: Sequence[str] = (),
    experiments: Sequence[str] = (),
    include_positive_controls: bool = True,
    workers: int | None = None,
    progress: bool = False,
    nuclei_sigma: float = 2.0,
    nuclei_min_distance: int = 7,
    nuclei_min_area: int = 30,
) -> layout.RawScreen:
    """The RxRx1 release at `raw_dir` (the rxrx1/ folder) as a RawScreen with nucleus centres.

    Args:
      raw_dir: folder holding metadata.csv and images/ (module docstring).
      cell_types: keep these cell types (IMPA: ("U2OS",)); empty keeps all.
      experiments: keep these experiments (e.g. "U2OS-01"); empty keeps all.
      include_positive_controls: keep the 30 positive-control siRNA wells (IMPA does).
      workers, progress: nucleus detection parallelism and progress bar.
      nuclei_sigma, nuclei_min_distance, nuclei_min_area: detect_locations parameters.
    """
    from data_builders.raw_screen import nuclei

    raw_dir = os.fspath(raw_dir)
    path = os.path.join(raw_dir, "metadata.csv")
    metadata, selection = _select(read_metadata(path), path, tuple(cell_types),
                                  tuple(experiments), include_positive_controls)
    spec = {"name": "rxrx1", "channels": list(CHANNELS), "image_size": list(IMAGE_SIZE),
            "bit_depth": 8, "notes": {"selection": selection}}
    images_dir = os.path.join(raw_dir, "images")
    screen = layout.make_screen(
        spec, site_index(metadata), perturbation_table(metadata, path), source=path,
        images_dir=images_dir, image_modes=("L",),
        image_description="an 8-bit greyscale PNG (RxRx1; re-export the file as 8-bit greyscale)")
    locations = nuclei.detect_locations(
        screen, DNA_CHANNEL, workers=workers, progress=progress, sigma=nuclei_sigma,
        min_distance=nuclei_min_distance, min_area=nuclei_min_area)
    return layout.with_locations(screen, locations)
