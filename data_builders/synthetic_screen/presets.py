"""Presets of the synthetic screen: one ConfigDict per preset and scale.

`get_preset(name, scale)` returns everything `screen.simulate_screen` needs. Scales: `tiny` renders
a whole preset in seconds (tests), `small` in a few minutes on 2 CPU cores (demos), `full` has the
size of the real screen the preset imitates. The world of a preset (perturbation effects, gene
complexes, embeddings: `design_seed` and the `perturbations.genes` universe fields) is the same at
every scale; a scale only selects perturbations and sets the layout.

Presets (each imitates a public screen's design, not its data):
- bbbc021_like: MCF-7-like cells, 3 channels (DNA, Tubulin, Actin), the 35 BBBC021 compounds
  with SMILES at their tested concentrations, DMSO controls (Ljosa et al. 2012; IMPA, LUMIC).
- cellpainting_like: U2OS-like cells, 5 Cell Painting channels, JUMP-Target-1 compounds, CRISPR
  guides and ORFs, each modality on its own plates with its own negative controls (JUMP cpg0000).
- rxrx1_like: HUVEC-like cells, 6 channels, siRNA-like knockdowns of JUMP-Target-1 genes, one
  replicate per experimental batch and strong batch effects (RxRx1; IMPA batch correction).
- ops_like: HeLa-like cells at lower magnification, 4 channels (DNA, gH2AX, Tubulin, Actin), ~100
  genes in 14 complexes with many cells per gene (optical pooled screens; GRAPE). Arrayed: one
  guide per well rather than a pooled library decoded in situ, which the crops cannot tell apart.
- multi_cell_line: 5 cell lines with their own baseline morphology and response to the JUMP-MOA
  compounds, one cell line per plate, for cross-cell-line generation (LUMIC).
"""

from __future__ import annotations

import ml_collections

PRESETS = ("bbbc021_like", "cellpainting_like", "rxrx1_like", "ops_like", "multi_cell_line")
SCALES = ("tiny", "small", "full")

# Cell lines: baseline shift of the phenotype (0 = the generic cell), response scaling (how
# strongly perturbation effects act, overall and per parameter), density and size in pixels.
CELL_LINES = {
    "MCF7": dict(baseline=dict(cell_size=-0.3, cell_roundness=0.5, nuclear_size=-0.15,
                               actin_intensity=-0.1, membrane_intensity=0.2),
                 response_scale=1.0, density=1.2, cell_scale=0.9),
    "U2OS": dict(baseline=dict(cell_size=0.4, cell_roundness=-0.5, nuclear_size=0.2,
                               actin_intensity=0.2, er_texture=0.2),
                 response_scale=1.0, density=0.8, cell_scale=1.1),
    "HUVEC": dict(baseline=dict(cell_roundness=-0.8, nuclear_eccentricity=0.5, cell_size=0.1,
                                actin_intensity=0.3, mito_intensity=-0.2),
                  response_scale=1.0, density=1.0, cell_scale=1.0),
    "HeLa": dict(baseline=dict(nucleoli=0.3, cell_roundness=-0.1, dna_intensity=0.1),
                 response_scale=1.1, density=1.0, cell_scale=1.0),
    "A549": dict(baseline=dict(cell_size=0.15, er_intensity=0.25, mito_intensity=0.2,
                               cell_roundness=0.1),
                 response_scale=0.8, density=1.0, cell_scale=1.0),
    "HepG2": dict(baseline=dict(cell_size=-0.45, cell_roundness=0.6, nuclear_size=-0.2,
                                mito_intensity=0.35, golgi_dispersal=0.2),
                  response_scale=0.6, density=1.4, cell_scale=0.85),
}


def _cell_line(name: str, *, response_variation: float = 0.0, heterogeneity: float = 1.0
               ) -> ml_collections.ConfigDict:
    spec = CELL_LINES[name]
    return ml_collections.ConfigDict(dict(
        baseline=ml_collections.ConfigDict(spec["baseline"]),
        response_scale=spec["response_scale"],
        # Log-normal spread of the per-parameter response around response_scale, drawn once per
        # cell line: lines respond differently, not just more or less.
        response_variation=response_variation,
        heterogeneity=heterogeneity,  # Multiplier of phenotype.CELL_VARIABILITY.
        density=spec["density"],  # Multiplier of cells.density.
        cell_scale=spec["cell_scale"],  # Multiplier of cells.cell_scale.
    ))


