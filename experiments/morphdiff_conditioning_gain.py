"""Does a MorphDiff U-Net use its expression vector? The conditioning gain of one or more runs.

For the same held-out real cells (test split of seen perturbations, every split of unseen ones),
`morphdiff_eval.conditioning_gain`: the denoising loss under a random control's expression
context minus under the cell's own, same noise and timesteps. 0 = the condition is ignored.
Cheaper than sampling, and it separates what the U-Net learned from what the decoder renders.

`--oracle` adds, for the seen perturbations, the same gain for a reference denoiser that knows
the data: each perturbation's training latents as a diagonal Gaussian (its mean, the pooled
within-perturbation variance), denoised in closed form (posterior mean of x0 given x_t), under
the cell's own mean vs the controls' mean. It is what a per-perturbation mean shift is worth
on held-out cells, i.e. how much of the loss the expression vector can explain at all.
Writes experiments/results/morphdiff_conditioning_gain_cpu.md.

  python experiments/morphdiff_conditioning_gain.py runs/md_ldm2 runs/md_ldm_learned runs/md_ldm3
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from morphjax import morphdiff_eval
from morphjax.runs import Run, load_run


def _means(cache, indices: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Posterior means of cached cells, flattened."""
    out = []
    for start in range(0, len(indices), chunk):
        moments = cache.moments(indices[start:start + chunk])
        out.append(np.split(moments, 2, axis=-1)[0].reshape(len(moments), -1))
    return np.concatenate(out)


def gaussian_oracle_gain(run: Run, cells, repeats: int, seed: int) -> tuple[np.ndarray, float]:
    """Per-cell gain of the closed-form diagonal-Gaussian denoiser (see the module docstring),
    L1 eps loss, t uniform as in training; and its mean control-context loss."""
    c, spec, task = run.config, run.task.spec, run.task
    scale = float(run.state.eval_model("ldm").scale_factor.get_value())
    train_rows = spec.training_rows(c.data.train_split)
    train = _means(task.latent_cache(c.data.train_split), train_rows["split_index"].to_numpy())
    train *= scale
    ids = train_rows["perturbation_id"].to_numpy()
    means = {p: train[ids == p].mean(0) for p in np.unique(ids)}
    within = np.concatenate([train[ids == p] - m for p, m in means.items()]).var(0)
    control = train[spec.is_control[ids]].mean(0)
    del train
    cells = cells.sort_values("split", kind="stable")
    x0 = np.concatenate([_means(task.latent_cache(split), g["split_index"].to_numpy())
                         for split, g in cells.groupby("split", sort=True)]) * scale
    own = np.stack([means[p] for p in cells["perturbation_id"]])
    alpha_bar = np.asarray(task.schedule.alphas_cumprod)
    rng = np.random.default_rng(seed)
    gains, losses = np.zeros(len(x0)), []
    for _ in range(repeats):
        ab = alpha_bar[rng.integers(len(alpha_bar), size=len(x0))][:, None]
        a, s = np.sqrt(ab), np.sqrt(1 - ab)
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        xt = a * x0 + s * eps

        def loss(mean):
            x0_hat = mean + a * within / (a * a * within + s * s) * (xt - a * mean)
            return np.abs((xt - a * x0_hat) / s - eps).mean(1)

        base = loss(control)
        gains += (base - loss(own)) / repeats
        losses.append(base.mean())
    return gains, float(np.mean(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="diffusion workdirs, each optionally :STEP")
    parser.add_argument("--cells", type=int, default=1024, help="held-out cells (one draw for all)")
    parser.add_argument("--repeats", type=int, default=4, help="noisings per cell")
    parser.add_argument("--oracle", action="store_true",
                        help="also the closed-form Gaussian denoiser's gain (seen perturbations)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()

    lines = ["# MorphDiff conditioning gain (CPU)", "", f"Command: `python {' '.join(sys.argv)}`",
             "", f"{args.cells} held-out cells, {args.repeats} noisings each; gain = loss under "
             "a control's expression - loss under the cell's own (same noise, t); relative = "
             "gain / the control-context loss.", "",
             "| run | step | conditioning | group | perturbations | cells | gain | standard error "
             "| relative |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for arg in args.runs:
        workdir, _, step = arg.partition(":")
        run = load_run(workdir, step=int(step) if step else None)
        spec = run.task.spec
        pool = morphdiff_eval.held_out_cells(spec, run.config.data.eval_split)
        pool = pool[~spec.is_control[pool["perturbation_id"]]]
        if len(pool) < args.cells:
            raise ValueError(f"{workdir}: {len(pool)} held-out treated cells, fewer than "
                             f"--cells {args.cells}")
        rng = np.random.default_rng(args.seed)
        pool = pool.iloc[np.sort(rng.choice(len(pool), args.cells, replace=False))]
        gains = morphdiff_eval.conditioning_gain(run, pool, repeats=args.repeats, seed=args.seed)
        summary = morphdiff_eval.summarize_gain(gains, {"seen": spec.seen,
                                                        "unseen": spec.unseen})
        for group, g in summary.items():
            lines.append(f"| `{workdir}` | {run.step} | {run.config.conditioning.mode} | {group} "
                         f"| {g['n_perturbations']} | {g['cells']} | {g['gain']:.3g} | "
                         f"{g['gain_se']:.2g} | {100 * g['relative_gain']:.3f}% |")
        print("\n".join(lines[-len(summary):]), flush=True)
        if args.oracle:
            seen = pool[np.isin(pool["perturbation_id"], spec.seen)]
            gain, base = gaussian_oracle_gain(run, seen, args.repeats, args.seed)
            lines.append(f"| `{workdir}` Gaussian reference | - | per-perturbation mean | seen | "
                         f"{seen['perturbation_id'].nunique()} | {len(seen)} | "
                         f"{gain.mean():.3g} | {gain.std(ddof=1) / np.sqrt(len(gain)):.2g} | "
                         f"{100 * gain.mean() / base:.3f}% |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "morphdiff_conditioning_gain_cpu.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
