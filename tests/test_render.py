"""Tests for the synthetic-screen cell renderer: phenotype sampling, structures, technical effects.

Morphology is checked with classical image measurements written here from NumPy/SciPy (Otsu
threshold, connected components, structure-tensor coherence, top-hat spots), not with the
renderer's own internals.
"""

import dataclasses
import time

import numpy as np
import pytest
from scipy import ndimage, stats

from data_builders.synthetic_screen import phenotype as ph
from data_builders.synthetic_screen import render

SIZE = (160, 160)
SCALE = 0.6
NUM_PARAMS = len(ph.PHENOTYPE)


def _cells(seed=0, heterogeneity=1.0, size=SIZE, scale=SCALE, **named):
    n = render.expected_cell_count(size, scale)
    baseline = ph.phenotype_vector(**named)
    return ph.sample_cells(n, baseline, heterogeneity, np.random.default_rng(seed))


def _render(phenotypes, channels, seed=0, size=SIZE, scale=SCALE, technical=None):
    technical = technical or render.default_technical(len(channels))
    return render.render_site(
        phenotypes,
        channels,
        image_size=size,
        technical=technical,
        rng=np.random.default_rng(seed),
        cell_scale=scale,
    )


def _image(channel, seed=0, heterogeneity=1.0, **named):
    """One channel of a site whose cells all carry the named phenotype shift."""
    cells = _cells(seed=seed, heterogeneity=heterogeneity, **named)
    return _render(cells, [channel], seed=seed + 100).images[0].astype(np.float64)


def _otsu(values):
    """Otsu (1979) threshold: maximises the between-class variance of a 256-bin histogram."""
    hist, edges = np.histogram(values, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * centres)
    w1 = w0[-1] - w0
    between = (m0[-1] * w0 / w0[-1] - m0) ** 2 / np.maximum(w0 * w1, 1)
    return centres[np.argmax(between[:-1])]


def _objects(image, drop_border=False):
    """Labels, count, areas and mean intensities of Otsu-thresholded objects."""
    mask = image > _otsu(image)
    if drop_border:  # Remove objects cut by the image border.
        edge = np.zeros_like(mask)
        edge[[0, -1], :] = edge[:, [0, -1]] = True
        mask &= ~ndimage.binary_propagation(edge & mask, mask=mask)
    labels, count = ndimage.label(mask)
    index = np.arange(1, count + 1)
    return labels, count, ndimage.sum(mask, labels, index), ndimage.mean(image, labels, index)


def _coherence(image, weight=1.0):
    """Energy-weighted structure-tensor coherence: 1 for parallel lines, ~0 for isotropic dots."""
    ix, iy = ndimage.sobel(image, 1), ndimage.sobel(image, 0)
    jxx = ndimage.gaussian_filter(ix * ix, 2)
    jyy = ndimage.gaussian_filter(iy * iy, 2)
    jxy = ndimage.gaussian_filter(ix * iy, 2)
    anisotropy = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2)
    return (anisotropy * weight).sum() / ((jxx + jyy) * weight).sum()


def _foreground_cv(image):
    """Coefficient of variation of the stained (above-background) pixels."""
    signal = image - np.median(image)
    values = signal[signal > 0.3 * _otsu(signal)]
    return values.std() / values.mean()


def _spots(image, size, threshold):
    """Number of bright spots: connected components of a white top-hat above `threshold`."""
    return ndimage.label(ndimage.white_tophat(image, size=size) > threshold)[1]


# ---------------------------------------------------------------------------------------------
# Phenotype.
# ---------------------------------------------------------------------------------------------


