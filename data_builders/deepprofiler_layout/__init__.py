"""Screens exported for DeepProfiler (BBBC022/036/037, LINCS, CDRP, TA-ORF; Moshkov et al.
2024, Cell Painting CNN). Layout and options: reader.py and profiling_reference.md §1.2-1.6.

  <root>/inputs/config/*.json                      optional DeepProfiler config (defaults)
  <root>/inputs/metadata/index.csv                 Metadata_Plate, Metadata_Well, Metadata_Site,
                                                   one path column per channel, label column
  <root>/inputs/images/<Plate>/<file>.tif(f)       16-bit greyscale, one file per channel
  <root>/outputs/compressed/images/<Plate>/*.png   8-bit (`prepare` output; --compressed)
  <root>/inputs/locations/<Plate>/<Well>-<Site>-Nuclei.csv   Nuclei_Location_Center_X/Y
"""

import argparse

from data_builders.deepprofiler_layout.reader import read_deepprofiler
from data_builders.raw_screen import layout

NAME = "deepprofiler_layout"
SUMMARY = "Any screen exported for DeepProfiler: inputs/metadata/index.csv + images + locations"
NEEDS = ("inputs/metadata/index.csv, inputs/images/ 16-bit TIFF (or outputs/compressed/images "
         "8-bit PNG), inputs/locations/{Plate}/{Well}-{Site}-Nuclei.csv, optional config json")
DEFAULTS = dict(crop_size=128, illumination="deepprofiler")  # DeepProfiler box_size 128.

__all__ = ["DEFAULTS", "NAME", "NEEDS", "SUMMARY", "add_arguments", "read", "read_deepprofiler"]


def _list(text: str | None) -> list[str] | None:
    return None if text is None else [v for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="DeepProfiler config in inputs/config/ (default: the only json)")
    parser.add_argument("--metadata", default="index.csv", help="index file in inputs/metadata/")
    parser.add_argument("--channels", default=None,
                        help="comma-separated channel columns in order (default: config)")
    parser.add_argument("--label-field", default=None,
                        help="column whose values are the perturbations, e.g. Treatment")
    parser.add_argument("--control", action="append", default=None,
                        help="control label (DMSO@0) or COLUMN=VALUE; repeatable "
                             "(default: config control_value)")
    parser.add_argument("--compressed", action=argparse.BooleanOptionalAction, default=None,
                        help="read outputs/compressed/images 8-bit PNGs (default: config)")
    parser.add_argument("--bit-depth", type=int, default=None, help="expected bits per pixel")
    parser.add_argument("--perturbation-type", default="compound",
                        choices=[t for t in layout.PERTURBATION_TYPES if t != "control"])
    parser.add_argument("--split-field", default=None,
                        help="index column holding DeepProfiler's split (default: config)")
    parser.add_argument("--train-values", default=None, help="comma-separated train values")
    parser.add_argument("--test-values", default=None, help="comma-separated test values")
    parser.add_argument("--dose-field", default=None, help="index column with the dose (µM)")
    parser.add_argument("--name-field", default=None, help="index column with a readable name")
    parser.add_argument("--moa-table", default=None,
                        help="MoA match table (e.g. BBBC022_MOA_MATCHES_official.csv)")
    parser.add_argument("--moa-key", default=None,
                        help="index column matched to the MoA table (default broad_sample)")


def read(raw_dir: str, args: argparse.Namespace) -> layout.RawScreen:
    return read_deepprofiler(
        raw_dir, config=args.config, metadata=args.metadata, channels=_list(args.channels),
        label_field=args.label_field, control=args.control, compressed=args.compressed,
        bit_depth=args.bit_depth, perturbation_type=args.perturbation_type,
        split_field=args.split_field, train_values=_list(args.train_values),
        test_values=_list(args.test_values), dose_field=args.dose_field,
        name_field=args.name_field, moa_table=args.moa_table, moa_key=args.moa_key)
