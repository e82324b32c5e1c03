"""Cell Painting CNN on the synthetic screen: weak supervision, sphering, MoA matching.

Follows cell_painting_cnn.txt on the small bbbc021_like screen (35 compounds in 12 MoAs, DMSO on
every plate; the demo dataset):
  1. train the CNN on every treatment (`configs/cpcnn.py:synthetic`, leave-cells-out);
  2. rank treatments by their effect (paper "Measuring treatment effect": classical features,
     sphered with lambda 1e-2, z-scored distance to the plate's control median) and train a second
     CNN on the strongest 20% only (Fig. 3 idea);
  3. single-cell features of every (sub-sampled) cell from: classical features, both CNNs and a
     random-init CNN of the same architecture;
  4. site median -> well mean -> sphering on DMSO wells -> treatment mean, maximum dose only;
  5. MoA matching on cosine similarity: interpolated MAP (paper), copairs mAP, folds of
     enrichment at the top 1%, precision@5 -- raw and sphered;
  6. the sphering lambda sweep (Fig. 6B) for every feature set, as a table and a plot.

`--multi-batch` runs the same on a screen where sphering has batch effects to remove: the same
compounds, effects and doses (same design), but small plate maps (18 treated + 6 DMSO wells), so
each compound sits on the plates of one map, and every plate is its own batch with RxRx1-strength
technical and biological batch effects. Compounds sharing plates then share batch artefacts,
which is what sphering on the controls is for (cell_painting_cnn.txt, "Batch correction").

  python experiments/cpcnn_synthetic.py --out experiments/results --workdir runs/cpcnn_synthetic
  python experiments/cpcnn_synthetic.py --multi-batch --steps 600 --strong-fraction 0
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pandas as pd

from morphjax import config as cfg
from morphjax.demo import CONFIGS, ensure_synthetic_screen
from morphjax import embed as embed_lib
from morphjax import profiling
from morphjax.profiling import evaluate as profile_eval

DATA = "runs/data/bbbc021_like_small"
MULTI_BATCH_DATA = "runs/data/bbbc021_like_multibatch"


def multi_batch_screen(data_dir: str) -> str:
    """The `--multi-batch` screen (see the module docstring) under `data_dir`, built once."""
    dataset = os.path.join(data_dir, "dataset")
    if not os.path.isdir(dataset):
        from data_builders.raw_screen import build_raw_screen  # noqa: PLC0415
        from data_builders.synthetic_screen import presets, simulate_screen  # noqa: PLC0415

        screen = presets.get_preset("bbbc021_like", "small")
        screen.layout.update(wells_per_plate=24, controls_per_plate=6, replicates=2,
                             n_batches=8, sites_per_well=2)
        screen.technical.update(gain_sd_batch=0.35, gain_sd_plate=0.08, offset_sd=0.6,
                                gradient_sd=0.2, batch_phenotype_shift=0.3)
        simulate_screen(screen, None, os.path.join(data_dir, "raw"), seed=0)
        build_raw_screen(os.path.join(data_dir, "raw"), dataset)
    return dataset
LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def subsample(cells: pd.DataFrame, per_site: int, seed: int = 0) -> pd.DataFrame:
    """At most `per_site` cells of every field of view (seeded), in field-of-view order."""
    rng = np.random.default_rng(seed)
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    order = rng.permutation(len(cells))
    shuffled = cells.iloc[order]
    kept = shuffled[shuffled.groupby(keys).cumcount() < per_site]
    return cells.loc[np.sort(kept.index)].reset_index(drop=True)


def train_cnn(dataset: str, workdir: str, steps: int, include: tuple[str, ...] = ()):
    from morphjax.train import loop  # noqa: PLC0415
    overrides = [f"data.path={dataset}", f"train.total_steps={steps}",
                 f"train.checkpoint_every={max(1, steps // 3)}",
                 f"train.eval_every={steps}"]
    config = cfg.load_config(os.path.join(CONFIGS, "cpcnn.py") + ":synthetic", overrides)
    config.data.include = include
    loop.train(config, workdir)


def cnn_table(workdir: str, cells: pd.DataFrame, random_init: bool = False) -> pd.DataFrame:
    from morphjax.runs import load_run  # noqa: PLC0415
    from morphjax.train.cpcnn import MODEL, prepare_crop  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    run = load_run(workdir)
    task, c = run.task, run.config
    backbone = run.state.models[MODEL].backbone
    if random_init:
        backbone = task.build_backbone(nnx.Rngs(c.seed + 1), task.num_classes)
    fn, params = embed_lib.cnn_feature_fn(backbone, c.model.feature_layer)
    index, size = task.cellset.channel_index, c.data.image_size
    crop = c.data.crop_size
    features, rate = embed_lib.extract_features(
        fn, params, c.data.path, cells,
        lambda ex: prepare_crop(ex["image"], index, size, crop), batch_size=256)
    name = "random_cnn" if random_init else "cnn"
    print(f"{workdir}{' (random init)' if random_init else ''}: {rate:.1f} cells/s")
    return _table(cells, features, name)


def classical_table(dataset: str, cells: pd.DataFrame, channels: tuple[str, ...]) -> pd.DataFrame:
    import jax  # noqa: PLC0415
    from morphjax.features import get_extractor  # noqa: PLC0415

    extractor = get_extractor("classical", channel_names=channels, nucleus_channel="DNA",
                              cell_channel="Actin" if "Actin" in channels else None)
    apply = jax.jit(lambda _, x: extractor.apply(x * 2.0 - 1.0))
    features, rate = embed_lib.extract_features(
        apply, {}, dataset, cells, lambda ex: ex["image"].astype(np.float32) / 255.0,
        batch_size=128)
    print(f"classical features: {rate:.1f} cells/s")
    keep = np.isfinite(features).all(0) & (features.std(0) > 0)
    return _table(cells, features[:, keep], "classical")


def _table(cells: pd.DataFrame, features: np.ndarray, model: str) -> pd.DataFrame:
    meta = embed_lib.cells_metadata(cells, model)
    names = [f"{model}_{i}" for i in range(features.shape[1])]
    return pd.concat([meta, pd.DataFrame(features, columns=names)], axis=1)


def max_dose(table: pd.DataFrame) -> pd.DataFrame:
    """Each compound at its maximum concentration, plus controls (paper, benchmarks)."""
    top = table.groupby("Metadata_Perturbation")["Metadata_Dose"].transform("max")
    return table[(table["Metadata_Dose"] == top) | (table["Metadata_is_control"] == 1)]


def evaluate_features(name: str, cells: pd.DataFrame, lam: float
                      ) -> tuple[list[dict], pd.DataFrame]:
    """Matching metrics of raw and sphered treatment profiles, and the lambda sweep."""
    result = profiling.profile(max_dose(cells), lam=lam)
    raw = profiling.aggregate(result["well"], "Metadata_Perturbation", "mean",
                              profiling.feature_columns(result["well"]))
    rows = []
    for kind, table in (("raw", raw), ("sphered", result["treatment"])):
        metrics = profile_eval.matching_metrics(table, label="Metadata_MoA")
        rows.append({"features": name, "profiles": kind, "lambda": lam if kind == "sphered"
                     else float("nan"), **metrics})
    sweep = profile_eval.lambda_sweep(result["well"], lambdas=LAMBDAS, label="Metadata_MoA")
    sweep.insert(0, "features", name)
    return rows, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--multi-batch", action="store_true",
                        help="the multi-batch screen of the module docstring")
    parser.add_argument("--data", default=None, help=f"default {DATA} ({MULTI_BATCH_DATA})")
    parser.add_argument("--workdir", default=None,
                        help="default runs/cpcnn_synthetic(_multibatch)")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per CNN")
    parser.add_argument("--cells-per-site", type=int, default=40)
    parser.add_argument("--strong-fraction", type=float, default=0.2,
                        help="train a CNN on this fraction of strongest treatments (0: skip)")
    parser.add_argument("--lam", type=float, default=1e-2, help="sphering lambda of the main table")
    args = parser.parse_args()
    suffix = "_multibatch" if args.multi_batch else ""
    args.workdir = args.workdir or f"runs/cpcnn_synthetic{suffix}"
    os.makedirs(args.out, exist_ok=True)
    if args.multi_batch:
        dataset = multi_batch_screen(args.data or MULTI_BATCH_DATA)
    else:
        dataset = ensure_synthetic_screen(args.data or DATA)
    from morphjax.train.cpcnn import select_cells  # noqa: PLC0415

    config = cfg.load_config(os.path.join(CONFIGS, "cpcnn.py") + ":synthetic",
                             [f"data.path={dataset}"])
    channels = select_cells(config).channel_names
    cells = subsample(embed_lib.embedding_cells(dataset, ("train", "test")), args.cells_per_site)
    print(f"{len(cells)} cells ({args.cells_per_site} per site at most)")

    classical_path = os.path.join(args.workdir, "classical_cells.parquet")
    if os.path.isfile(classical_path):  # Features of a previous run of this script.
        tables = {"classical": profiling.read_table(classical_path)}
    else:
        tables = {"classical": classical_table(dataset, cells, channels)}
        profiling.write_table(tables["classical"], classical_path)
    strength = profile_eval.treatment_effect(
        profiling.profile(max_dose(tables["classical"]), lam=1e-2)["well_sphered"])
    strong = ()
    if args.strong_fraction > 0:
        n_strong = max(2, int(round(args.strong_fraction * len(strength))))
        strong = tuple(strength["Metadata_Perturbation"].head(n_strong))
        print(f"strongest {n_strong} treatments: {', '.join(strong)}")

    all_dir = os.path.join(args.workdir, "all_treatments")
    strong_dir = os.path.join(args.workdir, "strong_treatments")
    train_cnn(dataset, all_dir, args.steps)
    if strong:
        doses = max_dose(tables["classical"])
        dose_of = doses.groupby("Metadata_Perturbation")["Metadata_Dose"].first()
        train_cnn(dataset, strong_dir, args.steps,
                  include=tuple(f"{t}@{dose_of[t]}" for t in strong))
    tables["cnn_all"] = cnn_table(all_dir, cells)
    if strong:
        tables["cnn_strong"] = cnn_table(strong_dir, cells)
    tables["cnn_random_init"] = cnn_table(all_dir, cells, random_init=True)

    rows, sweeps = [], []
    for name, table in tables.items():
        r, sweep = evaluate_features(name, table, args.lam)
        rows += r
        sweeps.append(sweep)
    results = pd.DataFrame(rows)
    sweep = pd.concat(sweeps, ignore_index=True)
    results.to_csv(os.path.join(args.out, f"cpcnn_synthetic{suffix}_cpu.csv"), index=False)
    sweep.to_csv(os.path.join(args.out, f"cpcnn_synthetic{suffix}_lambda_sweep.csv"), index=False)
    for name, part in sweep.groupby("features", sort=False):
        profile_eval.plot_lambda_sweep(
            part, os.path.join(args.out, f"cpcnn_synthetic{suffix}_lambda_sweep_{name}.png"))
    strength.to_csv(os.path.join(args.out, f"cpcnn_synthetic{suffix}_treatment_effect.csv"),
                    index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(results.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    with open(os.path.join(args.out, f"cpcnn_synthetic{suffix}_cpu.json"), "w") as f:
        json.dump({"cells": len(cells), "strong": list(strong), "steps": args.steps,
                   "lambda": args.lam}, f, indent=2)


if __name__ == "__main__":
    main()
