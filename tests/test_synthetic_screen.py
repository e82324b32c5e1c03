"""Synthetic screen: design, perturbation model, presets and the raw layout (RAW_LAYOUT.md)."""

import json
import os
from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from data_builders.synthetic_screen import perturbations as P
from data_builders.synthetic_screen import phenotype, presets, screen
from morphjax import chem

INDEX_REQUIRED = ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Perturbation")
PERTURBATION_COLUMNS = ("perturbation", "type", "is_control", "moa", "smiles", "target_gene",
                        "complex", "sequence")


@pytest.fixture(scope="session")
def tiny_screens(tmp_path_factory):
    root = tmp_path_factory.mktemp("screens")
    out = {}
    for name in presets.PRESETS:
        summary = screen.simulate_screen(name, "tiny", root / name, seed=0, progress=False,
                                         workers=1)
        out[name] = (root / name, summary)
    return out


@pytest.fixture(scope="session")
def worlds():
    """Full perturbation world of each preset (no rendering)."""
    return {name: P.build_library(presets.get_preset(name, "full")) for name in presets.PRESETS}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


# ------------------------------------------------------------------------------------------
# Seeds.
# ------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_screen_with_any_worker_count(tiny_screens, tmp_path):
    first, _ = tiny_screens["bbbc021_like"]
    screen.simulate_screen("bbbc021_like", "tiny", tmp_path / "again", seed=0, progress=False,
                           workers=2)
    a, b = _files(first), _files(tmp_path / "again")
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different


def test_different_seed_changes_cells_not_design(tiny_screens, tmp_path):
    first, _ = tiny_screens["rxrx1_like"]
    screen.simulate_screen("rxrx1_like", "tiny", tmp_path / "other", seed=1, progress=False)
    a, b = _files(first), _files(tmp_path / "other")
    # Design and perturbation world: identical.
    for name in ("index.csv", "perturbations.csv", "expression.npy", "gene_embeddings.npy",
                 "ground_truth/perturbations.csv"):
        assert a[name] == b[name], name
    assert sorted(a) == sorted(b)  # Same plates, wells, sites, channels.
    # Cells and pixels: different.
    images = [n for n in a if n.startswith("images/")]
    assert all(a[n] != b[n] for n in images)
    assert a["ground_truth/cells.csv"] != b["ground_truth/cells.csv"]
    sa = json.loads(a["screen.json"])
    sb = json.loads(b["screen.json"])
    assert (sa["seed"], sb["seed"]) == (0, 1)


