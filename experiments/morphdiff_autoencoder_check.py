"""How far MorphDiff's first stage sits from real cells, before any diffusion is trained.

The latent diffusion model can only generate what the autoencoder decodes, so the round trip
decode(encode(x)) of real test cells bounds every generated-vs-real distance (the "rFID" of
latent-diffusion papers). This script measures it in the evaluation's classical feature space
(`impa_eval.Projection`, 32 dims) for one or more autoencoder runs, next to calibration rows on
the same cells: other real cells, real cells blurred by a 0.5 px Gaussian, real cells with
added noise. Writes experiments/results/morphdiff_autoencoder_check_SCREEN_cpu.md, SCREEN being
the folder that holds the runs' dataset (e.g. cellpainting_like_small).

  python experiments/morphdiff_autoencoder_check.py runs/md_ae2 runs/md_ae_f2:3000
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import scipy.ndimage as ndi

from morphjax import impa_eval, morphdiff_sample
from morphjax.runs import load_run
from morphjax.train import morphdiff as md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="autoencoder workdirs, each optionally :STEP")
    parser.add_argument("--cells", type=int, default=256, help="test cells per set")
    parser.add_argument("--dims", type=int, default=32, help="PCA dimensions (as the evaluation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()

    loaded = []
    for arg in args.runs:
        workdir, _, step = arg.partition(":")
        run = load_run(workdir, step=int(step) if step else None)
        if run.config.task != "morphdiff_autoencoder":
            raise ValueError(f"{workdir} is a {run.config.task!r} run, not a MorphDiff "
                             "autoencoder (configs/morphdiff.py:PRESET,autoencoder)")
        loaded.append((arg, run))
    first = loaded[0][1]
    spec, size = first.task.spec, first.config.data.image_size
    split = first.config.data.eval_split
    available = len(md.open_split(spec.dataset_dir, split))
    if available < 2 * args.cells:
        raise ValueError(f"--cells {args.cells}: the evaluation split has {available} cells, "
                         f"fewer than the 2 x {args.cells} needed")
    rng = np.random.default_rng(args.seed)
    cells = morphdiff_sample.read_cells(first, split,
                                        rng.choice(available, 2 * args.cells, replace=False))
    real, other = cells[:args.cells], cells[args.cells:]

    extractor = impa_eval.feature_extractors(first, ["classical"])["classical"]
    real_features = impa_eval.extract(extractor, real)
    other_features = impa_eval.extract(extractor, other)
    projection = impa_eval.Projection(np.concatenate([real_features, other_features]), args.dims)
    reference = projection(real_features)

    rows = []

    def add(name: str, features: np.ndarray, l1: float | None = None) -> None:
        scores = impa_eval.distribution_metrics(reference, projection(features), k=5,
                                                seed=args.seed)
        rows.append((name, l1, scores))
        print(f"{name}: FID {scores['fid']:.1f}", flush=True)

    def features_of(images: np.ndarray) -> np.ndarray:
        return impa_eval.extract(extractor, np.clip(images, -1.0, 1.0))

    add("other real cells", other_features)
    add("real cells, Gaussian blur sigma 0.5 px",
        features_of(ndi.gaussian_filter(real, (0, 0.5, 0.5, 0))))
    for sigma in (0.02, 0.05):
        add(f"real cells + N(0, {sigma}) noise",
            features_of(real + rng.normal(0, sigma, real.shape)))
    for arg, run in loaded:
        rec = morphdiff_sample.reconstruct(run, real, seed=args.seed)
        a = run.config.autoencoder
        loss = run.config.loss
        losses = ["L1"] + ([] if loss.perceptual == "none" else [loss.perceptual])
        if run.step > loss.disc_start:
            losses.append(f"GAN from step {loss.disc_start}")
        name = (f"`{arg}` round trip (step {run.step}, ch_mult {tuple(a.ch_mult)}, "
                f"z {a.z_channels}, {' + '.join(losses)})")
        add(name, features_of(rec), float(np.abs(rec - real).mean()))

    lines = ["# MorphDiff stage 1: autoencoder round trip vs real cells (classical features)", "",
             f"Command: `python experiments/morphdiff_autoencoder_check.py {' '.join(args.runs)}`",
             "",
             f"{args.cells} random test cells of `{spec.dataset_dir}` ({size} px) against: "
             f"{args.cells} other test cells, the same cells degraded, and their autoencoder "
             f"round trips. Classical features, variance-filtered, z-scored and projected to "
             f"{args.dims} PCA dimensions fitted on the real cells, as in the evaluation. "
             "L1 is the mean absolute round-trip error in [-1, 1]. KID is the unbiased "
             "polynomial-kernel MMD^2 (as torch-fidelity), negative when the "
             "two sets are closer than their sampling noise. Coverage: k = 5.", "",
             "| cells | L1 | FID | KID | coverage |", "|---|---:|---:|---:|---:|"]
    for name, l1, m in rows:
        lines.append(f"| {name} | {'' if l1 is None else f'{l1:.4f}'} | {m['fid']:.1f} | "
                     f"{m['kid']:.4g} | {m['coverage']:.3f} |")
    os.makedirs(args.out, exist_ok=True)
    screen = os.path.basename(os.path.dirname(os.path.normpath(spec.dataset_dir)))
    path = os.path.join(args.out, f"morphdiff_autoencoder_check_{screen}_cpu.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
