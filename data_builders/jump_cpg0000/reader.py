"""JUMP cpg0000 pilot (CPJUMP1; Chandrasekaran et al. 2024) in the Cell Painting Gallery layout
-> `layout.RawScreen`.

`raw_dir` is a Gallery source folder (e.g. cellpainting-gallery/cpg0000-jump-pilot/source_4):

  images/{batch}/images/{plate folder}/Images/*.tiff     16-bit greyscale TIFF, one per channel
                                                           (Phenix names r01c01f01p01-ch1sk1fk1fl1)
  workspace/load_data_csv/{batch}/{plate}/load_data.csv  one row per site: Metadata_Plate,
      Metadata_Well (A01; r01c01 is converted), Metadata_Site, and per channel either
      URL_Orig{Channel} (s3://.../images/{batch}/images/...) or FileName_Orig{Channel} +
      PathName_Orig{Channel}; extra channels (Brightfield, ...) are ignored
  workspace/metadata/platemaps/{batch}/barcode_platemap.csv   Assay_Plate_Barcode, Plate_Map_Name
  workspace/metadata/platemaps/{batch}/platemap/{Plate_Map_Name}.txt
      TSV: [plate_map_name,] well_position, broad_sample[, solvent]
  workspace/metadata/external_metadata/JUMP-Target-1_{compound,crispr,orf}_metadata.tsv
      compound: broad_sample, pert_iname, target_list, pert_type, control_type, smiles, ...
      crispr:   broad_sample, gene, pert_type, control_type, target_sequence, negcon_control_type
      orf:      broad_sample, gene, pert_type, control_type, 5'_flank_seq, ...
  workspace/analysis/{batch}/{plate}/analysis/{folder}/Nuclei.csv + Image.csv
      CellProfiler output (folder per site, well or plate): Nuclei ImageNumber,
      Location_Center_X/Y (else AreaShape_Center_X/Y); Image ImageNumber, Metadata_Plate,
      Metadata_Well, Metadata_Site
  optional experiment-metadata.tsv (2024_Chandrasekaran_NatureMethods benchmark/output):
      Batch, Plate_Map_Name, Assay_Plate_Barcode, Perturbation, Cell_type, Time, ...

Image paths: the part of a load_data path after `{batch}/images/` is read under
`raw_dir/images/{batch}/images/`; a path without it is read as `{plate folder}/Images/{file}`
there (its last directory two levels).
"""

import glob
import os
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from data_builders.deepprofiler_layout import reader as dp
from data_builders.raw_screen import layout

PLATE, WELL, SITE = layout.PLATE, layout.WELL, layout.SITE
DEFAULT_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
MODALITIES = ("compound", "crispr", "orf")
DEFAULT_TABLES = {m: f"JUMP-Target-1_{m}_metadata.tsv" for m in MODALITIES}
DMSO = "DMSO"
TIME = "Metadata_Time"
_RC_WELL = re.compile(r"^r(\d{2})c(\d{2})$", re.IGNORECASE)
_EXPERIMENT_USED = ("Batch", "Plate_Map_Name", "Assay_Plate_Barcode", "Perturbation",
                    "Cell_type", "Time")


def _well_name(well: str) -> str:
    """A01-style well names; Phenix r01c01 is converted."""
    match = _RC_WELL.match(well)
    if match:
        return f"{chr(ord('A') + int(match.group(1)) - 1)}{int(match.group(2)):02d}"
    return well


