"""Simulates a whole synthetic screen and writes it in the raw layout of RAW_LAYOUT.md.

`simulate_screen` lays out plates, wells, sites, batches and cell lines (the design, fixed by the
preset's `design_seed`), draws per-batch and per-plate technical effects, samples cells (cell line
baseline + batch drift + the perturbation effect on the responders + cell-to-cell variation),
renders every site and writes images, nucleus locations, metadata and the hidden truth.

Randomness: the design and the perturbation world come from `design_seed`; everything drawn in a
build (technical effects, cells, noise) comes from `seed`, each site from its own
SeedSequence(seed, (plate, row, column, site)), so the screen does not depend on the number of
workers, and a different seed gives different cells on the same design.

Besides the files RAW_LAYOUT.md lists, the hidden `ground_truth/` holds `perturbations.csv`
(effect vector, penetrance, dose-response and mechanism of every perturbation) and `sites.csv`
(cell counts and technical effects of every site), and `screen.json` lists `genes`, the rows of
gene_embeddings.npy.
"""

from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import os
import secrets
import shutil
import time
from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from data_builders.synthetic_screen import perturbations as perturbations_lib
from data_builders.synthetic_screen import phenotype, presets, render
from morphjax import io as mio

PLATE_FORMATS = {96: (8, 12), 384: (16, 24)}
# spawn_key tags of the SeedSequence(seed, ...) streams.
_BATCH, _PLATE, _SITE = 0, 1, 2
_COORD_FORMAT = "%.3f"
_PHENOTYPE_FORMAT = "%.5f"
_PNG_COMPRESSION = 3


# ------------------------------------------------------------------------------------------
# Design.
# ------------------------------------------------------------------------------------------


