"""Latent phenotype of a synthetic cell: interpretable, standardised morphology parameters.

Every parameter is standardised: 0 is the untreated baseline of the cell line, +-1 a strong but
realistic shift (what a potent compound does to the cells that respond), +-3 extreme. A
perturbation shifts the vector, `sample_cells` adds cell-to-cell variation, and `render.py` maps
each cell's vector to pixels. The parameters follow the feature groups of Cell Painting profiles
(Bray et al. 2016, Nat. Protoc.: size/shape, intensity, texture of each compartment).
"""

from collections.abc import Mapping

import numpy as np

PHENOTYPE: tuple[str, ...] = (
    "nuclear_size",
    "nuclear_eccentricity",
    "nuclear_fragmentation",
    "nucleoli",
    "cell_size",
    "cell_roundness",
    "dna_intensity",
    "er_intensity",
    "er_texture",
    "rna_intensity",
    "actin_intensity",
    "actin_disruption",
    "tubulin_intensity",
    "tubulin_bundling",
    "mito_intensity",
    "mito_puncta",
    "multinucleation",
    "mitotic_rounding",
    "dna_damage_foci",
    "membrane_intensity",
    "golgi_dispersal",
)

# What +1 means for each parameter (-1 is the opposite where one exists). Kept next to PHENOTYPE
# so that MoA prototypes can be written against it.
PHENOTYPE_DESCRIPTIONS: dict[str, str] = {
    "nuclear_size": "nuclear area x1.6 (radius x exp(0.24 v)); -1: area x0.62",
    "nuclear_eccentricity": "elongated nucleus (axis ratio 0.78 -> 0.58); <= -1: round",
    "nuclear_fragmentation": ">= 0.73: micronuclei/fragments appear, 3 more per +1 (max 8), main "
    "nucleus shrinks and brightens (pyknosis); below that: more irregular outline",
    "nucleoli": "larger, brighter, more nucleoli (RNA channel; dark holes in DNA); -1: fewer",
    "cell_size": "cell radius x1.22 (area x1.5); -1: x0.82",
    "cell_roundness": "rounder, smoother outline; -1: elongated, irregular, spread",
    "dna_intensity": "DNA stain x1.5 (every *_intensity is a factor exp(0.4 v))",
    "er_intensity": "ER stain x1.5",
    "er_texture": "more reticular, higher-contrast ER network; -1: diffuse ER",
    "rna_intensity": "RNA stain (nucleoli and cytoplasm) x1.5",
    "actin_intensity": "actin stain x1.5",
    "actin_disruption": "stress fibres lost, actin aggregates/puncta appear, cortex weaker; "
    "-1: more stress fibres",
    "tubulin_intensity": "tubulin stain x1.5",
    "tubulin_bundling": "thick bright microtubule bundles (taxol-like); -1: depolymerised, "
    "diffuse tubulin (nocodazole-like)",
    "mito_intensity": "mitochondria stain x1.5",
    "mito_puncta": "fragmented, punctate mitochondria; -1: fused tubular network",
    "multinucleation": "discrete: 1 + floor(v) nuclei (max 4), so >= 1 gives binucleate cells",
    "mitotic_rounding": "discrete-like: v > 0.9 -> 1.1 ramps to mitotic arrest (round small cell, "
    "condensed bright chromatin, bright round tubulin/actin)",
    "dna_damage_foci": "more gH2AX foci (threshold on a foci field drops 0.45 per +1) and brighter "
    "pan-nuclear gH2AX",
    "membrane_intensity": "plasma membrane and Golgi stain (AGP/WGA) x1.5",
    "golgi_dispersal": "Golgi spreads around the nucleus and dims (brefeldin-like); -1: compact",
}

# Natural cell-to-cell standard deviation of each parameter in an untreated well. The discrete
# parameters are set so that a baseline well has a few % mitotic, binucleate and micronucleated
# cells, as in real cultures.
CELL_VARIABILITY: np.ndarray = np.array(
    [
        0.35,  # nuclear_size
        0.45,  # nuclear_eccentricity
        0.3,  # nuclear_fragmentation
        0.45,  # nucleoli
        0.4,  # cell_size
        0.5,  # cell_roundness
        0.2,  # dna_intensity
        0.25,  # er_intensity
        0.35,  # er_texture
        0.25,  # rna_intensity
        0.25,  # actin_intensity
        0.35,  # actin_disruption
        0.25,  # tubulin_intensity
        0.35,  # tubulin_bundling
        0.25,  # mito_intensity
        0.35,  # mito_puncta
        0.45,  # multinucleation
        0.45,  # mitotic_rounding
        0.4,  # dna_damage_foci
        0.25,  # membrane_intensity
        0.3,  # golgi_dispersal
    ]
)

