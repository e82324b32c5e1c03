"""Optical pooled screen (Funk et al. 2022, HeLa essential genes; GRAPE 4.1) -> RawScreen.

Expected on-disk layout (the file conventions of the Blainey lab `ops` package, which produced
the released screen; its raw images are BioImage Archive study S-BIAD394):

  RAW/cells.csv | cells.csv.gz | cells.parquet
      one row per segmented cell with its in situ sequencing call (ops.in_situ.call_cells):
      well (e.g. "A1"), tile (int), cell (int, the label in the tile's segmentation),
      i, j (nucleus centre in phenotype-image pixels: i = row, j = column),
      sgRNA_0 (the cell's top barcode mapped to a library guide; empty = did not map),
      gene_symbol_0 (gene of that guide; non-targeting guides: "nontargeting"),
      cell_barcode_count_0 (reads supporting that barcode).
      Optional: plate (default one plate, "plate"), batch (default = plate),
      cell_barcode_0, sgRNA_1, gene_symbol_1, cell_barcode_count_1 (the second-best barcode),
      barcode_count; any other column is ignored.
  RAW/images/{plate}/{mag}_{well}_Tile-{tile}.phenotype.tif   (or images/{mag}_{well}_Tile-
      {tile}.phenotype.tif when the table has no plate column)
      one multi-page TIFF per tile: 4 pages of 8- or 16-bit greyscale, in the order DAPI,
      gH2AX, alpha-Tubulin, Phalloidin (mag default "20X").

Barcode assignment (GRAPE 4.1 uses cells "with perturbation barcodes indicating the
perturbation each cell received"): a cell is kept when its top barcode maps to a guide
(`sgRNA_0` not empty), is supported by at least `min_barcode_count` reads, and - when the
table has the second-best barcode - that barcode does not map to a different perturbation
with at least `min_barcode_count` reads. Cells of genes outside `genes` (when given; controls
always kept) are left out. Every rule's count is in `screen.spec["cell_assignment"]` and, after
the build, in OUT/cell_assignment.json; nothing else is dropped.

Perturbations: gene level by default (GRAPE learns one embedding per gene), the perturbation
id being the gene symbol; `level="sgrna"` uses the guide sequence. Guides of the genes in
`control_genes` ("nontargeting") form the control, type "control". Sites are tiles; the per-cell
label goes into locations["Metadata_Perturbation"].
"""

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from data_builders.raw_screen import layout

CHANNELS = ("DAPI", "gH2AX", "Tubulin", "Phalloidin")
CELL_LINE = "HeLa"
TABLE_NAMES = ("cells.csv", "cells.csv.gz", "cells.parquet")
REQUIRED_COLUMNS = ("well", "tile", "cell", "i", "j", "sgRNA_0", "gene_symbol_0",
                    "cell_barcode_count_0")
CONTROL_GENES = ("nontargeting",)
LEVELS = ("gene", "sgrna")
DEFAULT_PLATE = "plate"
_BIT_DEPTH_MODES = ("L", "I;16", "I;16B", "I;16L")


def tile_relpath(plate: str | None, magnification: str, well: str, tile: int) -> str:
    """A tile's phenotype TIFF relative to RAW/images (ops.filenames.name_file convention)."""
    name = f"{magnification}_{well}_Tile-{tile}.phenotype.tif"
    return name if plate is None else os.path.join(plate, name)


