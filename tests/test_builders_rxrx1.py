"""RxRx1 builder on a tiny release written here in the exact RxRx1 layout."""

import argparse
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_builders import rxrx1
from data_builders.raw_screen import build_raw_screen, open_split, read_tables

SIZE = 512
CROP = 96
RADIUS = 9
# Nucleus centres (x, y), >= 48 px from the border so every 96 px crop fits.
CENTRES = ((100, 120), (300, 90), (200, 300), (420, 400))
COLUMNS = list(rxrx1.reader.METADATA_COLUMNS)
# (experiment, cell_type, plate, well, well_type, sirna, sirna_id, sites)
WELLS = [
    ("U2OS-01", "U2OS", 1, "B02", "negative_control", "EMPTY", 1138, (1, 2)),
    ("U2OS-01", "U2OS", 1, "B03", "treatment", "s21721", 1, (1, 2)),
    ("U2OS-01", "U2OS", 1, "B04", "positive_control", "s501309", 1108, (1,)),
    ("U2OS-02", "U2OS", 2, "B02", "negative_control", "EMPTY", 1138, (1,)),
    ("U2OS-02", "U2OS", 2, "C05", "treatment", "s21721", 1, (1,)),
    ("HUVEC-01", "HUVEC", 1, "B02", "negative_control", "EMPTY", 1138, (1,)),
]


def _metadata_rows():
    rows = []
    for experiment, cell_type, plate, well, well_type, sirna, sirna_id, sites in WELLS:
        for site in sites:
            rows.append({
                "site_id": f"{experiment}_{plate}_{well}_{site}",
                "well_id": f"{experiment}_{plate}_{well}", "cell_type": cell_type,
                "dataset": "train", "experiment": experiment, "plate": plate, "well": well,
                "site": site, "well_type": well_type, "sirna": sirna, "sirna_id": sirna_id})
    return pd.DataFrame(rows, columns=COLUMNS)