# ------------------------------------------------------------------------------------------
# The raw layout of every preset.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", presets.PRESETS)
def test_tiny_preset_matches_raw_layout(tiny_screens, name):
    root, summary = tiny_screens[name]
    config = presets.get_preset(name, "tiny")
    spec = json.loads((root / "screen.json").read_text())
    assert spec["channels"] == list(config.channels)
    assert spec["image_size"] == list(config.image_size) and spec["bit_depth"] == 16
    height, width = spec["image_size"]

    index = pd.read_csv(root / "index.csv", keep_default_na=False)
    assert set(INDEX_REQUIRED + tuple(spec["channels"])) <= set(index.columns)
    assert not index.duplicated(["Metadata_Plate", "Metadata_Well", "Metadata_Site"]).any()
    assert len(index) == summary["n_sites"]
    for _, row in index.head(3).iterrows():  # Every file exists below; decode a few.
        for channel in spec["channels"]:
            image = Image.open(root / "images" / row[channel])
            assert image.mode == "I;16" and image.size == (width, height)
            assert np.asarray(image).dtype == np.uint16
    for channel in spec["channels"]:
        assert all((root / "images" / p).is_file() for p in index[channel])
        assert all(p.endswith(f"_{channel}.png") for p in index[channel])

    perts = pd.read_csv(root / "perturbations.csv", keep_default_na=False)
    assert set(PERTURBATION_COLUMNS) <= set(perts.columns)
    assert perts["perturbation"].is_unique
    assert set(index["Metadata_Perturbation"]) <= set(perts["perturbation"])
    assert set(perts["type"]) <= {"compound", "crispr", "orf", "sirna", "control"}
    assert set(perts["is_control"]) <= {0, 1}
    assert ((perts["type"] == "control") == (perts["is_control"] == 1)).all()
    assert (perts.loc[perts["type"] == "compound", "smiles"] != "").all()
    is_control = index["Metadata_Perturbation"].map(dict(zip(perts["perturbation"],
                                                             perts["is_control"])))
    assert index.assign(c=is_control).groupby("Metadata_Plate")["c"].max().eq(1).all()

    expression = np.load(root / "expression.npy")
    assert expression.shape == (len(perts), 978) and expression.dtype == np.float32
    if spec["genes"]:
        embeddings = np.load(root / "gene_embeddings.npy")
        assert embeddings.shape[0] == len(spec["genes"])
        genetic = perts[perts["type"].isin(["crispr", "orf", "sirna"])]
        assert spec["genes"] == list(dict.fromkeys(genetic["target_gene"]))
    else:
        assert not (root / "gene_embeddings.npy").exists()

    cells = pd.read_csv(root / "ground_truth" / "cells.csv")
    expected = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "x", "y", "responder"]
    assert list(cells.columns) == expected + [f"phenotype_{p}" for p in phenotype.PHENOTYPE]
    assert len(cells) == summary["n_cells"] > 0
    groups = dict(list(cells.groupby(["Metadata_Plate", "Metadata_Well", "Metadata_Site"])))
    for row in index.itertuples(index=False):
        path = root / "locations" / row.Metadata_Plate / (
            f"{row.Metadata_Well}-{row.Metadata_Site}-Nuclei.csv")
        locations = pd.read_csv(path)
        assert list(locations.columns) == ["Nuclei_Location_Center_X",
                                           "Nuclei_Location_Center_Y"]
        truth = groups.get((row.Metadata_Plate, row.Metadata_Well, row.Metadata_Site))
        n_truth = 0 if truth is None else len(truth)
        assert len(locations) == n_truth
        if n_truth:
            np.testing.assert_array_equal(locations.to_numpy(), truth[["x", "y"]].to_numpy())
            assert locations["Nuclei_Location_Center_X"].between(0, width - 1).all()
            assert locations["Nuclei_Location_Center_Y"].between(0, height - 1).all()
    # Nothing left behind by the atomic writes.
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]


def _nuclear_spots(image: np.ndarray) -> np.ndarray:
    """Centroids (x, y) of bright blobs of a DNA image: an independent nucleus detector."""
    from scipy import ndimage
    smooth = ndimage.gaussian_filter(image.astype(np.float64), 2.0)
    background = np.median(smooth)
    mask = smooth > background + 0.35 * (np.percentile(smooth, 99.5) - background)
    labels, n = ndimage.label(mask)
    return np.array(ndimage.center_of_mass(mask, labels, range(1, n + 1)))[:, ::-1]


def test_recorded_nuclei_sit_on_dna_signal(tiny_screens):
    root, _ = tiny_screens["ops_like"]
    index = pd.read_csv(root / "index.csv")
    distances = []
    for row in index.itertuples(index=False):
        dna = np.asarray(Image.open(root / "images" / row.DNA))
        locations = pd.read_csv(root / "locations" / row.Metadata_Plate / (
            f"{row.Metadata_Well}-{row.Metadata_Site}-Nuclei.csv")).to_numpy()
        spots = _nuclear_spots(dna)
        if len(locations) and len(spots):
            d = np.linalg.norm(locations[:, None, :] - spots[None, :, :], axis=-1).min(1)
            distances.append(d)
    distances = np.concatenate(distances)
    assert len(distances) > 50
    assert np.median(distances) < 3.0  # Pixels; a shuffled centre is tens of pixels away.


