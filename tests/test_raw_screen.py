"""The raw-screen builder on small screens written here: known nuclei, gradient, bad files."""

import json
import os
import sys

import grain
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from data_builders.raw_screen import build_raw_screen
from data_builders.raw_screen import illumination
from data_builders.raw_screen import open_split
from data_builders.raw_screen import read_tables
from morphjax.data import make_train_dataset
from morphjax.data import tfds_source

SIZE = 128
CROP = 32
SIGMA = 8.0  # flat-field smoothing for 128 px images (IMPA's 50 is for ~1000 px fields)
CHANNELS = ("DNA", "Tubulin", "Actin")
PLATES = ("P1", "P2")
WELLS = ("A01", "A02", "B01", "B02")
SITES = (1, 2)
GRID = (28.0, 64.0, 100.0)
BACKGROUND = 400.0
PERTURBATIONS = pd.DataFrame({
    "perturbation": ["DMSO", "taxol", "docetaxel", "cytochalasin_b", "BRCA1_g1"],
    "type": ["control", "compound", "compound", "compound", "crispr"],
    "is_control": [1, 0, 0, 0, 0],
    "moa": ["DMSO", "Microtubule stabilizers", "Microtubule stabilizers", "Actin disruptors", ""],
    "smiles": [
        "CS(C)=O",
        "CC(=O)OC1C(=O)C2(C)C(O)CC3OCC3(OC(C)=O)C2C(OC(=O)c2ccccc2)C2(O)CC(OC(=O)C(O)"
        "C(NC(=O)c3ccccc3)c3ccccc3)C(C)=C1C2(C)C",
        "CC(=O)OC12COC1CC(O)C1(C)C2C(OC(=O)c2ccccc2)C2(O)CC(OC(=O)C(O)C(NC(=O)OC(C)(C)C)"
        "c3ccccc3)C(C)=C(C(O)C1=O)C2(C)C",
        "CC1CCCC=CC(=O)OC23C(C=CC(O)C1)C(O)C(=C)C(C)C2C(Cc1ccccc1)NC3=O",
        "",
    ],
    "target_gene": ["", "TUBB", "TUBB", "", "BRCA1"],
    "complex": ["", "", "", "", "BRCA1-A"],
    "sequence": ["", "", "", "", "ACGTACGTACGTACGTACGT"],
})
# Well -> perturbation, the same on every plate; A01 is the control well.
WELL_PERTURBATION = {"A01": "DMSO", "A02": "taxol", "B01": "cytochalasin_b", "B02": "BRCA1_g1"}


def _blob(centre_xy, sigma, amplitude):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    r2 = (xx - centre_xy[0]) ** 2 + (yy - centre_xy[1]) ** 2
    return amplitude * np.exp(-r2 / (2 * sigma**2))


def _site_centres(rng):
    """9 cells on a jittered 3x3 grid (crops fit, neighbours > crop apart) + 1 at the border."""
    jitter = rng.uniform(-6, 6, size=(9, 2))
    grid = np.array([(x, y) for y in GRID for x in GRID]) + jitter
    return np.concatenate([grid, [[rng.uniform(3, 12), rng.uniform(40, 90)]]])