def test_phenotype_names_index_and_vector():
    required = (
        "nuclear_size nuclear_eccentricity nuclear_fragmentation nucleoli cell_size "
        "cell_roundness dna_intensity er_intensity er_texture rna_intensity actin_intensity "
        "actin_disruption tubulin_intensity tubulin_bundling mito_intensity mito_puncta "
        "multinucleation mitotic_rounding dna_damage_foci membrane_intensity"
    ).split()
    assert set(required) <= set(ph.PHENOTYPE)
    assert len(set(ph.PHENOTYPE)) == NUM_PARAMS
    assert set(ph.PHENOTYPE_DESCRIPTIONS) == set(ph.PHENOTYPE)
    for i, name in enumerate(ph.PHENOTYPE):
        assert ph.phenotype_index(name) == i
    with pytest.raises(ValueError, match="nuclear_volume"):
        ph.phenotype_index("nuclear_volume")
    vector = ph.phenotype_vector({"cell_size": 1.0}, mito_puncta=-2)
    expected = np.zeros(NUM_PARAMS)
    expected[ph.PHENOTYPE.index("cell_size")] = 1.0
    expected[ph.PHENOTYPE.index("mito_puncta")] = -2.0
    np.testing.assert_array_equal(vector, expected)


def test_sample_cells_moments_and_correlations():
    baseline = np.linspace(-1, 1, NUM_PARAMS)
    heterogeneity = np.linspace(0.5, 1.5, NUM_PARAMS)
    cells = ph.sample_cells(40_000, baseline, heterogeneity, np.random.default_rng(0))
    assert cells.shape == (40_000, NUM_PARAMS)
    sd = heterogeneity * ph.CELL_VARIABILITY
    np.testing.assert_allclose(cells.mean(0), baseline, atol=4 * sd.max() / np.sqrt(40_000))
    np.testing.assert_allclose(cells.std(0), sd, rtol=0.03)
    corr = np.corrcoef(cells.T)
    np.testing.assert_allclose(corr, ph.correlation_matrix(), atol=0.03)
    i, j = ph.phenotype_index("cell_size"), ph.phenotype_index("nuclear_size")
    assert corr[i, j] > 0.5  # Big cells have big nuclei.
    # Deterministic given the rng; zero heterogeneity gives the baseline itself.
    again = ph.sample_cells(40_000, baseline, heterogeneity, np.random.default_rng(0))
    np.testing.assert_array_equal(cells, again)
    np.testing.assert_array_equal(
        ph.sample_cells(3, baseline, 0.0, np.random.default_rng(1)), np.tile(baseline, (3, 1))
    )


def test_sample_cells_per_cell_baseline_and_errors():
    baseline = np.zeros((4, NUM_PARAMS))
    baseline[2:, ph.phenotype_index("mito_puncta")] = 2.0  # Responders.
    cells = ph.sample_cells(4, baseline, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(cells, baseline)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=rf"\({NUM_PARAMS},\)"):
        ph.sample_cells(4, np.zeros(3), 1.0, rng)
    with pytest.raises(ValueError, match="heterogeneity"):
        ph.sample_cells(4, np.zeros(NUM_PARAMS), -1.0, rng)
    bad = np.zeros(NUM_PARAMS)
    bad[ph.phenotype_index("nucleoli")] = np.nan
    with pytest.raises(ValueError, match="nucleoli"):
        ph.sample_cells(4, bad, 1.0, rng)


# ---------------------------------------------------------------------------------------------
# Layout, determinism, centres.
# ---------------------------------------------------------------------------------------------


def test_same_seed_identical_different_seed_different():
    cells = _cells()
    channels = ["DNA", "ER", "RNA", "AGP", "Mito"]
    a, b = _render(cells, channels, seed=7), _render(cells, channels, seed=7)
    c = _render(cells, channels, seed=8)
    assert a.images.dtype == np.uint16 and a.images.shape == (5, *SIZE)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.centres, b.centres)
    np.testing.assert_array_equal(a.cell_index, b.cell_index)
    assert c.images.shape == a.images.shape
    assert not np.array_equal(a.centres[:3], c.centres[:3])
    assert np.abs(a.images.astype(float) - c.images).mean() > 50