def well_name(row: int, column: int) -> str:
    """Row 0, column 0 -> "A01"."""
    return f"{chr(ord('A') + row)}{column + 1:02d}"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks a preset config before anything is built; errors name the field and the fix."""
    for channel in config.channels:
        render.channel_structure(channel)  # ValueError naming the unknown channel.
    if len(set(config.channels)) != len(config.channels):
        raise ValueError(f"channels {config.channels} repeat a channel.")
    height, width = config.image_size
    if min(height, width) < 32:
        raise ValueError(f"image_size {tuple(config.image_size)} is too small (min 32x32).")
    if not len(config.cell_lines):
        raise ValueError("cell_lines is empty; add at least one cell line.")
    for name, line in config.cell_lines.items():
        for key in line.baseline:
            if key not in phenotype.PHENOTYPE:
                raise ValueError(f"cell_lines.{name}.baseline.{key}: unknown phenotype parameter; "
                                 f"known: {phenotype.PHENOTYPE}.")
        if line.response_scale < 0 or line.heterogeneity < 0 or line.density <= 0:
            raise ValueError(f"cell_lines.{name}: response_scale and heterogeneity must be >= 0 "
                             "and density > 0.")
    layout = config.layout
    if layout.plate_format not in PLATE_FORMATS:
        raise ValueError(f"layout.plate_format={layout.plate_format}; use 96 or 384.")
    if not 1 <= layout.controls_per_plate < layout.wells_per_plate <= layout.plate_format:
        raise ValueError(
            f"layout: need 1 <= controls_per_plate ({layout.controls_per_plate}) < "
            f"wells_per_plate ({layout.wells_per_plate}) <= plate_format "
            f"({layout.plate_format}); every plate carries negative controls.")
    if layout.replicates < 1 or layout.sites_per_well < 1 or layout.n_batches < 1:
        raise ValueError("layout: replicates, sites_per_well and n_batches must be >= 1.")


def _doses(library: perturbations_lib.PerturbationLibrary, row: int, max_doses: int
           ) -> tuple[float, ...]:
    doses = library.tested_doses[row]
    if max_doses > 0 and len(doses) > max_doses:
        keep = np.unique(np.round(np.linspace(0, len(doses) - 1, max_doses)).astype(int))
        doses = tuple(doses[i] for i in keep)
    return doses


def layout_screen(config: ml_collections.ConfigDict,
                  library: perturbations_lib.PerturbationLibrary) -> pd.DataFrame:
    """One row per well: plate, batch, cell line, replicate, well, perturbation (library row) and
    dose. Depends on the design seed only.

    Each modality (compound, CRISPR, ORF, siRNA) gets its own plate maps, as in JUMP: its
    conditions (perturbation x dose), shuffled, fill maps of `wells_per_plate -
    controls_per_plate` treated wells, and every map gets `controls_per_plate` wells of that
    modality's negative controls. Maps are repeated for each replicate and cell line, so the
    replicates of a condition sit on different plates; plates are then split in order into
    `n_batches` batches (a batch = a replicate set when n_batches == replicates).
    """
    layout = config.layout
    rng = perturbations_lib.named_rng(config.design_seed, "layout")
    n_rows, n_columns = PLATE_FORMATS[layout.plate_format]
    all_wells = [(r, c) for r in range(n_rows) for c in range(n_columns)]
    treated_per_map = layout.wells_per_plate - layout.controls_per_plate
    table = library.table
    maps = []  # (modality, [(row, dose)] in well order, [(r, c)] positions)
    for modality in perturbations_lib.MODALITIES:
        in_modality = (table["modality"] == modality).to_numpy()
        controls = np.flatnonzero(in_modality & (table["is_control"] == 1).to_numpy())
        treated = np.flatnonzero(in_modality & (table["is_control"] == 0).to_numpy())
        if not len(treated):
            continue
        if not len(controls):
            raise ValueError(f"No negative control for the {modality} plates; enable its "
                             "n_negcon in perturbations.")
        max_doses = config.perturbations.compounds.max_doses
        conditions = []
        for i in treated:
            if modality == "compound":
                conditions += [(int(i), d) for d in _doses(library, i, max_doses)]
            else:
                conditions.append((int(i), 0.0))
        conditions = [conditions[k] for k in rng.permutation(len(conditions))]
        for start in range(0, len(conditions), treated_per_map):
            chunk = conditions[start:start + treated_per_map]
            wells = chunk + [(int(controls[k % len(controls)]), 0.0)
                             for k in range(layout.controls_per_plate)]
            positions = [all_wells[k] for k in rng.permutation(len(all_wells))[:len(wells)]]
            maps.append((modality, wells, positions))
    rows = []
    plate_number = 0
    for replicate in range(layout.replicates):
        for line in config.cell_lines.keys():
            for modality, wells, positions in maps:
                plate_number += 1
                plate = f"{layout.plate_prefix}{plate_number:03d}"
                for (row, dose), (r, c) in sorted(zip(wells, positions), key=lambda x: x[1]):
                    rows.append(dict(plate=plate, plate_index=plate_number - 1,
                                     modality=modality, cell_line=line,
                                     replicate=replicate + 1, well=well_name(r, c), well_row=r,
                                     well_column=c, row=row, dose=dose))
    wells = pd.DataFrame(rows)
    n_plates = plate_number
    if layout.n_batches > n_plates:
        raise ValueError(f"layout.n_batches={layout.n_batches} but the design has only "
                         f"{n_plates} plates.")
    batch_of_plate = np.concatenate([np.full(len(part), b) for b, part in enumerate(
        np.array_split(np.arange(n_plates), layout.n_batches))])
    wells["batch"] = [f"Batch{b + 1}" for b in batch_of_plate[wells["plate_index"]]]
    wells["batch_index"] = batch_of_plate[wells["plate_index"]]
    return wells


# ------------------------------------------------------------------------------------------
# Technical and biological effects of a build.
# ------------------------------------------------------------------------------------------


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(key)))


def plate_effects(config: ml_collections.ConfigDict, wells: pd.DataFrame, seed: int
                  ) -> tuple[dict[int, render.Technical], dict[int, np.ndarray]]:
    """Per-plate Technical (batch effect shared by its plates + a smaller plate effect) and
    per-batch baseline drift of the phenotype (batches also differ biologically: passage,
    confluence, serum)."""
    t = config.technical
    n_channels = len(config.channels)
    base = render.default_technical(n_channels)
    batch = {}
    for b in sorted(set(wells["batch_index"])):
        rng = _stream(seed, _BATCH, int(b))
        batch[b] = dict(
            log_gain=rng.normal(0.0, t.gain_sd_batch, n_channels),
            log_offset=rng.normal(0.0, t.offset_sd, n_channels),
            gradient=rng.normal(0.0, t.gradient_sd, 2),
            vignetting=abs(rng.normal(0.0, t.vignetting_sd)),
            log_photons=rng.normal(0.0, t.noise_sd),
            log_read=rng.normal(0.0, t.noise_sd),
            log_blur=rng.normal(0.0, t.blur_sd),
            phenotype_shift=rng.normal(0.0, t.batch_phenotype_shift, len(phenotype.PHENOTYPE)),
        )
    technical = {}
    plates = wells.drop_duplicates("plate_index")
    for p, b in zip(plates["plate_index"], plates["batch_index"]):
        rng = _stream(seed, _PLATE, int(p))
        e = batch[b]
        gradient = base.gradient + e["gradient"] + rng.normal(0.0, t.gradient_sd / 4, 2)
        technical[int(p)] = render.Technical(
            gain=base.gain * np.exp(e["log_gain"] + rng.normal(0.0, t.gain_sd_plate, n_channels)),
            offset=base.offset * np.exp(e["log_offset"]
                                        + rng.normal(0.0, t.offset_sd / 3, n_channels)),
            gradient=np.clip(gradient, -0.45, 0.45),
            vignetting=float(np.clip(base.vignetting + e["vignetting"], 0.0, 0.6)),
            photon_scale=base.photon_scale * float(np.exp(e["log_photons"]
                                                          + rng.normal(0.0, t.noise_sd / 3))),
            read_noise=base.read_noise * float(np.exp(e["log_read"])),
            blur_sigma=base.blur_sigma * float(np.exp(e["log_blur"]
                                                      + rng.normal(0.0, t.blur_sd / 3))),
        )
    return technical, {b: e["phenotype_shift"] for b, e in batch.items()}


def cell_line_response(config: ml_collections.ConfigDict, line: str) -> np.ndarray:
    """(P,) multiplier of perturbation effects in `line`: response_scale times a fixed per-line
    log-normal profile, so lines differ in which parameters respond, not just by how much."""
    spec = config.cell_lines[line]
    z = perturbations_lib.named_rng(config.design_seed, "cell_line", line).normal(
        size=len(phenotype.PHENOTYPE))
    return spec.response_scale * np.exp(spec.response_variation * z)


def site_phenotypes(n: int, baseline: np.ndarray, effect: np.ndarray, penetrance: float,
                    heterogeneity: float, response_sd: float, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(phenotypes (n, P), responder (n,) bool) of one site's cells.

    A cell responds with probability `penetrance`; a responder is shifted by `effect` times a
    log-normal per-cell strength (cells respond unequally), then every cell gets the correlated
    cell-to-cell variation of phenotype.sample_cells.
    """
    responder = rng.random(n) < penetrance
    strength = np.exp(rng.normal(0.0, response_sd, n)) * responder
    shifted = baseline[None, :] + strength[:, None] * effect[None, :]
    return phenotype.sample_cells(n, shifted, heterogeneity, rng), responder


