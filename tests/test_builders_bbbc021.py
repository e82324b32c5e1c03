"""BBBC021 adapters (data_builders/bbbc021): the published layout and IMPA's crops agree.

Fixtures use real rows of BBBC021_v1_image.csv, the real MoA and SMILES tables, and small
16-bit TIFFs (128 x 160) whose values are v * 257 for a known uint8 pattern v, so the
builder's illumination="none" stretch (0.05..99.95 percentiles -> 0..255) gives back v exactly.
"""

import argparse
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_builders import bbbc021
from data_builders.raw_screen import build_raw_screen, open_split, read_tables
from data_builders.synthetic_screen import perturbations as synthetic_perturbations

SHAPE = (128, 160)
CROP = 32
RADIUS = 6
# (compound, concentration) sites per plate; two DMSO sites each. AZ138 at 0.01 has no MoA.
PLATES = {
    "Week10_40111": [("AZ138", 0.3), ("AZ138", 0.01), ("taxol", 0.3), ("DMSO", 0.0)],
    "Week2_24121": [("ALLN", 3.0), ("taxol", 0.3), ("DMSO", 0.0)],
}
CENTRES = np.array([[30.0, 30.0], [80.0, 64.0], [128.0, 96.0]])
BORDER_CENTRE = (8.0, 60.0)  # Its crop would leave the image: excluded, treated sites only.


@pytest.fixture(scope="module")
def shared():
    return synthetic_perturbations.shared_data_dir() / "bbbc021"


def _real_rows(shared) -> pd.DataFrame:
    table = pd.read_csv(shared / "BBBC021_v1_image.csv.gz", dtype=str, keep_default_na=False)
    rows = []
    for plate, conditions in PLATES.items():
        on_plate = table[(table["Image_Metadata_Plate_DAPI"] == plate)
                         & table["Image_FileName_DAPI"].str.contains("_s1_")]
        dose = on_plate["Image_Metadata_Concentration"].astype(float)
        for compound, concentration in conditions:
            match = on_plate[(on_plate["Image_Metadata_Compound"] == compound)
                             & np.isclose(dose, concentration)]
            assert len(match) >= 1 + (compound == "DMSO"), (plate, compound, concentration)
            rows.append(match.iloc[:2 if compound == "DMSO" else 1])
    return pd.concat(rows, ignore_index=True)


def _site_pattern(rng, treated: bool):
    """uint8 (H, W, 3) DNA / Tubulin / Actin and the nucleus centres of one site."""
    centres = CENTRES + rng.integers(-3, 4, CENTRES.shape)
    if treated:
        centres = np.concatenate([centres, [BORDER_CENTRE]])
    rows, cols = np.mgrid[:SHAPE[0], :SHAPE[1]]
    dna = rng.integers(0, 31, SHAPE)
    for x, y in centres:
        dna[(cols - x) ** 2 + (rows - y) ** 2 <= RADIUS**2] = 255
    image = np.stack([dna, rng.integers(0, 256, SHAPE), rng.integers(0, 256, SHAPE)], -1)
    return image.astype(np.uint8), centres