def test_layout_and_channels_do_not_depend_on_phenotype_or_channel_list():
    cells = _cells(heterogeneity=0.5)
    brighter = cells.copy()
    brighter[:, ph.phenotype_index("mito_intensity")] += 1.0
    base = _render(cells, ["DNA", "Mito"], seed=3)
    mito = _render(brighter, ["DNA", "Mito"], seed=3)
    dna_only = _render(cells, ["DNA"], seed=3)
    mito_first = _render(cells, ["Mito", "ER", "DNA"], seed=3)
    np.testing.assert_array_equal(base.centres, mito.centres)
    # A Mito parameter leaves the DNA channel untouched, pixel for pixel, and a channel's
    # pixels do not depend on which other channels are rendered, or in which order.
    np.testing.assert_array_equal(base.images[0], mito.images[0])
    np.testing.assert_array_equal(base.images[0], dna_only.images[0])
    np.testing.assert_array_equal(base.images[0], mito_first.images[2])
    np.testing.assert_array_equal(base.images[1], mito_first.images[0])
    background = _render(np.zeros((0, NUM_PARAMS)), ["Mito"]).images.mean()
    gain = (mito.images[1].mean() - background) / (base.images[1].mean() - background)
    assert 1.35 < gain < 1.65  # exp(0.4) = 1.49 on the stain, background unchanged.


def test_centres_in_view_lie_on_nuclei_and_index_rows():
    cells = _cells(heterogeneity=0.0)
    site = _render(cells, ["DNA"], seed=1)
    dna = site.images[0].astype(np.float64)
    height, width = SIZE
    x, y = site.centres.T
    assert np.all((x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1))
    # Cells are also placed outside the view, and every index is a row of `cells`, once.
    assert 0 < len(site.cell_index) < len(cells)
    assert np.all(np.diff(site.cell_index) > 0) and site.cell_index.max() < len(cells)
    background = np.median(dna)
    at_centres = dna[np.rint(y).astype(int), np.rint(x).astype(int)]
    assert np.all(at_centres > background + 0.5 * (np.percentile(dna, 99.5) - background))
    # Every nucleus lying wholly inside the image holds exactly one reported centre.
    labels, count, _, _ = _objects(dna)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    inner = [k for k in range(1, count + 1) if k not in border]
    hits = labels[np.rint(y).astype(int), np.rint(x).astype(int)]
    assert len(inner) >= 5
    assert sorted(hits[np.isin(hits, inner)].tolist()) == inner


def test_cell_index_maps_centres_to_their_phenotype_rows():
    cells = _cells(heterogeneity=0.0, seed=2)
    column = ph.phenotype_index("dna_intensity")
    cells[:, column] = np.random.default_rng(0).uniform(-1.5, 1.5, len(cells))
    site = _render(cells, ["DNA"], seed=2)
    smooth = ndimage.uniform_filter(site.images[0].astype(np.float64), 3)
    x, y = np.rint(site.centres).astype(int).T
    rho = stats.spearmanr(smooth[y, x], cells[site.cell_index, column]).statistic
    assert rho > 0.9


def test_expected_cell_count_gives_the_documented_density():
    size = (512, 512)
    n = render.expected_cell_count(size)
    assert 60 <= n <= 80
    in_view = [
        len(_render(np.zeros((n, NUM_PARAMS)), ["DNA"], seed=s, size=size, scale=1.0).centres)
        for s in range(3)
    ]
    expected = render.CELLS_PER_MEGAPIXEL * 1e-6 * size[0] * size[1]
    assert abs(np.mean(in_view) / expected - 1) < 0.15


def test_crowded_neighbours_share_borders_instead_of_overlapping():
    def diffuse_er(crowding):
        n = render.expected_cell_count(SIZE, SCALE) * crowding
        cells = ph.sample_cells(
            n, ph.phenotype_vector(er_texture=-4.0), 0.0, np.random.default_rng(0)
        )
        return _render(cells, ["ER"], seed=1).images[0].astype(np.float64)

    sparse, crowded = diffuse_er(1), diffuse_er(3)
    background = _render(np.zeros((0, NUM_PARAMS)), ["ER"]).images.mean()
    assert np.mean(crowded > 2 * background) > 0.75  # Crowded cells cover the field ...
    # ... but each pixel belongs to one cell: overlaps would add up to twice the brightness.
    assert np.percentile(crowded, 99.9) < 1.15 * np.percentile(sparse, 99.9)


