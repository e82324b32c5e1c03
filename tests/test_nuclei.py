"""The built-in nucleus detector (data_builders/raw_screen/nuclei.py)."""

import numpy as np
import pandas as pd
import pytest
from skimage.filters import threshold_otsu

from data_builders.raw_screen import layout, nuclei


@pytest.mark.parametrize("seed", range(4))
def test_otsu_matches_skimage(seed):
    rng = np.random.default_rng(seed)
    images = [
        rng.gamma(2.0, size=(50, 70)) * 300.0,
        np.concatenate([rng.normal(10, 2, 500), rng.normal(40, 5, 300)]).reshape(20, 40),
        rng.integers(0, 65536, (33, 31)).astype(np.float64),
    ]
    for image in images:
        assert nuclei.otsu_threshold(image) == threshold_otsu(image)
    assert nuclei.otsu_threshold(np.full((5, 5), 3.0)) == 3.0


def _discs(shape, centres, radius):
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    image = np.zeros(shape, np.float64)
    for x, y in centres:
        image[(cols - x) ** 2 + (rows - y) ** 2 <= radius**2] = 1.0
    return image


def test_planted_discs_one_detection_each():
    rng = np.random.default_rng(0)
    # Two touching discs (centres 16 px apart, radius 8), two isolated ones, one speck.
    centres = np.array([[30.0, 40.0], [46.0, 40.0], [100.0, 25.0], [90.5, 90.5]])
    image = _discs((128, 140), centres, 8) * 3000 + rng.normal(200, 20, (128, 140))
    image[5:7, 120:122] = 3000  # Debris below min_area.
    found = nuclei.detect_nuclei(image.astype(np.uint16))
    assert found.shape == (4, 2) and found.dtype == np.float64
    distances = np.linalg.norm(found[:, None] - centres[None], axis=-1)
    assert (distances.min(axis=0) <= 1.5).all()
    assert sorted(distances.argmin(axis=0)) == [0, 1, 2, 3]  # One detection per disc.
    assert (np.diff(found[:, 1]) >= 0).all()  # Sorted by y.
    assert len(nuclei.detect_nuclei(np.zeros((20, 20)))) == 0
    assert len(nuclei.detect_nuclei(image, min_area=10_000)) == 0


def test_detection_finds_the_synthetic_nuclei(tmp_path):
    from data_builders.synthetic_screen import simulate_screen

    simulate_screen("bbbc021_like", "tiny", tmp_path / "raw", seed=0, progress=False)
    screen = layout.read_screen(tmp_path / "raw")
    detected = nuclei.detect_locations(screen, "DNA")
    assert list(detected.columns) == ["site_row", "x", "y"]
    found = total = 0
    for site_row in range(4):
        recorded = layout.read_locations(screen, site_row)[["x", "y"]].to_numpy()
        mine = detected[detected["site_row"] == site_row][["x", "y"]].to_numpy()
        assert np.array_equal(mine, nuclei.detect_site(screen, site_row, 0))
        distances = np.linalg.norm(recorded[:, None] - mine[None], axis=-1)
        found += int((distances.min(axis=1) <= 5).sum())
        total += len(recorded)
    assert total > 20 and found >= 0.8 * total
    with pytest.raises(ValueError, match="'Mito' is not one of"):
        nuclei.detect_locations(screen, "Mito")
    assert isinstance(detected, pd.DataFrame)
