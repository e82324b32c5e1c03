"""Perturbation model of the synthetic screen: what each compound, guide, ORF and siRNA does.

Every perturbation gets an effect vector in phenotype space (phenotype.PHENOTYPE units: 0 is the
untreated cell, +-1 a strong shift), a penetrance (the fraction of cells that respond) and, for
compounds, a Hill dose-response. The design follows DESIGN.md, "The synthetic screen":

- Compounds use real SMILES and MoA labels (BBBC021, JUMP-Target-1, JUMP-MOA tables). Their effect
  is a mechanism prototype plus a fixed random linear projection of the centred Morgan fingerprint,
  so structurally similar compounds act alike and an unseen compound is predictable from its
  structure (the premise of IMPA's fingerprint conditioning, impa.txt "Perturbation embedding").
  Known MoAs have hand-designed prototypes; other MoAs get a seeded random sparse prototype whose
  strength tier (inactive, subtle, strong) is drawn, as real screens mix all three.
- Genetic perturbations use real genes, guides and ORF inserts from JUMP-Target-1. Genes are grouped
  into synthetic complexes sharing an effect (gene = complex effect + a small gene part), which is
  what GRAPE's learned gene embeddings are scored against (grape.txt, protein complexes). Guides of
  a gene share its effect and differ in efficiency (their penetrance); siRNAs knock a gene down
  partially and carry an off-target part; an ORF overexpression has its own effect, weakly opposite
  to the knockout. JUMP-Target compounds inherit the knockout effect of their target gene, so
  compound-gene matching (the JUMP-Target design) has a true answer.
- Every perturbation has an L1000-like 978-gene expression vector, linear in its effect plus noise
  (MorphDiff conditions images on such signatures, morphdiff.txt).

The "world" (effects, complexes, embeddings) depends on the design seed and the preset's world
fields only, not on which subset a scale selects, so tiny, small and full screens of a preset agree.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from data_builders.synthetic_screen.phenotype import PHENOTYPE
from morphjax import chem

SHARED_DATA_ENV = "MORPHJAX_SHARED_DATA"
N_EXPRESSION_GENES = 978  # L1000 landmark genes.
FINGERPRINT_BITS = 2048
FINGERPRINT_RADIUS = 2

BBBC021_SMILES = "bbbc021/BBBC021_compound_smiles.csv"
BBBC021_MOA = "bbbc021/BBBC021_v1_moa.csv"
JUMP_TARGET_COMPOUNDS = "jump_target/JUMP-Target-1_compound_metadata.tsv"
JUMP_TARGET_CRISPR = "jump_target/JUMP-Target-1_crispr_metadata.tsv"
JUMP_TARGET_ORF = "jump_target/JUMP-Target-1_orf_metadata.tsv"
JUMP_MOA_COMPOUNDS = "jump_moa/JUMP-MOA_compound_metadata.tsv"
SHARED_FILES = (BBBC021_SMILES, BBBC021_MOA, JUMP_TARGET_COMPOUNDS, JUMP_TARGET_CRISPR,
                JUMP_TARGET_ORF, JUMP_MOA_COMPOUNDS)

COMPOUND_SOURCES = ("bbbc021", "jump_target", "jump_moa")
SIRNAS_PER_GENE = 3  # In the world; a scale keeps perturbations.sirna.per_gene of them.
SIRNA_NEGCON = 8
DMSO_SMILES = "CS(C)=O"

# Hand-designed prototypes for the BBBC021 MoAs (Ljosa et al. 2013 MoA classes), from the
# morphology each class is known for: (penetrance, {phenotype: shift}). The strength of a
# prototype is its norm: microtubule, actin, Aurora and Eg5 classes are strong, kinase inhibitors,
# epithelial and cholesterol-lowering compounds subtle, as in BBBC021 profiling results.
MOA_PROTOTYPES: dict[str, tuple[float, dict[str, float]]] = {
    "Microtubule destabilizers": (0.9, {
        "tubulin_bundling": -1.6, "mitotic_rounding": 1.2, "cell_roundness": 0.7,
        "cell_size": -0.4, "nuclear_fragmentation": 0.4, "tubulin_intensity": -0.3}),
    "Microtubule stabilizers": (0.9, {
        "tubulin_bundling": 1.6, "multinucleation": 1.0, "nuclear_fragmentation": 0.7,
        "mitotic_rounding": 0.5, "nuclear_size": 0.4, "tubulin_intensity": 0.4}),
    "Actin disruptors": (0.9, {
        "actin_disruption": 1.8, "cell_roundness": 0.6, "cell_size": -0.6,
        "actin_intensity": -0.4, "multinucleation": 0.3}),
    "Aurora kinase inhibitors": (0.85, {
        "multinucleation": 1.4, "nuclear_size": 1.2, "cell_size": 0.8, "dna_intensity": 0.5,
        "nuclear_eccentricity": 0.3}),
    "Eg5 inhibitors": (0.85, {
        "mitotic_rounding": 1.7, "cell_roundness": 0.9, "dna_intensity": 0.5,
        "cell_size": -0.3, "nuclear_eccentricity": -0.3}),
    "DNA damage": (0.8, {
        "dna_damage_foci": 1.4, "nuclear_size": 0.8, "cell_size": 0.5, "nucleoli": 0.3,
        "dna_intensity": 0.3}),
    "DNA replication": (0.7, {
        "nuclear_size": 0.5, "dna_damage_foci": 0.5, "dna_intensity": -0.35, "nucleoli": 0.3}),
    "Protein degradation": (0.7, {
        "er_texture": 0.6, "er_intensity": 0.5, "mito_puncta": 0.4, "cell_roundness": 0.3,
        "nuclear_size": -0.3}),
    "Protein synthesis": (0.7, {
        "rna_intensity": -0.6, "nucleoli": -0.5, "cell_size": -0.4, "er_intensity": -0.3}),
    "Kinase inhibitors": (0.5, {
        "cell_size": 0.3, "actin_intensity": 0.3, "cell_roundness": -0.2}),
    "Epithelial": (0.5, {
        "cell_roundness": -0.3, "actin_intensity": 0.35, "cell_size": 0.25,
        "membrane_intensity": 0.2}),
    "Cholesterol-lowering": (0.4, {
        "membrane_intensity": -0.2, "er_texture": 0.15, "mito_intensity": -0.1}),
}
# JUMP-MOA labels that name a BBBC021 class.
MOA_ALIASES = {
    "Aurora kinase inhibitor": "Aurora kinase inhibitors",
    "kinesin inhibitor": "Eg5 inhibitors",
    "HMGCR inhibitor": "Cholesterol-lowering",
    "DNA inhibitor": "DNA replication",
}

# Random mechanisms (unknown MoAs, complexes, ORFs): tier -> (probability, strength range,
# penetrance range). Strength is the norm of the effect vector.
TIERS = {
    "inactive": (0.25, (0.0, 0.08), (0.2, 0.5)),
    "subtle": (0.4, (0.25, 0.6), (0.35, 0.7)),
    "strong": (0.35, (1.0, 2.0), (0.7, 0.95)),
}


def shared_data_dir(path: str | os.PathLike | None = None) -> Path:
    """The shared data directory: `path`, else $MORPHJAX_SHARED_DATA, else <repo>/../shared/data.

    Raises FileNotFoundError naming the first missing table and how to point at the right place.
    """
    if path:
        root, origin = Path(path), "the shared_data argument"
    elif os.environ.get(SHARED_DATA_ENV):
        root, origin = Path(os.environ[SHARED_DATA_ENV]), f"${SHARED_DATA_ENV}"
    else:
        root = Path(__file__).resolve().parents[2].parent / "shared" / "data"
        origin = "the default <repo>/../shared/data"
    for name in SHARED_FILES:
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"Shared data table {root / name} (from {origin}) is missing. Point "
                f"--shared-data or ${SHARED_DATA_ENV} at the directory holding bbbc021/, "
                "jump_target/ and jump_moa/.")
    return root


def stable_hash(text: str) -> int:
    """A seed component from a name that is the same in every process (unlike hash())."""
    return zlib.crc32(text.encode("utf-8"))


def named_rng(design_seed: int, *names: str) -> np.random.Generator:
    """An rng owned by one named item, independent of which other items exist."""
    return np.random.default_rng([int(design_seed)] + [stable_hash(n) for n in names])


def hill_activity(dose: ArrayLike, ec50: ArrayLike, hill: ArrayLike) -> np.ndarray:
    """Fraction of the full effect at `dose` (Hill equation); 0 at dose 0."""
    dose = np.asarray(dose, dtype=np.float64)
    ec50 = np.asarray(ec50, dtype=np.float64)
    hill = np.asarray(hill, dtype=np.float64)
    ratio = np.power(np.maximum(dose, 0.0) / ec50, hill)
    return ratio / (1.0 + ratio)


# ------------------------------------------------------------------------------------------
# Shared tables.
# ------------------------------------------------------------------------------------------


def _read_table(data_dir: Path, name: str, columns: Sequence[str]) -> pd.DataFrame:
    path = data_dir / name
    sep = "\t" if name.endswith(".tsv") else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several types for unreadable files.
        raise ValueError(f"Cannot read shared data table {path}: {e}") from e
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; found {list(table.columns)}.")
    return table


def _has_smiles(s: str) -> bool:
    return bool(s) and s != "NA"


def _parses(smiles: str) -> bool:
    try:
        chem.parse_smiles(smiles)
    except ValueError:
        return False
    return True


def load_compounds(source: str, data_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Compounds of `source` with columns perturbation, name, moa, smiles, targets, doses.

    `doses` holds the tested concentrations (µM) where the source has them (BBBC021), else ().
    Compounds without a SMILES (blinded ones) cannot have a structure-driven effect and are left
    out; the returned notes say which.
    """
    notes = []
    if source == "bbbc021":
        smiles = _read_table(data_dir, BBBC021_SMILES, ["compound", "smiles"])
        moa = _read_table(data_dir, BBBC021_MOA, ["compound", "concentration", "moa"])
        moa = moa[moa["moa"] != "DMSO"]
        doses = {c: tuple(sorted({float(x) for x in g["concentration"]}))
                 for c, g in moa.groupby("compound")}
        labels = dict(zip(moa["compound"], moa["moa"]))
        smiles_of = dict(zip(smiles["compound"], smiles["smiles"]))
        no_smiles = sorted(set(labels) - set(smiles_of))
        if no_smiles:
            notes.append(f"bbbc021: {len(no_smiles)} compounds without SMILES left out: "
                         f"{no_smiles}")
        names = sorted(set(labels) & set(smiles_of))
        rows = [dict(perturbation=c, name=c, moa=labels[c], smiles=smiles_of[c], targets="",
                     doses=doses[c]) for c in names]
    elif source in ("jump_target", "jump_moa"):
        path = JUMP_TARGET_COMPOUNDS if source == "jump_target" else JUMP_MOA_COMPOUNDS
        label_column = "target_list" if source == "jump_target" else "moa"
        table = _read_table(data_dir, path, ["broad_sample", "InChIKey", "pert_iname",
                                             label_column, "control_type", "smiles"])
        table = table[table["control_type"] != "negcon"]  # DMSO; added as the control.
        moa_of = {}
        if source == "jump_target":  # MoA labels where JUMP-MOA has the same molecule.
            moa_table = _read_table(data_dir, JUMP_MOA_COMPOUNDS, ["InChIKey", "moa"])
            moa_of = dict(zip(moa_table["InChIKey"], moa_table["moa"]))
        no_smiles = table[~table["smiles"].map(_has_smiles)]
        if len(no_smiles):
            notes.append(f"{source}: {len(no_smiles)} compounds without SMILES left out: "
                         f"{list(no_smiles['broad_sample'])}")
        table = table[table["smiles"].map(_has_smiles)]
        rows = []
        for r in table.itertuples(index=False):
            targets = r.target_list if source == "jump_target" else ""
            moa = moa_of.get(r.InChIKey, "") if source == "jump_target" else r.moa
            rows.append(dict(perturbation=r.broad_sample, name=r.pert_iname,
                             moa="" if moa == "NA" else moa, smiles=r.smiles,
                             targets="" if targets == "NA" else targets, doses=()))
    else:
        raise ValueError(f"Unknown compound source {source!r}; expected one of "
                         f"{COMPOUND_SOURCES}.")
    out = pd.DataFrame(rows, columns=["perturbation", "name", "moa", "smiles", "targets",
                                      "doses"])
    parsed = out["smiles"].map(_parses)
    if not parsed.all():
        notes.append(f"{source}: {int((~parsed).sum())} compounds whose SMILES RDKit cannot parse "
                     f"left out: {list(out['perturbation'][~parsed])}")
        out = out[parsed]
    duplicated = out["perturbation"][out["perturbation"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{source}: duplicated compound ids {list(duplicated)}.")
    return out.sort_values("perturbation", kind="stable").reset_index(drop=True), notes


def load_reference_smiles(data_dir: Path) -> list[str]:
    """Every SMILES of the shared compound tables: the fixed library that centres fingerprints."""
    smiles = set()
    for source in COMPOUND_SOURCES:
        smiles.update(load_compounds(source, data_dir)[0]["smiles"])
    return sorted(smiles)


def _load_genetic(data_dir: Path, table: str, sequence_column: str) -> pd.DataFrame:
    t = _read_table(data_dir, table, ["broad_sample", "gene", "control_type", sequence_column])
    return pd.DataFrame(dict(perturbation=t["broad_sample"], gene=t["gene"],
                             sequence=t[sequence_column],
                             is_negcon=(t["control_type"] == "negcon").to_numpy()))


def load_guides(data_dir: Path) -> pd.DataFrame:
    """JUMP-Target-1 CRISPR guides: perturbation, gene, sequence, is_negcon."""
    return _load_genetic(data_dir, JUMP_TARGET_CRISPR, "target_sequence")


def load_orfs(data_dir: Path) -> pd.DataFrame:
    """JUMP-Target-1 ORFs: perturbation, gene, sequence (insert), is_negcon."""
    return _load_genetic(data_dir, JUMP_TARGET_ORF, "target_matching_region_seq")


def sirna_sequences(gene: str, cds: str, n: int, design_seed: int) -> list[str]:
    """`n` siRNA-like 19-nt target sites in a gene's coding sequence (30-60% GC, as siRNA
    design rules ask), chosen by a seeded walk so each gene's siRNAs are fixed."""
    cds = cds.upper()
    if len(cds) < 80:
        raise ValueError(f"ORF insert of {gene} is {len(cds)} nt; too short for siRNA sites.")
    rng = named_rng(design_seed, "sirna", gene)
    starts = rng.permutation(np.arange(20, len(cds) - 40))
    out = []
    for s in starts:
        site = cds[s:s + 19]
        gc = (site.count("G") + site.count("C")) / 19
        if 0.3 <= gc <= 0.6 and set(site) <= set("ACGT") and site not in out:
            out.append(site)
            if len(out) == n:
                return out
    raise ValueError(f"Found only {len(out)} of {n} siRNA sites in the ORF insert of {gene}.")


# ------------------------------------------------------------------------------------------
# Mechanisms.
# ------------------------------------------------------------------------------------------


def prototype_vector(values: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    """A {phenotype: shift} mapping as a vector over `names`; unknown names are an error."""
    vector = np.zeros(len(names))
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"Phenotype {key!r} is not a phenotype parameter; known: "
                             f"{tuple(names)}.")
        vector[list(names).index(key)] = value
    return vector


def random_mechanism(key: str, n_phenotypes: int, design_seed: int,
                     tiers: Mapping = TIERS) -> tuple[np.ndarray, float, str]:
    """Seeded sparse effect for a named mechanism: (effect, penetrance, tier).

    A few phenotype parameters move together (mechanisms act on specific compartments); the
    tier decides whether the mechanism is inactive, subtle or strong.
    """
    rng = named_rng(design_seed, "mechanism", key)
    names = list(tiers)
    probs = np.array([tiers[t][0] for t in names], dtype=np.float64)
    tier = names[rng.choice(len(names), p=probs / probs.sum())]
    _, strength_range, penetrance_range = tiers[tier]
    k = int(rng.integers(2, min(6, n_phenotypes) + 1))
    direction = np.zeros(n_phenotypes)
    direction[rng.choice(n_phenotypes, size=k, replace=False)] = (
        rng.normal(size=k) + np.sign(rng.normal(size=k)))
    direction /= np.linalg.norm(direction)
    strength = rng.uniform(*strength_range)
    return direction * strength, float(rng.uniform(*penetrance_range)), tier


def moa_mechanism(moa: str, names: Sequence[str], design_seed: int
                  ) -> tuple[np.ndarray, float, str]:
    """(effect, penetrance, tier) of an MoA: hand-designed if known, else seeded random."""
    canonical = MOA_ALIASES.get(moa, moa)
    if canonical in MOA_PROTOTYPES:
        penetrance, values = MOA_PROTOTYPES[canonical]
        vector = prototype_vector(values, names)
        tier = "strong" if np.linalg.norm(vector) >= 1.0 else "subtle"
        return vector, penetrance, tier
    return random_mechanism("moa:" + canonical, len(names), design_seed)


class FingerprintProjection:
    """Fixed random linear map of a centred Morgan fingerprint into phenotype space.

    Linear in the fingerprint, so compounds sharing substructures get nearby outputs; centred on
    the mean fingerprint of all shared compound tables so that bits every drug-like molecule has
    do not push all compounds the same way. Scaled so that the output has unit mean squared norm
    over that reference library.
    """

    def __init__(self, reference_smiles: Sequence[str], n_phenotypes: int, design_seed: int):
        fingerprints = chem.morgan_fingerprints(reference_smiles, FINGERPRINT_RADIUS,
                                                FINGERPRINT_BITS).astype(np.float64)
        self.mean = fingerprints.mean(0)
        rng = named_rng(design_seed, "fingerprint_projection")
        self.weights = rng.normal(size=(FINGERPRINT_BITS, n_phenotypes))
        centred = fingerprints - self.mean
        raw = centred @ self.weights
        self.scale = 1.0 / np.sqrt(np.mean(np.sum(raw ** 2, axis=1)))

    def __call__(self, smiles: Sequence[str]) -> np.ndarray:
        fingerprints = chem.morgan_fingerprints(smiles, FINGERPRINT_RADIUS, FINGERPRINT_BITS)
        return (fingerprints - self.mean) @ self.weights * self.scale


# ------------------------------------------------------------------------------------------
# The library.
# ------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("perturbation", "type", "is_control", "moa", "smiles", "target_gene",
                 "complex", "sequence", "modality", "name")
MODALITIES = ("compound", "crispr", "orf", "sirna")


@dataclasses.dataclass
class PerturbationLibrary:
    """All perturbations of a screen world and their ground truth.

    `table` has the perturbations.csv columns of RAW_LAYOUT.md plus `modality` (which plates
    the perturbation goes on; controls included) and `name` (compound or gene name). Row i of
    every array belongs to row i of `table`. `effects` are at full activity: a compound at dose
    d moves responding cells by effects * hill_activity(d, ec50, hill).
    """

    table: pd.DataFrame
    effects: np.ndarray  # (N, P) float64.
    penetrance: np.ndarray  # (N,)
    ec50: np.ndarray  # (N,) µM; NaN for non-compounds (always fully active).
    hill: np.ndarray  # (N,)
    tested_doses: list[tuple[float, ...]]  # Per row; () where the source gives none.
    mechanism: list[str]  # Per row: "moa:<MoA>", "gene:<gene>", "complex:<c>", ... or "".
    tier: list[str]  # inactive / subtle / strong / "" (controls).
    expression: np.ndarray  # (N, 978) float32.
    genes: list[str]  # The world's genes, in complex order.
    gene_complex: list[str]  # Complex of each gene.
    complex_tier: dict[str, str]  # Tier of each complex.
    gene_embeddings: np.ndarray  # (len(genes), d) float32.
    phenotype_names: tuple[str, ...]
    notes: list[str]

    def __len__(self) -> int:
        return len(self.table)

    def index(self, perturbation: str) -> int:
        matches = np.flatnonzero(self.table["perturbation"].to_numpy() == perturbation)
        if len(matches) != 1:
            raise KeyError(f"Unknown perturbation {perturbation!r}.")
        return int(matches[0])

    def activity(self, rows: ArrayLike, doses: ArrayLike) -> np.ndarray:
        """Fraction of the full effect of `rows` at `doses` (1 for non-compounds)."""
        rows = np.asarray(rows)
        doses = np.asarray(doses, dtype=np.float64)
        ec50 = self.ec50[rows]
        compound = ~np.isnan(ec50)
        out = np.ones(np.broadcast(rows, doses).shape)
        active = hill_activity(doses, np.where(compound, ec50, 1.0), self.hill[rows])
        return np.where(compound, active, out)

    def select(self, rows: Sequence[int]) -> PerturbationLibrary:
        """The library restricted to `rows` (in that order); genes and notes kept whole."""
        rows = np.asarray(rows, dtype=np.int64)
        return dataclasses.replace(
            self, table=self.table.iloc[rows].reset_index(drop=True),
            effects=self.effects[rows], penetrance=self.penetrance[rows],
            ec50=self.ec50[rows], hill=self.hill[rows],
            tested_doses=[self.tested_doses[i] for i in rows],
            mechanism=[self.mechanism[i] for i in rows], tier=[self.tier[i] for i in rows],
            expression=self.expression[rows])

    def screen_genes(self) -> list[str]:
        """Genes of the genetic perturbations, in order of first appearance in `table`: the rows
        of gene_embeddings.npy."""
        genetic = self.table[self.table["type"].isin(("crispr", "orf", "sirna"))]
        return list(dict.fromkeys(g for g in genetic["target_gene"] if g))

    def gene_embedding_rows(self, genes: Sequence[str]) -> np.ndarray:
        position = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in position]
        if missing:
            raise KeyError(f"Genes {missing} are not in the screen world.")
        return self.gene_embeddings[[position[g] for g in genes]]