def _base(name: str, scale: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = name
    c.scale = scale
    # Fixes perturbation effects, complexes, embeddings and the plate layout. The `seed` argument
    # of simulate_screen draws cells, technical effects and noise.
    c.design_seed = 0
    c.shared_data = ""  # Empty: $MORPHJAX_SHARED_DATA or <repo>/../shared/data.
    c.channels = ("DNA", "ER", "RNA", "AGP", "Mito")
    c.image_size = (512, 512)
    c.cell_lines = ml_collections.ConfigDict()
    c.cells = ml_collections.ConfigDict(dict(
        density=1.0,  # Cells per field relative to render.expected_cell_count (Poisson).
        cell_scale=1.0,  # Renderer cell size; 1 is a 20x objective.
        response_sd=0.2,  # Log-normal cell-to-cell spread of the response strength.
    ))
    c.layout = ml_collections.ConfigDict(dict(
        plate_format=96,  # 96 or 384 wells.
        wells_per_plate=96,  # Wells used per plate, controls included.
        controls_per_plate=8,  # Negative-control wells on every plate.
        replicates=2,  # Plates maps repeated this many times (replicate plates).
        sites_per_well=1,
        n_batches=1,  # Plates are split into this many batches in replicate order.
        plate_prefix="P",
    ))
    c.perturbations = ml_collections.ConfigDict(dict(
        expression_noise=0.5,  # Sd of the L1000-like signature noise (signal sd ~ |effect|).
        compounds=ml_collections.ConfigDict(dict(
            source="",  # bbbc021, jump_target, jump_moa or "" (none).
            names=(),  # Explicit compound ids; empty: the first `n` (mechanisms round-robin).
            n=-1,
            doses=(5.0,),  # µM, for sources without tested concentrations.
            max_doses=-1,  # Tested concentrations kept per compound, spread over the range.
            n_negcon=1,  # DMSO.
            fingerprint_weight=0.7,  # Norm of the structure part relative to the mechanism.
            potency_sd=0.15,  # Log-normal compound-to-compound effect size spread.
            ec50_log10_offset=-0.3,  # EC50 relative to the geometric mean tested dose.
            ec50_log10_sd=0.35,
        )),
        genes=ml_collections.ConfigDict(dict(
            universe_size=-1,  # Genes of the world (-1: all 160 JUMP-Target-1 genes).
            n_complexes=24,
            gene_specific=0.3,  # Gene-specific part relative to the complex effect.
            embedding_dim=64,
            embedding_noise=0.8,  # Gene embedding = complex centroid + this * N(0, 1).
            select_complexes=-1,  # Scale selection: complexes used, and genes of each.
            select_per_complex=-1,
        )),
        crispr=ml_collections.ConfigDict(dict(enabled=False, guides_per_gene=2, n_negcon=4)),
        orf=ml_collections.ConfigDict(dict(enabled=False, n_negcon=2,
                                           knockout_opposition=0.3)),
        sirna=ml_collections.ConfigDict(dict(enabled=False, per_gene=2, n_negcon=2,
                                             off_target=0.15)),
    ))
    # Technical effects, relative to render.default_technical: log-normal sds of per-channel
    # gain (batch and plate), offsets, illumination gradient and vignetting, noise and blur.
    c.technical = ml_collections.ConfigDict(dict(
        gain_sd_batch=0.15,
        gain_sd_plate=0.05,
        offset_sd=0.3,
        gradient_sd=0.1,  # Per batch, added to the default gradient (fraction across the field).
        vignetting_sd=0.2,
        noise_sd=0.2,
        blur_sd=0.15,
        out_of_focus_fraction=0.02,  # Sites imaged out of focus (what blur QC must catch).
        defocus_sigma=2.5,  # Extra blur of such sites, pixels.
        batch_phenotype_shift=0.05,  # Sd of a per-batch biological drift of the baseline.
    ))
    return c


def _bbbc021_like(c: ml_collections.ConfigDict, scale: str) -> None:
    c.channels = ("DNA", "Tubulin", "Actin")
    c.cell_lines.MCF7 = _cell_line("MCF7")
    c.perturbations.compounds.source = "bbbc021"
    if scale == "tiny":
        c.perturbations.compounds.names = ("taxol", "nocodazole", "simvastatin")
        c.perturbations.compounds.max_doses = 2
        c.layout.update(wells_per_plate=8, controls_per_plate=2, replicates=2)
    elif scale == "small":
        c.perturbations.compounds.max_doses = 2
        c.layout.update(wells_per_plate=80, controls_per_plate=8, replicates=2,
                        sites_per_well=2)
    else:  # BBBC021: 96-well plates, 3 replicates, 4 fields per well.
        c.layout.update(wells_per_plate=96, controls_per_plate=12, replicates=3,
                        sites_per_well=4, n_batches=3)


def _cellpainting_like(c: ml_collections.ConfigDict, scale: str) -> None:
    c.cell_lines.U2OS = _cell_line("U2OS")
    p = c.perturbations
    p.compounds.source = "jump_target"
    p.compounds.doses = (5.0,)
    p.crispr.enabled = True
    p.orf.enabled = True
    c.layout.plate_format = 384
    c.layout.plate_prefix = "BR"
    if scale == "tiny":
        p.compounds.n = 3
        p.genes.update(select_complexes=2, select_per_complex=2)
        p.crispr.update(guides_per_gene=1, n_negcon=2)
        p.orf.n_negcon = 1
        c.layout.update(wells_per_plate=8, controls_per_plate=2, replicates=1)
    elif scale == "small":
        p.compounds.n = 32
        p.genes.update(select_complexes=8, select_per_complex=2)
        p.crispr.update(n_negcon=4)
        c.layout.update(wells_per_plate=64, controls_per_plate=8, replicates=2,
                        sites_per_well=2)
    else:  # JUMP cpg0000: 384-well plates, 4 replicate plates per map (9 fields there).
        c.layout.update(wells_per_plate=384, controls_per_plate=32, replicates=4,
                        sites_per_well=4, n_batches=4)


def _rxrx1_like(c: ml_collections.ConfigDict, scale: str) -> None:
    c.channels = ("DNA", "ER", "Actin", "RNA", "Mito", "WGA")
    c.cell_lines.HUVEC = _cell_line("HUVEC")
    p = c.perturbations
    p.sirna.enabled = True
    c.layout.plate_format = 384
    c.layout.plate_prefix = "RXP"
    # RxRx1's point: each experiment (batch) differs a lot in stain, optics and biology.
    c.technical.update(gain_sd_batch=0.35, gain_sd_plate=0.08, offset_sd=0.6, gradient_sd=0.2,
                       noise_sd=0.35, blur_sd=0.3, batch_phenotype_shift=0.3)
    if scale == "tiny":
        p.genes.update(select_complexes=2, select_per_complex=2)
        p.sirna.update(per_gene=1, n_negcon=2)
        c.layout.update(wells_per_plate=6, controls_per_plate=2, replicates=3, n_batches=3)
    elif scale == "small":
        p.genes.update(select_complexes=8, select_per_complex=3)
        p.sirna.update(per_gene=1, n_negcon=4)
        c.layout.update(wells_per_plate=32, controls_per_plate=8, replicates=3, n_batches=3,
                        sites_per_well=2)
    else:  # RxRx1: one replicate per experiment, 2 sites per well.
        p.sirna.update(per_gene=2, n_negcon=8)
        c.layout.update(wells_per_plate=384, controls_per_plate=30, replicates=6,
                        sites_per_well=2, n_batches=6)


def _ops_like(c: ml_collections.ConfigDict, scale: str) -> None:
    c.channels = ("DNA", "gH2AX", "Tubulin", "Actin")
    c.cell_lines.HeLa = _cell_line("HeLa")
    c.cells.cell_scale = 0.6  # 10x-like: small cells, many per field.
    p = c.perturbations
    p.crispr.enabled = True
    p.genes.update(universe_size=100, n_complexes=14)
    c.layout.plate_prefix = "OPS"
    if scale == "tiny":
        p.genes.update(select_complexes=2, select_per_complex=2)
        p.crispr.update(guides_per_gene=1, n_negcon=2)
        c.layout.update(wells_per_plate=6, controls_per_plate=2, replicates=1,
                        sites_per_well=2)
    elif scale == "small":
        p.genes.update(select_complexes=14, select_per_complex=2)
        p.crispr.update(guides_per_gene=1, n_negcon=4)
        c.layout.update(wells_per_plate=32, controls_per_plate=4, replicates=2,
                        sites_per_well=2)
    else:
        p.crispr.update(guides_per_gene=2, n_negcon=8)
        c.layout.update(wells_per_plate=96, controls_per_plate=8, replicates=2,
                        sites_per_well=9)


def _multi_cell_line(c: ml_collections.ConfigDict, scale: str) -> None:
    for name in ("A549", "HeLa", "HepG2", "MCF7", "U2OS"):
        c.cell_lines[name] = _cell_line(name, response_variation=0.35)
    p = c.perturbations
    p.compounds.source = "jump_moa"
    p.compounds.doses = (5.0,)
    c.layout.plate_prefix = "CL"
    if scale == "tiny":
        p.compounds.n = 3
        c.layout.update(wells_per_plate=4, controls_per_plate=1, replicates=1)
    elif scale == "small":
        p.compounds.n = 16
        c.layout.update(wells_per_plate=20, controls_per_plate=4, replicates=2)
    else:
        c.layout.update(wells_per_plate=96, controls_per_plate=8, replicates=3,
                        sites_per_well=4, n_batches=3)


_BUILDERS = dict(bbbc021_like=_bbbc021_like, cellpainting_like=_cellpainting_like,
                 rxrx1_like=_rxrx1_like, ops_like=_ops_like, multi_cell_line=_multi_cell_line)


def get_preset(name: str, scale: str) -> ml_collections.ConfigDict:
    """The screen config of preset `name` at `scale` (tiny, small or full)."""
    if name not in _BUILDERS:
        raise ValueError(f"Unknown synthetic screen preset {name!r}; choose one of {PRESETS}.")
    if scale not in SCALES:
        raise ValueError(f"Unknown scale {scale!r} for preset {name!r}; choose one of {SCALES}.")
    c = _base(name, scale)
    _BUILDERS[name](c, scale)
    if scale == "tiny":  # Seconds per preset: small fields.
        c.image_size = (256, 256)
    return c