# ------------------------------------------------------------------------------------------
# Rendering and writing one site (runs in worker processes).
# ------------------------------------------------------------------------------------------


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=_PNG_COMPRESSION)
    return buffer.getvalue()


def _locations_csv(centres: np.ndarray) -> str:
    lines = ["Nuclei_Location_Center_X,Nuclei_Location_Center_Y"]
    lines += [f"{_COORD_FORMAT % x},{_COORD_FORMAT % y}" for x, y in centres]
    return "\n".join(lines) + "\n"


def _simulate_site(task: dict) -> dict:
    """Samples, renders and writes one site; returns what the screen-level tables need."""
    rng = _stream(task["seed"], _SITE, *task["key"])
    technical = task["technical"]
    out_of_focus = bool(rng.random() < task["out_of_focus_fraction"])
    if out_of_focus:
        technical = render.Technical(**{**vars(technical), "blur_sigma": float(
            np.hypot(technical.blur_sigma, task["defocus_sigma"]))})
    n = int(rng.poisson(task["expected_cells"]))
    phenotypes, responder = site_phenotypes(n, task["baseline"], task["effect"],
                                            task["penetrance"], task["heterogeneity"],
                                            task["response_sd"], rng)
    site = render.render_site(phenotypes, task["channels"], image_size=task["image_size"],
                              technical=technical, rng=rng, cell_scale=task["cell_scale"])
    root = Path(task["root"])
    for path, image in zip(task["image_paths"], site.images):
        mio.atomic_write_bytes(root / "images" / path, _png_bytes(image))
    centres = np.asarray(site.centres, dtype=np.float64).reshape(-1, 2)
    mio.atomic_write_text(root / task["locations_path"], _locations_csv(centres))
    return dict(centres=centres, phenotypes=phenotypes[site.cell_index],
                responder=responder[site.cell_index], n_cells=n, out_of_focus=out_of_focus,
                blur_sigma=technical.blur_sigma)


