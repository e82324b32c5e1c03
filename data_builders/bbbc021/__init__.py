"""BBBC021 (Caie et al. 2010; Ljosa et al. 2012): MCF-7 cells, 113 compounds, DNA / Tubulin /
Actin, as published (raw.py: image table + 16-bit TIFFs) or as IMPA preprocessed it (impa.py:
one 96 x 96 x 3 uint8 .npy per cell, impa_reference.md §3.1).

Both layouts become a layout.RawScreen for raw_screen.build_raw_screen. IMPA's compound sets:
IMPA_SIX (the five-drug subset + DMSO, `subset="impa_six"`) and IMPA_OOD (unseen compounds,
`split="perturbations", holdout=IMPA_OOD`).
"""

import argparse
import glob
import os

from data_builders.bbbc021.impa import read_bbbc021_impa, sample_key_path
from data_builders.bbbc021.raw import CHANNELS, IMPA_OOD, IMPA_SIX, SUBSETS
from data_builders.bbbc021.raw import read_bbbc021
from data_builders.raw_screen import layout

NAME = "bbbc021"
SUMMARY = "BBBC021 MCF-7 compound screen (Ljosa 2012; IMPA)"
NEEDS = ("BBBC021_v1_image.csv, BBBC021_v1_moa.csv, compound SMILES csv, Week*/ 16-bit TIFFs "
         "(or --layout impa: IMPA metadata csv + per-cell .npy crops)")
DEFAULTS = dict(crop_size=96, illumination="impa")
# Named holdouts for `--split perturbations --holdout impa_ood`: IMPA's unseen compounds.
HOLDOUTS = {"impa_ood": IMPA_OOD}

__all__ = ["CHANNELS", "DEFAULTS", "HOLDOUTS", "IMPA_OOD", "IMPA_SIX", "NAME", "NEEDS", "SUBSETS",
           "SUMMARY", "add_arguments", "read", "read_bbbc021", "read_bbbc021_impa",
           "sample_key_path"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """BBBC021-specific flags of `morphjax build bbbc021`."""
    parser.add_argument("--layout", choices=("raw", "impa"), default="raw",
                        help="raw: BBBC021 v1 as published; impa: IMPA's per-cell .npy crops")
    parser.add_argument("--image-table", default=None,
                        help="default RAW/BBBC021_v1_image.csv[.gz] (layout raw)")
    parser.add_argument("--moa-table", default=None, help="default RAW/BBBC021_v1_moa.csv")
    parser.add_argument("--smiles-table", default=None,
                        help="CSV compound,smiles; default RAW/BBBC021_v1_compound.csv (layout "
                             "raw), none (layout impa: the metadata's SMILES column if any)")
    parser.add_argument("--compounds", default=None,
                        help="comma-separated compounds to keep (include DMSO for controls)")
    parser.add_argument("--subset", choices=sorted(SUBSETS), default=None,
                        help="a named compound subset (impa_six: IMPA's five drugs + DMSO)")
    parser.add_argument("--annotated-only", action="store_true",
                        help="keep only the compound-concentrations with an MoA (layout raw)")
    parser.add_argument("--centers", default=None,
                        help="CSV of nucleus centres (TableNumber, ImageNumber, "
                             "Nuclei_Location_Center_X/Y); default: detect on DNA (layout raw)")
    parser.add_argument("--impa-metadata", default=None,
                        help="IMPA metadata CSV (layout impa); default the one CSV in "
                             "RAW/metadata/")


def _impa_metadata(raw_dir: str, given: str | None) -> str:
    if given:
        return given
    found = sorted(glob.glob(os.path.join(raw_dir, "metadata", "*.csv")))
    if len(found) != 1:
        raise FileNotFoundError(
            f"Found {len(found)} CSV files in {os.path.join(raw_dir, 'metadata')}; pass "
            "--impa-metadata FILE.")
    return found[0]


def read(raw_dir: str, args: argparse.Namespace) -> layout.RawScreen:
    """The screen `morphjax build bbbc021 --raw DIR [flags]` builds."""
    compounds = None
    if getattr(args, "compounds", None):
        compounds = [c.strip() for c in args.compounds.split(",") if c.strip()]
    if getattr(args, "layout", "raw") == "impa":
        for flag in ("image_table", "moa_table", "centers"):
            if getattr(args, flag, None):
                raise ValueError(f"--{flag.replace('_', '-')} is for --layout raw.")
        if getattr(args, "annotated_only", False):
            raise ValueError("--annotated-only is for --layout raw.")
        return read_bbbc021_impa(
            raw_dir, _impa_metadata(raw_dir, getattr(args, "impa_metadata", None)),
            smiles_table=getattr(args, "smiles_table", None), compounds=compounds,
            subset=getattr(args, "subset", None))
    if getattr(args, "impa_metadata", None):
        raise ValueError("--impa-metadata is for --layout impa.")
    return read_bbbc021(
        raw_dir, image_table=getattr(args, "image_table", None),
        moa_table=getattr(args, "moa_table", None),
        smiles_table=getattr(args, "smiles_table", None), compounds=compounds,
        subset=getattr(args, "subset", None),
        annotated_only=getattr(args, "annotated_only", False),
        centers=getattr(args, "centers", None), detect_workers=getattr(args, "workers", None),
        progress=getattr(args, "progress", False))
