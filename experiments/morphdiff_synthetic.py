"""MorphDiff on a small synthetic screen: both stages, then the evaluation.

`--preset synthetic` (default) is the cellpainting_like screen, `--preset synthetic_bbbc021` the
bbbc021_like one (configs/morphdiff.py):
  1. the KL autoencoder (`configs/morphdiff.py:PRESET,autoencoder`), resumed if interrupted;
  2. the latent diffusion model on its frozen latents (`configs/morphdiff.py:PRESET`);
  3. `morphdiff_eval.evaluate_run`: G2I | I2I (| IMPA) | AE round trip | controls via AE |
     controls per group (seen / unseen, all / strong) in the classical space (and CP-CNN /
     Inception when given), retrieval of real profiles by generated ones, and sample grids of
     the 3 strongest unseen perturbations.
Writes experiments/results/morphdiff_PRESET_cpu.md and .json.

  python experiments/morphdiff_synthetic.py
  python experiments/morphdiff_synthetic.py --preset synthetic_bbbc021 --ae-workdir runs/md_ae_bb \
      --ldm-workdir runs/md_ldm_bb
  python experiments/morphdiff_synthetic.py --skip-train --samples 32 --impa-workdir runs/impa_cp
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from morphjax import config as cfg
from morphjax.demo import CONFIGS

PRESETS = ("synthetic", "synthetic_bbbc021")


def train_stage(preset: str, stage: str, dataset: str, workdir: str, steps: int | None,
                autoencoder: str | None = None) -> None:
    from morphjax.train import loop  # noqa: PLC0415

    overrides = [f"data.path={dataset}"] + ([f"train.total_steps={steps}"] if steps else [])
    if autoencoder:
        overrides.append(f"model.autoencoder={autoencoder}")
    arg = f"{preset},autoencoder" if stage == "autoencoder" else preset
    config = cfg.load_config(os.path.join(CONFIGS, "morphdiff.py") + ":" + arg, overrides)
    print(f"training {stage} ({config.train.total_steps} steps) in {workdir}")
    loop.train(config, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="synthetic", choices=PRESETS)
    parser.add_argument("--data", default=None, help="default: the preset's data.path")
    parser.add_argument("--ae-workdir", default="runs/md_ae")
    parser.add_argument("--ldm-workdir", default="runs/md_ldm")
    parser.add_argument("--steps-ae", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps-ldm", type=int, default=None, help="default: the preset's")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the runs as they are")
    parser.add_argument("--samples", type=int, default=None,
                        help="cells per perturbation and kind (default eval.samples_per_perturbation)")
    parser.add_argument("--modes", default="g2i,i2i")
    parser.add_argument("--max-seen", type=int, default=None,
                        help="evaluate every unseen perturbation but only this many seen ones")
    parser.add_argument("--impa-workdir", default=None,
                        help="an IMPA run on the same dataset, evaluated side by side")
    parser.add_argument("--cpcnn-run", default=None, help="a Cell Painting CNN run (feature space)")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--eval-dir", default=None, help="default LDM_WORKDIR/evaluation")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default the run's; MorphDiff: 1); "
                             "needs an LDM trained with loss.cond_drop_prob > 0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    screen = "bbbc021_like" if args.preset == "synthetic_bbbc021" else "cellpainting_like"
    if args.data is None:
        args.data = cfg.load_config(os.path.join(CONFIGS, "morphdiff.py") + ":"
                                    + args.preset).data.path
    if not os.path.isdir(args.data):
        raise SystemExit(f"{args.data} does not exist; build it with `morphjax build "
                         f"synthetic_screen --preset {screen} --scale small --out "
                         f"{os.path.dirname(os.path.abspath(args.data))}`")
    if not args.skip_train:
        train_stage(args.preset, "autoencoder", args.data, args.ae_workdir, args.steps_ae)
        train_stage(args.preset, "ldm", args.data, args.ldm_workdir, args.steps_ldm,
                    autoencoder=args.ae_workdir)

    from morphjax import morphdiff_eval, morphdiff_sample  # noqa: PLC0415

    eval_dir = args.eval_dir or os.path.join(args.ldm_workdir, "evaluation")
    modes = tuple(m for m in args.modes.split(",") if m)
    result = morphdiff_eval.evaluate_run(
        args.ldm_workdir, eval_dir, cpcnn_run=args.cpcnn_run,
        inception_weights=args.inception_weights, samples_per_perturbation=args.samples,
        modes=modes, seed=args.seed, impa_workdir=args.impa_workdir, max_seen=args.max_seen,
        guidance_scale=args.guidance)

    per = result["feature_spaces"]["classical"]["per_perturbation"]
    unseen = [p for p in per if not result["perturbations"][p]["seen"]]
    strongest = sorted(unseen, key=lambda p: -per[p]["metrics"]["controls"]["fid"])[:3]
    run = morphdiff_sample.load(args.ldm_workdir, args.guidance)
    grids = []
    for p in strongest:
        for mode in modes:
            paths = morphdiff_sample.sample(run, result["perturbations"][p]["name"],
                                            os.path.join(eval_dir, "samples"), mode=mode,
                                            n=8, seed=args.seed)
            grids.append(paths["rgb"])

    command = "python " + " ".join(sys.argv)
    scale = result["run"]["guidance_scale"]
    stem = (f"morphdiff_{args.preset}" + (f"_guidance{scale:g}" if scale != 1 else "")
            + (f"_seed{args.seed}" if args.seed else "") + "_cpu")
    lines = [f"# MorphDiff on the {screen} small synthetic screen (CPU)", "",
             f"Command: `{command}`", "",
             f"LDM run: `{args.ldm_workdir}` (step {result['run']['step']}), autoencoder "
             f"`{args.ae_workdir}`; classifier-free guidance scale {scale:g}; "
             f"{result['run']['samples_per_perturbation']} cells per "
             "perturbation and kind. Columns: generated from the expression vector (G2I), "
             "test-split control cells transformed (I2I), "
             + ("IMPA on the same controls, " if args.impa_workdir else "")
             + "the real cells through the autoencoder (AE round trip: the ceiling the first "
             "stage sets), the controls through the autoencoder (controls via AE: no change as "
             "the decoder renders it) and the untransformed controls (the predict-no-change "
             "baseline). "
             "Lower FID / "
             "KID / MMD is better; strong = controls-vs-real FID at or above the group's "
             "`eval.strong_quantile`. Real cells: the test split for seen perturbations, "
             "every split for unseen ones (held out of both stages).", ""]
    for space, entry in result["feature_spaces"].items():
        lines += [f"## Feature space: {space} ({entry['label']})", "",
                  morphdiff_eval.summary_table(result, space), ""]
    if "inception_score" in result:
        lines += ["## Inception Score (all perturbations pooled; higher is better)", "",
                  "| kind | IS mean | IS std |", "|---|---:|---:|"]
        lines += [f"| {morphdiff_eval.KIND_TITLES.get(k, k)} | {v['mean']:.3f} | "
                  f"{v['std']:.3f} |" for k, v in result["inception_score"].items()] + [""]
    for space, why in result["skipped_spaces"].items():
        lines += [f"Feature space {space} skipped: {why}.", ""]
    lines += ["## Classical FID per perturbation (unseen first, strongest first)", "",
              morphdiff_eval.perturbation_table(result, "classical"), ""]
    lines += ["## Does the U-Net use the expression vector? (conditioning gain)", "",
              "Denoising L1 loss of the evaluated real cells' cached latents (4 noisings each, t "
              "uniform) under a random control's expression context minus under their own, "
              "same noise: 0 = the condition is ignored.", "",
              morphdiff_eval.gain_table(result), ""]
    lines += ["## Retrieval of real profiles (classical, z-scored on controls)", "",
              "Labels: moa, else complex (genetic), else first target gene (compounds).", "",
              morphdiff_eval.retrieval_table(result), "", "## Sample grids (control | generated "
              "| real), strongest unseen perturbations", ""]
    lines += [f"- `{g}`" for g in grids]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(text)
    summary = {space: entry["summary"] for space, entry in result["feature_spaces"].items()}
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump({"command": command, "run": result["run"], "summary": summary,
                   "retrieval": result.get("retrieval"), "grids": grids,
                   "metrics": os.path.join(eval_dir, "metrics.json")}, f, indent=2)


if __name__ == "__main__":
    main()
