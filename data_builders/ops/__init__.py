"""Optical pooled screen builder (Funk et al. 2022 HeLa essential genes; GRAPE 4.1).

Layout, barcode assignment and perturbation levels are in reader.py's docstring; z-scoring by
the non-targeting cells of each batch (grape.txt 3.2) in zscore.py. After `build_raw_screen`,
`finish` writes OUT/zscore_by_batch.csv and OUT/cell_assignment.json.

Illumination default: GRAPE corrects a retrospective flat field and then rescales each
channel between its 0.1 and 99.9 percentiles (grape.txt 3.2): the "deepprofiler" plate
illumination function with the stretch at (0.1, 99.9).
"""

import argparse
import json
import os
from typing import Any

from data_builders.raw_screen import build_raw_screen, layout
from data_builders.ops.reader import CHANNELS, CONTROL_GENES, LEVELS, read_ops, read_ops_tile
from data_builders.ops.zscore import write_zscore_statistics, zscore, zscore_statistics

NAME = "ops"
SUMMARY = "Optical pooled CRISPR screen, HeLa essential genes (Funk 2022; GRAPE)"
NEEDS = ("cells.csv|.parquet (well, tile, cell, i, j, sgRNA_0, gene_symbol_0, "
         "cell_barcode_count_0) + images/[{plate}/]{mag}_{well}_Tile-{tile}.phenotype.tif "
         "(4 pages)")
DEFAULTS = dict(crop_size=96, illumination="deepprofiler", stretch_percentiles=(0.1, 99.9))
ASSIGNMENT_FILE = "cell_assignment.json"

__all__ = ["CHANNELS", "DEFAULTS", "NAME", "NEEDS", "SUMMARY", "add_arguments", "build_ops",
           "finish", "read", "read_ops", "read_ops_tile", "zscore", "zscore_statistics"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells-table", default=None,
                        help="per-cell table (default: cells.csv, cells.csv.gz or cells.parquet)")
    parser.add_argument("--magnification", default="20X",
                        help="{mag} of the phenotype file names (default 20X)")
    parser.add_argument("--level", choices=LEVELS, default="gene",
                        help="perturbation = gene symbol (GRAPE) or sgRNA")
    parser.add_argument("--min-barcode-count", type=float, default=1,
                        help="reads needed for a cell's top barcode (cell_barcode_count_0)")
    parser.add_argument("--gene", dest="genes", action="append", default=[],
                        help="keep only cells of this gene (+ controls); repeat for several")
    parser.add_argument("--control-gene", dest="control_genes", action="append", default=None,
                        help=f"gene symbol of non-targeting guides (default {CONTROL_GENES})")


def read(raw_dir: str, args: argparse.Namespace) -> layout.RawScreen:
    return read_ops(
        raw_dir, cells_table=args.cells_table, magnification=args.magnification,
        level=args.level, min_barcode_count=args.min_barcode_count, genes=args.genes,
        control_genes=tuple(args.control_genes or CONTROL_GENES))


def finish(out_dir: str | os.PathLike, screen: layout.RawScreen) -> None:
    """After the build: the barcode-assignment counts and the per-batch z-score statistics."""
    out_dir = os.fspath(out_dir)
    with open(os.path.join(out_dir, ASSIGNMENT_FILE), "w") as f:
        json.dump(screen.spec["notes"]["cell_assignment"], f, indent=1)
    write_zscore_statistics(out_dir)


def build_ops(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              read_options: dict[str, Any] | None = None, **build_options) -> dict[str, Any]:
    """read_ops + build_raw_screen (DEFAULTS overridden by `build_options`) + finish."""
    screen = read_ops(raw_dir, **(read_options or {}))
    report = build_raw_screen(screen, out_dir, **{**DEFAULTS, **build_options})
    finish(out_dir, screen)
    return report