def _site_images(seed):
    """Hoechst: bright disks on a dark background; other channels: seeded noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    dna = np.full((SIZE, SIZE), 8, np.uint8)
    for x, y in CENTRES:
        dna[(xx - x) ** 2 + (yy - y) ** 2 <= RADIUS**2] = 200
    rng = np.random.default_rng(seed)
    others = [rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for _ in range(5)]
    return [dna] + others


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """rxrx1/metadata.csv + rxrx1/images/{experiment}/Plate{plate}/{well}_s{site}_w{c}.png."""
    root = tmp_path_factory.mktemp("release") / "rxrx1"
    metadata = _metadata_rows()
    for n, row in metadata.iterrows():
        folder = root / "images" / row["experiment"] / f"Plate{row['plate']}"
        folder.mkdir(parents=True, exist_ok=True)
        for c, plane in enumerate(_site_images(n), start=1):
            Image.fromarray(plane).save(folder / f"{row['well']}_s{row['site']}_w{c}.png")
    metadata.to_csv(root / "metadata.csv", index=False)
    return root


def _copy_release(release, tmp_path):
    target = tmp_path / "rxrx1"
    shutil.copytree(release, target)
    return target


def test_read_maps_experiments_plates_and_sirnas(release):
    screen = rxrx1.read_rxrx1(release, cell_types=["U2OS"])
    index = screen.index
    assert len(index) == 7
    assert sorted(set(index["Metadata_Plate"])) == ["U2OS-01_Plate1", "U2OS-02_Plate2"]
    assert sorted(set(index["Metadata_Batch"])) == ["U2OS-01", "U2OS-02"]
    assert set(index["Metadata_CellLine"]) == {"U2OS"}
    assert index["Metadata_SiteId"].iloc[0] == "U2OS-01_1_B02_1"
    assert index.loc[0, "Hoechst"] == "U2OS-01/Plate1/B02_s1_w1.png"
    assert index.loc[0, "WGA"] == "U2OS-01/Plate1/B02_s1_w6.png"
    table = screen.perturbations.set_index("perturbation")
    assert table.loc["EMPTY", "type"] == "control" and table.loc["EMPTY", "is_control"] == 1
    assert table.loc["s21721", "type"] == "sirna" and table.loc["s21721", "is_control"] == 0
    assert table.loc["s501309", "type"] == "sirna"  # Positive controls kept, as in IMPA.
    assert screen.spec["notes"]["selection"] == {
        "sites_in_metadata": 8, "sites_selected": 7, "positive_control_sites_left_out": 0}
    # Every disk is found once, at its centre.
    cells = screen.locations
    assert len(cells) == 7 * len(CENTRES)
    site0 = cells[cells["site_row"] == 0][["x", "y"]].to_numpy()
    np.testing.assert_allclose(np.sort(site0, axis=0), np.sort(np.asarray(CENTRES, float), axis=0))


def test_positive_controls_can_be_left_out_and_are_counted(release):
    screen = rxrx1.read_rxrx1(release, experiments=["U2OS-01"], include_positive_controls=False)
    assert set(screen.index["Metadata_Perturbation"]) == {"EMPTY", "s21721"}
    assert screen.spec["notes"]["selection"]["positive_control_sites_left_out"] == 1


def test_build_u2os(release, tmp_path):
    screen = rxrx1.read_rxrx1(release, cell_types=["U2OS"])
    out = tmp_path / "out"
    options = {**rxrx1.DEFAULTS, "illumination": "none"}
    report = build_raw_screen(screen, out, **options, test_fraction=0.25, seed=1,
                              workers=1, progress=False)
    assert report["channels"] == list(rxrx1.CHANNELS)
    assert report["cells"]["found"] == report["cells"]["kept"] == 28
    assert report["examples"] == {"train": 21, "test": 7}
    assert report["notes"]["selection"]["sites_selected"] == 7
    tables = read_tables(out)
    cells = tables["cells"]
    assert (cells.groupby("Metadata_Well")["Metadata_Perturbation"].first().to_dict()
            == {"B02": "EMPTY", "B03": "s21721", "B04": "s501309", "C05": "s21721"})
    assert set(cells["Metadata_WellType"]) == {"negative_control", "treatment",
                                               "positive_control"}
    assert set(tables["batches"]["name"]) == {"U2OS-01", "U2OS-02"}
    assert (cells["is_control"] == (cells["Metadata_Perturbation"] == "EMPTY")).all()

    # illumination="none": each channel is stretched between its own 0.05 and 99.95
    # percentiles; the crop is the 96 px window centred on the nucleus.
    metadata = _metadata_rows()
    for split in ("train", "test"):
        source = open_split(out, split)
        for _, cell in cells[cells["split"] == split].iterrows():
            item = source[int(cell["split_index"])]
            n = int(np.flatnonzero((metadata["site_id"] == cell["Metadata_SiteId"]).to_numpy())[0])
            planes = np.stack(_site_images(n), axis=-1).astype(np.float64)
            lo, hi = np.percentile(planes, [0.05, 99.95], axis=(0, 1))
            expected = np.round(np.clip((planes - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
            row0, col0 = int(round(cell["y"])) - CROP // 2, int(round(cell["x"])) - CROP // 2
            np.testing.assert_array_equal(
                item["image"], expected[row0:row0 + CROP, col0:col0 + CROP])
            assert int(item["is_control"]) == int(cell["is_control"])


def _read_and_build(root, tmp_path):
    """Bit depth and shapes are checked where the images are read: detection and the build."""
    screen = rxrx1.read_rxrx1(root, cell_types=["U2OS"])
    build_raw_screen(screen, tmp_path / "out", crop_size=CROP, progress=False, workers=1)


def test_sixteen_bit_png_is_an_error(release, tmp_path):
    root = _copy_release(release, tmp_path)
    path = root / "images" / "U2OS-01" / "Plate1" / "B03_s2_w4.png"
    Image.fromarray(np.full((SIZE, SIZE), 1000, np.uint16)).save(path)
    with pytest.raises(ValueError, match=r"B03_s2_w4\.png.*mode I;16.*8-bit greyscale"):
        _read_and_build(root, tmp_path)


def test_colour_png_is_an_error(release, tmp_path):
    root = _copy_release(release, tmp_path)
    path = root / "images" / "U2OS-01" / "Plate1" / "B02_s1_w1.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"B02_s1_w1\.png.*mode RGB"):
        _read_and_build(root, tmp_path)


def test_channels_of_different_shapes_are_an_error(release, tmp_path):
    root = _copy_release(release, tmp_path)
    path = root / "images" / "U2OS-02" / "Plate2" / "C05_s1_w3.png"
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(path)
    with pytest.raises(ValueError, match="U2OS-02_Plate2 well C05 site 1.*disagree in shape"):
        _read_and_build(root, tmp_path)


def test_metadata_row_without_images_is_an_error(release, tmp_path):
    root = _copy_release(release, tmp_path)
    os.remove(root / "images" / "U2OS-01" / "Plate1" / "B04_s1_w5.png")
    with pytest.raises(FileNotFoundError, match=r"B04_s1_w5\.png.*well B04 site 1"):
        rxrx1.read_rxrx1(root)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.drop(columns="sirna"), r"lacks column\(s\) \['sirna'\]"),
    (lambda m: m.assign(well_type=m["well_type"].replace("treatment", "trt")),
     "well_type 'trt'"),
    (lambda m: m.assign(site=m["site"].astype(str).replace("2", "two")), "site 'two'"),
    (lambda m: m.assign(sirna=m["sirna"].replace("s21721", "EMPTY")),
     "sirna 'EMPTY' is a negative control elsewhere"),
    (lambda m: m.assign(sirna=np.where(m["well_type"] == "treatment", "", m["sirna"])),
     "empty sirna in a treatment well"),
])
def test_bad_metadata_is_an_error(release, tmp_path, change, message):
    root = _copy_release(release, tmp_path)
    change(pd.read_csv(root / "metadata.csv")).to_csv(root / "metadata.csv", index=False)
    with pytest.raises(ValueError, match=message):
        rxrx1.read_rxrx1(root)


def test_unknown_cell_type_is_an_error(release):
    with pytest.raises(ValueError, match=r"cell_type \['RPE'\] not in .*metadata\.csv"):
        rxrx1.read_rxrx1(release, cell_types=["RPE"])


def test_cli_arguments(release):
    parser = argparse.ArgumentParser()
    rxrx1.add_arguments(parser)
    args = parser.parse_args(["--cell-type", "U2OS", "--no-positive-controls"])
    screen = rxrx1.read(str(release), args)
    assert set(screen.index["Metadata_CellLine"]) == {"U2OS"}
    assert "s501309" not in set(screen.index["Metadata_Perturbation"])
    assert json.dumps(screen.spec["notes"])  # Serialisable into build_report.json.
