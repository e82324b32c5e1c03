"""The DeepProfiler-layout builder on a tiny export written here from the real JUMP-MOA tables."""

import argparse
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_builders import deepprofiler_layout
from data_builders.deepprofiler_layout import read_deepprofiler
from data_builders.raw_screen import build_raw_screen, open_split, read_build_report, read_tables
from data_builders.synthetic_screen.perturbations import shared_data_dir

H, W = 64, 80
CROP = 16
CHANNELS = ["DNA", "RNA", "ER", "AGP", "Mito"]
PLATES = ("SQ00014812", "SQ00014813")
SITES = (1, 2)
CENTRES = [(20.0, 20.0), (50.0, 30.0), (30.4, 44.6), (78.0, 10.0)]  # the last crosses the border


def _pattern(seed: int) -> np.ndarray:
    """8-bit pattern holding 0 and 255 rows, so the 0.05-99.95 % stretch maps it to itself."""
    image = np.random.default_rng(seed).integers(1, 255, size=(H, W)).astype(np.uint8)
    image[0], image[-1] = 0, 255
    return image


def _moa_tables():
    shared = shared_data_dir()
    compounds = pd.read_csv(shared / "jump_moa" / "JUMP-MOA_compound_metadata.tsv", sep="\t",
                            dtype=str, keep_default_na=False)
    platemap = pd.read_csv(shared / "jump_moa" / "JUMP-MOA_compound_platemap.tsv", sep="\t",
                           dtype=str, keep_default_na=False)
    return compounds, platemap


def write_export(root, *, compressed=False, config=True):
    """A DeepProfiler project: 2 plates x 3 wells (2 compounds + DMSO) x 2 sites."""
    compounds, platemap = _moa_tables()
    treated = platemap[platemap["broad_sample"] != ""].head(2)
    dmso_well = platemap[platemap["broad_sample"] == ""].iloc[0]["well_position"]
    wells = [(w, b) for w, b in zip(treated["well_position"], treated["broad_sample"])]
    wells.append((dmso_well, "DMSO"))
    rows, patterns = [], {}
    for p, plate in enumerate(PLATES):
        for w, (well, sample) in enumerate(wells):
            for site in SITES:
                row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
                       "Plate_Map_Name": "JUMP-MOA_compound_platemap"}
                for c, channel in enumerate(CHANNELS):
                    image = _pattern(1000 * p + 100 * w + 10 * site + c)
                    name = f"r01c{w + 1:02d}f{site:02d}p01-ch{c + 1}sk1fk1fl1"
                    row[channel] = f"{plate}/{name}.tiff"
                    patterns[(plate, well, site, channel)] = image
                    folder = os.path.join(root, "inputs", "images", plate)
                    os.makedirs(folder, exist_ok=True)
                    Image.fromarray((image.astype(np.uint16) * 257)).save(
                        os.path.join(folder, name + ".tiff"))
                    if compressed:
                        folder = os.path.join(root, "outputs", "compressed", "images", plate)
                        os.makedirs(folder, exist_ok=True)
                        Image.fromarray(image).save(os.path.join(folder, name + ".png"))
                dose = "" if sample == "DMSO" else "10.0"
                row.update(broad_sample=sample, Compound=sample, Concentration=dose,
                           Treatment=f"{sample}@{dose or 'NA'}",
                           Split="Training" if site == 1 else "Validation")
                rows.append(row)
                folder = os.path.join(root, "inputs", "locations", plate)
                os.makedirs(folder, exist_ok=True)
                if (plate, well, site) != (PLATES[1], dmso_well, 2):  # one site without file
                    pd.DataFrame({"Nuclei_Location_Center_X": [x for x, _ in CENTRES],
                                  "Nuclei_Location_Center_Y": [y for _, y in CENTRES]}).to_csv(
                        os.path.join(folder, f"{well}-{site}-Nuclei.csv"), index=False)
    os.makedirs(os.path.join(root, "inputs", "metadata"), exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(root, "inputs", "metadata", "index.csv"), index=False)
    if config:
        os.makedirs(os.path.join(root, "inputs", "config"), exist_ok=True)
        settings = {
            "dataset": {"metadata": {"label_field": "Treatment", "control_value": "DMSO@NA"},
                        "images": {"channels": CHANNELS, "file_format": "tiff", "bits": 16},
                        "locations": {"box_size": 128}},
            "prepare": {"compression": {"implement": compressed}},
            "train": {"partition": {"targets": ["Compound"], "split_field": "Split",
                                    "training_values": ["Training"],
                                    "validation_values": ["Validation"]}}}
        with open(os.path.join(root, "inputs", "config", "config.json"), "w") as f:
            json.dump(settings, f)
    # BBBC022-style MoA match table (short Broad id -> MoA) from the real JUMP-MOA annotations.
    short = compounds["broad_sample"].str.slice(0, 13)
    moa_path = os.path.join(root, "MOA_MATCHES_official.csv")
    pd.DataFrame({"Var1": short, "Metadata_moa.x": compounds["moa"]}).to_csv(moa_path,
                                                                             index=False)
    truth = {sample: compounds.set_index("broad_sample")["moa"].get(sample, "")
             for _, sample in wells}
    return wells, patterns, moa_path, truth


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dp") / "BBBC_like")
    wells, patterns, moa_path, truth = write_export(root, compressed=True)
    return root, wells, patterns, moa_path, truth


def _examples(out, split):
    source = open_split(out, split)
    return [source[i] for i in range(len(source))]