def _write_tiff(path, plane: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(plane).save(path, format="TIFF")


def write_raw(root, shared, *, rng_seed=0):
    """The published layout under root/raw; returns (raw_dir, expected cells)."""
    raw_dir = root / "raw"
    rows = _real_rows(shared)
    rng = np.random.default_rng(rng_seed)
    centres_rows, cells = [], []
    for _, row in rows.iterrows():
        image, centres = _site_pattern(rng, row["Image_Metadata_Compound"] != "DMSO")
        for c, stain in enumerate(("DAPI", "Tubulin", "Actin")):
            path = raw_dir / row[f"Image_PathName_{stain}"] / row[f"Image_FileName_{stain}"]
            _write_tiff(str(path), image[..., c].astype(np.uint16) * 257)
        for k, (x, y) in enumerate(centres):
            centres_rows.append(dict(TableNumber=row["TableNumber"],
                                     ImageNumber=row["ImageNumber"], ObjectNumber=k + 1,
                                     Nuclei_Location_Center_X=x, Nuclei_Location_Center_Y=y))
            col0, row0 = int(x) - CROP // 2, int(y) - CROP // 2
            if col0 < 0:
                continue  # The border cell.
            cells.append(dict(
                plate=row["Image_Metadata_Plate_DAPI"], well=row["Image_Metadata_Well_DAPI"],
                site=int(row["Image_FileName_DAPI"].split("_s")[1][0]), k=k,
                compound=row["Image_Metadata_Compound"],
                dose=float(row["Image_Metadata_Concentration"]),
                crop=image[row0:row0 + CROP, col0:col0 + CROP]))
    rows.to_csv(raw_dir / "BBBC021_v1_image.csv", index=False)
    shutil.copyfile(shared / "BBBC021_v1_moa.csv", raw_dir / "BBBC021_v1_moa.csv")
    shutil.copyfile(shared / "BBBC021_compound_smiles.csv", raw_dir / "BBBC021_v1_compound.csv")
    pd.DataFrame(centres_rows).to_csv(root / "centres.csv", index=False)
    return raw_dir, cells


def write_impa(root, cells, moa, *, split=None, state=("control", "trt")):
    """IMPA's layout of the same cells: metadata CSV + one .npy per cell."""
    images = root / "impa"
    records = []
    for i, cell in enumerate(cells):
        batch, plate_number = cell["plate"].split("_")
        key = f"{batch}_{plate_number}_{cell['well']}_s{cell['site']}_{cell['k']}"
        path = images / batch / plate_number / f"{cell['well']}_s{cell['site']}_{cell['k']}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, cell["crop"])
        control = cell["compound"] == "DMSO"
        records.append(dict(SAMPLE_KEY=key, SPLIT="train" if split is None else split[i],
                            STATE=state[0] if control else state[1],
                            CPD_NAME=cell["compound"], ANNOT=moa[cell["compound"]],
                            DOSE=cell["dose"]))
    (images / "metadata").mkdir(exist_ok=True)
    metadata = images / "metadata" / "bbbc021_df.csv"
    pd.DataFrame(records).to_csv(metadata)  # With an index column, as IMPA's files.
    return images, metadata


@pytest.fixture(scope="module")
def fixture(tmp_path_factory, shared):
    root = tmp_path_factory.mktemp("bbbc021")
    raw_dir, cells = write_raw(root, shared)
    moa = pd.read_csv(shared / "BBBC021_v1_moa.csv").groupby("compound")["moa"].first()
    return root, raw_dir, cells, moa.to_dict()


def _build(screen, out, **options):
    options = dict(crop_size=CROP, illumination="none", progress=False, workers=1, **options)
    return build_raw_screen(screen, out, **options)


def _cells_by_crop(out):
    """crop bytes -> (perturbation, moa, dose, split, plate, batch, is_control, type) of every
    built cell."""
    tables = read_tables(out)
    cells = tables["cells"]
    result = {}
    for split in ("train", "test"):
        source = open_split(out, split) if (cells["split"] == split).any() else []
        for item in source:
            row = cells.iloc[int(item["cell_index"])]
            assert row["split"] == split
            key = item["image"].tobytes()
            assert key not in result
            result[key] = (row["Metadata_Perturbation"], row["moa"], float(row["Metadata_Dose"]),
                           split, row["Metadata_Plate"], row["Metadata_Batch"],
                           int(row["is_control"]), row["type"])
            assert bool(item["is_control"]) == bool(row["is_control"])
    return result


def test_raw_layout_parses_the_real_table(fixture):
    root, raw_dir, cells, _ = fixture
    screen = bbbc021.read_bbbc021(raw_dir, centers=root / "centres.csv")
    index = screen.index
    assert len(index) == 9 and screen.channels == ("DNA", "Tubulin", "Actin")
    assert set(index["Metadata_Batch"]) == {"Week10", "Week2"}
    assert sorted(set(index["Metadata_Site"])) == [1]  # The first field of each well.
    assert index["DNA"].iloc[0].startswith("Week10/Week10_40111/")
    perturbations = screen.perturbations.set_index("perturbation")
    assert perturbations.loc["DMSO", "type"] == "control"
    assert perturbations.loc["DMSO", "is_control"] == 1
    assert perturbations.loc["AZ138", "moa"] == "Eg5 inhibitors"
    assert perturbations.loc["taxol", "smiles"].startswith("CC(=O)O[C@H]1")
    site_moa = dict(zip(zip(index["Metadata_Perturbation"], index["Metadata_Dose"]),
                        index["Metadata_MoA"]))
    assert site_moa[("AZ138", 0.01)] == "" and site_moa[("AZ138", 0.3)] == "Eg5 inhibitors"
    assert len(screen.locations) == 9 * 3 + 5  # Five treated sites have a border cell.
    assert any("0 compound(s) without an MoA" in n for n in screen.spec["notes"])

    annotated = bbbc021.read_bbbc021(raw_dir, centers=root / "centres.csv",
                                     annotated_only=True)
    assert len(annotated.index) == 8
    assert any("1 sites of compound-concentrations without an MoA" in n
               for n in annotated.spec["notes"])
    six = bbbc021.read_bbbc021(raw_dir, centers=root / "centres.csv", subset="impa_six")
    assert set(six.perturbations["perturbation"]) == {"AZ138", "DMSO", "taxol"}
    assert any("1 sites of compounds outside" in n for n in six.spec["notes"])
    assert any("4 centres of left-out sites skipped" in n for n in six.spec["notes"])


def test_raw_and_impa_layouts_give_the_same_cells(fixture, tmp_path):
    root, raw_dir, cells, moa = fixture
    raw_screen = bbbc021.read_bbbc021(raw_dir, centers=root / "centres.csv")
    raw_report = _build(raw_screen, tmp_path / "raw_out", split="perturbations",
                        holdout=["taxol"])
    images, metadata = write_impa(tmp_path, cells, moa)
    impa_screen = bbbc021.read_bbbc021_impa(images, metadata)
    impa_report = _build(impa_screen, tmp_path / "impa_out", split="perturbations",
                         holdout=["taxol"])

    assert raw_report["cells"]["kept"] == impa_report["cells"]["kept"] == len(cells) == 27
    assert raw_report["cells"]["excluded_border"] == 5
    assert raw_report["channels"] == impa_report["channels"] == ["DNA", "Tubulin", "Actin"]
    raw_cells, impa_cells = _cells_by_crop(tmp_path / "raw_out"), _cells_by_crop(
        tmp_path / "impa_out")
    # Identical crops with identical labels, plates, batches and splits.
    assert raw_cells == impa_cells
    expected = {c["crop"].tobytes(): (c["compound"], moa[c["compound"]], c["dose"])
                for c in cells}
    assert {k: v[:3] for k, v in raw_cells.items()} == expected
    splits = [v[3] for v in raw_cells.values()]
    assert 0 < splits.count("test") < len(splits)
    assert all(v[3] == "test" for v in raw_cells.values() if v[0] == "taxol")
    assert {v[0] for v in raw_cells.values() if v[6]} == {"DMSO"}

    # IMPA's own SPLIT column, STATE as 0/1 (the released CSVs), split="given".
    split = [raw_cells[c["crop"].tobytes()][3] for c in cells]
    images, metadata = write_impa(tmp_path / "given", cells, moa, split=split,
                                  state=(0, 1))
    given = bbbc021.read_bbbc021_impa(images, metadata)
    _build(given, tmp_path / "given_out", split="given")
    assert _cells_by_crop(tmp_path / "given_out") == raw_cells


def test_detected_centres_and_parallel_detection(fixture, tmp_path):
    _, raw_dir, _, _ = fixture
    serial = bbbc021.read_bbbc021(raw_dir, compounds=["taxol", "DMSO"])
    parallel = bbbc021.read_bbbc021(raw_dir, compounds=["taxol", "DMSO"], detect_workers=2)
    pd.testing.assert_frame_equal(serial.locations, parallel.locations)
    locations = serial.locations
    assert len(locations) == 6 * 3 + 2  # Border nuclei are found too (the builder drops them).
    for site_row in range(len(serial.index)):
        found = locations[locations["site_row"] == site_row][["x", "y"]].to_numpy()
        assert len(found) in (3, 4)
        assert (np.abs(found - np.round(found)) <= 0.5).all()
    assert any("detected on DNA (20 nuclei)" in n for n in serial.spec["notes"])


def test_cli_entry_points(fixture, tmp_path):
    root, raw_dir, cells, moa = fixture
    parser = argparse.ArgumentParser()
    bbbc021.add_arguments(parser)
    args = parser.parse_args(["--centers", str(root / "centres.csv"), "--compounds",
                              "taxol,DMSO"])
    screen = bbbc021.read(str(raw_dir), args)
    assert set(screen.perturbations["perturbation"]) == {"DMSO", "taxol"}
    images, _ = write_impa(tmp_path, cells, moa)
    args = parser.parse_args(["--layout", "impa", "--subset", "impa_six"])
    screen = bbbc021.read(str(images), args)  # Finds metadata/*.csv.
    assert set(screen.perturbations["perturbation"]) == {"AZ138", "DMSO", "taxol"}
    assert screen.precropped
    with pytest.raises(ValueError, match="--centers is for --layout raw"):
        bbbc021.read(str(images), parser.parse_args(["--layout", "impa", "--centers", "x"]))
    assert bbbc021.DEFAULTS == dict(crop_size=96, illumination="impa")
    assert bbbc021.NAME == "bbbc021" and bbbc021.SUMMARY and bbbc021.NEEDS


# ------------------------------------------------------------------------------------------
# Bad input: each error names the item.
# ------------------------------------------------------------------------------------------


@pytest.fixture
def raw_copy(fixture, tmp_path):
    root, raw_dir, _, _ = fixture
    shutil.copytree(raw_dir, tmp_path / "raw")
    shutil.copyfile(root / "centres.csv", tmp_path / "centres.csv")
    table = pd.read_csv(tmp_path / "raw" / "BBBC021_v1_image.csv", dtype=str,
                        keep_default_na=False)
    return tmp_path / "raw", table


def test_raw_errors(raw_copy, tmp_path):
    raw_dir, table = raw_copy
    first = table.iloc[0]
    dapi = raw_dir / first["Image_PathName_DAPI"] / first["Image_FileName_DAPI"]
    actin = raw_dir / first["Image_PathName_Actin"] / first["Image_FileName_Actin"]
    centres = tmp_path / "centres.csv"

    os.remove(actin)
    with pytest.raises(FileNotFoundError, match=f"{actin.name}.*row 0"):
        bbbc021.read_bbbc021(raw_dir, centers=centres)
    # Bit depth and shapes are checked when the images are read: by the build.
    _write_tiff(str(actin), np.zeros((128, 160), np.uint16))
    screen = bbbc021.read_bbbc021(raw_dir, centers=centres)
    Image.fromarray(np.zeros((128, 160), np.uint8)).save(actin, format="TIFF")  # 8-bit.
    with pytest.raises(ValueError, match=f"{actin.name} .*mode L.*16-bit greyscale"):
        build_raw_screen(screen, tmp_path / "out", crop_size=32, progress=False)
    Image.fromarray(np.zeros((128, 160, 3), np.uint8)).save(actin, format="TIFF")  # RGB.
    with pytest.raises(ValueError, match=f"{actin.name} .*mode RGB"):
        build_raw_screen(screen, tmp_path / "out", crop_size=32, progress=False)
    _write_tiff(str(actin), np.zeros((128, 150), np.uint16))
    with pytest.raises(ValueError, match="disagree in shape.*150"):
        build_raw_screen(screen, tmp_path / "out", crop_size=32, progress=False)

    bad = table.copy()
    bad.loc[2, "Image_FileName_Tubulin"] = ""
    bad.to_csv(raw_dir / "BBBC021_v1_image.csv", index=False)
    with pytest.raises(ValueError, match="row 2: no Tubulin image"):
        bbbc021.read_bbbc021(raw_dir, centers=centres)

    # A compound without SMILES: an error naming it, unless the selection leaves it out.
    extra = table.iloc[[0]].copy()
    extra["Image_Metadata_Compound"] = "5-fluorouracil"
    extra["ImageNumber"] = "99999"
    pd.concat([table, extra]).to_csv(raw_dir / "BBBC021_v1_image.csv", index=False)
    with pytest.raises(ValueError, match=r"no SMILES .*\['5-fluorouracil'\]"):
        bbbc021.read_bbbc021(raw_dir, centers=centres)
    with pytest.raises(ValueError, match=r"Compound\(s\) \['nope'\] are not in"):
        bbbc021.read_bbbc021(raw_dir, centers=centres, compounds=["taxol", "nope"])

    table.to_csv(raw_dir / "BBBC021_v1_image.csv", index=False)
    _write_tiff(str(actin), np.zeros((128, 160), np.uint16))
    wrong = pd.read_csv(centres)
    wrong.loc[3, "ImageNumber"] = 123456
    wrong.to_csv(tmp_path / "wrong.csv", index=False)
    with pytest.raises(ValueError, match=r"row 3: image .*'123456'\) is not in the image"):
        bbbc021.read_bbbc021(raw_dir, centers=tmp_path / "wrong.csv")
    assert dapi.exists()


def test_impa_errors(fixture, tmp_path):
    _, _, cells, moa = fixture
    images, metadata = write_impa(tmp_path, cells, moa)
    table = pd.read_csv(metadata, index_col=0)

    bad = table.copy()
    bad.loc[4, "STATE"] = "treated"
    bad.to_csv(metadata)
    with pytest.raises(ValueError, match="row 4 .*STATE 'treated'"):
        bbbc021.read_bbbc021_impa(images, metadata)
    bad = table.copy()
    bad.loc[5, "SPLIT"] = "val"
    bad.to_csv(metadata)
    with pytest.raises(ValueError, match="row 5 .*SPLIT 'val'"):
        bbbc021.read_bbbc021_impa(images, metadata)

    table.to_csv(metadata)
    key = table["SAMPLE_KEY"].iloc[7]
    missing = images.joinpath(*bbbc021.sample_key_path(key))
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=f"{missing.name} .*row 7"):
        bbbc021.read_bbbc021_impa(images, metadata)
    np.save(missing, cells[7]["crop"])

    # SMILES attached for scaffold splits; a compound without one is named.
    smiles = tmp_path / "smiles.csv"
    shared = synthetic_perturbations.shared_data_dir() / "bbbc021"
    full = pd.read_csv(shared / "BBBC021_compound_smiles.csv")
    full[full["compound"] != "ALLN"].to_csv(smiles, index=False)
    with pytest.raises(ValueError, match=r"no SMILES .*\['ALLN'\]"):
        bbbc021.read_bbbc021_impa(images, metadata, smiles_table=smiles)
    screen = bbbc021.read_bbbc021_impa(images, metadata, smiles_table=smiles,
                                       compounds=["AZ138", "taxol", "DMSO"])
    assert (screen.perturbations["smiles"] != "").all()

    # Crops of the wrong shape are refused by the builder, naming the file.
    np.save(missing, np.zeros((CROP, CROP, 4), np.uint8))
    screen = bbbc021.read_bbbc021_impa(images, metadata)
    with pytest.raises(ValueError, match=missing.name):
        _build(screen, tmp_path / "out")
