"""The JUMP cpg0000 builder on a tiny Gallery-layout screen written here from the real
JUMP-Target tables (compound, CRISPR and ORF plates of CPJUMP1)."""

import argparse
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_builders import jump_cpg0000
from data_builders.jump_cpg0000 import read_cpg0000
from data_builders.raw_screen import build_raw_screen, open_split, read_tables
from data_builders.synthetic_screen.perturbations import shared_data_dir

H, W = 64, 80
CROP = 16
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
PHENIX = {"Mito": 1, "AGP": 2, "RNA": 3, "ER": 4, "DNA": 5, "Brightfield": 8}
BATCH = "2020_11_04_CPJUMP1"
# Real rows of 2024_Chandrasekaran_NatureMethods benchmark/output/experiment-metadata.tsv.
EXPERIMENT = [
    ("JUMP-Target-1_compound_platemap", "BR00116991", "compound", "A549", "24", "100", "WGA"),
    ("JUMP-Target-1_crispr_platemap", "BR00116996", "crispr", "U2OS", "144", "100", "WGA"),
    ("JUMP-Target-1_orf_platemap", "BR00117006", "orf", "A549", "96", "100", "Phalloidin"),
]
FOLDER = {"BR00116991": "BR00116991__2020-11-05T19_51_35-Measurement1",
          "BR00116996": "BR00116996__2020-11-06T12_11_02-Measurement1",
          "BR00117006": "BR00117006__2020-11-09T09_19_57-Measurement1"}
CENTRES = [(20.0, 20.0), (52.0, 30.0), (40.2, 44.7), (2.0, 60.0)]  # the last crosses the border
SITES = (1, 2)


def _pattern(seed: int) -> np.ndarray:
    image = np.random.default_rng(seed).integers(1, 255, size=(H, W)).astype(np.uint8)
    image[0], image[-1] = 0, 255  # the 0.05-99.95 % stretch then maps u8 * 257 back to u8
    return image


def _tables():
    shared = shared_data_dir() / "jump_target"
    read = lambda name: pd.read_csv(shared / name, sep="\t", dtype=str, keep_default_na=False)
    return {m: (read(f"JUMP-Target-1_{m}_metadata.tsv"), read(f"JUMP-Target-1_{m}_platemap.tsv"))
            for m in ("compound", "crispr", "orf")}


def _chosen_wells(modality, metadata, platemap):
    """A treated well, an empty well (compound plates: DMSO) and a control well per plate."""
    control = dict(zip(metadata["broad_sample"], metadata["control_type"]))
    kind = platemap["broad_sample"].map(lambda s: "empty" if not s else control[s] or "trt")
    kind = kind.replace("NA", "trt")
    third = "poscon_cp" if modality == "compound" else "negcon"
    return [platemap["well_position"][kind == k].iloc[0] for k in ("trt", "empty", third)]