def _gene_world(config: ml_collections.ConfigDict, guides: pd.DataFrame, orfs: pd.DataFrame,
                n_phenotypes: int, design_seed: int):
    """Genes, their complexes, knockout effects, complex penetrance and embeddings."""
    genes_cfg = config.genes
    candidates = set(guides.loc[~guides["is_negcon"] & (guides["gene"] != ""), "gene"])
    candidates |= set(orfs.loc[~orfs["is_negcon"], "gene"])
    candidates = sorted(candidates)
    order = named_rng(design_seed, "gene_universe").permutation(len(candidates))
    size = genes_cfg.universe_size
    if size > len(candidates):
        raise ValueError(f"genes.universe_size={size} but JUMP-Target-1 has only "
                         f"{len(candidates)} genes.")
    universe = [candidates[i] for i in order[:size if size > 0 else len(candidates)]]
    n_complexes = genes_cfg.n_complexes
    if not 1 <= n_complexes <= len(universe):
        raise ValueError(f"genes.n_complexes={n_complexes} must be in [1, {len(universe)}].")
    complex_names = [f"CPLX{i + 1:02d}" for i in range(n_complexes)]
    complex_of = {g: complex_names[i % n_complexes] for i, g in enumerate(universe)}
    complex_effect, complex_penetrance, complex_tier, centroid = {}, {}, {}, {}
    for c in complex_names:
        complex_effect[c], complex_penetrance[c], complex_tier[c] = random_mechanism(
            "complex:" + c, n_phenotypes, design_seed)
        centroid[c] = named_rng(design_seed, "complex_centroid", c).normal(
            size=genes_cfg.embedding_dim)
    # Genes listed complex by complex, so that a selection of the first genes of each complex
    # is a prefix per complex.
    genes = [g for c in complex_names for g in universe if complex_of[g] == c]
    effect, embedding = {}, []
    for g in genes:
        c = complex_of[g]
        rng = named_rng(design_seed, "gene", g)
        own = rng.normal(size=n_phenotypes) / np.sqrt(n_phenotypes)
        effect[g] = complex_effect[c] + (
            genes_cfg.gene_specific * np.linalg.norm(complex_effect[c]) * own)
        embedding.append(centroid[c] + genes_cfg.embedding_noise * rng.normal(
            size=genes_cfg.embedding_dim))
    return dict(genes=genes, complex_of=complex_of, effect=effect,
                penetrance=complex_penetrance, tier=complex_tier,
                embeddings=np.asarray(embedding, dtype=np.float32), complexes=complex_names)


