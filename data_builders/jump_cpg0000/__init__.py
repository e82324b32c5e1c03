"""JUMP cpg0000 pilot (CPJUMP1; Chandrasekaran et al. 2024; IMPA's cpg0000) from the Cell
Painting Gallery layout. Exact layout and rules: reader.py.

  images/{batch}/images/{plate folder}/Images/*.tiff          16-bit TIFF per channel
  workspace/load_data_csv/{batch}/{plate}/load_data.csv       sites and image paths
  workspace/metadata/platemaps/{batch}/barcode_platemap.csv   barcode -> plate map
  workspace/metadata/platemaps/{batch}/platemap/{name}.txt    well_position, broad_sample
  workspace/metadata/external_metadata/JUMP-Target-1_{compound,crispr,orf}_metadata.tsv
  workspace/analysis/{batch}/{plate}/analysis/*/Nuclei.csv + Image.csv   nucleus centres
"""

import argparse

from data_builders.jump_cpg0000.reader import DEFAULT_CHANNELS, perturbation_table, read_cpg0000
from data_builders.raw_screen import layout

NAME = "jump_cpg0000"
SUMMARY = "JUMP cpg0000 pilot CPJUMP1: compound/CRISPR/ORF plates, U2OS and A549 (IMPA cpg0000)"
NEEDS = ("Gallery source folder: images/{batch}/images/*/Images/*.tiff, workspace/load_data_csv, "
         "metadata/platemaps, external_metadata JUMP-Target-1 tables, analysis Nuclei.csv")
DEFAULTS = dict(crop_size=96, illumination="impa")

__all__ = ["DEFAULTS", "NAME", "NEEDS", "SUMMARY", "add_arguments", "perturbation_table",
           "read", "read_cpg0000"]


def _list(text: str | None) -> list[str] | None:
    return None if text is None else [v for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default=None, help="comma-separated batch folders")
    parser.add_argument("--plates", default=None, help="comma-separated plate barcodes")
    parser.add_argument("--channels", default=",".join(DEFAULT_CHANNELS),
                        help="comma-separated channels (load_data *_Orig<name> columns)")
    parser.add_argument("--metadata-dir", default=None,
                        help="folder of JUMP-Target-1_*_metadata.tsv (default external_metadata)")
    parser.add_argument("--experiment-metadata", default=None,
                        help="experiment-metadata.tsv (cell type, time point per plate)")
    parser.add_argument("--cell-lines", default=None, help="keep plates of these cell types")
    parser.add_argument("--times", default=None, help="keep plates of these time points (h)")
    parser.add_argument("--modalities", default=None, help="keep compound, crispr and/or orf")
    parser.add_argument("--locations", default="cellprofiler",
                        help="'cellprofiler' or a DeepProfiler locations folder")
    parser.add_argument("--nuclei-object", default="Nuclei", help="CellProfiler object table")


def read(raw_dir: str, args: argparse.Namespace) -> layout.RawScreen:
    return read_cpg0000(
        raw_dir, batches=_list(args.batches), plates=_list(args.plates),
        channels=_list(args.channels), metadata_dir=args.metadata_dir,
        experiment_metadata=args.experiment_metadata, cell_lines=_list(args.cell_lines),
        times=_list(args.times), modalities=_list(args.modalities), locations=args.locations,
        nuclei_object=args.nuclei_object)
