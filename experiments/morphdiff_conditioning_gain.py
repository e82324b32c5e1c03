"""Does a MorphDiff U-Net use its expression vector? The conditioning gain of one or more runs.

For the same held-out real cells (test split of seen perturbations, every split of unseen ones),
`morphdiff_eval.conditioning_gain`: the denoising loss under a random control's expression
context minus under the cell's own, same noise and timesteps. 0 = the condition is ignored.
Cheaper than sampling, and it separates what the U-Net learned from what the decoder renders.
Writes experiments/results/morphdiff_conditioning_gain_cpu.md.

  python experiments/morphdiff_conditioning_gain.py runs/md_ldm2 runs/md_ldm_learned runs/md_ldm3
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from morphjax import morphdiff_eval
from morphjax.runs import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="diffusion workdirs, each optionally :STEP")
    parser.add_argument("--cells", type=int, default=1024, help="held-out cells (one draw for all)")
    parser.add_argument("--repeats", type=int, default=4, help="noisings per cell")
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
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "morphdiff_conditioning_gain_cpu.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