def write_gallery(raw):
    """Three plates of batch 2020_11_04_CPJUMP1, three wells x two sites each."""
    tables = _tables()
    workspace = os.path.join(raw, "workspace")
    meta = os.path.join(workspace, "metadata")
    os.makedirs(os.path.join(meta, "external_metadata"))
    os.makedirs(os.path.join(meta, "platemaps", BATCH, "platemap"))
    barcode_rows, patterns, truth = [], {}, {}
    for p, (map_name, plate, modality, *_) in enumerate(EXPERIMENT):
        metadata, platemap = tables[modality]
        metadata.to_csv(os.path.join(meta, "external_metadata",
                                     f"JUMP-Target-1_{modality}_metadata.tsv"), sep="\t",
                        index=False)
        platemap = platemap[["well_position", "broad_sample"]]
        platemap.insert(0, "plate_map_name", map_name)
        platemap.to_csv(os.path.join(meta, "platemaps", BATCH, "platemap", f"{map_name}.txt"),
                        sep="\t", index=False)
        barcode_rows.append((plate, map_name))
        images = os.path.join(raw, "images", BATCH, "images", FOLDER[plate], "Images")
        os.makedirs(images)
        rows = []
        for w, well in enumerate(_chosen_wells(modality, metadata, tables[modality][1])):
            truth[(plate, well)] = dict(zip(platemap["well_position"],
                                            platemap["broad_sample"]))[well]
            r, c = ord(well[0]) - ord("A") + 1, int(well[1:])
            for site in SITES:
                row = {}
                for channel in CHANNELS + ["Brightfield"]:
                    name = f"r{r:02d}c{c:02d}f{site:02d}p01-ch{PHENIX[channel]}sk1fk1fl1.tiff"
                    if channel != "Brightfield":
                        image = _pattern(1000 * p + 100 * w + 10 * site + PHENIX[channel])
                        patterns[(plate, well, site, channel)] = image
                        Image.fromarray(image.astype(np.uint16) * 257).save(
                            os.path.join(images, name))
                    if modality == "compound":  # Gallery style: s3 URLs
                        row[f"URL_Orig{channel}"] = (
                            f"s3://cellpainting-gallery/cpg0000-jump-pilot/source_4/images/"
                            f"{BATCH}/images/{FOLDER[plate]}/Images/{name}")
                    else:  # CellProfiler style: paths on the machine that ran it
                        row[f"FileName_Orig{channel}"] = name
                        row[f"PathName_Orig{channel}"] = (
                            f"/home/ubuntu/bucket/projects/2019_07_11_JUMP-CP/{BATCH}/images/"
                            f"{FOLDER[plate]}/Images")
                row.update(Metadata_Plate=plate, Metadata_Well=well, Metadata_Site=site,
                           Metadata_Col=c, Metadata_Row=r)
                rows.append(row)
                _write_nuclei(workspace, plate, well, site, per_well=(modality == "orf"))
        folder = os.path.join(workspace, "load_data_csv", BATCH, plate)
        os.makedirs(folder)
        pd.DataFrame(rows).to_csv(os.path.join(folder, "load_data.csv"), index=False)
    pd.DataFrame(barcode_rows, columns=["Assay_Plate_Barcode", "Plate_Map_Name"]).to_csv(
        os.path.join(meta, "platemaps", BATCH, "barcode_platemap.csv"), index=False)
    experiment = pd.DataFrame(
        [(BATCH, *e[:5], e[5], "absent", "Parental", "Day0", "1", e[6], "27648")
         for e in EXPERIMENT],
        columns=["Batch", "Plate_Map_Name", "Assay_Plate_Barcode", "Perturbation", "Cell_type",
                 "Time", "Density", "Antibiotics", "Cell_line", "Time_delay", "Times_imaged",
                 "Anomaly", "Number_of_images"])
    experiment.to_csv(os.path.join(raw, "experiment-metadata.tsv"), sep="\t", index=False)
    return patterns, truth