# ------------------------------------------------------------------------------------------
# The screen.
# ------------------------------------------------------------------------------------------


def _resolve(preset, scale) -> ml_collections.ConfigDict:
    if isinstance(preset, str):
        if scale is None:
            raise ValueError(f"simulate_screen({preset!r}): give a scale, one of "
                             f"{presets.SCALES}.")
        return presets.get_preset(preset, scale)
    if not isinstance(preset, ml_collections.ConfigDict):
        raise TypeError(f"preset must be a preset name or a ConfigDict, got {type(preset)}.")
    if scale is not None and scale != preset.scale:
        raise ValueError(f"scale={scale!r} disagrees with the config's scale {preset.scale!r}; "
                         "pass scale=None with a config.")
    return preset


def simulate_screen(preset: str | ml_collections.ConfigDict, scale: str | None,
                    out_dir: str | os.PathLike, *, seed: int = 0, progress: bool = True,
                    workers: int | None = None,
                    shared_data: str | os.PathLike | None = None) -> dict:
    """Renders a synthetic screen into `out_dir` in the raw layout (RAW_LAYOUT.md).

    Args:
      preset: a preset name (presets.PRESETS) or a preset ConfigDict.
      scale: tiny, small or full with a preset name; None (or the config's) with a ConfigDict.
      out_dir: must not exist or be empty. The screen is written to a temporary sibling and
        renamed at the end, so an interrupted build leaves no partial screen.
      seed: draws cells, technical effects and noise; the design does not depend on it.
      progress: show a progress bar over sites.
      workers: processes rendering sites; default 2 (1 for small screens). Does not change
        the result.
      shared_data: directory of the BBBC021 / JUMP tables; overrides the config's
        `shared_data` (default: $MORPHJAX_SHARED_DATA, else <repo>/../shared/data).

    Returns:
      Summary: n_sites, n_cells, n_perturbations, n_plates, n_wells, seconds, out_dir, and
      excluded (shared-data rows left out, e.g. compounds without SMILES).
    """
    start = time.perf_counter()
    config = _resolve(preset, scale)
    if shared_data is not None:
        config = ml_collections.ConfigDict(config)  # A copy: the caller's config is unchanged.
        config.shared_data = os.fspath(shared_data)
    validate_config(config)
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"Output directory {out_dir} exists and is not empty; remove it or "
                              "choose another --out.")

    world = perturbations_lib.build_library(config)
    library = perturbations_lib.select_for_scale(world, config)
    wells = layout_screen(config, library)
    technical, batch_shift = plate_effects(config, wells, seed)
    response = {line: cell_line_response(config, line) for line in config.cell_lines.keys()}
    baselines = {line: phenotype.phenotype_vector(dict(spec.baseline))
                 for line, spec in config.cell_lines.items()}
    image_size = tuple(int(s) for s in config.image_size)
    table = library.table

    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    tasks, index_rows = [], []
    for w in wells.itertuples(index=False):
        line = config.cell_lines[w.cell_line]
        activity = float(library.activity(w.row, w.dose)) if w.dose > 0 else 1.0
        effect = library.effects[w.row] * activity * response[w.cell_line]
        expected = render.expected_cell_count(
            image_size, config.cells.cell_scale * line.cell_scale,
            config.cells.density * line.density)
        for site in range(1, config.layout.sites_per_well + 1):
            paths = [f"{w.plate}/{w.well}_s{site}_{ch}.png" for ch in config.channels]
            index_rows.append(dict(
                Metadata_Plate=w.plate, Metadata_Well=w.well, Metadata_Site=site,
                **dict(zip(config.channels, paths)),
                Metadata_Perturbation=table["perturbation"].iloc[w.row],
                Metadata_Batch=w.batch, Metadata_CellLine=w.cell_line, Metadata_Dose=w.dose,
                Metadata_Replicate=w.replicate, Metadata_MoA=table["moa"].iloc[w.row],
                Metadata_Modality=w.modality))
            tasks.append(dict(
                seed=seed, key=(w.plate_index, w.well_row, w.well_column, site),
                technical=technical[w.plate_index],
                out_of_focus_fraction=config.technical.out_of_focus_fraction,
                defocus_sigma=config.technical.defocus_sigma, expected_cells=expected,
                baseline=baselines[w.cell_line] + batch_shift[w.batch_index], effect=effect,
                penetrance=float(library.penetrance[w.row]), heterogeneity=line.heterogeneity,
                response_sd=config.cells.response_sd, channels=tuple(config.channels),
                image_size=image_size, cell_scale=config.cells.cell_scale * line.cell_scale,
                root=str(tmp_dir), image_paths=paths,
                locations_path=f"locations/{w.plate}/{w.well}-{site}-Nuclei.csv"))

    if workers is None:
        workers = 1 if len(tasks) < 24 else min(2, os.cpu_count() or 1)
    try:
        tmp_dir.mkdir(parents=True)
        bar = tqdm(total=len(tasks), disable=not progress, unit="site",
                   desc=f"{config.preset} {config.scale}")
        results = []
        if workers <= 1:
            for task in tasks:
                results.append(_simulate_site(task))
                bar.update()
        else:
            context = multiprocessing.get_context("spawn")  # No fork of a JAX-holding parent.
            pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
            try:
                for result in pool.map(_simulate_site, tasks, chunksize=4):
                    results.append(result)
                    bar.update()
            finally:  # On an error or Ctrl-C, drop queued sites instead of rendering them.
                pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        summary = _write_tables(tmp_dir, config, seed, library, wells, index_rows, tasks,
                                results)
        if out_dir.exists():
            out_dir.rmdir()  # Empty, checked above.
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    summary.update(seconds=round(time.perf_counter() - start, 2), out_dir=str(out_dir))
    return summary