@pytest.mark.parametrize("name", presets.PRESETS)
@pytest.mark.parametrize("scale", ["small", "full"])
def test_small_and_full_designs_replicate_every_perturbation(worlds, name, scale):
    config = presets.get_preset(name, scale)
    library = P.select_for_scale(worlds[name], config)
    wells = screen.layout_screen(config, library)
    table = library.table
    is_control = table["is_control"].to_numpy()[wells["row"]]
    treated = wells[is_control == 0]
    counts = treated.groupby(["row", "dose", "cell_line"]).size()
    assert counts.min() >= 2
    assert set(treated["row"]) == set(np.flatnonzero(table["is_control"] == 0))
    assert wells.assign(c=is_control).groupby("plate")["c"].sum().ge(1).all()
    # Controls match the plate's modality (DMSO on compound plates, ...).
    assert (table["modality"].to_numpy()[wells["row"]] == wells["modality"]).all()
    assert not wells.duplicated(["plate", "well"]).any()
    assert wells.groupby("plate").size().max() <= config.layout.wells_per_plate
    if name == "rxrx1_like":
        assert wells["batch"].nunique() >= 3
    if name == "multi_cell_line":
        assert wells["cell_line"].nunique() == 5
        assert wells.groupby("plate")["cell_line"].nunique().eq(1).all()


def test_rxrx1_batches_differ_more_than_plates_within_a_batch():
    config = presets.get_preset("rxrx1_like", "full")
    library = P.select_for_scale(P.build_library(config), config)
    wells = screen.layout_screen(config, library)
    config.layout.n_batches = 3  # Several plates per batch.
    wells = screen.layout_screen(config, library)
    technical, shift = screen.plate_effects(config, wells, seed=0)
    plates = wells.drop_duplicates("plate_index")
    log_gain = np.log(np.stack([technical[p].gain for p in plates["plate_index"]]))
    batch = plates["batch_index"].to_numpy()
    within = np.mean([log_gain[batch == b].std(0).mean() for b in np.unique(batch)])
    between = np.stack([log_gain[batch == b].mean(0) for b in np.unique(batch)]).std(0).mean()
    assert between > 2 * within
    assert np.std(np.stack(list(shift.values()))) > 0.1  # Biological batch drift.


# ------------------------------------------------------------------------------------------
# Perturbation model.
# ------------------------------------------------------------------------------------------


def _binned_means(x: np.ndarray, y: np.ndarray, edges) -> np.ndarray:
    return np.array([y[(x >= lo) & (x < hi)].mean() for lo, hi in zip(edges[:-1], edges[1:])])


def test_fingerprint_part_follows_tanimoto_similarity():
    data_dir = P.shared_data_dir()
    smiles = P.load_reference_smiles(data_dir)
    projection = P.FingerprintProjection(smiles, len(phenotype.PHENOTYPE), design_seed=0)
    out = projection(smiles)
    assert np.mean(np.sum(out ** 2, axis=1)) == pytest.approx(1.0)
    upper = np.triu_indices(len(smiles), 1)
    fingerprints = chem.morgan_fingerprints(smiles)
    similarity = chem.tanimoto(fingerprints, fingerprints)[upper]
    effect_similarity = _cosine(out, out)[upper]
    means = _binned_means(similarity, effect_similarity, (0.0, 0.15, 0.3, 0.5, 0.7, 1.01))
    assert np.all(np.diff(means) > 0.05)  # Smooth: closer structures, closer outputs.
    assert means[-1] > 0.75 and abs(means[0]) < 0.1
    assert stats.pearsonr(similarity, effect_similarity).statistic > 0.15


@pytest.mark.parametrize("name", ["cellpainting_like", "multi_cell_line", "bbbc021_like"])
def test_structurally_similar_compounds_have_similar_effects(worlds, name):
    library = worlds[name]
    compounds = np.flatnonzero(library.table["type"] == "compound")
    smiles = list(library.table["smiles"].iloc[compounds])
    fingerprints = chem.morgan_fingerprints(smiles)
    similarity = chem.tanimoto(fingerprints, fingerprints)
    cos = _cosine(library.effects[compounds], library.effects[compounds])
    upper = np.triu_indices(len(compounds), 1)
    rho = stats.spearmanr(similarity[upper], cos[upper]).statistic
    rng = np.random.default_rng(0)
    null = []
    for _ in range(50):  # Permuting compounds keeps both similarity distributions.
        order = rng.permutation(len(compounds))
        null.append(stats.spearmanr(similarity[upper], cos[np.ix_(order, order)][upper])
                    .statistic)
    assert rho > max(null)
    close, far = similarity[upper] >= 0.3, similarity[upper] < 0.2
    assert close.sum() >= 5
    assert cos[upper][close].mean() > cos[upper][far].mean() + 0.3
    # Leave-one-out: a compound's most similar structure predicts its effect better than chance.
    np.fill_diagonal(similarity, -1)
    nearest = similarity.argmax(1)
    diagonal = ~np.eye(len(compounds), dtype=bool)
    assert cos[np.arange(len(compounds)), nearest].mean() > cos[diagonal].mean() + 0.08


