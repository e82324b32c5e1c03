"""Optical pooled screen builder on a tiny screen written here in the ops package layout."""

import argparse
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_builders import ops
from data_builders.raw_screen import open_split, read_build_report, read_tables

HEIGHT, WIDTH = 96, 128  # Not square, so a swapped i/j would show.
CROP = 32
PLATES = ("P1", "P2")
TILES = (3, 7)
# Per tile: (cell, i, j, sgRNA_0, gene_symbol_0, count_0, sgRNA_1, gene_symbol_1, count_1)
CELLS = [
    (1, 20, 20, "sgA1", "GENEA", 5, "", "", 0),
    (2, 20, 60, "sgA2", "GENEA", 3, "sgA1", "GENEA", 2),     # second guide, same gene
    (3, 20, 100, "sgB1", "GENEB", 4, "", "", 0),
    (4, 60, 30, "sgNT1", "nontargeting", 6, "", "", 0),
    (5, 60, 70, "sgNT2", "nontargeting", 2, "", "", 0),
    (6, 70, 105, "", "", 0, "", "", 0),                      # unmapped barcode
    (7, 45, 45, "sgB1", "GENEB", 1, "", "", 0),              # low count (min 2)
    (8, 40, 85, "sgA1", "GENEA", 3, "sgB1", "GENEB", 2),     # ambiguous
]
GENE_OF = {"sgA1": "GENEA", "sgA2": "GENEA", "sgB1": "GENEB", "sgNT1": "nontargeting",
           "sgNT2": "nontargeting"}


def _table():
    rows = []
    for plate in PLATES:
        for tile in TILES:
            for cell, i, j, sg0, g0, n0, sg1, g1, n1 in CELLS:
                rows.append({"plate": plate, "well": "A1", "tile": tile, "cell": cell, "i": i,
                             "j": j, "sgRNA_0": sg0, "gene_symbol_0": g0,
                             "cell_barcode_count_0": n0, "sgRNA_1": sg1, "gene_symbol_1": g1,
                             "cell_barcode_count_1": n1, "barcode_count": n0 + n1})
    return pd.DataFrame(rows)


def _tile_pages(seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 60000, (HEIGHT, WIDTH)).astype(np.uint16) for _ in range(4)]


def _write_tiff(path, pages):
    images = [Image.fromarray(p) for p in pages]
    images[0].save(path, save_all=True, append_images=images[1:])


@pytest.fixture(scope="module")
def screen_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops_screen")
    _table().to_csv(root / "cells.csv", index=False)
    for p, plate in enumerate(PLATES):
        (root / "images" / plate).mkdir(parents=True)
        for tile in TILES:
            _write_tiff(root / "images" / plate / f"20X_A1_Tile-{tile}.phenotype.tif",
                        _tile_pages(100 * p + tile))
    return root


def _copy(screen_dir, tmp_path):
    target = tmp_path / "screen"
    shutil.copytree(screen_dir, target)
    return target


def test_tiles_are_read_as_four_channels(screen_dir):
    screen = ops.read_ops(screen_dir, min_barcode_count=2)
    image = ops.read_ops_tile(screen, 0)
    assert image.shape == (HEIGHT, WIDTH, 4) and image.dtype == np.float32
    np.testing.assert_array_equal(image, np.stack(_tile_pages(3), axis=-1))


def test_barcode_assignment_is_counted(screen_dir):
    screen = ops.read_ops(screen_dir, min_barcode_count=2)
    assert screen.spec["notes"]["cell_assignment"] == {
        "cells_in_table": 32, "kept": 20, "unmapped": 4, "low_count": 4, "ambiguous": 4,
        "other_gene": 0, "genes_without_cells": []}
    table = screen.perturbations.set_index("perturbation")
    assert list(table.index) == ["GENEA", "GENEB", "nontargeting"]
    assert table.loc["nontargeting", "type"] == "control"
    assert table.loc["GENEA", "type"] == "crispr" and table.loc["GENEA", "target_gene"] == "GENEA"
    assert len(screen.index) == 4 and sorted(set(screen.index["Metadata_Site"])) == [3, 7]
    # Only GENEA cells (+ controls); an unknown requested gene is reported, not an error.
    screen = ops.read_ops(screen_dir, min_barcode_count=2, genes=["GENEA", "NOTAGENE"])
    counts = screen.spec["notes"]["cell_assignment"]
    assert counts["kept"] == 16 and counts["other_gene"] == 4
    assert counts["genes_without_cells"] == ["NOTAGENE"]


