"""Streams a 100k-crop build: the raw-screen builder's throughput and memory at scale.

Renders (once) a bbbc021_like screen nine replicate plates deep with four fields per well
(~2,900 fields of view, ~100k nuclei) and builds it with `morphjax bench build`'s timing, next
to the small demo screen (~11k crops). Memory that stays flat from 11k to 100k crops is what
"streams" means here: crops go to ArrayRecord shards as they are cut, and only per-cell ids
stay in memory.

  python experiments/build_100k.py --workers 1 2
"""

from __future__ import annotations

import argparse
import os

import pandas as pd

from morphjax.bench_build import bench_build

SMALL_RAW = "runs/data/bbbc021_like_small/raw"
LARGE_RAW = "runs/data/bbbc021_like_100k/raw"


def large_screen(raw_dir: str) -> str:
    if not os.path.isdir(raw_dir):
        from data_builders.synthetic_screen import presets, simulate_screen  # noqa: PLC0415

        screen = presets.get_preset("bbbc021_like", "small")
        screen.layout.update(replicates=9, sites_per_well=4, n_batches=3)
        simulate_screen(screen, None, raw_dir, seed=0)
    return raw_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="experiments/results/bench_build_cpu.csv")
    args = parser.parse_args()
    tables = []
    for name, raw in (("small", SMALL_RAW), ("100k", large_screen(LARGE_RAW))):
        table = bench_build(raw, workers=args.workers)
        table.insert(0, "screen", name)
        tables.append(table)
    pd.concat(tables).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