def build_library(preset: ml_collections.ConfigDict,
                  phenotype_names: Sequence[str] = PHENOTYPE) -> PerturbationLibrary:
    """Builds the full perturbation world of a preset config (presets.get_preset): every
    perturbation its sources offer. A scale's subset is `select_for_scale`.
    """
    names = tuple(phenotype_names)
    n_phenotypes = len(names)
    design_seed = int(preset.design_seed)
    data_dir = shared_data_dir(preset.shared_data or None)
    config = preset.perturbations
    guides, orfs = load_guides(data_dir), load_orfs(data_dir)
    world = _gene_world(config, guides, orfs, n_phenotypes, design_seed)
    notes = []
    rows = []  # dicts: table columns + effect, penetrance, ec50, hill, doses, mechanism, tier.

    def add(perturbation, type_, modality, effect, penetrance, *, is_control=0, moa="",
            smiles="", target_gene="", complex_="", sequence="", name="", ec50=np.nan,
            hill=np.nan, doses=(), mechanism="", tier=""):
        rows.append(dict(perturbation=perturbation, type=type_, is_control=is_control, moa=moa,
                         smiles=smiles, target_gene=target_gene, complex=complex_,
                         sequence=sequence, modality=modality, name=name or perturbation,
                         effect=np.asarray(effect, dtype=np.float64), penetrance=penetrance,
                         ec50=ec50, hill=hill, doses=tuple(doses), mechanism=mechanism,
                         tier=tier))

    zero = np.zeros(n_phenotypes)
    cc = config.compounds
    if cc.source:
        compounds, source_notes = load_compounds(cc.source, data_dir)
        notes += source_notes
        projection = FingerprintProjection(load_reference_smiles(data_dir), n_phenotypes,
                                           design_seed)
        structure = projection(list(compounds["smiles"]))
        add("DMSO", "control", "compound", zero, 0.0, is_control=1, smiles=DMSO_SMILES)
        for i, c in enumerate(compounds.itertuples(index=False)):
            target = next((g for g in c.targets.split("|") if g in world["effect"]), "")
            if target:  # JUMP-Target design: the compound mimics its target's knockout.
                mechanism = "gene:" + target
                base = world["effect"][target]
                penetrance = world["penetrance"][world["complex_of"][target]]
                tier = world["tier"][world["complex_of"][target]]
            elif c.moa:
                mechanism = "moa:" + MOA_ALIASES.get(c.moa, c.moa)
                base, penetrance, tier = moa_mechanism(c.moa, names, design_seed)
            else:
                first = c.targets.split("|")[0] if c.targets else c.perturbation
                mechanism = "target:" + first
                base, penetrance, tier = random_mechanism(mechanism, n_phenotypes, design_seed)
            rng = named_rng(design_seed, "compound", c.perturbation)
            potency = np.exp(rng.normal(0.0, cc.potency_sd))
            effect = potency * (base + cc.fingerprint_weight * np.linalg.norm(base)
                                * structure[i])
            penetrance = float(np.clip(penetrance + rng.normal(0.0, 0.05), 0.05, 1.0))
            doses = c.doses if c.doses else tuple(cc.doses)
            if not doses:
                raise ValueError(f"Compound {c.perturbation} has no tested doses; set "
                                 "perturbations.compounds.doses.")
            reference = float(np.exp(np.mean(np.log(doses))))
            ec50 = reference * 10 ** rng.normal(cc.ec50_log10_offset, cc.ec50_log10_sd)
            hill = rng.uniform(1.0, 2.0)
            add(c.perturbation, "compound", "compound", effect, penetrance, moa=c.moa,
                smiles=c.smiles, target_gene=c.targets, name=c.name, ec50=ec50, hill=hill,
                doses=doses, mechanism=mechanism, tier=tier)

    gene_set = set(world["genes"])
    if config.crispr.enabled:
        negcon = guides[guides["is_negcon"]].sort_values("perturbation")
        for r in negcon.itertuples(index=False):
            add(r.perturbation, "control", "crispr", zero, 0.0, is_control=1,
                sequence=r.sequence, name="non-targeting")
        treated = guides[~guides["is_negcon"] & guides["gene"].isin(gene_set)]
        for r in treated.sort_values(["gene", "perturbation"]).itertuples(index=False):
            c = world["complex_of"][r.gene]
            efficiency = named_rng(design_seed, "guide", r.perturbation).beta(8.0, 2.0)
            add(r.perturbation, "crispr", "crispr", world["effect"][r.gene],
                world["penetrance"][c] * efficiency, target_gene=r.gene, complex_=c,
                sequence=r.sequence, name=r.gene, mechanism="complex:" + c,
                tier=world["tier"][c])

    if config.orf.enabled:
        negcon = orfs[orfs["is_negcon"]].sort_values("perturbation")
        for r in negcon.itertuples(index=False):
            add(r.perturbation, "control", "orf", zero, 0.0, is_control=1, sequence=r.sequence,
                name=r.gene)
        treated = orfs[~orfs["is_negcon"] & orfs["gene"].isin(gene_set)]
        for r in treated.sort_values(["gene", "perturbation"]).itertuples(index=False):
            c = world["complex_of"][r.gene]
            own, penetrance, tier = random_mechanism("orf:" + r.gene, n_phenotypes,
                                                     design_seed)
            effect = own - config.orf.knockout_opposition * world["effect"][r.gene]
            add(r.perturbation, "orf", "orf", effect, penetrance, target_gene=r.gene,
                complex_=c, sequence=r.sequence, name=r.gene, mechanism="orf:" + r.gene,
                tier=tier)

    if config.sirna.enabled:
        for k in range(SIRNA_NEGCON):
            add(f"siNT_{k + 1}", "control", "sirna", zero, 0.0, is_control=1,
                name="non-targeting")
        cds = dict(zip(orfs.loc[~orfs["is_negcon"], "gene"],
                       orfs.loc[~orfs["is_negcon"], "sequence"]))
        for g in sorted(gene_set & set(cds)):
            c = world["complex_of"][g]
            sites = sirna_sequences(g, cds[g], SIRNAS_PER_GENE, design_seed)
            for k, site in enumerate(sites):
                pid = f"si{g}_{k + 1}"
                rng = named_rng(design_seed, "sirna", pid)
                knockdown = rng.uniform(0.5, 0.95)
                off_target = rng.normal(size=n_phenotypes)
                off_target *= config.sirna.off_target / np.linalg.norm(off_target)
                add(pid, "sirna", "sirna", knockdown * world["effect"][g] + off_target,
                    min(1.0, world["penetrance"][c] + 0.1), target_gene=g, complex_=c,
                    sequence=site, name=g, mechanism="complex:" + c, tier=world["tier"][c])

    if not rows:
        raise ValueError("The preset selects no perturbations: enable compounds, crispr, orf "
                         "or sirna.")
    table = pd.DataFrame([{k: r[k] for k in TABLE_COLUMNS} for r in rows])
    duplicated = table["perturbation"][table["perturbation"].duplicated()]
    if len(duplicated):
        raise ValueError(f"Duplicated perturbation ids {list(duplicated)}.")
    effects = np.stack([r["effect"] for r in rows])
    rng = named_rng(design_seed, "expression")
    loading = rng.normal(size=(n_phenotypes, N_EXPRESSION_GENES))
    noise = np.stack([named_rng(design_seed, "expression_noise", r["perturbation"]).normal(
        size=N_EXPRESSION_GENES) for r in rows])
    expression = effects @ loading + config.expression_noise * noise
    return PerturbationLibrary(
        table=table, effects=effects, penetrance=np.array([r["penetrance"] for r in rows]),
        ec50=np.array([r["ec50"] for r in rows], dtype=np.float64),
        hill=np.array([r["hill"] for r in rows], dtype=np.float64),
        tested_doses=[r["doses"] for r in rows], mechanism=[r["mechanism"] for r in rows],
        tier=[r["tier"] for r in rows], expression=expression.astype(np.float32),
        genes=world["genes"], gene_complex=[world["complex_of"][g] for g in world["genes"]],
        complex_tier=world["tier"],
        gene_embeddings=world["embeddings"], phenotype_names=names, notes=notes)


