"""Classical features: analytic shapes, scikit-image / SciPy / NumPy references, sharding, and
features that move with the synthetic screen's hidden truth.

Tolerances asserted (observed on 64 random crops/blobs in brackets): Otsu within one histogram bin
of skimage [same bin]; area and extent exact; perimeter, axis lengths, eccentricity to 1e-5
[2e-7 relative], orientation to 1e-3 degrees [3e-5]; solidity at most 0.002 below skimage [0.0013,
polygon hull]; Zernike to 2e-5 [1.3e-6]; GLCM to 1e-6 and its properties to 1e-5 [3e-7];
quantiles exact on 8-bit images; granularity openings exact; Pearson and Manders to 1e-5 / 1e-4
[1e-7].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import ndimage, stats

skimage = pytest.importorskip("skimage")
from skimage import feature as skfeature  # noqa: E402
from skimage import filters, measure  # noqa: E402

from data_builders.raw_screen import build_raw_screen, open_split, read_tables  # noqa: E402
from data_builders.synthetic_screen import simulate_screen  # noqa: E402
from morphjax.features import (  # noqa: E402
    classical_feature_fn,
    classical_features,
    discriminative_features,
    get_extractor,
)
from morphjax.features.classical import extract  # noqa: E402
from morphjax.features.classical import intensity as intensity_lib  # noqa: E402
from morphjax.features.classical import segment as segment_lib  # noqa: E402
from morphjax.features.classical import shape as shape_lib  # noqa: E402
from morphjax.features.classical import texture as texture_lib  # noqa: E402
from test_synthetic_screen import _cells_with_treatment  # noqa: E402

CHANNELS = ("DNA", "Tubulin", "Actin")
SIZE = 96
BATCH = 16
BACKGROUND = 0.05


@pytest.fixture(scope="module")
def extract_fn():
    """The 96x96x3 DNA/Tubulin/Actin function, always called with BATCH crops (one compile)."""
    fn, names = classical_feature_fn((SIZE, SIZE, 3), CHANNELS, "DNA", "Tubulin")

    def run(crops: np.ndarray) -> pd.DataFrame:
        out = []
        for start in range(0, len(crops), BATCH):
            chunk = crops[start:start + BATCH]
            padded = np.concatenate([chunk, np.zeros((BATCH - len(chunk),) + chunk.shape[1:],
                                                     np.float32)])
            out.append(np.asarray(fn(padded))[:len(chunk)])
        return pd.DataFrame(np.concatenate(out), columns=names)

    return fn, names, run


# ------------------------------------------------------------------------------------------
# Analytic crops.
# ------------------------------------------------------------------------------------------


def _grid():
    return np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)


def _disc(radius, centre=(48, 48)):
    rows, cols = _grid()
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _ellipse(a, b, degrees, centre=(48, 48)):
    rows, cols = _grid()
    y, x = rows - centre[0], cols - centre[1]
    t = np.radians(degrees)
    u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def _annulus(outer, inner, gap=0):
    rows, cols = _grid()
    ring = _disc(outer) & ~_disc(inner)
    return ring & ~((cols > 48) & (np.abs(rows - 48) < gap))


def _crop(dna, tubulin, actin):
    return np.stack([dna, tubulin, actin], axis=-1).astype(np.float32)


def _object(mask, level):
    return np.where(mask, level, BACKGROUND)


def _stripes():
    return np.where(np.arange(SIZE)[None, :] % 2 == 0, 0.2, 0.8) * np.ones((SIZE, 1))


def _bump(sigma=12.0):
    rows, cols = _grid()
    return BACKGROUND + 0.9 * np.exp(-((rows - 48) ** 2 + (cols - 48) ** 2) / (2 * sigma**2))


def _blobs(radius=3, spacing=12, within=26):
    actin = np.full((SIZE, SIZE), 0.1)
    for r in range(48 - within, 48 + within + 1, spacing):
        for c in range(48 - within, 48 + within + 1, spacing):
            if (r - 48) ** 2 + (c - 48) ** 2 <= within**2:
                actin[_disc(radius, (r, c))] = 0.7
    return actin


ANALYTIC = {
    "disc": _crop(_object(_disc(12), 0.8), _object(_disc(30), 0.5), np.full((SIZE, SIZE), 0.4)),
    "ellipse": _crop(_object(_ellipse(20, 10, 30), 0.8), _object(_disc(40), 0.5), _stripes()),
    "open_ring": _crop(_object(_annulus(18, 10, gap=3), 0.8), _object(_disc(35), 0.5),
                       np.full((SIZE, SIZE), 0.4)),
    "closed_ring": _crop(_object(_annulus(18, 10), 0.8), _object(_disc(35), 0.5),
                         np.full((SIZE, SIZE), 0.4)),
    "blobs": _crop(_object(_disc(10), 0.8), _object(_disc(36), 0.5), _blobs()),
    "neighbours": _crop(_object(_disc(10) | _disc(8, (12, 12)) | _disc(8, (12, 84))
                                | _disc(8, (86, 48)), 0.8), _object(_disc(25), 0.5), _bump()),
    "empty": np.zeros((SIZE, SIZE, 3), np.float32),
}


@pytest.fixture(scope="module")
def analytic(extract_fn):
    _, _, run = extract_fn
    table = run(np.stack(list(ANALYTIC.values())))
    table.index = list(ANALYTIC)
    return table


def test_disc_shape_is_round(analytic):
    disc = analytic.loc["disc"]
    area = np.pi * 12**2
    assert disc["Nuclei_Found"] == 1
    assert disc["Nuclei_AreaShape_Area"] == pytest.approx(area, rel=0.03)
    assert disc["Nuclei_AreaShape_Eccentricity"] < 0.1
    assert disc["Nuclei_AreaShape_MajorAxisLength"] == pytest.approx(24, rel=0.03)
    assert disc["Nuclei_AreaShape_MinorAxisLength"] == pytest.approx(24, rel=0.03)
    # A digital disc is not quite convex to skimage either (hull of pixel-edge midpoints): 0.948.
    drawn = measure.regionprops(_disc(12).astype(int))[0]
    assert disc["Nuclei_AreaShape_Solidity"] == pytest.approx(drawn.solidity, abs=0.002)
    assert disc["Nuclei_AreaShape_Solidity"] > 0.94
    assert disc["Nuclei_AreaShape_FormFactor"] == pytest.approx(1.0, abs=0.1)
    assert disc["Nuclei_AreaShape_Compactness"] == pytest.approx(1.0, abs=0.02)
    assert disc["Nuclei_AreaShape_Extent"] == pytest.approx(area / 25**2, rel=0.03)
    assert disc["Nuclei_AreaShape_Zernike_0_0"] == pytest.approx(1.0, abs=0.05)
    odd_m = [f"Nuclei_AreaShape_Zernike_{n}_{m}" for n, m in shape_lib.zernike_indexes(9) if m]
    assert disc[odd_m].max() < 0.02  # A disc has (almost) no angular structure.
    assert disc["Cells_AreaShape_Area"] == pytest.approx(np.pi * 30**2, rel=0.03)
    assert disc["Nuclei_Neighbors_NumberOfNeighbors"] == 0


def test_ellipse_axes_and_eccentricity(analytic):
    ellipse = analytic.loc["ellipse"]
    assert ellipse["Nuclei_AreaShape_MajorAxisLength"] == pytest.approx(40, rel=0.03)
    assert ellipse["Nuclei_AreaShape_MinorAxisLength"] == pytest.approx(20, rel=0.05)
    assert ellipse["Nuclei_AreaShape_Eccentricity"] == pytest.approx(np.sqrt(1 - 0.25), abs=0.02)
    drawn = measure.regionprops(_ellipse(20, 10, 30).astype(int))[0]
    assert ellipse["Nuclei_AreaShape_Orientation"] == pytest.approx(
        np.degrees(drawn.orientation), abs=1.0)


def test_ring_solidity_and_filled_holes(analytic):
    assert analytic.loc["open_ring", "Nuclei_AreaShape_Solidity"] < 0.75
    # A closed ring is filled like CellProfiler fills holes: a disc of the outer radius.
    closed = analytic.loc["closed_ring"]
    assert closed["Nuclei_AreaShape_Solidity"] > 0.95
    assert closed["Nuclei_AreaShape_Area"] == pytest.approx(np.pi * 18**2, rel=0.03)


def test_uniform_intensity_has_no_spread(analytic):
    disc = analytic.loc["disc"]
    for compartment in extract.COMPARTMENTS:
        values = disc[[f"{compartment}_Intensity_{f}_Actin" for f in (
            "MeanIntensity", "MinIntensity", "MaxIntensity", "LowerQuartileIntensity",
            "MedianIntensity", "UpperQuartileIntensity", "MeanIntensityEdge")]]
        np.testing.assert_allclose(values, 0.4, atol=1e-6)
        assert disc[f"{compartment}_Intensity_StdIntensity_Actin"] == pytest.approx(0, abs=1e-6)
        assert disc[f"{compartment}_Intensity_MADIntensity_Actin"] == pytest.approx(0, abs=1e-6)
        assert disc[f"{compartment}_Intensity_MassDisplacement_Actin"] == pytest.approx(
            0, abs=1e-3)
        texture = disc[[f"{compartment}_Texture_{f}_Actin_1_avg_8"
                        for f in ("AngularSecondMoment", "Contrast", "Entropy")]]
        np.testing.assert_allclose(texture, [1, 0, 0], atol=1e-6)
    area = disc["Cells_AreaShape_Area"]
    assert disc["Cells_Intensity_IntegratedIntensity_Actin"] == pytest.approx(0.4 * area, rel=1e-5)
    np.testing.assert_allclose(disc[[f"Cells_RadialDistribution_MeanFrac_Actin_{k}of4"
                                     for k in range(1, 5)]], 1.0, atol=1e-5)
    np.testing.assert_allclose(disc[[f"Cells_RadialDistribution_RadialCV_Actin_{k}of4"
                                     for k in range(1, 5)]], 0.0, atol=1e-5)


def test_stripe_texture_matches_hand_computed_glcm(analytic):
    # Columns alternate 0.2 / 0.8 -> grey levels 0 / 7. At 0, 45 and 135 degrees every pair is
    # (0, 7) or (7, 0): p = 0.5 each, contrast 49, IDM 1/50, correlation -1. At 90 degrees pairs
    # are (0, 0) or (7, 7): contrast 0, IDM 1, correlation 1, and p ~ 0.5 each (exactly if the
    # object has as many pixels in light as in dark columns), so ASM ~ 0.5, 1 bit, mean 3.5.
    ellipse = analytic.loc["ellipse"]
    for compartment in extract.COMPARTMENTS:
        def value(feature):
            return ellipse[f"{compartment}_Texture_{feature}_Actin_1_avg_8"]
        assert value("Contrast") == pytest.approx(3 * 49 / 4, abs=1e-4)
        assert value("AngularSecondMoment") == pytest.approx(0.5, abs=1e-4)
        assert value("Entropy") == pytest.approx(1.0, abs=1e-4)
        assert value("InverseDifferenceMoment") == pytest.approx((3 / 50 + 1) / 4, abs=1e-6)
        assert value("Correlation") == pytest.approx(-0.5, abs=1e-5)
        assert value("SumAverage") == pytest.approx(7.0, abs=0.05)
        assert value("Variance") == pytest.approx(12.25, abs=0.01)


def test_granularity_peaks_at_planted_blob_size(analytic):
    # Discs of radius 3 survive openings by diamonds up to radius 3 and vanish at 4.
    spectrum = analytic.loc["blobs", [f"Cells_Granularity_{k}_Actin" for k in range(1, 9)]]
    spectrum = spectrum.to_numpy()
    assert np.argmax(spectrum) == 3
    assert spectrum[3] > 4 * np.delete(spectrum, 3).max()


def test_radial_distribution_of_centre_bright_cell_decreases(analytic):
    crop = analytic.loc["neighbours"]
    mean_frac = crop[[f"Cells_RadialDistribution_MeanFrac_Actin_{k}of4" for k in range(1, 5)]]
    assert np.all(np.diff(mean_frac.to_numpy()) < 0)
    frac = crop[[f"Cells_RadialDistribution_FracAtD_Actin_{k}of4" for k in range(1, 5)]]
    assert frac.sum() == pytest.approx(1.0, abs=1e-5)


def test_neighbours_and_missing_nucleus(analytic):
    assert analytic.loc["neighbours", "Nuclei_Neighbors_NumberOfNeighbors"] == 3
    empty = analytic.loc["empty"]
    assert empty["Nuclei_Found"] == 0
    assert (empty == 0).all()
    assert np.isfinite(analytic.to_numpy()).all()


# ------------------------------------------------------------------------------------------
# References: scikit-image, SciPy, NumPy on random crops.
# ------------------------------------------------------------------------------------------


def _random_blobs(rng, size=SIZE, n=6, noise=0.03):
    """A DNA-like channel: Gaussian-blurred discs of random size and brightness plus noise."""
    image = np.zeros((size, size))
    rows, cols = np.mgrid[0:size, 0:size]
    centres = [(size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4))]
    centres += [tuple(rng.uniform(8, size - 8, 2)) for _ in range(n - 1)]
    for r, c in centres:
        radius = rng.uniform(5, 13)
        squashed = ((rows - r) / rng.uniform(0.7, 1.3)) ** 2 + (cols - c) ** 2
        image = np.maximum(image, rng.uniform(0.4, 0.9) * (squashed <= radius**2))
    image = ndimage.gaussian_filter(image, 1.0) + noise * rng.standard_normal(image.shape)
    return np.clip(image + 0.05, 0, 1).astype(np.float32)


def _random_masks(n, seed):
    """Largest 8-connected component of thresholded smooth noise (irregular blobs)."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n):
        field = ndimage.gaussian_filter(rng.random((64, 64)), rng.uniform(2, 6))
        labels, count = ndimage.label(field > np.quantile(field, rng.uniform(0.5, 0.85)),
                                      np.ones((3, 3)))
        sizes = ndimage.sum(labels > 0, labels, range(1, count + 1))
        masks.append(labels == 1 + np.argmax(sizes))
    return np.stack(masks)