def perturbation_table(tables: dict[str, pd.DataFrame], sources: dict[str, str]
                       ) -> pd.DataFrame:
    """JUMP-Target compound / CRISPR / ORF metadata -> one perturbation table (RAW_LAYOUT.md).

    Negative controls (control_type == "negcon": DMSO, non-targeting guides, the ORF negcon
    genes) are `type` "control", is_control 1; positive controls keep their modality's type.
    DMSO's metadata row has broad_sample "NA"; its id is "DMSO" (empty plate-map wells of
    compound plates hold it). `name` is pert_iname (compounds) or the gene.
    """
    required = {"compound": ("broad_sample", "pert_iname", "control_type", "smiles",
                             "target_list"),
                "crispr": ("broad_sample", "gene", "control_type", "target_sequence"),
                "orf": ("broad_sample", "gene", "control_type", "5'_flank_seq")}
    rows = []
    for modality, table in tables.items():
        dp.require_columns(table, required[modality], sources[modality])
        for record in table.to_dict("records"):
            negcon = record["control_type"] == "negcon"
            sample = record["broad_sample"]
            if modality == "compound":
                if negcon and record["pert_iname"] == DMSO:
                    sample = DMSO
                target = "" if record["target_list"] == "NA" else record["target_list"]
                rows.append(dict(perturbation=sample, smiles=record["smiles"],
                                 target_gene=target, sequence="", name=record["pert_iname"]))
            else:
                sequence = record["target_sequence" if modality == "crispr" else "5'_flank_seq"]
                rows.append(dict(perturbation=sample, smiles="", target_gene=record["gene"],
                                 sequence=sequence, name=record["gene"]))
            rows[-1].update(type="control" if negcon else modality, is_control=int(negcon),
                            modality=modality, moa="", control_type=record["control_type"])
            if not sample:
                raise ValueError(f"{sources[modality]} row {len(rows) - 1}: empty broad_sample.")
    table = pd.DataFrame(rows)
    duplicated = table["perturbation"].duplicated()
    if duplicated.any():
        raise ValueError(f"Perturbation ids {list(table['perturbation'][duplicated][:5])} appear "
                         f"twice across {list(sources.values())}.")
    return table


def _read_tsv(path: str) -> pd.DataFrame:
    return dp.read_csv_text(path, sep="\t")


def _image_path(raw_dir: str, batch: str, directory: str, file_name: str) -> str:
    """Local path of a load_data image: the part after `{batch}/images/`, else the last two
    directories, under raw_dir/images/{batch}/images/."""
    full = f"{directory.rstrip('/')}/{file_name}" if file_name else directory
    full = full.replace("\\", "/")
    marker = f"/{batch}/images/"
    at = full.rfind(marker)
    if at >= 0:
        relative = full[at + len(marker):]
    else:
        parts = full.split("/")
        relative = "/".join(parts[-3:])
    return os.path.join(raw_dir, "images", batch, "images", *relative.split("/"))


def _load_data(raw_dir: str, batch: str, plate: str, channels: Sequence[str]) -> pd.DataFrame:
    """One plate's load_data.csv -> sites with local image paths per channel."""
    path = os.path.join(raw_dir, "workspace", "load_data_csv", batch, plate, "load_data.csv")
    table = dp.read_csv_text(path)
    dp.require_columns(table, (PLATE, WELL, SITE), path)
    sites = pd.DataFrame({PLATE: table[PLATE], WELL: table[WELL].map(_well_name),
                          SITE: table[SITE], layout.BATCH: batch})
    wrong = sites[PLATE] != plate
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise ValueError(f"{path} row {i}: Metadata_Plate {sites[PLATE][i]!r} is not the "
                         f"plate of its folder ({plate!r}).")
    for channel in channels:
        url, name, folder = (f"URL_Orig{channel}", f"FileName_Orig{channel}",
                             f"PathName_Orig{channel}")
        if url in table.columns:
            paths = [_image_path(raw_dir, batch, u, "") for u in table[url]]
        elif name in table.columns and folder in table.columns:
            paths = [_image_path(raw_dir, batch, d, f) for d, f in zip(table[folder], table[name])]
        else:
            raise ValueError(f"{path} has neither {url} nor {name} + {folder} for channel "
                             f"{channel!r}; it has {list(table.columns)}.")
        sites[channel] = paths
    sites["_source_row"] = np.arange(len(table))
    sites["_source"] = path
    return sites


def _plate_map(raw_dir: str, batch: str, plate_map_name: str) -> pd.DataFrame:
    path = os.path.join(raw_dir, "workspace", "metadata", "platemaps", batch, "platemap",
                        f"{plate_map_name}.txt")
    table = _read_tsv(path)
    dp.require_columns(table, ("well_position", "broad_sample"), path)
    table["well_position"] = table["well_position"].map(_well_name)
    table["_source"] = path
    return table