def write_screen(root, *, gradient=1.0, flat_cells=(), blurred_cells=(), sites=SITES,
                 image_format="png", pooled=False, plates=PLATES, seed=0):
    """A raw screen in RAW_LAYOUT.md: Gaussian nuclei at recorded centres, a left-to-right
    illumination gradient (right edge `1 + gradient` times the left), light noise.

    `flat_cells` / `blurred_cells`: (plate, well, site, cell) whose nucleus is left out of
    the DNA channel / drawn 4x wider. Returns the true centres per site.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(root)
    with open(os.path.join(root, "screen.json"), "w") as f:
        json.dump({"name": "toy-screen", "channels": list(CHANNELS),
                   "image_size": [SIZE, SIZE], "bit_depth": 16}, f)
    PERTURBATIONS.to_csv(os.path.join(root, "perturbations.csv"), index=False)
    np.save(os.path.join(root, "expression.npy"),
            rng.normal(size=(len(PERTURBATIONS), 978)).astype(np.float32))
    field = 1.0 + gradient * np.arange(SIZE)[None, :] / (SIZE - 1)
    rows, centres = [], {}
    for b, plate in enumerate(plates):
        for well in WELLS:
            for site in sites:
                xy = _site_centres(rng)
                centres[(plate, well, site)] = xy
                row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
                       "Metadata_Perturbation": WELL_PERTURBATION[well],
                       "Metadata_Batch": f"batch{b}", "Metadata_CellLine": "MCF7",
                       "Metadata_Dose": 0.0 if well in ("A01", "B02") else 1.0,
                       "Metadata_Replicate": b + 1}
                for c, channel in enumerate(CHANNELS):
                    image = np.full((SIZE, SIZE), BACKGROUND)
                    for k, centre in enumerate(xy):
                        if c == 0 and (plate, well, site, k) in flat_cells:
                            continue
                        wide = c == 0 and (plate, well, site, k) in blurred_cells
                        image += _blob(centre, 12.0 if wide else 3.0 * (1 + c),
                                       (800.0 if wide else 8000.0) / (1 + c))
                    image = image * field + rng.normal(0, 5, size=image.shape)
                    relative = f"{plate}/{well}_s{site}_{channel}.{image_format}"
                    path = os.path.join(root, "images", relative)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    Image.fromarray(np.clip(image, 0, 65535).astype(np.uint16)).save(path)
                    row[channel] = relative
                rows.append(row)
                locations = pd.DataFrame({"Nuclei_Location_Center_X": xy[:, 0],
                                          "Nuclei_Location_Center_Y": xy[:, 1]})
                if pooled:
                    locations["Metadata_Perturbation"] = [
                        PERTURBATIONS["perturbation"][k % len(PERTURBATIONS)]
                        for k in range(len(xy))]
                path = os.path.join(root, "locations", plate, f"{well}-{site}-Nuclei.csv")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                locations.to_csv(path, index=False)
    pd.DataFrame(rows).to_csv(os.path.join(root, "index.csv"), index=False)
    return centres


def build(raw, out, **kwargs):
    options = dict(crop_size=CROP, illumination_sigma=SIGMA, progress=False)
    options.update(kwargs)
    return build_raw_screen(raw, out, **options)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen")
    raw = str(root / "raw")
    centres = write_screen(raw)
    report = build(raw, str(root / "impa"))
    return raw, centres, str(root / "impa"), report


def _load_split(out, split):
    source = open_split(out, split)
    items = [source[i] for i in range(len(source))]
    return {key: np.stack([item[key] for item in items]) for key in items[0]}


def _all_examples(out):
    parts = [_load_split(out, s) for s in ("train", "test")]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(merged["cell_index"])
    return {k: v[order] for k, v in merged.items()}


def test_crops_are_centred_on_recorded_nuclei(screen):
    raw, centres, out, _ = screen
    examples = _all_examples(out)
    cells = read_tables(out)["cells"]
    np.testing.assert_array_equal(examples["cell_index"], np.arange(len(cells)))
    assert len(cells) == len(PLATES) * len(WELLS) * len(SITES) * 9
    for i, cell in cells.iterrows():
        true_xy = centres[(cell.Metadata_Plate, cell.Metadata_Well, cell.Metadata_Site)][
            cell.location_row]
        np.testing.assert_allclose([cell.x, cell.y], true_xy, atol=1e-9)
        np.testing.assert_allclose(examples["center"][i], true_xy, atol=1e-4)
        dna = examples["image"][i, :, :, 0].astype(np.float64)
        # The nucleus under the crop centre (a neighbour's may be partly in view).
        labels, _ = ndimage.label(dna > 0.5 * dna.max())
        central = labels == labels[CROP // 2, CROP // 2]
        com_y, com_x = ndimage.center_of_mass(dna * central)
        # The nucleus lands on pixel (S//2, S//2) up to the sub-pixel part of its centre.
        expected = CROP // 2 + (true_xy - np.round(true_xy))
        assert abs(com_x - expected[0]) < 0.35 and abs(com_y - expected[1]) < 0.35, (i, com_x,
                                                                                    com_y)
        assert max(abs(com_x - CROP // 2), abs(com_y - CROP // 2)) <= 1.0


def _right_left_ratio(out):
    cells = read_tables(out)["cells"]
    images = _all_examples(out)["image"][..., 0].astype(np.float64)
    # The nucleus region only: the left column's crops also see the border cells.
    centre = images[:, CROP // 2 - 6:CROP // 2 + 6, CROP // 2 - 6:CROP // 2 + 6]
    means = centre.reshape(len(images), -1).mean(axis=1)
    x = cells["x"].to_numpy()
    return means[x > 85].mean() / means[x < 45].mean()


def test_illumination_correction_flattens_plate_gradient(screen, tmp_path):
    raw, _, impa_out, _ = screen
    build(raw, str(tmp_path / "none"), illumination="none")
    build(raw, str(tmp_path / "dp"), illumination="deepprofiler")
    uncorrected = _right_left_ratio(str(tmp_path / "none"))
    impa = _right_left_ratio(impa_out)
    deepprofiler = _right_left_ratio(str(tmp_path / "dp"))
    assert uncorrected > 1.4, uncorrected  # the raw gradient is 1.46x between the columns
    assert abs(impa - 1.0) < 0.05, impa
    assert abs(deepprofiler - 1.0) < 0.08, deepprofiler


def test_impa_correction_follows_the_paper_steps():
    rng = np.random.default_rng(1)
    plate = rng.gamma(4.0, 200.0, size=(7, 40, 50)) * np.linspace(1, 2, 50)
    image = plate[3]
    # Independent float64 reference of impa.txt's steps.
    flat = ndimage.gaussian_filter(np.percentile(plate, 10, axis=0), 5.0)
    expected = np.clip(np.log(np.clip(image / flat, 1, None)), None, 5) / 5 * 255
    flat_field = illumination.impa_flat_field(plate, 5.0)
    got = illumination.impa_to_uint8(image, flat_field)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(float) - expected).max() <= 0.51
    # Pixels at or below background are 0, pixels over e^5 x background saturate at 255.
    assert illumination.impa_to_uint8(np.full((2, 2), 50.0), np.full((2, 2), 100.0)).max() == 0
    assert illumination.impa_to_uint8(np.full((2, 2), 2e4), np.full((2, 2), 100.0)).min() == 255


def test_deepprofiler_illumination_follows_the_field():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:256, 0:320]
    field = 1.0 + xx / 319 + 0.3 * ((yy - 100) / 128) ** 2  # gradient + off-centre vignetting
    plate = rng.normal(300.0, 10.0, size=(8, 256, 320)) * field
    plate[:, 100:112, 150:162] += 5000.0  # a bright object the median filter must ignore
    illum = illumination.deepprofiler_illumination(plate)
    assert illum.min() == pytest.approx(1.0)
    # Proportional to the true field away from the borders: the ratio is flat.
    ratio = (illum / field)[24:-24, 24:-24]
    assert ratio.std() / ratio.mean() < 0.02, ratio.std() / ratio.mean()
    corrected = plate[0] / illum
    assert corrected[24:-24, 250:290].mean() / corrected[24:-24, 30:70].mean() == pytest.approx(
        1.0, abs=0.03)


@pytest.mark.parametrize("percentiles", [(0.05, 99.95), (0.1, 99.9), (5.0, 90.0)])
def test_stretch_maps_percentiles_to_full_range(percentiles):
    image = np.arange(10000, dtype=np.float64).reshape(100, 100)
    out = illumination.correct("none", image, None, percentiles)
    lo, hi = np.percentile(image, percentiles)
    expected = np.round(np.clip((image - lo) / (hi - lo), 0, 1) * 255)
    np.testing.assert_array_equal(out, expected)
    assert out.min() == 0 and out.max() == 255


def _reference_crops(raw, cells, crop, method, resize_to=None):
    """Crops computed directly with NumPy from the raw PNGs: plate statistic, correction,
    integer window around the rounded centre, optional PIL resize."""
    index = pd.read_csv(os.path.join(raw, "index.csv"), dtype={"Metadata_Plate": str})
    crops = []
    stats = {}
    for _, cell in cells.iterrows():
        site = index[(index.Metadata_Plate == cell.Metadata_Plate)
                     & (index.Metadata_Well == cell.Metadata_Well)
                     & (index.Metadata_Site == cell.Metadata_Site)].iloc[0]
        planes = []
        for channel in CHANNELS:
            key = (cell.Metadata_Plate, channel)
            if key not in stats:
                paths = index[index.Metadata_Plate == cell.Metadata_Plate][channel]
                stack = np.stack([np.asarray(Image.open(os.path.join(raw, "images", p)))
                                  for p in paths]).astype(np.float32)
                stats[key] = illumination.plate_statistic(method, stack, SIGMA)
            image = np.asarray(Image.open(os.path.join(raw, "images", site[channel])))
            corrected = illumination.correct(method, image.astype(np.float32), stats[key])
            r0 = int(np.round(cell.y)) - crop // 2
            c0 = int(np.round(cell.x)) - crop // 2
            window = corrected[r0:r0 + crop, c0:c0 + crop]
            if resize_to:
                window = np.asarray(Image.fromarray(window).resize(
                    (resize_to, resize_to), Image.Resampling.BILINEAR))
            planes.append(window)
        crops.append(np.stack(planes, axis=-1))
    return np.stack(crops)


@pytest.mark.parametrize("method,crop,resize_to", [
    ("impa", CROP, None), ("none", 48, 24), ("deepprofiler", CROP, None)])
def test_round_trip_through_grain_equals_numpy_crops(screen, tmp_path, method, crop, resize_to):
    raw, _, impa_out, report = screen
    out = impa_out
    if (method, crop) != ("impa", CROP):
        out = str(tmp_path / "out")
        report = build(raw, out, illumination=method, crop_size=crop, resize_to=resize_to)
    cells = read_tables(out)["cells"]
    train_cells = cells[cells.split == "train"].sort_values("split_index")
    assert len(train_cells) == report["examples"]["train"]
    source = open_split(out, "train")
    dataset = make_train_dataset(grain.MapDataset.source(source), batch_size=8, seed=3,
                                 process_index=0, process_count=1)
    batch = next(iter(dataset))
    size = resize_to or crop
    assert batch["image"].shape == (8, size, size, len(CHANNELS))
    assert batch["image"].dtype == np.uint8
    picked = cells.set_index("cell_index").loc[batch["cell_index"]].reset_index()
    reference = _reference_crops(raw, picked, crop, method, resize_to)
    np.testing.assert_array_equal(batch["image"], reference)
    # Labels travel with the image.
    for key in ("perturbation_id", "plate_id", "well_id", "batch_id", "cell_line_id", "moa_id"):
        np.testing.assert_array_equal(batch[key], picked[key], err_msg=key)
    np.testing.assert_array_equal(batch["is_control"], picked["is_control"].astype(bool))
    np.testing.assert_array_equal(batch["site"], picked["Metadata_Site"])
    np.testing.assert_allclose(batch["dose"], picked["Metadata_Dose"])
    np.testing.assert_allclose(batch["center"], picked[["x", "y"]].to_numpy(), atol=1e-4)
    assert "tensorflow" not in sys.modules


def test_tables_vocabularies_and_tfds_reading(screen):
    raw, _, out, report = screen
    tables = read_tables(out)
    perturbations = tables["perturbations"]
    assert list(perturbations["perturbation"]) == list(PERTURBATIONS["perturbation"])
    np.testing.assert_array_equal(perturbations["perturbation_id"], np.arange(5))
    cells = tables["cells"]
    for table, column in [("plates", "Metadata_Plate"), ("wells", "Metadata_Well"),
                          ("batches", "Metadata_Batch"), ("cell_lines", "Metadata_CellLine")]:
        names = tables[table].set_index("id")["name"]
        id_column = {"plates": "plate_id", "wells": "well_id", "batches": "batch_id",
                     "cell_lines": "cell_line_id"}[table]
        assert (names[cells[id_column]].to_numpy() == cells[column]).all(), table
    assert list(tables["wells"]["name"]) == sorted(WELLS)
    assert list(tables["batches"]["name"]) == ["batch0", "batch1"]
    moas = tables["moas"].set_index("id")["name"]
    assert (moas[cells["moa_id"]].to_numpy() == cells["moa"]).all()
    assert set(cells["Metadata_Replicate"]) == {1, 2}  # extra index columns are carried
    assert (cells.loc[cells.Metadata_Perturbation == "DMSO", "is_control"] == 1).all()
    expression = np.load(os.path.join(out, "expression.npy"))
    np.testing.assert_array_equal(expression, np.load(os.path.join(raw, "expression.npy")))
    with open(os.path.join(out, "screen.json")) as f:
        assert json.load(f)["channels"] == list(CHANNELS)
    # tfds.data_source by name, as morphjax.data.tfds_source reads prepared datasets.
    source = tfds_source(report["name"], "test", data_dir=out)
    assert len(source) == report["examples"]["test"]
    item = source[0]
    assert item["image"].shape == (CROP, CROP, 3) and item["image"].dtype == np.uint8
    row = cells.iloc[int(item["cell_index"])]
    assert row["split"] == "test" and row["perturbation_id"] == item["perturbation_id"]
    assert "tensorflow" not in sys.modules


def test_counts_add_up_and_qc_filters_are_reported(tmp_path):
    raw = str(tmp_path / "raw")
    flat = {("P1", "A02", 1, 4), ("P2", "B01", 2, 5)}
    blurred = {("P1", "A01", 1, 2), ("P1", "B02", 2, 8), ("P2", "A01", 1, 5)}
    write_screen(raw, flat_cells=flat, blurred_cells=blurred)
    n_sites = len(PLATES) * len(WELLS) * len(SITES)

    defaults = build(raw, str(tmp_path / "defaults"))
    assert defaults["cells"] == {"found": 10 * n_sites, "kept": 9 * n_sites - 2,
                                 "excluded_border": n_sites, "excluded_low_variance": 2,
                                 "excluded_blur": 0}

    report = build(raw, str(tmp_path / "qc"), qc_min_std=4.0, qc_min_sharpness=6.0)
    counts = report["cells"]
    assert counts == {"found": 10 * n_sites, "kept": 9 * n_sites - 5,
                      "excluded_border": n_sites, "excluded_low_variance": 2,
                      "excluded_blur": 3}
    per_plate = report["cells_per_plate"]
    for key in counts:
        assert sum(p[key] for p in per_plate.values()) == counts[key]
    assert per_plate["P1"]["excluded_blur"] == 2 and per_plate["P2"]["excluded_blur"] == 1
    cells = read_tables(str(tmp_path / "qc"))["cells"]
    assert len(cells) == counts["kept"] == sum(report["examples"].values())
    kept = set(zip(cells.Metadata_Plate, cells.Metadata_Well, cells.Metadata_Site,
                   cells.location_row))
    assert not kept & (flat | blurred)
    assert all(row[3] != 9 for row in kept)  # the border cell of every site
    with open(os.path.join(tmp_path, "qc", "build_report.json")) as f:
        assert json.load(f)["cells"] == counts


def test_held_out_plate_perturbation_and_scaffold_never_in_train(screen, tmp_path):
    raw = screen[0]
    by_plate = build(raw, str(tmp_path / "plates"), split="plates", holdout=("P2",))
    cells = read_tables(str(tmp_path / "plates"))["cells"]
    assert set(cells[cells.split == "test"].Metadata_Plate) == {"P2"}
    assert "P2" not in set(cells[cells.split == "train"].Metadata_Plate)
    assert by_plate["split_info"]["test_plates"] == ["P2"]
    assert "P2" not in set(cells.loc[_load_split(str(tmp_path / "plates"), "train")[
        "cell_index"]].Metadata_Plate)

    build(raw, str(tmp_path / "pert"), split="perturbations", holdout=("taxol",))
    cells = read_tables(str(tmp_path / "pert"))["cells"]
    train = _load_split(str(tmp_path / "pert"), "train")
    test = _load_split(str(tmp_path / "pert"), "test")
    taxol = 1
    assert taxol not in set(train["perturbation_id"])
    assert set(test["perturbation_id"]) == {taxol, 0}  # held out + controls
    assert test["is_control"].any() and train["is_control"].any()
    assert set(cells[cells.split == "train"].Metadata_Perturbation) == {"DMSO", "cytochalasin_b",
                                                               "BRCA1_g1"}

    drawn = build(raw, str(tmp_path / "drawn"), split="perturbations", test_fraction=0.3,
                  seed=4)
    held = drawn["split_info"]["test_perturbations"]
    assert len(held) == 1 and held[0] != "DMSO"
    cells = read_tables(str(tmp_path / "drawn"))["cells"]
    assert not set(held) & set(cells[cells.split == "train"].Metadata_Perturbation)

    for seed in range(3):
        out = str(tmp_path / f"scaffold{seed}")
        report = build(raw, out, split="scaffold", test_fraction=0.5, seed=seed)
        cells = read_tables(out)["cells"]
        treated_test = (cells.split == "test") & (cells.is_control == 0)
        test_pert = set(cells[treated_test].Metadata_Perturbation)
        train_pert = set(cells[cells.split == "train"].Metadata_Perturbation)
        assert test_pert == set(report["split_info"]["test_perturbations"])
        assert test_pert and not test_pert & train_pert
        assert "BRCA1_g1" in train_pert  # genetic perturbations stay in train
        assert test_pert <= {"taxol", "cytochalasin_b"}

    report = build(raw, str(tmp_path / "random"), split="random_cells", test_fraction=0.25)
    n = report["examples"]["train"] + report["examples"]["test"]
    assert abs(report["examples"]["test"] / n - 0.25) < 0.1


def test_pooled_screen_per_cell_perturbations(tmp_path):
    raw = str(tmp_path / "raw")
    write_screen(raw, pooled=True, plates=("P1",), sites=(1,))
    build(raw, str(tmp_path / "out"))
    cells = read_tables(str(tmp_path / "out"))["cells"]
    expected = PERTURBATIONS["perturbation"].to_numpy()[cells.location_row % 5]
    np.testing.assert_array_equal(cells.Metadata_Perturbation, expected)
    np.testing.assert_array_equal(cells.is_control, (cells.location_row % 5 == 0).astype(int))


def _expect_error(raw, tmp_path, exception, *fragments):
    out = str(tmp_path / "out")
    with pytest.raises(exception) as info:
        build(raw, out)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp")]


def _small_screen(tmp_path):
    raw = str(tmp_path / "raw")
    write_screen(raw, plates=("P1",), sites=(1,))
    return raw


def test_missing_channel_file_names_the_path_and_site(tmp_path):
    raw = _small_screen(tmp_path)
    os.remove(os.path.join(raw, "images", "P1", "A02_s1_Actin.png"))
    _expect_error(raw, tmp_path, FileNotFoundError, "A02_s1_Actin.png", "well A02 site 1")


def test_truncated_png_names_the_file(tmp_path):
    raw = _small_screen(tmp_path)
    path = os.path.join(raw, "images", "P1", "B01_s1_Tubulin.png")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    _expect_error(raw, tmp_path, ValueError, "B01_s1_Tubulin.png", "Cannot read image")


def test_channel_shape_mismatch_names_the_site_and_shapes(tmp_path):
    raw = _small_screen(tmp_path)
    path = os.path.join(raw, "images", "P1", "A01_s1_Actin.png")
    Image.fromarray(np.zeros((SIZE, SIZE - 8), np.uint16)).save(path)
    # Without image_size in screen.json the site's channels are compared with each other.
    spec_path = os.path.join(raw, "screen.json")
    with open(spec_path) as f:
        spec = json.load(f)
    del spec["image_size"]
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    _expect_error(raw, tmp_path, ValueError, "well A01 site 1", "(128, 120)", "(128, 128)")


def test_unknown_perturbation_is_named(tmp_path):
    raw = _small_screen(tmp_path)
    index = pd.read_csv(os.path.join(raw, "index.csv"))
    index.loc[2, "Metadata_Perturbation"] = "mystery_compound"
    index.to_csv(os.path.join(raw, "index.csv"), index=False)
    _expect_error(raw, tmp_path, ValueError, "mystery_compound", "perturbations.csv")


def test_unknown_per_cell_perturbation_is_named(tmp_path):
    raw = _small_screen(tmp_path)
    path = os.path.join(raw, "locations", "P1", "A02-1-Nuclei.csv")
    locations = pd.read_csv(path)
    locations["Metadata_Perturbation"] = ["taxol"] * (len(locations) - 1) + ["sgXYZ"]
    locations.to_csv(path, index=False)
    _expect_error(raw, tmp_path, ValueError, "sgXYZ", "A02-1-Nuclei.csv")


def test_missing_channel_column_is_named(tmp_path):
    raw = _small_screen(tmp_path)
    index = pd.read_csv(os.path.join(raw, "index.csv")).drop(columns="Tubulin")
    index.to_csv(os.path.join(raw, "index.csv"), index=False)
    _expect_error(raw, tmp_path, ValueError, "Tubulin", "index.csv")


def test_missing_screen_json_and_location_column(tmp_path):
    raw = _small_screen(tmp_path)
    path = os.path.join(raw, "locations", "P1", "B02-1-Nuclei.csv")
    pd.read_csv(path).rename(columns={"Nuclei_Location_Center_Y": "Y"}).to_csv(path, index=False)
    _expect_error(raw, tmp_path, ValueError, "Nuclei_Location_Center_Y", "B02-1-Nuclei.csv")
    os.remove(os.path.join(raw, "screen.json"))
    _expect_error(raw, tmp_path, FileNotFoundError, "screen.json")


def test_bad_options_and_existing_output(screen, tmp_path):
    raw, _, out, _ = screen
    with pytest.raises(FileExistsError, match="already exists"):
        build(raw, out)
    with pytest.raises(ValueError, match="Unknown split"):
        build(raw, str(tmp_path / "a"), split="wells")
    with pytest.raises(ValueError, match="P9"):
        build(raw, str(tmp_path / "b"), split="plates", holdout=("P9",))
    with pytest.raises(ValueError, match="controls"):
        build(raw, str(tmp_path / "c"), split="perturbations", holdout=("DMSO",))
    with pytest.raises(ValueError, match="illumination"):
        build(raw, str(tmp_path / "d"), illumination="flat")
    with pytest.raises(ValueError, match="Unknown split 'validation'"):
        open_split(out, "validation")


def test_tiff_images_and_sites_without_locations(tmp_path):
    png, tif = str(tmp_path / "png"), str(tmp_path / "tif")
    write_screen(png, plates=("P1",), sites=(1,), seed=5)
    write_screen(tif, plates=("P1",), sites=(1,), seed=5, image_format="tif")
    os.remove(os.path.join(tif, "locations", "P1", "B01-1-Nuclei.csv"))
    from_png = build(png, str(tmp_path / "png_out"))
    from_tif = build(tif, str(tmp_path / "tif_out"))
    # A site without a locations file has no cells (DeepProfiler), and is counted.
    assert from_png["sites_without_locations"] == 0
    assert from_tif["sites_without_locations"] == 1
    assert from_tif["cells"]["found"] == from_png["cells"]["found"] - 10
    png_cells = read_tables(str(tmp_path / "png_out"))["cells"]
    tif_cells = read_tables(str(tmp_path / "tif_out"))["cells"]
    assert "B01" not in set(tif_cells.Metadata_Well)
    png_images = _all_examples(str(tmp_path / "png_out"))["image"]
    tif_images = _all_examples(str(tmp_path / "tif_out"))["image"]
    same = (png_cells.Metadata_Well != "B01").to_numpy()
    # The plate statistic sees the same images, so the crops are identical.
    np.testing.assert_array_equal(png_images[same], tif_images)
    np.testing.assert_array_equal(png_cells[same].x, tif_cells.x)


def test_overwrite_replaces_a_finished_build(screen, tmp_path):
    raw = screen[0]
    out = str(tmp_path / "out")
    first = build(raw, out, crop_size=CROP)
    second = build(raw, out, crop_size=24, overwrite=True, illumination_max_sites=3)
    assert first["options"]["crop_size"] == CROP and second["options"]["crop_size"] == 24
    # Plate statistics from a seeded subsample of 3 of the 8 sites per plate.
    assert first["illumination_sites_per_plate"] == {"P1": 8, "P2": 8}
    assert second["illumination_sites_per_plate"] == {"P1": 3, "P2": 3}
    assert open_split(out, "train")[0]["image"].shape == (24, 24, len(CHANNELS))
    assert sorted(os.listdir(tmp_path)) == ["out"]


# In-memory screens (layout.make_screen): what the real-layout builders hand to the builder.


def _memory_screen(raw, **kwargs):
    """The toy screen's tables read into memory, with the nucleus centres as a DataFrame."""
    from data_builders.raw_screen import layout

    index = pd.read_csv(os.path.join(raw, "index.csv"))
    cells = []
    for site_row, row in index.iterrows():
        path = os.path.join(raw, "locations", row["Metadata_Plate"],
                            f"{row['Metadata_Well']}-{row['Metadata_Site']}-Nuclei.csv")
        xy = pd.read_csv(path)
        cells.append(pd.DataFrame({"site_row": site_row, "x": xy["Nuclei_Location_Center_X"],
                                   "y": xy["Nuclei_Location_Center_Y"]}))
    spec = {"name": "toy-screen", "channels": list(CHANNELS), "image_size": [SIZE, SIZE]}
    return layout.make_screen(
        spec, index, PERTURBATIONS, source=os.path.join(raw, "index.csv"),
        images_dir=os.path.join(raw, "images"),
        locations=kwargs.pop("locations", pd.concat(cells, ignore_index=True)), **kwargs)