def test_complex_members_share_effects_and_embeddings(worlds):
    library = worlds["ops_like"]
    table = library.table
    guides = np.flatnonzero(table["type"] == "crispr")
    complexes = table["complex"].to_numpy()[guides]
    tiers = np.array([library.complex_tier[c] for c in complexes])
    active = tiers != "inactive"
    cos = _cosine(library.effects[guides], library.effects[guides])
    same = complexes[:, None] == complexes[None, :]
    off_diagonal = ~np.eye(len(guides), dtype=bool)
    both_active = active[:, None] & active[None, :]
    assert cos[same & off_diagonal & both_active].mean() > 0.8
    assert abs(cos[~same & both_active].mean()) < 0.3
    assert len(set(library.gene_complex)) == 14 and len(library.genes) == 100

    embeddings = library.gene_embeddings
    gene_complex = np.array(library.gene_complex)
    cos = _cosine(embeddings, embeddings)
    same = gene_complex[:, None] == gene_complex[None, :]
    off_diagonal = ~np.eye(len(embeddings), dtype=bool)
    assert cos[same & off_diagonal].mean() > cos[~same].mean() + 0.4
    # Membership is recoverable: leave-one-out nearest complex centroid.
    correct = 0
    for i in range(len(embeddings)):
        others = np.arange(len(embeddings)) != i
        names = sorted(set(gene_complex))
        centroids = np.stack([embeddings[others & (gene_complex == c)].mean(0) for c in names])
        correct += names[int(np.argmin(((centroids - embeddings[i]) ** 2).sum(1)))] == \
            gene_complex[i]
    assert correct / len(embeddings) > 0.8


def test_guides_of_a_gene_share_its_effect_with_efficiency_in_penetrance(worlds):
    library = worlds["cellpainting_like"]
    t = library.table
    guides = t[t["type"] == "crispr"]
    for _, group in list(guides.groupby("target_gene"))[:20]:
        rows = group.index.to_numpy()
        np.testing.assert_allclose(library.effects[rows], library.effects[rows[:1]].repeat(
            len(rows), 0))
        assert len(rows) < 2 or library.penetrance[rows[0]] != library.penetrance[rows[1]]
    orfs = t[t["type"] == "orf"].index.to_numpy()
    # ORFs have their own effect: not the knockout's.
    knockout = {g: library.effects[r] for g, r in zip(guides["target_gene"], guides.index)}
    cos = [_cosine(library.effects[r], knockout[t["target_gene"][r]])
           for r in orfs if np.linalg.norm(knockout[t["target_gene"][r]]) > 0.5]
    assert np.mean(cos) < 0.5


def test_jump_target_compounds_mimic_their_target_knockout(worlds):
    library = worlds["cellpainting_like"]
    t = library.table
    knockout = {}
    for r in np.flatnonzero(t["type"] == "crispr"):
        knockout[t["target_gene"][r]] = library.effects[r]
    sims = []
    for r in np.flatnonzero(t["type"] == "compound"):
        mechanism = library.mechanism[r]
        if mechanism.startswith("gene:") and np.linalg.norm(library.effects[r]) > 0.5:
            sims.append(_cosine(library.effects[r], knockout[mechanism[5:]]))
    assert len(sims) > 50 and np.mean(sims) > 0.7


def test_expression_is_linear_in_effects_plus_noise(worlds):
    library = worlds["cellpainting_like"]
    x = np.column_stack([library.effects, np.ones(len(library))])
    y = library.expression.astype(np.float64)

    def r_squared(design):
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        residual = y - design @ coef
        return 1 - (residual ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), residual

    r2, residual = r_squared(x)
    assert 0.6 < r2 < 0.99  # Predictable, not a copy.
    config = presets.get_preset("cellpainting_like", "full")
    assert residual.std() == pytest.approx(config.perturbations.expression_noise, rel=0.1)
    shuffled = x[np.random.default_rng(0).permutation(len(x))]
    assert r_squared(shuffled)[0] < 0.1
    controls = library.table["is_control"].to_numpy() == 1
    assert np.allclose(library.effects[controls], 0)