def _cellprofiler_nuclei(raw_dir: str, batch: str, plate: str, object_name: str
                         ) -> pd.DataFrame:
    """Every nucleus of a plate from CellProfiler's per-group Nuclei.csv + Image.csv: columns
    Metadata_Plate, Metadata_Well, Metadata_Site, x, y."""
    root = os.path.join(raw_dir, "workspace", "analysis", batch, plate, "analysis")
    found = sorted(glob.glob(os.path.join(root, "*", f"{object_name}.csv")))
    if not found:
        raise FileNotFoundError(
            f"No CellProfiler {object_name}.csv under {root}/*/ for plate {plate}; pass "
            "locations=<DeepProfiler locations folder> if the centres are elsewhere.")
    parts = []
    for nuclei_path in found:
        image_path = os.path.join(os.path.dirname(nuclei_path), "Image.csv")
        image = dp.read_csv_text(image_path)
        dp.require_columns(image, ("ImageNumber", PLATE, WELL, SITE), image_path)
        nuclei = dp.read_csv_text(nuclei_path)
        x, y = next(((f"{p}_Center_X", f"{p}_Center_Y") for p in ("Location", "AreaShape")
                     if f"{p}_Center_X" in nuclei.columns), (None, None))
        if x is None:
            raise ValueError(f"{nuclei_path} has neither Location_Center_X/Y nor "
                             f"AreaShape_Center_X/Y; it has {list(nuclei.columns)[:20]}...")
        dp.require_columns(nuclei, ("ImageNumber", y), nuclei_path)
        merged = nuclei[["ImageNumber", x, y]].merge(
            image[["ImageNumber", PLATE, WELL, SITE]], on="ImageNumber", how="left",
            validate="many_to_one")
        orphan = merged[PLATE].isna()
        if orphan.any():
            i = int(np.flatnonzero(orphan)[0])
            raise ValueError(f"{nuclei_path} row {i}: ImageNumber "
                             f"{merged['ImageNumber'][i]!r} is not in {image_path}.")
        xy = merged[[x, y]].apply(pd.to_numeric, errors="coerce")
        bad = xy.isna().any(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{nuclei_path} row {i}: centre {tuple(merged.loc[i, [x, y]])} is "
                             "not numeric.")
        parts.append(pd.DataFrame({PLATE: merged[PLATE], WELL: merged[WELL].map(_well_name),
                                   SITE: merged[SITE], "x": xy[x], "y": xy[y]}))
    return pd.concat(parts, ignore_index=True)