def interleave_tiers(keys: Sequence[str], tier: Mapping[str, str]) -> list[str]:
    """`keys` reordered strong, subtle, inactive, strong, ... (stable within a tier), so that
    the first few of them already mix strong, subtle and inactive mechanisms."""
    by_tier = [[k for k in keys if tier[k] == t] for t in ("strong", "subtle", "inactive")]
    by_tier.append([k for k in keys if tier[k] not in ("strong", "subtle", "inactive")])
    out = []
    while any(by_tier):
        for group in by_tier:
            if group:
                out.append(group.pop(0))
    return out


def select_for_scale(library: PerturbationLibrary, preset: ml_collections.ConfigDict
                     ) -> PerturbationLibrary:
    """The perturbations a scale of `preset` uses.

    Compounds: `compounds.names` if given, else the first `compounds.n` in an order that visits
    mechanisms round-robin (so a few compounds already span several MoAs). Genes: the first
    `genes.select_per_complex` genes of each of the first `genes.select_complexes` complexes;
    with them all their guides (up to `crispr.guides_per_gene`), ORFs and siRNAs. Controls:
    the first `n_negcon` of each modality.
    """
    config = preset.perturbations
    t = library.table
    keep = []
    complex_names = interleave_tiers(list(dict.fromkeys(library.gene_complex)),
                                     library.complex_tier)
    n_complexes = config.genes.select_complexes
    chosen_complexes = complex_names[:n_complexes if n_complexes > 0 else len(complex_names)]
    per_complex = config.genes.select_per_complex
    chosen_genes = []
    for c in chosen_complexes:
        members = [g for g, gc in zip(library.genes, library.gene_complex) if gc == c]
        chosen_genes += members[:per_complex if per_complex > 0 else len(members)]
    chosen_genes = set(chosen_genes)
    for modality in MODALITIES:
        rows = np.flatnonzero((t["modality"] == modality).to_numpy())
        if not len(rows):
            continue
        controls = [i for i in rows if t["is_control"].iloc[i]]
        treated = [i for i in rows if not t["is_control"].iloc[i]]
        sub = config.compounds if modality == "compound" else config[modality]
        n_negcon = sub.get("n_negcon", 1)
        keep += controls[:n_negcon if n_negcon > 0 else len(controls)]
        if modality == "compound":
            keep += _select_compounds(library, treated, config.compounds)
        else:
            picked = [i for i in treated if t["target_gene"].iloc[i] in chosen_genes]
            if modality in ("crispr", "sirna"):
                per_gene = (config.crispr.guides_per_gene if modality == "crispr"
                            else config.sirna.per_gene)
                counts = {}
                for i in picked:
                    g = t["target_gene"].iloc[i]
                    counts[g] = counts.get(g, 0) + 1
                    if per_gene <= 0 or counts[g] <= per_gene:
                        keep.append(i)
            else:
                keep += picked
    return library.select(keep)


def _select_compounds(library: PerturbationLibrary, rows: list[int], config) -> list[int]:
    t = library.table
    if config.names:
        ids = list(t["perturbation"].iloc[rows])
        missing = [n for n in config.names if n not in ids]
        if missing:
            raise ValueError(f"perturbations.compounds.names: unknown compound(s) {missing} in "
                             f"source {config.source!r}; known: {sorted(ids)}.")
        return [rows[ids.index(n)] for n in config.names]
    groups, tier = {}, {}
    for i in rows:
        groups.setdefault(library.mechanism[i], []).append(i)
        tier[library.mechanism[i]] = library.tier[i]
    ordered = []
    queues = [groups[k] for k in interleave_tiers(sorted(groups), tier)]
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))
    n = config.n
    return ordered[:n if n > 0 else len(ordered)]