def _write_nuclei(workspace, plate, well, site, per_well):
    """CellProfiler tables: per-site folders, or (per_well) one folder per well."""
    group = f"{plate}-{well}" if per_well else f"{plate}-{well}-{site}"
    folder = os.path.join(workspace, "analysis", BATCH, plate, "analysis", group)
    os.makedirs(folder, exist_ok=True)
    number = site if per_well else 1
    image = pd.DataFrame({"ImageNumber": [number], "Metadata_Plate": [plate],
                          "Metadata_Well": [well], "Metadata_Site": [site],
                          "Count_Nuclei": [len(CENTRES)]})
    nuclei = pd.DataFrame({"ImageNumber": number, "ObjectNumber": np.arange(1, 5),
                           "AreaShape_Area": 300, "AreaShape_Center_X": [x for x, _ in CENTRES],
                           "AreaShape_Center_Y": [y for _, y in CENTRES],
                           "Location_Center_X": [x for x, _ in CENTRES],
                           "Location_Center_Y": [y for _, y in CENTRES]})
    for name, table in (("Image.csv", image), ("Nuclei.csv", nuclei)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            table = pd.concat([pd.read_csv(path), table])
        table.to_csv(path, index=False)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    raw = str(tmp_path_factory.mktemp("cpg0000") / "source_4")
    patterns, truth = write_gallery(raw)
    return raw, patterns, truth


def test_parse_perturbations_modalities_and_experiment(gallery):
    raw, _, truth = gallery
    screen = read_cpg0000(raw, experiment_metadata=os.path.join(raw, "experiment-metadata.tsv"))
    index, table = screen.index, screen.perturbations.set_index("perturbation")
    # 3 plates x 3 wells x 2 sites, minus the empty CRISPR and ORF wells.
    assert len(index) == 14
    assert screen.spec["adapter_counts"]["sites_of_empty_wells"] == 4
    assert screen.spec["adapter_counts"]["platemap_wells_not_imaged"] == 3 * (384 - 3)
    plates = index.groupby("Metadata_Plate").first()
    assert plates["Metadata_Modality"].to_dict() == {
        "BR00116991": "compound", "BR00116996": "crispr", "BR00117006": "orf"}
    assert plates["Metadata_CellLine"].to_dict() == {
        "BR00116991": "A549", "BR00116996": "U2OS", "BR00117006": "A549"}
    assert plates["Metadata_Time"].to_dict() == {
        "BR00116991": "24", "BR00116996": "144", "BR00117006": "96"}
    assert set(plates["Metadata_Antibiotics"]) == {"absent"}
    dmso = table.loc["DMSO"]
    assert (dmso["type"], dmso["is_control"], dmso["smiles"]) == ("control", 1, "C[S+](C)[O-]")
    for (plate, well), sample in truth.items():
        perturbation = index.loc[(index["Metadata_Plate"] == plate)
                                 & (index["Metadata_Well"] == well), "Metadata_Perturbation"]
        if plate == "BR00116991" and sample == "":
            assert set(perturbation) == {"DMSO"}
        elif sample == "":
            assert perturbation.empty  # empty CRISPR/ORF well: left out, counted
        else:
            assert set(perturbation) == {sample}
    modality = dict(zip(plates.index, plates["Metadata_Modality"]))
    for plate, group in index.groupby("Metadata_Plate"):
        rows = table.loc[group["Metadata_Perturbation"].unique()]
        assert set(rows["modality"]) == {modality[plate]}
        assert set(rows["type"]) <= {modality[plate], "control"}
        assert ((rows["type"] == "control") == (rows["is_control"] == 1)).all()
    crispr = table[table["modality"] == "crispr"]
    assert crispr["sequence"].str.fullmatch("[ACGT]{20}").all()
    assert (crispr["name"] == crispr["target_gene"]).all()
    orf = table[table["modality"] == "orf"]
    assert orf["is_control"].any() and orf["sequence"].str.startswith("ggtctatataag").all()
    compound = table[(table["modality"] == "compound") & (table["is_control"] == 0)]
    assert (compound["smiles"] != "").all() and (compound["target_gene"] != "").all()
    # 4 nuclei per site of every kept site.
    assert len(screen.locations) == 4 * 14
    assert screen.spec["adapter_counts"]["nuclei_of_sites_left_out"] == 4 * 4


def test_build_crops_labels_and_selection(gallery, tmp_path):
    raw, patterns, _ = gallery
    parser = argparse.ArgumentParser()
    jump_cpg0000.add_arguments(parser)
    args = parser.parse_args(["--experiment-metadata", os.path.join(raw, "experiment-metadata.tsv"),
                              "--cell-lines", "A549"])
    screen = jump_cpg0000.read(raw, args)
    assert set(screen.index["Metadata_Plate"]) == {"BR00116991", "BR00117006"}
    assert screen.spec["adapter_counts"]["plates_left_out"] == 1
    out = str(tmp_path / "built")
    report = build_raw_screen(screen, out, crop_size=CROP, illumination="none",
                              split="random_cells", progress=False, workers=1)
    assert report["cells"]["found"] == 4 * 10 and report["cells"]["kept"] == 3 * 10
    tables = read_tables(out)
    cells, perturbations = tables["cells"], tables["perturbations"]
    assert set(tables["cell_lines"]["name"]) == {"A549"}
    for split in ("train", "test"):
        rows = cells[cells["split"] == split].sort_values("split_index")
        source = open_split(out, split)
        assert len(source) == len(rows) > 0
        for i, (_, cell) in enumerate(rows.iterrows()):
            example = source[i]
            key = (cell["Metadata_Plate"], cell["Metadata_Well"], int(cell["Metadata_Site"]))
            r0, c0 = int(round(cell["y"])) - CROP // 2, int(round(cell["x"])) - CROP // 2
            expected = np.stack([patterns[key + (c,)][r0:r0 + CROP, c0:c0 + CROP]
                                 for c in CHANNELS], axis=-1)
            np.testing.assert_array_equal(example["image"], expected)
            row = perturbations.loc[example["perturbation_id"]]
            assert row["perturbation"] == cell["Metadata_Perturbation"]
            assert bool(example["is_control"]) == bool(row["is_control"])
    assert set(cells["Metadata_Time"].astype(str)) == {"24", "96"}

    orf_only = read_cpg0000(raw, modalities=["orf"])
    assert set(orf_only.index["Metadata_Plate"]) == {"BR00117006"}
    with pytest.raises(ValueError, match="needs experiment_metadata"):
        read_cpg0000(raw, times=["24"])


def test_deepprofiler_locations_folder(gallery, tmp_path):
    raw, _, _ = gallery
    folder = tmp_path / "locations" / "BR00116996"
    folder.mkdir(parents=True)
    pd.DataFrame({"Nuclei_Location_Center_X": [30.0], "Nuclei_Location_Center_Y": [31.0]}).to_csv(
        folder / "A01-1-Nuclei.csv", index=False)
    screen = read_cpg0000(raw, plates=["BR00116996"], locations=str(tmp_path / "locations"))
    assert len(screen.locations) == 1
    assert screen.index.loc[screen.locations["site_row"][0], "Metadata_Well"] == "A01"


def _copy(raw, tmp_path):
    target = str(tmp_path / "source_4")
    shutil.copytree(raw, target)
    return target


def test_errors_name_the_item(gallery, tmp_path):
    raw = _copy(gallery[0], tmp_path)
    platemaps = os.path.join(raw, "workspace", "metadata", "platemaps", BATCH, "platemap")
    # Imaged well missing from the plate map.
    path = os.path.join(platemaps, "JUMP-Target-1_orf_platemap.txt")
    original = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    original[original["well_position"] != "A01"].to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"Imaged well\(s\) \['A01'\] of plate BR00117006"):
        read_cpg0000(raw)
    # Plate-map sample missing from the metadata tables.
    changed = original.copy()
    changed.loc[changed["well_position"] == "P24", "broad_sample"] = "ccsbBroad304_99999"
    changed.to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"\['ccsbBroad304_99999'\].*not in the metadata"):
        read_cpg0000(raw)
    original.to_csv(path, sep="\t", index=False)
    # Plate without a barcode_platemap row.
    os.makedirs(os.path.join(raw, "workspace", "load_data_csv", BATCH, "BR00999999"))
    with pytest.raises(ValueError, match=r"Plate BR00999999 .* no row in .*barcode_platemap"):
        read_cpg0000(raw)
    os.rmdir(os.path.join(raw, "workspace", "load_data_csv", BATCH, "BR00999999"))
    # Missing image file.
    images = os.path.join(raw, "images", BATCH, "images", FOLDER["BR00116996"], "Images")
    missing = os.path.join(images, "r01c01f02p01-ch4sk1fk1fl1.tiff")
    os.replace(missing, missing + ".bak")
    with pytest.raises(FileNotFoundError, match=r"ch4sk1fk1fl1.tiff for channel 'ER' of plate "
                                                r"BR00116996 well A01 site 2"):
        read_cpg0000(raw)
    os.replace(missing + ".bak", missing)
    # 8-bit images where 16-bit TIFFs are expected.
    first = os.path.join(images, "r01c01f01p01-ch5sk1fk1fl1.tiff")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(first)
    with pytest.raises(ValueError, match=r"ch5sk1fk1fl1.tiff \(channel 'DNA'.* is 8-bit; "
                                         r"expected 16-bit"):
        read_cpg0000(raw)
    # Channels of a site disagree in shape: named when building.
    Image.fromarray(np.zeros((H, W - 8), np.uint16)).save(first)
    screen = read_cpg0000(raw, plates=["BR00116996"])
    with pytest.raises(ValueError, match=r"disagree in shape.*'DNA': \(64, 72\)"):
        build_raw_screen(screen, str(tmp_path / "out"), crop_size=CROP, progress=False,
                         workers=1)
    # No CellProfiler output for a plate.
    shutil.rmtree(os.path.join(raw, "workspace", "analysis", BATCH, "BR00117006"))
    with pytest.raises(FileNotFoundError, match=r"No CellProfiler Nuclei.csv .* BR00117006"):
        read_cpg0000(raw)