def test_moa_tiers_mix_strong_subtle_and_inactive(worlds):
    library = worlds["multi_cell_line"]  # JUMP-MOA: mostly MoAs without a prototype.
    compounds = library.table["type"].to_numpy() == "compound"
    tiers = pd.Series(np.array(library.tier)[compounds])
    assert {"strong", "subtle", "inactive"} <= set(tiers)
    strength = np.linalg.norm(library.effects[compounds], axis=1)
    assert np.median(strength[tiers == "strong"]) > 5 * np.median(strength[tiers == "subtle"]) \
        / 2 > 0
    assert np.median(strength[tiers == "inactive"]) < 0.15


def test_hill_dose_response_is_monotone_and_matches_formula(worlds):
    library = worlds["bbbc021_like"]
    compounds = np.flatnonzero(library.table["type"] == "compound")
    doses = np.geomspace(1e-4, 1e3, 40)
    for r in compounds:
        activity = library.activity(np.full(len(doses), r), doses)
        assert np.all(np.diff(activity) >= 0) and activity[0] < 0.05 and activity[-1] > 0.95
        reference = 1.0 / (1.0 + (library.ec50[r] / doses) ** library.hill[r])
        np.testing.assert_allclose(activity, reference, rtol=1e-10)
        assert library.activity(r, library.ec50[r]) == pytest.approx(0.5)
    # Genetic perturbations are always fully active.
    assert P.build_library(presets.get_preset("ops_like", "tiny")).activity(5, 0.0) == 1.0


def test_tested_doses_span_the_ec50():
    library = P.build_library(presets.get_preset("bbbc021_like", "full"))
    multi = [r for r in range(len(library)) if len(library.tested_doses[r]) >= 3]
    low = [library.activity(r, min(library.tested_doses[r])) for r in multi]
    high = [library.activity(r, max(library.tested_doses[r])) for r in multi]
    assert np.mean(high) - np.mean(low) > 0.3


def test_dose_response_in_sampled_cells():
    rng = np.random.default_rng(0)
    effect = phenotype.phenotype_vector(tubulin_bundling=-1.5, mitotic_rounding=1.0)
    direction = effect / np.linalg.norm(effect)
    baseline = np.zeros(len(phenotype.PHENOTYPE))
    shifts = []
    for activity in P.hill_activity(np.geomspace(0.01, 100, 7), 1.0, 1.5):
        cells, _ = screen.site_phenotypes(3000, baseline, effect * activity, 0.8, 1.0, 0.2, rng)
        shifts.append((cells @ direction).mean())
    assert np.all(np.diff(shifts) > 0)
    assert shifts[0] < 0.05 and shifts[-1] > 0.8 * 0.8 * np.linalg.norm(effect)


def test_penetrance_sets_the_fraction_of_responders():
    rng = np.random.default_rng(1)
    effect = phenotype.phenotype_vector(actin_disruption=2.0)
    baseline = np.zeros(len(phenotype.PHENOTYPE))
    column = phenotype.phenotype_index("actin_disruption")
    for penetrance in (0.0, 0.3, 0.9):
        cells, responder = screen.site_phenotypes(20000, baseline, effect, penetrance, 1.0, 0.2,
                                                  rng)
        assert responder.mean() == pytest.approx(penetrance, abs=0.015)
        assert abs(cells[~responder, column].mean()) < 0.03  # Non-responders untouched.
        if penetrance:
            assert cells[responder, column].mean() == pytest.approx(2.0 * np.exp(0.02), rel=0.05)


def _cells_with_treatment(root):
    """Ground-truth cells joined with their site's perturbation and dose."""
    index = pd.read_csv(root / "index.csv")
    return pd.read_csv(root / "ground_truth" / "cells.csv").merge(
        index[["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Perturbation",
               "Metadata_Dose"]])