def read_ops_tile(screen: layout.RawScreen, site_row: int) -> np.ndarray:
    """One tile's multi-page phenotype TIFF as float32 (H, W, 4), pages in CHANNELS order.

    Every channel column of the index holds the same tile path. A wrong page count, a page
    that is not 8/16-bit greyscale, or pages of different shapes is an error naming the file.
    """
    where = screen.site_label(site_row)
    path = screen.image_path(site_row, screen.channels[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing phenotype image {path} ({where}).")
    planes = []
    try:
        with Image.open(path) as image:
            n_pages = getattr(image, "n_frames", 1)
            if n_pages != len(screen.channels):
                raise ValueError(
                    f"Phenotype image {path} ({where}) has {n_pages} page(s); expected "
                    f"{len(screen.channels)} ({', '.join(screen.channels)}).")
            for page in range(n_pages):
                image.seek(page)
                if image.mode not in _BIT_DEPTH_MODES:
                    raise ValueError(
                        f"Phenotype image {path} ({where}) page {page} "
                        f"({screen.channels[page]}) has PIL mode {image.mode!r}; expected 8- or "
                        "16-bit greyscale.")
                image.load()
                planes.append(np.asarray(image).astype(np.float32))
    except ValueError:
        raise
    except (OSError, SyntaxError) as e:
        raise ValueError(f"Cannot read image {path} ({where}): corrupt or truncated? {e}") from e
    shapes = {c: p.shape for c, p in zip(screen.channels, planes)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"Pages of phenotype image {path} ({where}) disagree in shape: {shapes}.")
    return np.stack(planes, axis=-1)


def find_cells_table(raw_dir: str, cells_table: str | None = None) -> str:
    if cells_table is not None:
        path = cells_table if os.path.isabs(cells_table) else os.path.join(raw_dir, cells_table)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Missing cells table {path}.")
        return path
    for name in TABLE_NAMES:
        path = os.path.join(raw_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"No cells table in {raw_dir}: expected one of {TABLE_NAMES} (ops data_builders/ops "
        "reader.py docstring), or pass cells_table=.")


def read_cells_table(path: str) -> pd.DataFrame:
    """The per-cell table as text columns (tile, cell as int; i, j, counts as float)."""
    if path.endswith(".parquet"):
        table = pd.read_parquet(path)
        for column in table.columns:
            if table[column].dtype == object:
                table[column] = table[column].fillna("").astype(str)
    elif path.endswith((".csv", ".csv.gz")):
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        raise ValueError(
            f"Cells table {path}: unsupported format; use .csv, .csv.gz or .parquet "
            "(convert an ops .hdf table with pandas.read_hdf(...).to_parquet(...)).")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {list(table.columns)}.")
    if table.empty:
        raise ValueError(f"{path} has no rows (cells).")
    table = table.reset_index(drop=True)
    for column in ("sgRNA_0", "gene_symbol_0", "sgRNA_1", "gene_symbol_1", "well", "plate",
                   "batch"):
        if column in table.columns:
            table[column] = table[column].fillna("").astype(str)
    for column, integer in (("tile", True), ("cell", True), ("i", False), ("j", False),
                            ("cell_barcode_count_0", False), ("cell_barcode_count_1", False)):
        if column not in table.columns:
            continue
        raw = table[column]
        values = pd.to_numeric(raw.replace("", np.nan), errors="coerce")
        optional = column == "cell_barcode_count_1"
        bad = values.isna() & ~(optional & (raw.astype(str) == ""))
        if integer:
            bad |= values.notna() & (values != values.round())
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            kind = "an integer" if integer else "a number"
            raise ValueError(f"{path} row {r}: {column} {raw[r]!r} is not {kind}.")
        table[column] = values.astype(np.int64) if integer else values.fillna(0.0)
    if "plate" not in table.columns:
        table["plate"] = ""
    keys = table[["plate", "well", "tile", "cell"]]
    duplicated = keys.duplicated()
    if duplicated.any():
        r = int(np.flatnonzero(duplicated)[0])
        plate, well, tile, cell = (table[c][r] for c in ("plate", "well", "tile", "cell"))
        raise ValueError(f"{path} row {r}: cell {cell} of plate {plate!r} well {well} tile "
                         f"{tile} appears more than once.")
    return table


def assign_cells(table: pd.DataFrame, *, level: str, min_barcode_count: float,
                 genes: Sequence[str], control_genes: Sequence[str]) -> tuple[np.ndarray, dict]:
    """Each cell's fate ("kept", "unmapped", "low_count", "ambiguous", "other_gene") and the
    counts per fate (module docstring)."""
    if level not in LEVELS:
        raise ValueError(f"Unknown level {level!r}; expected one of {LEVELS}.")
    if min_barcode_count < 0:
        raise ValueError(f"min_barcode_count must be >= 0, got {min_barcode_count}.")
    key = "gene_symbol" if level == "gene" else "sgRNA"
    fate = np.full(len(table), "kept", dtype=object)
    unmapped = (table["sgRNA_0"] == "").to_numpy() | (table["gene_symbol_0"] == "").to_numpy()
    low = ~unmapped & (table["cell_barcode_count_0"].to_numpy() < min_barcode_count)
    fate[unmapped] = "unmapped"
    fate[low] = "low_count"
    if f"{key}_1" in table.columns and "cell_barcode_count_1" in table.columns:
        second = table[f"{key}_1"].to_numpy(dtype=object)
        ambiguous = ((second != "") & (second != table[f"{key}_0"].to_numpy(dtype=object))
                     & (table["cell_barcode_count_1"].to_numpy() >= max(min_barcode_count, 1)))
        fate[(fate == "kept") & ambiguous] = "ambiguous"
    if genes:
        allowed = set(genes) | set(control_genes)
        other = ~table["gene_symbol_0"].isin(allowed).to_numpy()
        fate[(fate == "kept") & other] = "other_gene"
    counts = {"cells_in_table": int(len(table))}
    for name in ("kept", "unmapped", "low_count", "ambiguous", "other_gene"):
        counts[name] = int((fate == name).sum())
    return fate, counts


def perturbation_table(cells: pd.DataFrame, level: str,
                       control_genes: Sequence[str]) -> pd.DataFrame:
    """One row per gene (or guide) of the kept cells; control genes' rows are type control."""
    if level == "gene":
        ids = sorted(set(cells["gene_symbol_0"]))
        gene = np.asarray(ids, dtype=object)
        sequence = np.full(len(ids), "", dtype=object)
    else:
        guides = cells.drop_duplicates("sgRNA_0").sort_values("sgRNA_0")
        clash = cells.groupby("sgRNA_0")["gene_symbol_0"].nunique()
        if (clash > 1).any():
            guide = clash.index[np.flatnonzero(clash.to_numpy() > 1)[0]]
            raise ValueError(f"sgRNA {guide!r} is labelled with more than one gene symbol.")
        ids = list(guides["sgRNA_0"])
        gene = guides["gene_symbol_0"].to_numpy(dtype=object)
        sequence = np.asarray(ids, dtype=object)
    is_control = np.isin(gene, list(control_genes)).astype(np.int64)
    return pd.DataFrame({
        "perturbation": ids,
        "type": np.where(is_control == 1, "control", "crispr"),
        "is_control": is_control,
        "target_gene": np.where(is_control == 1, "", gene),
        "sequence": sequence,
        "modality": "crispr",
    })


def read_ops(
    raw_dir: str | os.PathLike,
    *,
    cells_table: str | None = None,
    magnification: str = "20X",
    level: str = "gene",
    min_barcode_count: float = 1,
    genes: Sequence[str] = (),
    control_genes: Sequence[str] = CONTROL_GENES,
    cell_line: str = CELL_LINE,
) -> layout.RawScreen:
    """The optical pooled screen at `raw_dir` as a RawScreen (module docstring for the layout).

    Args:
      raw_dir: folder with the cells table and images/.
      cells_table: the table's file name or path (default: the first of TABLE_NAMES there).
      magnification: the `{mag}` of the phenotype file names.
      level: "gene" (GRAPE) or "sgrna": what a perturbation id is.
      min_barcode_count: reads needed for the top barcode (cell_barcode_count_0).
      genes: keep only cells of these genes (plus controls); empty keeps every gene.
      control_genes: gene symbols of the non-targeting guides.
      cell_line: Metadata_CellLine of every site.
    """
    raw_dir = os.fspath(raw_dir)
    path = find_cells_table(raw_dir, cells_table)
    table = read_cells_table(path)
    fate, counts = assign_cells(table, level=level, min_barcode_count=min_barcode_count,
                                genes=tuple(genes), control_genes=tuple(control_genes))
    kept = fate == "kept"
    if not kept.any():
        raise ValueError(f"No cell of {path} has an assigned perturbation: {counts}.")
    unknown = sorted(set(genes) - set(table["gene_symbol_0"][kept]))
    counts["genes_without_cells"] = unknown
    key = "gene_symbol_0" if level == "gene" else "sgRNA_0"
    perturbations = perturbation_table(table[kept], level, control_genes)

    has_plate = (table["plate"] != "").any()
    if has_plate and (table["plate"] == "").any():
        r = int(np.flatnonzero(table["plate"] == "")[0])
        raise ValueError(f"{path} row {r}: empty plate.")
    plates = table["plate"].where(table["plate"] != "", DEFAULT_PLATE)
    batches = table["batch"] if "batch" in table.columns else plates
    all_sites = pd.DataFrame({"plate": plates, "well": table["well"], "tile": table["tile"],
                              "batch": batches})
    per_plate = all_sites.groupby("plate")["batch"].nunique()
    if (per_plate > 1).any():
        plate = per_plate.index[np.flatnonzero(per_plate.to_numpy() > 1)[0]]
        raise ValueError(f"{path}: plate {plate} has cells of several batches.")
    sites = all_sites.drop_duplicates(["plate", "well", "tile"]).reset_index(drop=True)
    control = perturbations.loc[perturbations["is_control"] == 1, "perturbation"]
    site_label = control.iloc[0] if len(control) else perturbations["perturbation"].iloc[0]
    index = pd.DataFrame({
        layout.PLATE: sites["plate"],
        layout.WELL: sites["well"],
        layout.SITE: sites["tile"].astype(np.int64),
        layout.PERTURBATION: site_label,
        layout.BATCH: sites["batch"],
        layout.CELL_LINE: cell_line,
        "Metadata_Modality": "crispr",
    })
    tiles = [tile_relpath(p if has_plate else None, magnification, w, t)
             for p, w, t in zip(sites["plate"], sites["well"], sites["tile"])]
    for channel in CHANNELS:
        index[channel] = tiles

    site_of = pd.Series(np.arange(len(sites)),
                        index=pd.MultiIndex.from_frame(sites[["plate", "well", "tile"]]))
    cells = table[kept]
    rows = site_of.reindex(pd.MultiIndex.from_arrays(
        [plates[kept], cells["well"], cells["tile"]])).to_numpy()
    locations = pd.DataFrame({
        "site_row": rows.astype(np.int64),
        "x": cells["j"].to_numpy(np.float64),
        "y": cells["i"].to_numpy(np.float64),
        layout.PERTURBATION: cells[key].to_numpy(dtype=object),
    })
    locations = locations.sort_values("site_row", kind="stable").reset_index(drop=True)
    images_dir = os.path.join(raw_dir, "images")
    for row, tile in enumerate(tiles):
        if not os.path.isfile(os.path.join(images_dir, tile)):
            first = int(np.flatnonzero(
                (plates == sites["plate"][row]).to_numpy()
                & (table["well"] == sites["well"][row]).to_numpy()
                & (table["tile"] == sites["tile"][row]).to_numpy())[0])
            raise FileNotFoundError(
                f"{path} row {first}: missing phenotype image {os.path.join(images_dir, tile)} "
                f"of well {sites['well'][row]} tile {sites['tile'][row]}.")
    spec = {"name": "ops", "channels": list(CHANNELS),
            "notes": {"cell_assignment": counts, "level": level,
                      "min_barcode_count": min_barcode_count,
                      "control_genes": list(control_genes)}}
    return layout.make_screen(
        spec=spec, index=index, perturbations=perturbations, source=path,
        images_dir=images_dir, locations=locations, site_reader=read_ops_tile)