def test_sgrna_level(screen_dir):
    screen = ops.read_ops(screen_dir, level="sgrna", min_barcode_count=2)
    table = screen.perturbations.set_index("perturbation")
    # At guide level, cell 2's second guide (sgA1 of the same gene) makes it ambiguous, so
    # sgA2 has no cell left.
    assert sorted(table.index) == ["sgA1", "sgB1", "sgNT1", "sgNT2"]
    assert table.loc["sgNT2", "is_control"] == 1 and table.loc["sgA1", "target_gene"] == "GENEA"
    assert table.loc["sgA1", "sequence"] == "sgA1" and table.loc["sgNT1", "type"] == "control"
    assert screen.spec["notes"]["cell_assignment"]["ambiguous"] == 8


def test_build_labels_crops_and_zscore(screen_dir, tmp_path):
    out = tmp_path / "out"
    report = ops.build_ops(
        screen_dir, out, read_options=dict(min_barcode_count=2), crop_size=CROP,
        illumination="none", qc_min_std=0.0, test_fraction=0.25, seed=0, workers=1,
        progress=False)
    assert report["channels"] == ["DAPI", "gH2AX", "Tubulin", "Phalloidin"]
    assert report["cells"]["found"] == 20
    # Cells 1 and 3 sit 20 px from the top: their 32 px crops fit exactly; none is cut off.
    assert report["cells"]["kept"] == 20
    assert sum(report["examples"].values()) == 20
    assert report["notes"]["cell_assignment"]["unmapped"] == 4
    with open(out / "cell_assignment.json") as f:
        assert json.load(f)["ambiguous"] == 4

    tables = read_tables(out)
    cells = tables["cells"]
    assert set(tables["batches"]["name"]) == set(PLATES)
    by_cell = {(c[1], c[2]): GENE_OF.get(c[3]) for c in CELLS}
    for _, cell in cells.iterrows():
        assert cell["Metadata_Perturbation"] == by_cell[(cell["y"], cell["x"])]
        assert cell["is_control"] == int(cell["Metadata_Perturbation"] == "nontargeting")
        assert cell["Metadata_CellLine"] == "HeLa"

    # illumination="none": per tile and channel, GRAPE's 0.1..99.9 percentile stretch.
    crops, batch_ids, controls = [], [], []
    for split in ("train", "test"):
        source = open_split(out, split)
        for _, cell in cells[cells["split"] == split].iterrows():
            item = source[int(cell["split_index"])]
            p = PLATES.index(cell["Metadata_Plate"])
            pages = np.stack(_tile_pages(100 * p + int(cell["Metadata_Site"])), -1)
            pages = pages.astype(np.float64)
            lo, hi = np.percentile(pages, [0.1, 99.9], axis=(0, 1))
            expected = np.round(np.clip((pages - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
            r0, c0 = int(cell["y"]) - CROP // 2, int(cell["x"]) - CROP // 2
            np.testing.assert_array_equal(item["image"], expected[r0:r0 + CROP, c0:c0 + CROP])
            if split == "train":
                crops.append(item["image"])
                batch_ids.append(int(item["batch_id"]))
                controls.append(bool(item["is_control"]))

    # zscore_by_batch.csv: mean/std of the train non-targeting crops of each batch, in [0, 1].
    stats = pd.read_csv(out / "zscore_by_batch.csv")
    crops, batch_ids, controls = np.stack(crops), np.asarray(batch_ids), np.asarray(controls)
    for b in range(2):
        x = crops[controls & (batch_ids == b)].astype(np.float64) / 255.0
        rows = stats[stats["batch_id"] == b]
        assert list(rows["channel"]) == report["channels"]
        assert (rows["n_cells"] == len(x)).all() and len(x) > 0
        np.testing.assert_allclose(rows["mean"], x.mean(axis=(0, 1, 2)), rtol=1e-10)
        np.testing.assert_allclose(rows["std"], x.std(axis=(0, 1, 2)), rtol=1e-8)
    z = ops.zscore(crops, batch_ids, stats)
    mean = stats.set_index(["batch_id", "channel"])["mean"]
    std = stats.set_index(["batch_id", "channel"])["std"]
    for k in (0, len(crops) - 1):
        for c, name in enumerate(report["channels"]):
            key = (batch_ids[k], name)
            want = (crops[k, ..., c] / 255.0 - mean[key]) / std[key]
            np.testing.assert_allclose(z[k, ..., c], want, rtol=1e-5, atol=1e-5)
    # Controls of a batch come out with mean 0 and std 1 per channel.
    zc = z[controls & (batch_ids == 0)]
    np.testing.assert_allclose(zc.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(zc.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match=r"batch_id\(s\) \[5\]"):
        ops.zscore(crops[:1], np.array([5]), stats)
    assert read_build_report(out)["options"]["crop_size"] == CROP


def test_missing_tile_image_is_an_error(screen_dir, tmp_path):
    root = _copy(screen_dir, tmp_path)
    os.remove(root / "images" / "P2" / "20X_A1_Tile-7.phenotype.tif")
    with pytest.raises(FileNotFoundError, match=r"cells\.csv row 24: missing .*Tile-7"):
        ops.read_ops(root)


def _replace_tile(root, pages):
    path = root / "images" / "P1" / "20X_A1_Tile-3.phenotype.tif"
    _write_tiff(path, pages)
    return ops.read_ops(root)


def test_wrong_bit_depth_is_an_error(screen_dir, tmp_path):
    root = _copy(screen_dir, tmp_path)
    pages = [p.astype(np.float32) for p in _tile_pages(0)]
    screen = _replace_tile(root, pages)
    with pytest.raises(ValueError, match=r"Tile-3\.phenotype\.tif .*page 0 \(DAPI\).*'F'"):
        ops.read_ops_tile(screen, 0)


def test_pages_of_different_shapes_are_an_error(screen_dir, tmp_path):
    root = _copy(screen_dir, tmp_path)
    pages = _tile_pages(0)
    pages[2] = pages[2][:64]
    screen = _replace_tile(root, pages)
    with pytest.raises(ValueError, match="Tile-3.*disagree in shape"):
        ops.read_ops_tile(screen, 0)


def test_wrong_page_count_is_an_error(screen_dir, tmp_path):
    root = _copy(screen_dir, tmp_path)
    screen = _replace_tile(root, _tile_pages(0)[:3])
    with pytest.raises(ValueError, match=r"Tile-3.*has 3 page\(s\); expected 4"):
        ops.read_ops_tile(screen, 0)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns="gene_symbol_0"), r"lacks column\(s\) \['gene_symbol_0'\]"),
    (lambda t: t.assign(tile=t["tile"].astype(str).replace("7", "x")), "tile 'x'"),
    (lambda t: pd.concat([t, t.iloc[:1]]),
     "row 32: cell 1 of plate 'P1' well A1 tile 3 appears more than once"),
    (lambda t: t.assign(sgRNA_0=""), "No cell of .* has an assigned perturbation"),
    (lambda t: t.assign(batch=np.where(t["tile"] == 3, "b1", "b2")),
     "plate P1 has cells of several batches"),
])
def test_bad_cells_table_is_an_error(screen_dir, tmp_path, change, message):
    root = _copy(screen_dir, tmp_path)
    change(pd.read_csv(root / "cells.csv", keep_default_na=False)).to_csv(
        root / "cells.csv", index=False)
    with pytest.raises(ValueError, match=message):
        ops.read_ops(root)


def test_parquet_table_and_cli_arguments(screen_dir, tmp_path):
    root = _copy(screen_dir, tmp_path)
    table = pd.read_csv(root / "cells.csv", keep_default_na=False)
    os.remove(root / "cells.csv")
    table.to_parquet(root / "cells.parquet")
    parser = argparse.ArgumentParser()
    ops.add_arguments(parser)
    args = parser.parse_args(["--min-barcode-count", "2", "--level", "gene"])
    screen = ops.read(str(root), args)
    assert screen.spec["notes"]["cell_assignment"]["kept"] == 20