def test_ground_truth_responders_follow_penetrance_and_strength(tiny_screens):
    root, _ = tiny_screens["bbbc021_like"]
    cells = _cells_with_treatment(root)
    truth = pd.read_csv(root / "ground_truth" / "perturbations.csv", keep_default_na=False)
    penetrance = dict(zip(truth["perturbation"], truth["penetrance"]))
    columns = [f"phenotype_{p}" for p in phenotype.PHENOTYPE]
    control = cells[cells["Metadata_Perturbation"] == "DMSO"]
    assert control["responder"].sum() == 0
    shift = {}
    for pert, group in cells[cells["Metadata_Perturbation"] != "DMSO"].groupby(
            "Metadata_Perturbation"):
        fraction = group["responder"].mean()
        p = penetrance[pert]
        assert abs(fraction - p) < 4 * np.sqrt(p * (1 - p) / len(group)) + 0.02, pert
        top = group[group["Metadata_Dose"] == group["Metadata_Dose"].max()]
        responders = top[top["responder"] == 1]
        shift[pert] = np.linalg.norm(responders[columns].mean() - control[columns].mean())
    # Strong MoAs (microtubule) move responders far more than a subtle one (statin).
    assert min(shift["taxol"], shift["nocodazole"]) > 3 * shift["simvastatin"]


def test_ground_truth_shift_follows_the_dose_response(tiny_screens):
    root, _ = tiny_screens["bbbc021_like"]
    cells = _cells_with_treatment(root)
    truth = pd.read_csv(root / "ground_truth" / "perturbations.csv").set_index("perturbation")
    columns = [f"phenotype_{p}" for p in phenotype.PHENOTYPE]
    control = cells[cells["Metadata_Perturbation"] == "DMSO"][columns].to_numpy()
    config = presets.get_preset("bbbc021_like", "tiny")
    for pert in ("taxol", "nocodazole"):
        effect = truth.loc[pert, [f"effect_{p}" for p in phenotype.PHENOTYPE]].to_numpy(float)
        direction = effect / np.linalg.norm(effect)
        group = cells[(cells["Metadata_Perturbation"] == pert) & (cells["responder"] == 1)]
        measured, expected = [], []
        for dose, at_dose in group.groupby("Metadata_Dose"):
            measured.append((at_dose[columns].to_numpy() @ direction).mean()
                            - (control @ direction).mean())
            activity = 1.0 / (1.0 + (truth.loc[pert, "ec50"] / dose) ** truth.loc[pert, "hill"])
            expected.append(activity * np.linalg.norm(effect)
                            * np.exp(config.cells.response_sd ** 2 / 2))
        assert len(measured) == 2 and expected[1] - expected[0] > 0.3, pert
        np.testing.assert_allclose(measured, expected, atol=0.4)  # ~4 standard errors.
        assert measured[1] > measured[0]


def test_cell_lines_differ_in_baseline_and_response():
    config = presets.get_preset("multi_cell_line", "tiny")
    lines = list(config.cell_lines.keys())
    assert len(lines) == 5
    responses = np.stack([screen.cell_line_response(config, line) for line in lines])
    corr = np.corrcoef(np.log(responses))
    assert np.all(corr[~np.eye(5, dtype=bool)] < 0.9)  # Not just rescaled copies.
    baselines = np.stack([phenotype.phenotype_vector(dict(config.cell_lines[line].baseline))
                          for line in lines])
    assert len({tuple(b) for b in baselines}) == 5


def test_sirna_sites_are_in_the_gene_coding_sequence(worlds):
    library = worlds["rxrx1_like"]
    orfs = P.load_orfs(P.shared_data_dir())
    cds = dict(zip(orfs["gene"], orfs["sequence"].str.upper()))
    sirnas = library.table[library.table["type"] == "sirna"]
    assert len(sirnas) == 3 * 160
    for gene, site in zip(sirnas["target_gene"], sirnas["sequence"]):
        assert len(site) == 19 and site in cds[gene]
        assert 0.3 <= (site.count("G") + site.count("C")) / 19 <= 0.6