def _stacked_site(screen, site_row):
    """A site reader as multi-channel formats need one (here: the per-channel files)."""
    from data_builders.raw_screen import layout
    return np.stack([layout.read_image(screen.image_path(site_row, c), "")
                     for c in screen.channels], axis=-1).astype(np.float32)


def test_memory_screen_and_workers_give_the_same_dataset(screen, tmp_path):
    raw, _, out, _ = screen
    reference = _all_examples(out)
    memory = _memory_screen(raw)
    build(memory, str(tmp_path / "memory"), workers=2)
    build(_memory_screen(raw, site_reader=_stacked_site), str(tmp_path / "reader"))
    for name in ("memory", "reader"):
        examples = _all_examples(str(tmp_path / name))
        for key in ("image", "perturbation_id", "plate_id", "center", "cell_index"):
            np.testing.assert_array_equal(examples[key], reference[key], err_msg=f"{name} {key}")
    tables = read_tables(str(tmp_path / "memory"))
    pd.testing.assert_frame_equal(tables["cells"], read_tables(out)["cells"])
    with open(os.path.join(tmp_path, "memory", "screen.json")) as f:
        assert json.load(f)["channels"] == list(CHANNELS)


def test_precropped_cells_and_given_split(screen, tmp_path):
    raw, _, out, _ = screen
    examples = _all_examples(out)
    cells = read_tables(out)["cells"]
    crop_dir = tmp_path / "crops"
    crop_dir.mkdir()
    paths = []
    for i, image in enumerate(examples["image"]):
        paths.append(str(crop_dir / f"{i}.npy"))
        np.save(paths[-1], image)
    index = pd.read_csv(os.path.join(raw, "index.csv"))
    site_row = pd.MultiIndex.from_frame(index[["Metadata_Plate", "Metadata_Well",
                                               "Metadata_Site"]]).get_indexer(
        pd.MultiIndex.from_frame(cells[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]]))
    locations = pd.DataFrame({"site_row": site_row, "x": np.nan, "y": np.nan,
                              "crop_path": paths, "split": cells["split"]})
    memory = _memory_screen(raw, locations=locations)
    assert memory.precropped
    build(memory, str(tmp_path / "pre"), split="given", illumination="impa")
    rebuilt = _all_examples(str(tmp_path / "pre"))
    np.testing.assert_array_equal(rebuilt["image"], examples["image"])
    np.testing.assert_array_equal(rebuilt["perturbation_id"], examples["perturbation_id"])
    assert (read_tables(str(tmp_path / "pre"))["cells"]["split"] == cells["split"]).all()

    np.save(paths[3], examples["image"][3][:, :, :2])
    with pytest.raises(ValueError, match=r"3\.npy.*expected uint8 \(32, 32, 3\)"):
        build(memory, str(tmp_path / "bad"))
    os.remove(paths[5])
    with pytest.raises(FileNotFoundError, match=r"row 5: missing crop file .*5\.npy"):
        _memory_screen(raw, locations=locations)