def test_cells_cut_by_the_border_are_drawn():
    cells = _cells(heterogeneity=0.0)
    site = _render(cells, ["AGP"], seed=4)
    agp = site.images[0].astype(np.float64)
    edge = np.concatenate([agp[0], agp[-1], agp[:, 0], agp[:, -1]])
    assert np.mean(edge > np.median(agp) + 300) > 0.05


# ---------------------------------------------------------------------------------------------
# Phenotype -> morphology.
# ---------------------------------------------------------------------------------------------


def test_nuclear_size_grows_dna_objects():
    small = _objects(_image("DNA", heterogeneity=0.0, nuclear_size=-1.0), drop_border=True)[2]
    large = _objects(_image("DNA", heterogeneity=0.0, nuclear_size=1.0), drop_border=True)[2]
    ratio = np.median(large) / np.median(small)
    assert 2.0 < ratio < 3.3  # Area x exp(0.48 * 2) = 2.6.


def test_fragmentation_multinucleation_and_mitosis_change_nuclei():
    base = _objects(_image("DNA", heterogeneity=0.0))
    fragmented = _objects(_image("DNA", heterogeneity=0.0, nuclear_fragmentation=2.0))
    assert fragmented[1] > 2.5 * base[1]
    assert np.median(fragmented[2]) < 0.5 * np.median(base[2])

    mitotic = _objects(_image("DNA", heterogeneity=0.0, mitotic_rounding=2.0))
    assert np.median(mitotic[2]) < 0.7 * np.median(base[2])  # Condensed ...
    assert np.median(mitotic[3]) > 1.4 * np.median(base[3])  # ... and bright.

    def nuclei(image):  # Distance-transform peaks separate touching nuclei.
        mask = ndimage.gaussian_filter(image, 1) > _otsu(image)
        dist = ndimage.gaussian_filter(ndimage.distance_transform_edt(mask), 1)
        return ndimage.label((dist == ndimage.maximum_filter(dist, size=5)) & (dist >= 2))[1]

    single = [_image("DNA", seed=s, heterogeneity=0.0) for s in range(2)]
    double = [_image("DNA", seed=s, heterogeneity=0.0, multinucleation=1.5) for s in range(2)]
    assert sum(map(nuclei, double)) > 1.4 * sum(map(nuclei, single))
    area = [np.median(np.concatenate([_objects(i)[2] for i in images])) for images in (
        single, double)]
    assert area[1] > 1.2 * area[0]  # Two touching nuclei, each 1/sqrt(2) of the area.


def test_channel_intensity_parameters_act_on_their_channel():
    channels = ["DNA", "ER", "RNA", "Mito", "Tubulin", "Actin", "WGA"]
    parameters = {
        "dna_intensity": "DNA",
        "er_intensity": "ER",
        "rna_intensity": "RNA",
        "mito_intensity": "Mito",
        "tubulin_intensity": "Tubulin",
        "actin_intensity": "Actin",
        "membrane_intensity": "WGA",
    }
    cells = _cells(heterogeneity=0.5)
    base = _render(cells, channels, seed=5).images.astype(np.float64)
    background = _render(np.zeros((0, NUM_PARAMS)), channels).images.mean((1, 2))
    base_signal = base.mean((1, 2)) - background
    for name, channel in parameters.items():
        shifted = cells.copy()
        shifted[:, ph.phenotype_index(name)] += 1.0
        images = _render(shifted, channels, seed=5).images.astype(np.float64)
        change = (images.mean((1, 2)) - background) / base_signal
        target = channels.index(channel)
        assert 1.35 < change[target] < 1.65, (name, change)
        others = np.delete(change, target)
        assert np.all(np.abs(others - 1) < 0.02), (name, change)