def test_world_does_not_depend_on_scale(worlds):
    full = worlds["cellpainting_like"]
    tiny_world = P.build_library(presets.get_preset("cellpainting_like", "tiny"))
    np.testing.assert_array_equal(full.effects, tiny_world.effects)
    tiny = P.select_for_scale(tiny_world, presets.get_preset("cellpainting_like", "tiny"))
    rows = [full.index(p) for p in tiny.table["perturbation"]]
    np.testing.assert_array_equal(full.effects[rows], tiny.effects)
    np.testing.assert_array_equal(full.expression[rows], tiny.expression)
    # A tiny selection mixes tiers rather than taking the first (possibly inactive) items.
    assert {"strong", "subtle"} <= set(t for t in tiny.tier if t)


# ------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------


def test_unknown_preset_or_scale_is_named():
    with pytest.raises(ValueError, match="nope"):
        presets.get_preset("nope", "tiny")
    with pytest.raises(ValueError, match="huge"):
        presets.get_preset("ops_like", "huge")
    with pytest.raises(ValueError, match="give a scale"):
        screen.simulate_screen("ops_like", None, "/nonexistent/x")


def test_missing_shared_data_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv(P.SHARED_DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"BBBC021_compound_smiles\.csv.*MORPHJAX"):
        P.shared_data_dir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere")):
        P.shared_data_dir(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "other")):
        screen.simulate_screen("ops_like", "tiny", tmp_path / "out", shared_data=tmp_path / "other")
    assert not (tmp_path / "out").exists()


def test_bad_config_values_are_named(tmp_path):
    config = presets.get_preset("bbbc021_like", "tiny")
    config.perturbations.compounds.names = ("taxol", "not-a-drug")
    with pytest.raises(ValueError, match="not-a-drug"):
        screen.simulate_screen(config, None, tmp_path / "a", progress=False)
    config = presets.get_preset("bbbc021_like", "tiny")
    config.cell_lines.MCF7.baseline.cell_colour = 1.0
    with pytest.raises(ValueError, match="cell_colour"):
        screen.simulate_screen(config, None, tmp_path / "b", progress=False)
    config = presets.get_preset("bbbc021_like", "tiny")
    config.channels = ("DNA", "Tubulin", "Cytoplasm")
    with pytest.raises(ValueError, match="Cytoplasm"):
        screen.simulate_screen(config, None, tmp_path / "c", progress=False)
    config = presets.get_preset("bbbc021_like", "tiny")
    config.layout.controls_per_plate = 0
    with pytest.raises(ValueError, match="controls_per_plate"):
        screen.simulate_screen(config, None, tmp_path / "d", progress=False)
    assert not any(tmp_path.iterdir())


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "screen").mkdir()
    (tmp_path / "screen" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        screen.simulate_screen("ops_like", "tiny", tmp_path / "screen", progress=False)
    assert (tmp_path / "screen" / "keep.txt").read_text() == "mine"


def test_interrupted_build_leaves_no_partial_screen(monkeypatch, tmp_path):
    calls = []
    original = screen._simulate_site

    def failing(task):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(task)

    monkeypatch.setattr(screen, "_simulate_site", failing)
    with pytest.raises(KeyboardInterrupt):
        screen.simulate_screen("ops_like", "tiny", tmp_path / "screen", progress=False,
                               workers=1)
    assert os.listdir(tmp_path) == []


def test_excluded_compounds_are_reported(tiny_screens):
    _, summary = tiny_screens["multi_cell_line"]
    assert "8 compounds without SMILES" in summary["excluded"]
    root, _ = tiny_screens["cellpainting_like"]
    notes = json.loads((root / "screen.json").read_text())["notes"]
    assert any("RDKit cannot parse" in n for n in notes)


def test_presets_are_configdicts_with_the_fields_the_screen_needs():
    for name in presets.PRESETS:
        for scale in presets.SCALES:
            config = presets.get_preset(name, scale)
            assert isinstance(config, ml_collections.ConfigDict)
            screen.validate_config(config)
            assert config.preset == name and config.scale == scale
    assert presets.get_preset("rxrx1_like", "tiny").channels == (
        "DNA", "ER", "Actin", "RNA", "Mito", "WGA")
    assert presets.get_preset("ops_like", "tiny").channels == ("DNA", "gH2AX", "Tubulin", "Actin")
    assert len(presets.get_preset("multi_cell_line", "small").cell_lines) == 5
