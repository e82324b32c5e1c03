"""RxRx1 builder: the RxRx1 release (rxrx1/metadata.csv + images/) -> single-cell crops.

The on-disk layout, the mapping to plates/batches/perturbations and the bit-depth rule are in
reader.py's docstring. IMPA's batch-correction setting is `--cell-type U2OS` (impa.txt, "RxRx1").

Illumination default "deepprofiler": IMPA corrects RxRx1 illumination within each plate before
Otsu segmentation; the release PNGs are 8-bit with a near-zero background, where the "impa"
log-ratio to a 10th-percentile flat field (floored at 1 count) saturates most nuclei, while
DeepProfiler's plate mean illumination function followed by a per-image percentile stretch
keeps the 8-bit range.
"""

import argparse

from data_builders.raw_screen import layout
from data_builders.rxrx1.reader import CHANNELS, DNA_CHANNEL, read_rxrx1

NAME = "rxrx1"
SUMMARY = "RxRx1 siRNA screen, 4 cell types, 51 experiments (Recursion 2019; IMPA batch corr.)"
NEEDS = ("rxrx1/metadata.csv and rxrx1/images/{experiment}/Plate{plate}/{well}_s{site}_w{1..6}.png "
         "(512x512 8-bit greyscale)")
DEFAULTS = dict(crop_size=96, illumination="deepprofiler")

__all__ = ["CHANNELS", "DEFAULTS", "DNA_CHANNEL", "NAME", "NEEDS", "SUMMARY", "add_arguments",
           "read", "read_rxrx1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cell-type", dest="cell_types", action="append", default=[],
        help="keep this cell type (HEPG2, HUVEC, RPE, U2OS); repeat for several. IMPA: U2OS.")
    parser.add_argument(
        "--experiment", dest="experiments", action="append", default=[],
        help="keep this experiment (e.g. U2OS-01); repeat for several.")
    parser.add_argument(
        "--no-positive-controls", dest="include_positive_controls", action="store_false",
        help="leave out the positive-control siRNA wells (kept by default, as in IMPA).")
    parser.add_argument("--nuclei-sigma", type=float, default=2.0,
                        help="Gaussian smoothing of the Hoechst channel before Otsu (pixels).")
    parser.add_argument("--nuclei-min-distance", type=int, default=7,
                        help="minimum distance between two nucleus centres (pixels).")
    parser.add_argument("--nuclei-min-area", type=int, default=30,
                        help="smallest nucleus kept (pixels).")


def read(raw_dir: str, args: argparse.Namespace) -> layout.RawScreen:
    return read_rxrx1(
        raw_dir, cell_types=args.cell_types, experiments=args.experiments,
        include_positive_controls=args.include_positive_controls,
        workers=getattr(args, "workers", None), progress=getattr(args, "progress", False),
        nuclei_sigma=args.nuclei_sigma, nuclei_min_distance=args.nuclei_min_distance,
        nuclei_min_area=args.nuclei_min_area)