def _write_tables(root: Path, config, seed, library, wells, index_rows, tasks, results
                  ) -> dict:
    names = phenotype.PHENOTYPE
    index = pd.DataFrame(index_rows)
    mio.atomic_write_text(root / "index.csv", index.to_csv(index=False))

    cells = []
    for row, result in zip(index_rows, results):
        n = len(result["centres"])
        frame = pd.DataFrame(result["phenotypes"].reshape(n, len(names)),
                             columns=[f"phenotype_{p}" for p in names])
        frame.insert(0, "responder", result["responder"].astype(np.int64))
        frame.insert(0, "y", result["centres"][:, 1])
        frame.insert(0, "x", result["centres"][:, 0])
        for k, key in enumerate(("Metadata_Plate", "Metadata_Well", "Metadata_Site")):
            frame.insert(k, key, row[key])
        cells.append(frame)
    cells = pd.concat(cells, ignore_index=True)
    # x, y exactly as written in the locations files.
    cells_xy = cells.copy()
    cells_xy["x"] = cells["x"].map(lambda v: _COORD_FORMAT % v)
    cells_xy["y"] = cells["y"].map(lambda v: _COORD_FORMAT % v)
    text = cells_xy.to_csv(index=False, float_format=_PHENOTYPE_FORMAT)
    mio.atomic_write_text(root / "ground_truth" / "cells.csv", text)

    sites = index[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].copy()
    sites["n_cells_rendered"] = [r["n_cells"] for r in results]
    sites["n_cells_in_view"] = [len(r["centres"]) for r in results]
    sites["out_of_focus"] = [int(r["out_of_focus"]) for r in results]
    sites["blur_sigma"] = [r["blur_sigma"] for r in results]
    for key in ("photon_scale", "read_noise", "vignetting"):
        sites[key] = [getattr(t["technical"], key) for t in tasks]
    for axis, name in enumerate(("gradient_x", "gradient_y")):
        sites[name] = [t["technical"].gradient[axis] for t in tasks]
    for c, channel in enumerate(config.channels):
        sites[f"gain_{channel}"] = [t["technical"].gain[c] for t in tasks]
        sites[f"offset_{channel}"] = [t["technical"].offset[c] for t in tasks]
    mio.atomic_write_text(root / "ground_truth" / "sites.csv",
                          sites.to_csv(index=False, float_format="%.6g"))

    table = library.table
    mio.atomic_write_text(root / "perturbations.csv", table.to_csv(index=False))
    truth = table[["perturbation"]].copy()
    truth["mechanism"] = library.mechanism
    truth["tier"] = library.tier
    truth["penetrance"] = library.penetrance
    truth["strength"] = np.linalg.norm(library.effects, axis=1)
    truth["ec50"] = library.ec50
    truth["hill"] = library.hill
    for k, p in enumerate(names):
        truth[f"effect_{p}"] = library.effects[:, k]
    mio.atomic_write_text(root / "ground_truth" / "perturbations.csv",
                          truth.to_csv(index=False, float_format="%.6g"))
    mio.atomic_write_bytes(root / "expression.npy", _npy_bytes(library.expression))
    genes = library.screen_genes()
    if genes:
        mio.atomic_write_bytes(root / "gene_embeddings.npy",
                               _npy_bytes(library.gene_embedding_rows(genes)))

    summary = dict(n_sites=len(index), n_cells=int(len(cells)), n_perturbations=len(table),
                   n_plates=int(wells["plate"].nunique()), n_wells=len(wells),
                   excluded=len(library.notes) and "; ".join(library.notes) or "none")
    screen = dict(
        name=config.preset, channels=list(config.channels), image_size=list(config.image_size),
        bit_depth=16, seed=int(seed), preset=config.preset, scale=config.scale,
        design_seed=int(config.design_seed), phenotype=list(names), genes=genes,
        cell_lines=list(config.cell_lines.keys()), batches=sorted(set(wells["batch"])),
        n_sites=summary["n_sites"], n_cells=summary["n_cells"],
        n_perturbations=summary["n_perturbations"], notes=library.notes,
        config=config.to_dict())
    mio.atomic_write_json(root / "screen.json", screen)  # Last: its presence marks a screen.
    return summary


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()