def test_otsu_matches_skimage_within_one_bin():
    rng = np.random.default_rng(0)
    images = np.stack([_random_blobs(rng) * rng.uniform(0.2, 1) for _ in range(12)])
    masks = images > np.median(images, axis=(1, 2), keepdims=True) * 0.5
    ours = np.asarray(jax.jit(jax.vmap(segment_lib.otsu_threshold))(images))
    ours_masked = np.asarray(jax.jit(jax.vmap(segment_lib.otsu_threshold))(images, masks))
    for image, mask, value, value_masked in zip(images, masks, ours, ours_masked):
        bin_width = (image.max() - image.min()) / 256
        assert abs(value - filters.threshold_otsu(image)) <= bin_width * 1.001
        selected = image[mask]
        bin_width = (selected.max() - selected.min()) / 256
        assert abs(value_masked - filters.threshold_otsu(selected)) <= bin_width * 1.001
    flat = np.full((1, 8, 8), 0.3, np.float32)
    assert float(jax.jit(jax.vmap(segment_lib.otsu_threshold))(flat)[0]) == pytest.approx(0.3)


def _reference_segmentation(dna, tubulin, min_area=10):
    """The same pipeline with scikit-image / SciPy: blur, Otsu, fill holes, 8-connected labels,
    size filter, the component nearest the centre, then the cell as the component of
    (Tubulin foreground | nuclei foreground) containing it."""
    def foreground(image):
        smooth = filters.gaussian(image.astype(np.float64), sigma=1, mode="nearest",
                                  preserve_range=True)
        return ndimage.binary_fill_holes(smooth > filters.threshold_otsu(smooth))

    nuclei = foreground(dna)
    labels = measure.label(nuclei, connectivity=2)
    sizes = np.bincount(labels.ravel())
    big = (labels > 0) & (sizes[labels] >= min_area)
    rows, cols = np.mgrid[0:dna.shape[0], 0:dna.shape[1]]
    distance = np.where(big, (rows - dna.shape[0] // 2) ** 2 + (cols - dna.shape[1] // 2) ** 2,
                        np.inf)
    seed = np.unravel_index(np.argmin(distance), dna.shape)
    nucleus = big & (labels == labels[seed])
    union = ndimage.binary_fill_holes(nuclei | (filters.gaussian(
        tubulin.astype(np.float64), sigma=1, mode="nearest", preserve_range=True)
        > filters.threshold_otsu(filters.gaussian(tubulin.astype(np.float64), sigma=1,
                                                  mode="nearest", preserve_range=True))))
    union_labels = measure.label(union, connectivity=2)
    return nucleus, union_labels == union_labels[seed], int(len(np.unique(labels[big])) - 1)


def test_segmentation_matches_scikit_image_pipeline():
    rng = np.random.default_rng(1)
    dna = np.stack([_random_blobs(rng) for _ in range(8)])
    tubulin = np.stack([ndimage.gaussian_filter(d, 6) * 3 + 0.02 * rng.random(d.shape)
                        for d in dna]).astype(np.float32)
    segment = jax.jit(jax.vmap(lambda d, t: segment_lib.segment(
        d, t, sigma=1.0, min_area=10, fill=True, cell_radius=10)))
    masks = segment(dna, tubulin)
    for i in range(len(dna)):
        nucleus, cell, neighbours = _reference_segmentation(dna[i], tubulin[i])
        np.testing.assert_array_equal(np.asarray(masks.nucleus[i]), nucleus)
        np.testing.assert_array_equal(np.asarray(masks.cell[i]), cell)
        np.testing.assert_array_equal(np.asarray(masks.cytoplasm[i]), cell & ~nucleus)
        assert int(masks.neighbours[i]) == neighbours
        assert bool(masks.found[i])


def test_without_cell_channel_the_cell_is_the_dilated_nucleus():
    rng = np.random.default_rng(12)
    dna = np.stack([_random_blobs(rng) for _ in range(4)])
    masks = jax.jit(jax.vmap(lambda d: segment_lib.segment(
        d, None, sigma=1.0, min_area=10, fill=True, cell_radius=10)))(dna)
    for i in range(len(dna)):
        nucleus, _, _ = _reference_segmentation(dna[i], dna[i])
        np.testing.assert_array_equal(np.asarray(masks.nucleus[i]), nucleus)
        cell = ndimage.binary_dilation(nucleus, _disc(10, (10, 10))[:21, :21])
        np.testing.assert_array_equal(np.asarray(masks.cell[i]), cell)


def test_label_components_matches_scipy_on_random_masks():
    rng = np.random.default_rng(2)
    masks = ndimage.gaussian_filter(rng.random((6, 64, 64)), (0, 2, 2)) > 0.5
    labels = np.asarray(jax.jit(jax.vmap(segment_lib.label_components))(masks))
    for mask, ours in zip(masks, labels):
        reference, count = ndimage.label(mask, np.ones((3, 3)))
        pairs = set(zip(reference[mask].tolist(), ours[mask].tolist()))
        assert len(pairs) == count == len(np.unique(ours[mask]))  # same partition
        assert (ours[~mask] == 0).all()


@pytest.fixture(scope="module")
def random_shapes():
    masks = _random_masks(16, seed=3)
    return masks, np.asarray(jax.jit(jax.vmap(shape_lib.area_shape))(masks))


def test_shape_matches_regionprops(random_shapes):
    masks, ours = random_shapes
    names = list(shape_lib.SHAPE_FEATURES)
    for mask, row in zip(masks, ours):
        props = measure.regionprops(mask.astype(int))[0]
        value = dict(zip(names, row))
        assert value["Area"] == props.area
        assert value["Extent"] == pytest.approx(props.extent, rel=1e-6)
        assert value["Perimeter"] == pytest.approx(props.perimeter, rel=1e-5)
        assert value["FormFactor"] == pytest.approx(
            4 * np.pi * props.area / props.perimeter**2, rel=1e-5)
        assert value["Eccentricity"] == pytest.approx(props.eccentricity, abs=1e-4)
        assert value["MajorAxisLength"] == pytest.approx(props.axis_major_length, rel=1e-5)
        assert value["MinorAxisLength"] == pytest.approx(props.axis_minor_length, rel=1e-4)
        assert value["Orientation"] == pytest.approx(np.degrees(props.orientation), abs=1e-3)
        assert props.solidity - 0.002 <= value["Solidity"] <= props.solidity + 1e-6
        coords = np.argwhere(mask)
        spread = ((coords - coords.mean(axis=0)) ** 2).sum(axis=1).mean()
        assert value["Compactness"] == pytest.approx(2 * np.pi * spread / props.area, rel=1e-5)


def _zernike_reference(mask, degree=9):
    """centrosome.zernike's score from the factorial formula, on the centroid/farthest-pixel
    disc (the centre and radius morphjax uses)."""
    coords = np.argwhere(mask).astype(np.float64)
    dy, dx = (coords - coords.mean(axis=0)).T
    radius = np.sqrt(dx**2 + dy**2).max()
    rho, phi = np.hypot(dx, dy) / radius, np.arctan2(dy, dx)
    out = []
    for n, m in shape_lib.zernike_indexes(degree):
        radial = sum((-1) ** s * math.factorial(n - s) * rho ** (n - 2 * s)
                     / (math.factorial(s) * math.factorial((n + m) // 2 - s)
                        * math.factorial((n - m) // 2 - s)) for s in range((n - m) // 2 + 1))
        out.append(abs(np.sum(radial * np.exp(1j * m * phi))) / (np.pi * radius**2))
    return np.array(out)


def test_zernike_matches_factorial_formula(random_shapes):
    masks, ours = random_shapes
    zernike = ours[:, len(shape_lib.SHAPE_FEATURES):]
    assert zernike.shape[1] == 30
    for mask, row in zip(masks[:4], zernike):
        np.testing.assert_allclose(row, _zernike_reference(mask), atol=2e-5)


def _haralick_reference(p):
    """The 13 Haralick features of a normalised GLCM from their definitions, in float64."""
    levels = len(p)
    i, j = np.mgrid[0:levels, 0:levels]
    px, py = p.sum(axis=1), p.sum(axis=0)
    k = np.arange(levels)
    mux, muy = px @ k, py @ k
    sx, sy = np.sqrt(px @ (k - mux) ** 2), np.sqrt(py @ (k - muy) ** 2)
    p_sum = np.array([p[i + j == s].sum() for s in range(2 * levels - 1)])
    p_diff = np.array([p[np.abs(i - j) == d].sum() for d in range(levels)])

    def entropy(q):
        q = q[q > 0]
        return -(q * np.log2(q)).sum()

    s = np.arange(2 * levels - 1)
    hxy = entropy(p.ravel())
    outer = np.outer(px, py)
    hxy1 = -(p[outer > 0] * np.log2(outer[outer > 0])).sum()
    sum_average = p_sum @ s
    return np.array([
        (p**2).sum(), ((i - j) ** 2 * p).sum(),
        ((i * j * p).sum() - mux * muy) / (sx * sy) if sx * sy > 0 else 1.0,
        px @ (k - mux) ** 2, (p / (1 + (i - j) ** 2)).sum(), sum_average,
        p_sum @ (s - sum_average) ** 2, entropy(p_sum), hxy,
        p_diff @ (k - p_diff @ k) ** 2, entropy(p_diff),
        (hxy - hxy1) / max(entropy(px), entropy(py)),
        np.sqrt(max(0.0, 1 - np.exp(-2 * (entropy(outer.ravel()) - hxy)))),
    ])


@pytest.mark.parametrize("distance", [1, 3])
def test_glcm_matches_skimage_graycoprops(distance):
    rng = np.random.default_rng(5)
    images = np.stack([_random_blobs(rng, size=48) for _ in range(4)])
    full = np.ones((1, 48, 48), bool)
    levels = 8

    @jax.jit
    @jax.vmap
    def glcm_features(image):
        grey = texture_lib.quantize(image, full[0], levels)
        matrices = texture_lib.cooccurrence(grey, full, levels, distance)[0]  # (4, L, L)
        return grey, matrices, jax.vmap(texture_lib.haralick)(matrices)

    greys, matrices, ours = (np.asarray(a) for a in glcm_features(images))
    # Offsets (0, d), (d, d), (d, 0), (d, -d) as CellProfiler (mahotas); skimage rounds the
    # Euclidean offset, so its diagonal (d, d) comes with distance round(d sqrt 2).
    diagonal = round(distance * np.sqrt(2))
    for grey, ours_p, ours_f in zip(greys, matrices, ours):
        axes = skfeature.graycomatrix(grey.astype(np.uint8), [distance], [0, np.pi / 2],
                                      levels=levels, symmetric=True, normed=True)
        diagonals = skfeature.graycomatrix(grey.astype(np.uint8), [diagonal],
                                           [np.pi / 4, 3 * np.pi / 4], levels=levels,
                                           symmetric=True, normed=True)
        reference = np.stack([axes[..., 0], diagonals[..., 0], axes[..., 1], diagonals[..., 1]],
                             axis=-1)  # (L, L, 1, 4) like graycomatrix
        np.testing.assert_allclose(ours_p, reference[:, :, 0, :].transpose(2, 0, 1), atol=1e-6)
        for name, index in (("contrast", 1), ("correlation", 2), ("ASM", 0),
                            ("homogeneity", 4)):
            np.testing.assert_allclose(ours_f[:, index],
                                       skfeature.graycoprops(reference, name)[0], atol=1e-5)
        np.testing.assert_allclose(np.sqrt(ours_f[:, 0]),
                                   skfeature.graycoprops(reference, "energy")[0], atol=1e-5)
        for angle in range(4):
            np.testing.assert_allclose(ours_f[angle], _haralick_reference(
                reference[:, :, 0, angle].astype(np.float64)), rtol=1e-4, atol=1e-4)


def _glcm_reference(grey, mask, levels, distance):
    """(4, L, L) symmetric normalised co-occurrences of pixel pairs both inside `mask`."""
    h, w = grey.shape
    out = []
    for dr, dc in ((0, distance), (distance, distance), (distance, 0), (distance, -distance)):
        counts = np.zeros((levels, levels))
        for r in range(h):
            for c in range(w):
                r2, c2 = r + dr, c + dc
                if 0 <= r2 < h and 0 <= c2 < w and mask[r, c] and mask[r2, c2]:
                    counts[grey[r, c], grey[r2, c2]] += 1
        counts += counts.T
        out.append(counts / counts.sum())
    return np.stack(out)


def test_texture_of_nucleus_cytoplasm_and_cell_from_one_scatter():
    rng = np.random.default_rng(6)
    image = _random_blobs(rng, size=40)
    nucleus = np.zeros((40, 40), bool)
    nucleus[12:25, 10:28] = True
    cell = np.zeros((40, 40), bool)
    cell[4:36, 3:37] = True
    parts = np.stack([nucleus, cell & ~nucleus])
    ours = np.asarray(jax.jit(lambda x, p: texture_lib.texture(x, p, 8, 1))(image, parts))
    grey = np.asarray(texture_lib.quantize(image, cell, 8))  # over the cell's range
    assert grey[cell].min() == 0 and grey[cell].max() == 7
    for index, mask in enumerate((nucleus, cell & ~nucleus, cell)):
        for angle, p in enumerate(_glcm_reference(grey, mask, 8, 1)):
            np.testing.assert_allclose(ours[index, angle], _haralick_reference(p),
                                       rtol=1e-4, atol=1e-5)


def _diamond(radius):
    r = np.arange(-radius, radius + 1)
    return np.abs(r)[:, None] + np.abs(r)[None, :] <= radius


def test_granularity_openings_match_scipy_grey_opening():
    rng = np.random.default_rng(7)
    images = rng.random((3, 40, 40)).astype(np.float32)
    images[:, :, :5] = 0.9  # a plateau touching the border
    openings = np.asarray(jax.jit(jax.vmap(lambda x: intensity_lib.granularity_openings(x, 8)))(
        images))
    for image, ours in zip(images, openings):
        for k in range(1, 9):
            reference = ndimage.grey_opening(image, footprint=_diamond(k), mode="constant",
                                             cval=0.0)
            np.testing.assert_array_equal(ours[k - 1], reference)


def test_intensity_statistics_match_numpy():
    rng = np.random.default_rng(8)
    images = (rng.integers(0, 256, (6, 48, 48)) / 255.0).astype(np.float32)
    nucleus = np.zeros((6, 48, 48), bool)
    cytoplasm = np.zeros((6, 48, 48), bool)
    for i in range(6):
        cell = ndimage.binary_dilation(np.pad(np.ones((5 + 3 * i, 7 + 2 * i), bool), 6),
                                       iterations=2)
        cell = np.pad(cell, ((0, 48 - cell.shape[0]), (0, 48 - cell.shape[1])))
        nuc = np.zeros_like(cell)
        nuc[8:12 + i, 9:14 + i] = True
        nucleus[i], cytoplasm[i] = nuc, cell & ~nuc
    ours = np.asarray(jax.jit(jax.vmap(intensity_lib.intensity))(images, nucleus, cytoplasm))
    names = intensity_lib.INTENSITY_FEATURES
    for image, nuc, cyto, table in zip(images, nucleus, cytoplasm, ours):
        for mask, row in zip((nuc, nuc | cyto, cyto), table):
            values = image[mask].astype(np.float64)
            coords = np.argwhere(mask).astype(np.float64)
            weighted = (coords * values[:, None]).sum(axis=0) / values.sum()
            edge = mask & ~ndimage.binary_erosion(mask, [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
            expected = dict(
                IntegratedIntensity=values.sum(), MeanIntensity=values.mean(),
                StdIntensity=values.std(), MinIntensity=values.min(), MaxIntensity=values.max(),
                LowerQuartileIntensity=np.quantile(values, 0.25),
                MedianIntensity=np.median(values),
                UpperQuartileIntensity=np.quantile(values, 0.75),
                MADIntensity=np.median(np.abs(values - np.median(values))),
                MeanIntensityEdge=image[edge].mean(),
                MassDisplacement=np.linalg.norm(weighted - coords.mean(axis=0)))
            for name, value in zip(names, row):
                tolerance = 2e-4 if name == "MassDisplacement" else 1e-6  # centroid difference
                assert value == pytest.approx(expected[name], rel=1e-5, abs=tolerance), name


def test_colocalization_matches_numpy():
    rng = np.random.default_rng(9)
    base = _random_blobs(rng)
    image = np.stack([base, np.clip(base + 0.3 * rng.random(base.shape), 0, 1),
                      rng.random(base.shape)]).astype(np.float32)
    mask = _disc(30)
    pairs = [(0, 1), (0, 2), (1, 2)]
    ours = np.asarray(jax.jit(lambda x, m: intensity_lib.colocalization(x, m, pairs))(
        image, mask))
    for (a, b), row in zip(pairs, ours):
        x, y = image[a][mask].astype(np.float64), image[b][mask].astype(np.float64)
        assert row[0] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-5)
        above_x, above_y = x > filters.threshold_otsu(x), y > filters.threshold_otsu(y)
        assert row[1] == pytest.approx(x[above_x & above_y].sum() / x[above_x].sum(), abs=1e-4)
        assert row[2] == pytest.approx(y[above_x & above_y].sum() / y[above_y].sum(), abs=1e-4)
        assert row[3] == pytest.approx((x * y).sum() / np.sqrt((x**2).sum() * (y**2).sum()),
                                       rel=1e-5)
    assert ours[0, 0] > 0.5 > abs(ours[1, 0])  # related channels correlate, noise does not


# ------------------------------------------------------------------------------------------
# Batched, sharded, registry and DataFrame paths.
# ------------------------------------------------------------------------------------------


def _mixed_crops():
    rng = np.random.default_rng(10)
    crops = list(ANALYTIC.values())
    while len(crops) < BATCH:
        dna = _random_blobs(rng)
        crops.append(_crop(dna, np.clip(ndimage.gaussian_filter(dna, 6) * 3, 0, 1),
                           rng.random(dna.shape)))
    return np.stack(crops).astype(np.float32)


def test_sharded_batch_equals_single_device(extract_fn):
    fn, _, _ = extract_fn
    crops = _mixed_crops()
    single = np.asarray(fn(crops))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded_in = jax.device_put(crops, NamedSharding(mesh, PartitionSpec("data")))
    sharded = fn(sharded_in)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), single, rtol=1e-5, atol=1e-5)
    assert np.isfinite(single).all()


def test_registry_extractor_maps_model_range(extract_fn):
    fn, names, _ = extract_fn
    crops = np.round(_mixed_crops() * 256) / 256  # dyadic: [-1, 1] and back is exact
    extractor = get_extractor("classical", channel_names=CHANNELS, nucleus_channel="DNA",
                              cell_channel="Tubulin", image_shape=(SIZE, SIZE, 3))
    assert extractor.dim == len(names) and extractor.feature_names == tuple(names)
    assert extractor.label == f"classical/{len(names)} features"
    np.testing.assert_array_equal(np.asarray(extractor(crops * 2 - 1)), np.asarray(fn(crops)))


def test_dataframe_api_reads_uint8_and_warns_about_missing_nuclei(extract_fn):
    fn, names, _ = extract_fn
    crops = np.round(_mixed_crops() * 255).astype(np.uint8)
    with pytest.warns(UserWarning, match="no nucleus found in 1 of 16 crops"):
        table = classical_features(crops, CHANNELS, "dna", "TUBULIN", batch_size=BATCH)
    assert list(table.columns) == names and (table.dtypes == np.float32).all()
    np.testing.assert_array_equal(table.to_numpy(), np.asarray(fn(crops.astype(np.float32) / 255)))


def test_feature_names_and_counts():
    three = extract.feature_names(CHANNELS)
    five = extract.feature_names(("DNA", "ER", "RNA", "AGP", "Mito"))
    assert (len(three), len(five)) == (370, 582)
    assert len(set(three)) == len(three) and len(set(five)) == len(five)
    assert "Nuclei_AreaShape_Zernike_9_9" in three
    assert "Cells_Correlation_Manders_Tubulin_DNA" in three
    per_angle = extract.feature_names(CHANNELS, extract.ClassicalConfig(
        texture_per_angle=True, texture_distances=(1, 3), levels=16))
    assert "Nuclei_Texture_Contrast_DNA_3_135_16" in per_angle
    assert len(per_angle) == 370 + 3 * 3 * 13 * (8 - 1)


def test_bad_input_names_the_problem(extract_fn):
    fn, _, _ = extract_fn
    with pytest.raises(ValueError, match="'Hoechst' is not among channel_names"):
        classical_feature_fn((SIZE, SIZE, 3), CHANNELS, "Hoechst")
    with pytest.raises(ValueError, match="cell_channel 'ER'"):
        classical_feature_fn((SIZE, SIZE, 3), CHANNELS, "DNA", "ER")
    with pytest.raises(ValueError, match=r"has 4 channels but channel_names names 3"):
        classical_feature_fn((SIZE, SIZE, 4), CHANNELS)
    with pytest.raises(ValueError, match=r"must be \(B, H, W, C\), got shape \(96, 96, 3\)"):
        classical_features(np.zeros((SIZE, SIZE, 3), np.uint8), CHANNELS)
    with pytest.raises(ValueError, match=r"must be \(B, H, W, C\), got shape \(96, 96, 3\)"):
        fn(jnp.zeros((SIZE, SIZE, 3)))
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        classical_features(np.full((1, SIZE, SIZE, 3), -0.5, np.float32), CHANNELS)
    with pytest.raises(ValueError, match="unknown classical feature options"):
        classical_feature_fn(None, CHANNELS, levels=8, radius=3)
    with pytest.raises(ValueError, match="levels must be in 2..256"):
        classical_feature_fn(None, CHANNELS, levels=1)


# ------------------------------------------------------------------------------------------
# Synthetic screen: features follow the hidden per-cell truth.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def screen(tmp_path_factory, extract_fn):
    _, _, run = extract_fn
    root = tmp_path_factory.mktemp("classical_screen")
    simulate_screen("bbbc021_like", "tiny", root / "raw", seed=0, progress=False, workers=1)
    build_raw_screen(root / "raw", root / "dataset", progress=False)
    examples = [example for split in ("train", "test")
                for example in open_split(root / "dataset", split)]
    cells = read_tables(root / "dataset")["cells"].set_index("cell_index")
    crops = cells.loc[[e["cell_index"] for e in examples]].reset_index()
    # Ground-truth rows of a site follow the order of its locations file (location_row).
    truth = _cells_with_treatment(root / "raw")
    site = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    truth["location_row"] = truth.groupby(site).cumcount()
    joined = crops.merge(truth.drop(columns=["Metadata_Perturbation"]),
                         on=site + ["location_row"], how="left", validate="one_to_one")
    assert joined["phenotype_nuclear_size"].notna().all()
    np.testing.assert_allclose(joined["x_x"], joined["x_y"], atol=1e-3)  # same nucleus
    features = run(np.stack([e["image"] for e in examples]).astype(np.float32) / 255)
    return pd.concat([joined, features], axis=1), pd.read_csv(
        root / "raw" / "ground_truth" / "perturbations.csv")


@pytest.mark.parametrize("truth, feature", [
    ("phenotype_nuclear_size", "Nuclei_AreaShape_Area"),
    ("phenotype_dna_intensity", "Nuclei_Intensity_MeanIntensity_DNA"),
    ("phenotype_nuclear_eccentricity", "Nuclei_AreaShape_Eccentricity"),
    ("phenotype_tubulin_intensity", "Cells_Intensity_MeanIntensity_Tubulin"),
])
def test_features_follow_the_hidden_phenotype(screen, truth, feature):
    table, _ = screen
    assert table["Nuclei_Found"].all()
    assert stats.spearmanr(table[truth], table[feature])[0] > 0.6


def test_nuclear_shrinking_perturbation_has_smaller_nuclei(screen):
    table, perturbations = screen
    shrinking = perturbations.loc[perturbations["effect_nuclear_size"].idxmin(), "perturbation"]
    area = table.groupby("Metadata_Perturbation")["Nuclei_AreaShape_Area"].mean()
    assert area[shrinking] < 0.95 * area["DMSO"]


def test_discriminative_features_rank_taxol_versus_dmso(screen):
    table, _ = screen
    pair = table[table["Metadata_Perturbation"].isin(["DMSO", "taxol"])]
    features = pair[[c for c in pair.columns if c.split("_")[0] in extract.COMPARTMENTS]]
    ranking = discriminative_features(features.assign(Constant=1.0),
                                      pair["Metadata_Perturbation"].to_numpy(),
                                      n_estimators=100, top=10)
    assert ranking.attrs["cv_accuracy"] > 0.8
    assert "Constant" in ranking.attrs["dropped_constant"]
    assert ranking.attrs["n_dropped_constant"] >= 1
    assert list(ranking.columns) == ["feature", "importance"] and len(ranking) == 10
    assert ranking["importance"].is_monotonic_decreasing


def test_discriminative_features_finds_the_planted_feature():
    rng = np.random.default_rng(11)
    labels = np.repeat(["control", "treated"], 40)
    table = pd.DataFrame(rng.standard_normal((80, 6)), columns=[f"f{i}" for i in range(6)])
    table["signal"] = (labels == "treated") * 2.0 + 0.3 * rng.standard_normal(80)
    table["Metadata_Well"] = "A01"
    ranking = discriminative_features(table, labels, n_estimators=50, top=None)
    assert ranking["feature"].iloc[0] == "signal"
    assert len(ranking) == 7 and ranking.attrs["n_dropped_constant"] == 0
    with pytest.raises(ValueError, match="exactly 2 classes"):
        discriminative_features(table, np.repeat(["a", "b", "c"], [30, 30, 20]))
    with pytest.raises(ValueError, match="one entry per table row"):
        discriminative_features(table, labels[:10])
    with pytest.raises(ValueError, match="NaN or inf"):
        discriminative_features(table.assign(f0=np.nan), labels)


def test_bench_features_cli_prints_side_by_side_table(extract_fn, capsys, tmp_path):
    from morphjax import cli

    out = tmp_path / "bench.csv"
    assert cli.main(["bench", "features", "--n", str(BATCH), "--batch-size", str(BATCH),
                     "--reference-n", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scikit-image per crop" in printed and "370 features" in printed
    table = pd.read_csv(out)
    assert list(table["implementation"]) == [f"morphjax jit+vmap (batch {BATCH})",
                                             "scikit-image per crop"]
    assert (table["seconds"] > 0).all() and table["ratio"].iloc[0] == 1