# Cell-to-cell correlations that biology implies: big cells have big nuclei (cell cycle), mitotic
# cells are round with bright condensed DNA, stain uptake varies together, damaged cells fragment.
_CORRELATIONS: dict[tuple[str, str], float] = {
    ("nuclear_size", "cell_size"): 0.6,
    ("nuclear_size", "dna_intensity"): 0.2,
    ("nuclear_size", "multinucleation"): 0.2,
    ("cell_size", "multinucleation"): 0.3,
    ("cell_size", "cell_roundness"): -0.3,
    ("mitotic_rounding", "cell_roundness"): 0.4,
    ("mitotic_rounding", "dna_intensity"): 0.3,
    ("nuclear_fragmentation", "dna_damage_foci"): 0.3,
    ("er_intensity", "rna_intensity"): 0.3,
    ("er_intensity", "mito_intensity"): 0.3,
    ("actin_intensity", "tubulin_intensity"): 0.3,
    ("actin_intensity", "membrane_intensity"): 0.3,
    ("tubulin_intensity", "mito_intensity"): 0.2,
    ("membrane_intensity", "er_intensity"): 0.2,
}


def phenotype_index(name: str) -> int:
    """Column of `name` in phenotype vectors."""
    try:
        return PHENOTYPE.index(name)
    except ValueError:
        raise ValueError(
            f"Unknown phenotype parameter {name!r}; known parameters: {', '.join(PHENOTYPE)}."
        ) from None


def phenotype_vector(values: Mapping[str, float] | None = None, **named: float) -> np.ndarray:
    """(P,) vector, zero except the named parameters: phenotype_vector(nuclear_size=1.0)."""
    vector = np.zeros(len(PHENOTYPE))
    for name, value in {**(values or {}), **named}.items():
        vector[phenotype_index(name)] = float(value)
    return vector


def correlation_matrix() -> np.ndarray:
    """(P, P) cell-to-cell correlation of the phenotype parameters."""
    corr = np.eye(len(PHENOTYPE))
    for (a, b), r in _CORRELATIONS.items():
        i, j = phenotype_index(a), phenotype_index(b)
        corr[i, j] = corr[j, i] = r
    return corr


_CHOLESKY = np.linalg.cholesky(correlation_matrix())  # Fails at import if not positive definite.


def sample_cells(
    n: int,
    baseline: np.ndarray,
    heterogeneity: np.ndarray | float,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n, P) per-cell phenotypes: baseline + correlated cell-to-cell variation.

    Args:
      n: number of cells.
      baseline: (P,) shared by all cells, or (n, P) per cell (e.g. responders shifted, others not).
      heterogeneity: multiplier of the natural per-cell standard deviation `CELL_VARIABILITY`:
        a scalar or (P,) per parameter; 1 is a normal culture, 0 gives identical cells.
      rng: source of randomness; the result is a deterministic function of its state.
    """
    num_params = len(PHENOTYPE)
    if int(n) != n or n < 0:
        raise ValueError(f"sample_cells: n must be a non-negative integer, got {n!r}.")
    n = int(n)
    baseline = np.asarray(baseline, dtype=np.float64)
    if baseline.shape not in ((num_params,), (n, num_params)):
        raise ValueError(
            f"sample_cells: baseline has shape {baseline.shape}; expected ({num_params},) or "
            f"({n}, {num_params}) with columns in PHENOTYPE order."
        )
    heterogeneity = np.asarray(heterogeneity, dtype=np.float64)
    if heterogeneity.shape not in ((), (num_params,)):
        raise ValueError(
            f"sample_cells: heterogeneity has shape {heterogeneity.shape}; expected a scalar or "
            f"({num_params},)."
        )
    for label, array in (("baseline", baseline), ("heterogeneity", heterogeneity)):
        grid = array if array.ndim == 2 else np.broadcast_to(array, (1, num_params))
        bad = ~np.isfinite(grid)
        if bad.any():
            names = ", ".join(PHENOTYPE[i] for i in np.flatnonzero(bad.any(axis=0)))
            raise ValueError(f"sample_cells: {label} is not finite for: {names}.")
    if np.any(heterogeneity < 0):
        raise ValueError("sample_cells: heterogeneity must be >= 0.")
    z = rng.standard_normal((n, num_params)) @ _CHOLESKY.T
    return baseline + heterogeneity * CELL_VARIABILITY * z