def test_parse_labels_controls_moa_and_split(export):
    root, wells, _, moa_path, truth = export
    screen = read_deepprofiler(root, compressed=False, moa_table=moa_path,
                               dose_field="Concentration", name_field="Compound")
    assert screen.channels == tuple(CHANNELS)
    assert len(screen.index) == len(PLATES) * len(wells) * len(SITES)
    table = screen.perturbations.set_index("perturbation")
    assert table.loc["DMSO@NA", "is_control"] == 1 and table.loc["DMSO@NA", "type"] == "control"
    for _, sample in wells[:2]:
        label = f"{sample}@10.0"
        assert table.loc[label, "type"] == "compound" and table.loc[label, "is_control"] == 0
        assert table.loc[label, "moa"] == truth[sample] != ""
        assert table.loc[label, "name"] == sample
    assert set(screen.locations["split"]) == {"train", "test"}
    first_sites = screen.index["Metadata_Site"].to_numpy()[screen.locations["site_row"]] == 1
    assert (screen.locations["split"][first_sites] == "train").all()
    doses = screen.index.set_index("Metadata_Perturbation")["Metadata_Dose"]
    assert np.isnan(doses["DMSO@NA"]).all() and (doses.drop("DMSO@NA") == 10.0).all()
    # 11 of 12 sites have a locations file with 4 nuclei.
    assert len(screen.locations) == 11 * len(CENTRES)


def test_build_compressed_pngs_equal_expected_crops(export, tmp_path):
    root, wells, patterns, moa_path, _ = export
    screen = read_deepprofiler(root, moa_table=moa_path)  # config: compressed, 8-bit
    assert screen.spec["bit_depth"] == 8
    out = str(tmp_path / "built")
    options = {**deepprofiler_layout.DEFAULTS, "crop_size": CROP, "illumination": "none"}
    report = build_raw_screen(screen, out, split="given", progress=False, workers=2,
                              **options)
    assert report["sites_without_locations"] == 1
    # 3 inside-image nuclei per site of 11 sites; the 4th crosses the border.
    assert report["cells"]["found"] == 44 and report["cells"]["kept"] == 33
    assert report["examples"] == {"train": 18, "test": 15}
    tables = read_tables(out)
    cells, perturbations = tables["cells"], tables["perturbations"]
    assert list(read_build_report(out)["channels"]) == CHANNELS
    assert (cells.loc[cells["Metadata_Site"] == 1, "split"] == "train").all()
    for split in ("train", "test"):
        rows = cells[cells["split"] == split].sort_values("split_index")
        for example, (_, cell) in zip(_examples(out, split), rows.iterrows()):
            key = (cell["Metadata_Plate"], cell["Metadata_Well"], int(cell["Metadata_Site"]))
            r0 = int(round(cell["y"])) - CROP // 2
            c0 = int(round(cell["x"])) - CROP // 2
            expected = np.stack([patterns[key + (c,)][r0:r0 + CROP, c0:c0 + CROP]
                                 for c in CHANNELS], axis=-1)
            np.testing.assert_array_equal(example["image"], expected)
            label = perturbations.loc[example["perturbation_id"], "perturbation"]
            assert label == cell["Metadata_Perturbation"]
            assert bool(example["is_control"]) == (label == "DMSO@NA")


def test_raw_tiffs_without_config_and_cli_arguments(tmp_path):
    root = str(tmp_path / "raw")
    write_export(root, config=False)
    parser = argparse.ArgumentParser()
    deepprofiler_layout.add_arguments(parser)
    args = parser.parse_args(["--label-field", "Compound", "--control", "Compound=DMSO",
                              "--channels", "DNA,RNA,ER,AGP,Mito",
                              "--perturbation-type", "compound"])
    screen = deepprofiler_layout.read(root, args)
    assert screen.spec["bit_depth"] == 16
    assert screen.perturbations.set_index("perturbation").loc["DMSO", "is_control"] == 1
    assert "split" not in screen.locations.columns
    out = str(tmp_path / "out")
    report = build_raw_screen(screen, out, crop_size=CROP, illumination="deepprofiler",
                              progress=False, workers=1)
    assert report["cells"]["kept"] == 33


def test_errors_name_the_item(export, tmp_path):
    root, wells, _, _, _ = export
    with pytest.raises(ValueError, match=r"is 16-bit; expected 8-bit"):
        read_deepprofiler(root, compressed=False, bit_depth=8)
    with pytest.raises(ValueError, match=r"control 'DMSO@0' is not a value of the label"):
        read_deepprofiler(root, control=["DMSO@0"])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['Hoechst'\]"):
        read_deepprofiler(root, channels=["Hoechst", "RNA"])
    # A metadata row whose image file is missing.
    broken = str(tmp_path / "broken")
    write_export(broken)
    index = pd.read_csv(os.path.join(broken, "inputs", "metadata", "index.csv"), dtype=str,
                        keep_default_na=False)
    missing = os.path.join(broken, "inputs", "images", index.loc[5, "ER"])
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=rf"{os.path.basename(missing)}.*row 5"):
        read_deepprofiler(broken, compressed=False)
    # Channels of one site disagree in shape: named at build time.
    Image.fromarray(np.zeros((H, W - 8), np.uint16)).save(missing)
    screen = read_deepprofiler(broken, compressed=False)
    with pytest.raises(ValueError, match=r"disagree in shape.*'ER': \(64, 72\)"):
        build_raw_screen(screen, str(tmp_path / "out"), crop_size=CROP, progress=False,
                         workers=1)
    # An empty label (a metadata row without a perturbation).
    index.loc[3, "Treatment"] = ""
    index.to_csv(os.path.join(broken, "inputs", "metadata", "index.csv"), index=False)
    with pytest.raises(ValueError, match=r"row 3: empty 'Treatment'"):
        read_deepprofiler(broken, compressed=False)