def test_memory_screen_errors_name_the_item(screen, tmp_path):
    raw, _, _, _ = screen
    good = _memory_screen(raw).locations
    bad = good.assign(site_row=good["site_row"].where(good.index != 4, 999))
    with pytest.raises(ValueError, match="row 4: site_row 999 is not a row"):
        _memory_screen(raw, locations=bad)
    bad = good.assign(Metadata_Perturbation=["", "nope"] + [""] * (len(good) - 2))
    with pytest.raises(ValueError, match="row 1: Metadata_Perturbation 'nope'"):
        _memory_screen(raw, locations=bad)
    bad = good.assign(split=["train", "valid"] + ["test"] * (len(good) - 2))
    with pytest.raises(ValueError, match="row 1: split 'valid'"):
        _memory_screen(raw, locations=bad)
    with pytest.raises(ValueError, match="split='given' needs"):
        build(_memory_screen(raw), str(tmp_path / "x"), split="given")
    image = os.path.join(raw, "images", "P2", "B01_s1_Actin.png")
    os.replace(image, tmp_path / "kept.png")
    try:
        with pytest.raises(FileNotFoundError, match=r"B01_s1_Actin.png.*index.csv row"):
            _memory_screen(raw)
    finally:
        os.replace(tmp_path / "kept.png", image)