def test_actin_disruption_replaces_fibres_by_aggregates():
    def coherence(image):  # Around the brightest 1% of pixels, and away from them.
        signal = image - np.median(image)
        brightest = ndimage.binary_dilation(signal > np.percentile(signal, 99), iterations=3)
        return _coherence(image, weight=brightest), _coherence(image, weight=~brightest)

    fibres = coherence(_image("Actin", heterogeneity=0.0))
    disrupted = coherence(_image("Actin", heterogeneity=0.0, actin_disruption=2.0))
    assert fibres[0] > 0.6 and fibres[1] > 0.6  # Bright and dim structures are fibres ...
    assert disrupted[0] < 0.5 * fibres[0]  # ... the brightest become round aggregates ...
    assert disrupted[1] < 0.55 * fibres[1]  # ... and the fibres elsewhere are gone.


def test_tubulin_bundling_raises_and_depolymerisation_lowers_contrast():
    def spread(image):  # Bright tail of the stained pixels: thick bundles raise it.
        signal = image - np.median(image)
        values = signal[signal > 0.3 * _otsu(signal)]
        return np.percentile(values, 99) / np.percentile(values, 50)

    images = [_image("Tubulin", heterogeneity=0.0, tubulin_bundling=b) for b in (-2.0, 0.0, 2.0)]
    cv = [_foreground_cv(image) for image in images]
    assert cv[0] < 0.9 * cv[1] and cv[2] > 1.2 * cv[1]
    tail = [spread(image) for image in images]
    assert tail[0] < 0.8 * tail[1] and tail[2] > 1.6 * tail[1]


def test_mito_puncta_fragment_the_network():
    def blobs(image):
        signal = image - np.median(image)
        mask = signal > 0.4 * np.percentile(signal, 99.5)
        return mask.sum() / ndimage.label(mask)[1], _coherence(image)

    tubular_size, tubular_coherence = blobs(_image("Mito", mito_puncta=-1.5))
    punctate_size, punctate_coherence = blobs(_image("Mito", mito_puncta=2.0))
    assert punctate_size < 0.75 * tubular_size  # Small dots instead of long tubules.
    assert punctate_coherence < 0.95 * tubular_coherence


def test_er_texture_foci_and_nucleoli():
    def texture(image):  # Fine-scale (Laplacian of Gaussian) energy per unit stain.
        signal = image - np.median(image)
        stained = signal > 0.3 * _otsu(signal)
        return np.abs(ndimage.gaussian_laplace(image, 1.0)[stained]).mean() / signal[stained].mean()

    er = [texture(_image("ER", heterogeneity=0.0, er_texture=t)) for t in (-2.0, 0.0, 2.0)]
    assert er[0] < 0.6 * er[1] and er[2] > 1.15 * er[1]  # Diffuse < baseline < reticular.
    foci = [
        _spots(_image("gH2AX", heterogeneity=0.0, dna_damage_foci=d), 5, 500)
        for d in (0.0, 1.0, 2.0)
    ]
    assert foci[0] < foci[1] < foci[2] and foci[2] > 3 * max(foci[0], 2)
    nucleoli = [
        ndimage.white_tophat(_image("RNA", nucleoli=v), size=7).mean() for v in (-1.0, 2.0)
    ]
    assert nucleoli[1] > 1.15 * nucleoli[0]


# ---------------------------------------------------------------------------------------------
# Technical effects.
# ---------------------------------------------------------------------------------------------


def _empty(size=(96, 128), seed=0, **changes):
    technical = dataclasses.replace(render.default_technical(1), **changes)
    return _render(np.zeros((0, NUM_PARAMS)), ["DNA"], seed=seed, size=size, technical=technical)


def test_illumination_field_matches_its_formula():
    technical = dataclasses.replace(
        render.default_technical(1), gradient=np.array([0.3, -0.2]), vignetting=0.25
    )
    field = render.illumination_field(technical, (5, 9))
    y, x = np.meshgrid(np.linspace(-1, 1, 5), np.linspace(-1, 1, 9), indexing="ij")
    expected = (1 + 0.3 * x - 0.2 * y) * (1 - 0.25 * (x**2 + y**2) / 2)
    np.testing.assert_allclose(field, expected, rtol=1e-12)
    assert field[2, 4] == pytest.approx(1.0)
    flat = dataclasses.replace(technical, gradient=np.zeros(2))
    assert render.illumination_field(flat, (5, 9))[0, 0] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="gradient"):
        render.illumination_field(dataclasses.replace(technical, gradient=[0.8, 0.5]), (5, 9))