def read_cpg0000(
    raw_dir: str | os.PathLike,
    *,
    batches: Sequence[str] | None = None,
    plates: Sequence[str] | None = None,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    metadata_dir: str | None = None,
    metadata_tables: dict[str, str] | None = None,
    experiment_metadata: str | None = None,
    cell_lines: Sequence[str] | None = None,
    times: Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
    locations: str = "cellprofiler",
    nuclei_object: str = "Nuclei",
    bit_depth: int = 16,
    name: str = "jump_cpg0000",
) -> layout.RawScreen:
    """Parses CPJUMP1 plates in the Gallery layout into a screen for `build_raw_screen`.

    Args:
      raw_dir: the Gallery source folder holding images/ and workspace/.
      batches: batch folders to read (default every batch under workspace/load_data_csv).
      plates: plate barcodes to keep (default all of the batches).
      channels: channel names in order; load_data columns {URL,FileName,PathName}_Orig<name>.
      metadata_dir: folder of the JUMP-Target tables (default workspace/metadata/
        external_metadata); `metadata_tables` maps compound/crispr/orf to file names there.
      experiment_metadata: experiment-metadata.tsv: sets Metadata_CellLine (Cell_type),
        Metadata_Time (Time, hours), Metadata_Modality (Perturbation) per (Batch, barcode);
        its other columns are carried as Metadata_<column>.
      cell_lines, times, modalities: keep only plates with these values (cell lines and times
        need experiment_metadata); left-out plates are counted in spec["adapter_counts"].
      locations: "cellprofiler" (workspace/analysis Nuclei.csv + Image.csv) or a folder in
        DeepProfiler's layout ({Plate}/{Well}-{Site}-Nuclei.csv).
      nuclei_object: CellProfiler object table name for "cellprofiler" locations.
      bit_depth: expected bits per pixel, checked on the first site of every plate before the
        build and on every image as the build reads it.

    Plate-map wells that were not imaged are counted (spec["adapter_counts"]
    ["platemap_wells_not_imaged"]); imaged wells missing from the plate map, plate-map samples
    missing from the metadata tables, and plates without a plate map are errors. Empty
    plate-map wells of CRISPR / ORF plates (no reagent) are left out and counted
    ("sites_of_empty_wells"); on compound plates they are DMSO.
    """
    raw_dir = os.fspath(raw_dir)
    if not os.path.isdir(raw_dir):
        raise FileNotFoundError(f"Gallery source folder {raw_dir} does not exist.")
    channels = list(channels)
    load_root = os.path.join(raw_dir, "workspace", "load_data_csv")
    if batches is None:
        batches = sorted(d for d in os.listdir(load_root)
                         if os.path.isdir(os.path.join(load_root, d))) \
            if os.path.isdir(load_root) else []
    if not batches:
        raise FileNotFoundError(f"No batch folders under {load_root}.")
    counts = {"plates_left_out": 0, "platemap_wells_not_imaged": 0, "sites_of_empty_wells": 0}

    # Perturbation metadata.
    metadata_dir = metadata_dir or os.path.join(raw_dir, "workspace", "metadata",
                                                "external_metadata")
    files = {**DEFAULT_TABLES, **(metadata_tables or {})}
    sources = {m: os.path.join(metadata_dir, f) for m, f in files.items()
               if os.path.isfile(os.path.join(metadata_dir, f))}
    if not sources:
        raise FileNotFoundError(f"None of the JUMP-Target metadata tables {list(files.values())} "
                                f"is in {metadata_dir}.")
    perturbations = perturbation_table({m: _read_tsv(p) for m, p in sources.items()}, sources)
    modality_of = dict(zip(perturbations["perturbation"], perturbations["modality"]))

    experiment = None
    if experiment_metadata:
        experiment = _read_tsv(experiment_metadata)
        dp.require_columns(experiment, _EXPERIMENT_USED, experiment_metadata)
        experiment = experiment.set_index(["Batch", "Assay_Plate_Barcode"])
        if not experiment.index.is_unique:
            raise ValueError(f"{experiment_metadata}: (Batch, Assay_Plate_Barcode) repeats.")
    elif cell_lines or times:
        raise ValueError("Selecting cell_lines or times needs experiment_metadata "
                         "(experiment-metadata.tsv with Cell_type and Time).")

    all_sites, plate_keys = [], []
    for batch in batches:
        barcode_path = os.path.join(raw_dir, "workspace", "metadata", "platemaps", batch,
                                    "barcode_platemap.csv")
        barcodes = dp.read_csv_text(barcode_path)
        dp.require_columns(barcodes, ("Assay_Plate_Barcode", "Plate_Map_Name"), barcode_path)
        plate_map_of = dict(zip(barcodes["Assay_Plate_Barcode"], barcodes["Plate_Map_Name"]))
        batch_dir = os.path.join(load_root, batch)
        if not os.path.isdir(batch_dir):
            raise FileNotFoundError(f"Missing load_data folder {batch_dir}.")
        for plate in sorted(os.listdir(batch_dir)):
            if plates is not None and plate not in plates:
                continue
            if plate not in plate_map_of:
                raise ValueError(f"Plate {plate} (batch {batch}) has no row in {barcode_path}.")
            fields = {}
            if experiment is not None:
                if (batch, plate) not in experiment.index:
                    raise ValueError(f"Plate {plate} of batch {batch} is not in "
                                     f"{experiment_metadata}.")
                info = experiment.loc[(batch, plate)]
                fields = {layout.CELL_LINE: info["Cell_type"], TIME: info["Time"],
                          "Metadata_Modality": info["Perturbation"]}
                fields.update({f"Metadata_{c}": info[c] for c in experiment.columns
                               if c not in _EXPERIMENT_USED})
            if ((cell_lines and fields.get(layout.CELL_LINE) not in cell_lines)
                    or (times and str(fields.get(TIME)) not in [str(t) for t in times])):
                counts["plates_left_out"] += 1
                continue
            plate_map = _plate_map(raw_dir, batch, plate_map_of[plate])
            samples = set(plate_map["broad_sample"]) - {""}
            unknown = sorted(samples - set(modality_of))
            if unknown:
                raise ValueError(f"{plate_map['_source'][0]}: broad_sample(s) {unknown[:5]} "
                                 f"({len(unknown)} in all) are not in the metadata tables "
                                 f"{list(sources.values())}.")
            kinds = sorted({modality_of[s] for s in samples})
            modality = fields.get("Metadata_Modality") or (kinds[0] if len(kinds) == 1 else "")
            if modality not in MODALITIES or (kinds and kinds != [modality]):
                raise ValueError(f"{plate_map['_source'][0]}: plate {plate} mixes modalities "
                                 f"{kinds} (experiment metadata: {modality or 'none'}).")
            fields["Metadata_Modality"] = modality
            if modalities and modality not in modalities:
                counts["plates_left_out"] += 1
                continue
            sites = _load_data(raw_dir, batch, plate, channels)
            for key, value in fields.items():
                sites[key] = value
            sites["Metadata_Plate_Map_Name"] = plate_map_of[plate]
            well_sample = dict(zip(plate_map["well_position"], plate_map["broad_sample"]))
            imaged = set(sites[WELL])
            not_mapped = sorted(imaged - set(well_sample))
            if not_mapped:
                raise ValueError(f"Imaged well(s) {not_mapped[:5]} of plate {plate} "
                                 f"({sites['_source'][0]}) are not in the plate map "
                                 f"{plate_map['_source'][0]}.")
            counts["platemap_wells_not_imaged"] += len(set(well_sample) - imaged)
            sample = sites[WELL].map(well_sample)
            if modality == "compound":
                sample = sample.replace("", DMSO)
            empty = sample == ""
            counts["sites_of_empty_wells"] += int(empty.sum())
            sites = sites[~empty].copy()
            sites[layout.PERTURBATION] = sample[~empty]
            all_sites.append(sites)
            plate_keys.append((batch, plate))
    if not all_sites:
        raise ValueError(f"No plate of batches {list(batches)} left after selection "
                         f"(plates={plates}, cell_lines={cell_lines}, times={times}, "
                         f"modalities={modalities}).")
    index = pd.concat(all_sites, ignore_index=True)
    for column in (PLATE, WELL, SITE):
        missing = index[column] == ""
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            raise ValueError(f"{index['_source'][i]} row {index['_source_row'][i]}: empty "
                             f"{column}.")
    duplicated = index.duplicated([PLATE, WELL, SITE])
    if duplicated.any():
        i = int(np.flatnonzero(duplicated)[0])
        raise ValueError(f"Site {tuple(index.loc[i, [PLATE, WELL, SITE]])} appears twice "
                         f"(e.g. the same plate in two batches: pick one with batches=).")
    source = index["_source"][0] if len(plate_keys) == 1 else os.path.join(
        load_root, "{batch}/{plate}/load_data.csv")
    for site_row in range(len(index)):
        for channel in channels:
            if not os.path.isfile(index.at[site_row, channel]):
                raise FileNotFoundError(
                    f"Missing image {index.at[site_row, channel]} for channel {channel!r} of "
                    f"plate {index.at[site_row, PLATE]} well {index.at[site_row, WELL]} site "
                    f"{index.at[site_row, SITE]} ({index['_source'][site_row]} row "
                    f"{index['_source_row'][site_row]}).")
    dp.check_first_site_bit_depth(index, channels, "", bit_depth, source)
    index = index.drop(columns=["_source", "_source_row"])

    # Nucleus centres -> rows of the site table.
    if locations == "cellprofiler":
        nuclei = pd.concat([_cellprofiler_nuclei(raw_dir, b, p, nuclei_object)
                            for b, p in plate_keys], ignore_index=True)
        keys = pd.MultiIndex.from_frame(index[[PLATE, WELL, SITE]].astype(str))
        site_row = keys.get_indexer(pd.MultiIndex.from_frame(
            nuclei[[PLATE, WELL, SITE]].astype(str)))
        counts["nuclei_of_sites_left_out"] = int((site_row < 0).sum())
        cells = pd.DataFrame({"site_row": site_row, "x": nuclei["x"], "y": nuclei["y"]})
        cells = cells[site_row >= 0].reset_index(drop=True)
    else:
        cells = dp.read_locations_folder(locations, index)
    used = perturbations["perturbation"].isin(set(index[layout.PERTURBATION]))
    perturbations = perturbations[used].reset_index(drop=True)
    spec = {"name": name, "channels": channels, "bit_depth": bit_depth,
            "source_layout": "cellpainting_gallery", "adapter_counts": counts}
    return layout.make_screen(spec, index, perturbations, source=source, locations=cells,
                              image_modes=layout.BIT_DEPTH_MODES.get(bit_depth),
                              image_description=f"a {bit_depth}-bit greyscale TIFF")