def test_empty_site_gain_offset_and_gradient():
    base = _empty().images[0].astype(np.float64)
    offset = _empty(offset=np.array([400.0])).images[0].astype(np.float64)
    gain = _empty(gain=np.array([2.0])).images[0].astype(np.float64)
    assert offset.mean() - base.mean() == pytest.approx(300.0, abs=2.0)
    light = base.mean() - 100.0  # default offset 100
    assert light > 30
    assert (gain.mean() - 100.0) / light == pytest.approx(2.0, rel=0.02)

    tilted = _empty(gradient=np.array([0.4, 0.0])).images[0].astype(np.float64) - 100.0
    profile = tilted.mean(axis=0) / light  # Mean over rows, per column.
    x = np.linspace(-1, 1, tilted.shape[1])
    np.testing.assert_allclose(np.polyfit(x, profile, 1), [0.4, 1.0], atol=0.03)
    assert tilted[:, -16:].mean() > 1.5 * tilted[:, :16].mean()


def test_noise_follows_photon_and_read_noise():
    std = {}
    for scale in (0.1, 10.0):  # 0.1: exact Poisson branch (< 50 photons); 10: normal branch.
        image = _empty(size=(128, 128), photon_scale=scale, read_noise=4.0).images[0]
        image = image.astype(np.float64)
        std[scale] = image.std()
        expected = np.sqrt(image.mean() / scale + 4.0**2)
        assert std[scale] == pytest.approx(expected, rel=0.05)
    assert std[0.1] > 3 * std[10.0]


def test_blur_removes_high_frequencies():
    cells = _cells()

    def energy(sigma):
        technical = dataclasses.replace(render.default_technical(1), blur_sigma=sigma)
        image = _render(cells, ["Mito"], seed=6, technical=technical).images[0]
        return np.mean(ndimage.laplace(image.astype(np.float64)) ** 2)

    assert energy(3.0) < 0.3 * energy(0.7)


# ---------------------------------------------------------------------------------------------
# Errors and speed.
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    cells = _cells()
    with pytest.raises(ValueError, match="'Brightfield'"):
        _render(cells, ["DNA", "Brightfield"])
    with pytest.raises(ValueError, match="Unknown channel"):
        render.channel_structure("mito")
    with pytest.raises(ValueError, match="2 channel gains for 3 channels"):
        _render(cells, ["DNA", "ER", "Mito"], technical=render.default_technical(2))
    with pytest.raises(ValueError, match=rf"expected \(n, {NUM_PARAMS}\)"):
        _render(cells[:, :5], ["DNA"])
    bad = cells.copy()
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        _render(bad, ["DNA"])
    with pytest.raises(ValueError, match="gain > 0"):
        dataclasses.replace(render.default_technical(2), gain=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="photon_scale > 0"):
        dataclasses.replace(render.default_technical(1), photon_scale=0.0)
    with pytest.raises(ValueError, match="image_size"):
        _render(cells, ["DNA"], size=(0, 64))
    for name, structure in (("DAPI", "nucleus"), ("Hoechst", "nucleus"), ("gH2AX", "gh2ax")):
        assert render.channel_structure(name) == structure


def test_time_per_full_size_site():
    """Prints the time of a 512x512 five-channel site (not asserted: timing is not a test)."""
    size = (512, 512)
    channels = ["DNA", "ER", "RNA", "AGP", "Mito"]
    cells = _cells(size=size, scale=1.0)
    technical = render.default_technical(len(channels))
    _render(cells, channels, size=size, scale=1.0, technical=technical)  # Builds texture tiles.
    times = []
    for seed in range(3):
        start = time.perf_counter()
        site = _render(cells, channels, seed=seed, size=size, scale=1.0, technical=technical)
        times.append(time.perf_counter() - start)
    print(
        f"\nrender_site 512x512x5, {len(cells)} cells ({len(site.centres)} in view): "
        f"{min(times):.3f} s (min of 3)"
    )
