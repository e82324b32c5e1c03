"""L1000 expression signatures paired with the perturbations of a screen (MorphDiff conditioning).

MorphDiff (Methods, "MorphDiff Model"; Datasets) conditions its diffusion U-Net on one L1000 gene
expression vector per perturbation: (N, 977) floats in the reference code, row i paired with image
i. This module reads L1000 profiles, keeps the landmark genes and writes one vector per row of a
screen's `perturbations.csv` as `expression.npy` (RAW_LAYOUT.md).

Readers (all return `Signatures`: values float32 (n_signatures, n_genes), a gene table and a
signature table):

- `read_gct`: GCT 1.2 and 1.3 text (cmapPy/clue.io layout). Rows of the file are genes, columns are
  signatures. 1.2: `#1.2`, `nrows<TAB>ncols`, header `Name<TAB>Description<TAB><signature ids>`,
  then one line per gene. 1.3: `#1.3`, `nrows ncols nrowmeta ncolmeta`, header
  `id<TAB><nrowmeta gene fields><TAB><signature ids>`, then `ncolmeta` lines
  `<field><TAB><nrowmeta fillers><TAB><one value per signature>`, then one line per gene.
- `read_gctx`: GCTX (HDF5) as cmapPy writes it. `/0/DATA/0/matrix` is stored (n_signatures,
  n_genes); `/0/META/ROW/id` are gene ids (Entrez ids in LINCS files), `/0/META/COL/id` signature
  ids, and every other dataset under `/0/META/ROW` (`/0/META/COL`) is a gene (signature) field such
  as pr_gene_symbol, pr_is_lm (pert_id, pert_idose, pert_itime, cell_id). Only the selected
  signatures are read, in blocks, so 10s-of-GB LINCS files are fine. LINCS GEO releases keep
  signature and gene fields in separate tables (`sig_info.txt`, `gene_info.txt`): pass them as
  `signature_info=` / `gene_info=`.
- `read_table`: CSV/TSV with one row per signature, or `.npy` with companion tables (see there).

Metadata values are kept as strings; the CMap null marker `-666` and empty/NA values become "".
Numeric HDF5 fields are written as their shortest decimal (10.0 -> "10").

Then `select_landmarks` keeps the 978 L1000 landmark genes (in a given order; MorphDiff uses 977,
see there), `pair_expression` attaches one averaged vector to each perturbation (replicate
signatures averaged, dose/time/cell matched after unit normalisation) and `write_expression`
stores it next to `perturbations.csv`.
"""

import dataclasses
import gzip
import math
import os
import re
from collections.abc import Sequence

import h5py
import numpy as np
import pandas as pd

from morphjax import io as mio

# Values CMap and common tools use for "missing"; they become "" in metadata and NaN in data.
NULL_VALUES = frozenset({"", "-666", "-666.0", "nan", "NaN", "NAN", "NA", "N/A", "#N/A", "na",
                         "None", "null", "NULL"})
# Numeric table columns that are metadata, not genes, in `read_table` (case-insensitive).
META_PREFIXES = ("metadata_", "pert_", "cell_", "sig_", "det_", "rna_", "distil_")
META_NAMES = frozenset({"dose", "time", "replicate", "plate", "well", "site", "batch"})
_SYMBOL_FIELDS = ("pr_gene_symbol", "symbol", "gene_symbol")
_LANDMARK_FIELDS = ("pr_is_lm", "is_landmark")
_GENE_COLUMNS = ("pr_gene_symbol", "symbol", "pr_gene_id", "id", "gene")
_READ_BLOCK = 1024  # Signatures read from HDF5 per block.


@dataclasses.dataclass(frozen=True)
class Signatures:
    """Expression signatures: one row of `values` per signature, one column per gene.

    values: float32 (n_signatures, n_genes).
    genes: one row per column of `values`: `id` (str), `symbol` (str, "" if unknown),
      `is_landmark` (bool; only when the source has pr_is_lm/is_landmark) and the source's other
      gene fields as strings.
    meta: one row per signature: `id` and the source's fields (pert_id, pert_idose, ...) as strings.
    source: the file read, named in error messages.
    """
    values: np.ndarray
    genes: pd.DataFrame
    meta: pd.DataFrame
    source: str = ""

    def __post_init__(self):
        if self.values.ndim != 2 or self.values.dtype != np.float32:
            raise ValueError(f"{self.source}: values must be float32 (n_signatures, n_genes), got "
                             f"{self.values.dtype} {self.values.shape}")
        if self.values.shape != (len(self.meta), len(self.genes)):
            raise ValueError(f"{self.source}: values {self.values.shape} do not match "
                             f"{len(self.meta)} signatures x {len(self.genes)} genes")
        for what, table in (("gene", self.genes), ("signature", self.meta)):
            if "id" not in table.columns:
                raise ValueError(f"{self.source}: {what} table has no 'id' column")
            duplicated = table["id"][table["id"].duplicated()].unique().tolist()
            if duplicated:
                raise ValueError(f"{self.source}: duplicated {what} ids {_first(duplicated)}")

    def take(self, *, signatures=None, genes=None) -> "Signatures":
        """The given signature rows and/or gene columns (integer positions, in the given order)."""
        values, meta, gene_table = self.values, self.meta, self.genes
        if signatures is not None:
            signatures = np.asarray(signatures, dtype=np.int64)
            values, meta = values[signatures], meta.iloc[signatures]
        if genes is not None:
            genes = np.asarray(genes, dtype=np.int64)
            values, gene_table = values[:, genes], gene_table.iloc[genes]
        return Signatures(np.ascontiguousarray(values, dtype=np.float32),
                          gene_table.reset_index(drop=True), meta.reset_index(drop=True),
                          self.source)


# ----------------------------------------------------------------------------------------------
# Readers.


def read_gct(path: str | os.PathLike) -> Signatures:
    """Reads a GCT 1.2 or 1.3 file (optionally gzipped); see the module docstring for the layout."""
    path = _existing(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        lines = [line.rstrip("\r\n") for line in f]
    if not lines or lines[0].strip() not in ("#1.2", "#1.3"):
        got = lines[0] if lines else "an empty file"
        raise ValueError(f"{path}:1: expected the GCT version line '#1.2' or '#1.3', got {got!r}")
    version = lines[0].strip()[1:]
    dims = lines[1].split() if len(lines) > 1 else []
    want = 2 if version == "1.2" else 4
    if len(dims) != want or not all(d.isdigit() for d in dims):
        example = "nrows<TAB>ncols" if version == "1.2" else "nrows ncols nrowmeta ncolmeta"
        raise ValueError(f"{path}:2: GCT {version} needs the dimensions line '{example}' "
                         f"({want} integers), got {lines[1] if len(lines) > 1 else ''!r}")
    n_rows, n_cols = int(dims[0]), int(dims[1])
    n_row_meta, n_col_meta = (1, 0) if version == "1.2" else (int(dims[2]), int(dims[3]))
    width = 1 + n_row_meta + n_cols
    expected_lines = 3 + n_col_meta + n_rows
    body = lines[2:]
    while body and not body[-1].strip():
        body.pop()
    if len(body) + 2 != expected_lines:
        raise ValueError(f"{path}: the dimensions line says {n_rows} genes and {n_col_meta} "
                         f"column-metadata lines ({expected_lines} lines in all), but the file "
                         f"has {len(body) + 2} lines")

    def fields(number: int) -> list[str]:
        parts = lines[number - 1].split("\t")
        if len(parts) != width:
            raise ValueError(f"{path}:{number}: expected {width} tab-separated fields (1 id + "
                             f"{n_row_meta} gene fields + {n_cols} signatures), got {len(parts)}")
        return parts

    header = fields(3)
    gene_fields = [h.strip() for h in header[1:1 + n_row_meta]]
    if version == "1.2":
        gene_fields = ["description"]
    signature_ids = [h.strip() for h in header[1 + n_row_meta:]]
    meta = {"id": signature_ids}
    for number in range(4, 4 + n_col_meta):
        parts = fields(number)
        meta[parts[0].strip()] = [_clean(v) for v in parts[1 + n_row_meta:]]
    gene_ids, gene_meta = [], {name: [] for name in gene_fields}
    values = np.empty((n_rows, n_cols), dtype=np.float32)
    for i, number in enumerate(range(4 + n_col_meta, 4 + n_col_meta + n_rows)):
        parts = fields(number)
        gene_ids.append(parts[0].strip())
        for name, value in zip(gene_fields, parts[1:1 + n_row_meta]):
            gene_meta[name].append(_clean(value))
        values[i] = _floats(parts[1 + n_row_meta:], f"{path}:{number}", signature_ids)
    genes = _gene_table(pd.DataFrame({"id": gene_ids, **gene_meta}), path)
    return Signatures(np.ascontiguousarray(values.T), genes, pd.DataFrame(meta), path)


def read_gctx(path: str | os.PathLike, *, genes: Sequence[str] | None = None,
              signatures: Sequence[str] | None = None, pert_ids: Sequence[str] | None = None,
              signature_info: str | os.PathLike | None = None,
              gene_info: str | os.PathLike | None = None) -> Signatures:
    """Reads the selected part of a GCTX (HDF5) file in cmapPy's layout (module docstring).

    Args:
      path: the .gctx file.
      genes: gene ids or symbols to keep, in this order (default all); see `select_landmarks`.
      signatures: signature ids to keep (default all). Signatures keep the file's order.
      pert_ids: keep only signatures whose `pert_id` field is one of these.
      signature_info: optional table (e.g. LINCS `sig_info.txt`) joined on signature id: first
        column `sig_id` if present, else the first column. Its fields replace same-named ones.
      gene_info: optional table (e.g. LINCS `gene_info.txt`) joined on gene id (`pr_gene_id` or
        the first column); gives pr_gene_symbol and pr_is_lm.
    """
    path = _existing(path)
    with h5py.File(path, "r") as f:
        for node in ("/0/DATA/0/matrix", "/0/META/ROW/id", "/0/META/COL/id"):
            if node not in f:
                raise ValueError(f"{path}: not a GCTX file, it has no {node} dataset")
        gene_table = _hdf5_fields(f["/0/META/ROW"], path)
        meta = _hdf5_fields(f["/0/META/COL"], path)
        matrix = f["/0/DATA/0/matrix"]
        if matrix.ndim != 2 or matrix.shape != (len(meta), len(gene_table)):
            raise ValueError(
                f"{path}: /0/DATA/0/matrix has shape {matrix.shape}; cmapPy stores it as "
                f"(n_signatures, n_genes) = ({len(meta)}, {len(gene_table)}) from "
                f"/0/META/COL/id and /0/META/ROW/id")
        if signature_info is not None:
            meta = _join(meta, signature_info, "sig_id", "signature")
        if gene_info is not None:
            gene_table = _join(gene_table, gene_info, "pr_gene_id", "gene")
        gene_table = _gene_table(gene_table, path)
        keep = np.ones(len(meta), dtype=bool)
        if signatures is not None:
            wanted = pd.Index([str(s) for s in signatures])
            missing = wanted.difference(meta["id"]).tolist()
            if missing:
                raise ValueError(f"{path}: no signatures with ids {_first(missing)}")
            keep &= meta["id"].isin(wanted).to_numpy()
        if pert_ids is not None:
            if "pert_id" not in meta.columns:
                raise ValueError(f"{path}: pert_ids= needs a pert_id signature field; fields are "
                                 f"{list(meta.columns)} (pass signature_info=sig_info.txt)")
            keep &= meta["pert_id"].isin([str(p) for p in pert_ids]).to_numpy()
        rows = np.flatnonzero(keep)
        columns = (np.arange(len(gene_table)) if genes is None
                   else _resolve_genes(gene_table, genes, path))
        values = np.empty((len(rows), len(columns)), dtype=np.float32)
        for start in range(0, len(rows), _READ_BLOCK):
            block = rows[start:start + _READ_BLOCK]
            if block[-1] - block[0] + 1 <= 2 * len(block):  # Dense enough: one contiguous read.
                chunk = matrix[block[0]:block[-1] + 1][block - block[0]]
            else:
                chunk = matrix[block]
            values[start:start + len(block)] = chunk[:, columns]
    return Signatures(values, gene_table.iloc[columns].reset_index(drop=True),
                      meta.iloc[rows].reset_index(drop=True), path)


def read_table(path: str | os.PathLike, *, key: str | None = None,
               meta_columns: Sequence[str] = (), meta: str | os.PathLike | None = None,
               genes: str | os.PathLike | None = None) -> Signatures:
    """Reads signatures from a CSV/TSV table, or from a .npy matrix with companion tables.

    CSV/TSV (`.csv`, `.tsv`, `.txt`, optionally `.gz`; `.csv` is comma-, the others
    tab-separated): one row per signature. The id column is `key` (default: the first column;
    `key=""` numbers the rows 0..n-1); ids must be unique. Gene columns are the numeric columns
    that are not the id, not in `meta_columns` and not named like metadata (prefixes
    Metadata_/pert_/cell_/sig_/det_/rna_/distil_, or dose/time/replicate/plate/well/site/batch,
    case-insensitive); every other column is a signature field. The column names are the gene ids.

    `.npy`: float (n_signatures, n_genes). Both companions are required:
      meta: CSV/TSV with one row per matrix row, in order; id column as above (so
        `perturbations.csv` with key="perturbation" reads a screen's `expression.npy` back).
      genes: one row per matrix column, in order: a CSV/TSV with an `id` (or `pr_gene_id`) column
        and optional symbol/pr_gene_symbol and is_landmark/pr_is_lm, or a text file with one gene
        id per line (as `write_expression`'s `expression_genes.csv`).
    """
    path = _existing(path)
    if path.endswith(".npy"):
        if meta is None or genes is None:
            raise ValueError(f"{path}: a .npy matrix needs meta= (one row per signature) and "
                             f"genes= (one row per column) companion files")
        values = np.load(path, allow_pickle=False)
        if values.ndim != 2 or values.dtype.kind not in "fiu":
            raise ValueError(f"{path}: expected a 2-D numeric matrix, got {values.dtype} "
                             f"{values.shape}")
        meta_table = _read_strings(meta)
        meta_table = _with_id(meta_table, key, os.fspath(meta))
        gene_table = _read_gene_file(genes)
        if len(meta_table) != values.shape[0]:
            raise ValueError(f"{meta} has {len(meta_table)} rows but {path} has "
                             f"{values.shape[0]} signature rows")
        if len(gene_table) != values.shape[1]:
            raise ValueError(f"{genes} lists {len(gene_table)} genes but {path} has "
                             f"{values.shape[1]} columns")
        return Signatures(values.astype(np.float32), _gene_table(gene_table, os.fspath(genes)),
                          meta_table, path)

    table = _read_strings(path)
    table = _with_id(table, key, path)
    unknown = [c for c in meta_columns if c not in table.columns]
    if unknown:
        raise ValueError(f"{path}: meta_columns {unknown} are not columns of the table")
    gene_columns = [c for c in table.columns[1:]
                    if c not in meta_columns and not _looks_like_meta(c) and _is_numeric(table[c])]
    if not gene_columns:
        raise ValueError(f"{path}: no numeric gene columns found among {list(table.columns)}")
    values = np.empty((len(table), len(gene_columns)), dtype=np.float32)
    for j, column in enumerate(gene_columns):
        values[:, j] = _floats(table[column].tolist(), f"{path}: column {column!r}",
                               table["id"].tolist())
    meta_table = table[[c for c in table.columns if c not in gene_columns]].copy()
    gene_table = _gene_table(pd.DataFrame({"id": [str(c) for c in gene_columns]}), path)
    return Signatures(values, gene_table, meta_table.reset_index(drop=True), path)


def read_signatures(path: str | os.PathLike, **kwargs) -> Signatures:
    """Dispatches on the extension: .gct(.gz) -> read_gct, .gctx -> read_gctx, else read_table."""
    name = os.fspath(path).lower()
    if name.endswith((".gct", ".gct.gz")):
        return read_gct(path, **kwargs)
    if name.endswith(".gctx"):
        return read_gctx(path, **kwargs)
    return read_table(path, **kwargs)


def add_metadata(sig: Signatures, *, signature_info: str | os.PathLike | None = None,
                 gene_info: str | os.PathLike | None = None) -> Signatures:
    """Joins LINCS-style `sig_info.txt` / `gene_info.txt` tables onto `sig` (see `read_gctx`)."""
    meta, genes = sig.meta, sig.genes
    if signature_info is not None:
        meta = _join(meta, signature_info, "sig_id", "signature")
    if gene_info is not None:
        genes = _gene_table(_join(genes, gene_info, "pr_gene_id", "gene"), sig.source)
    return Signatures(sig.values, genes, meta, sig.source)


# ----------------------------------------------------------------------------------------------
# Landmark genes.


def read_gene_list(path: str | os.PathLike, *, column: str | None = None) -> list[str]:
    """Gene ids/symbols from a file: one per line, or a CSV/TSV with a header.

    A file whose first line contains a tab or comma, or is one of the column names below, is a
    table: `column` (default the first of
    pr_gene_symbol, symbol, pr_gene_id, id, gene present, else the first column); if it has a
    `pr_is_lm` column (LINCS gene_info.txt) only rows with pr_is_lm == 1 are kept. Otherwise one
    gene per line; blank lines and lines starting with '#' are skipped.
    """
    path = _existing(path)
    if not _is_table(path):
        with open(path, encoding="utf-8") as f:
            return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
    table = _read_strings(path)
    if column is None:
        candidates = [c for c in _GENE_COLUMNS if c in table.columns]
        column = candidates[0] if candidates else table.columns[0]
    if column not in table.columns:
        raise ValueError(f"{path}: no column {column!r}; columns are {list(table.columns)}")
    if "pr_is_lm" in table.columns:
        flags = [_flag(v, f"{path}: pr_is_lm") for v in table["pr_is_lm"]]
        table = table[np.asarray(flags, dtype=bool)]
    return [str(v) for v in table[column] if str(v)]


def select_landmarks(sig: Signatures, *, landmarks: str | os.PathLike | Sequence[str] | None = None,
                     drop: Sequence[str] = (), n_expected: int | None = 978) -> Signatures:
    """Keeps the L1000 landmark genes (Subramanian 2017: 978 measured genes).

    landmarks: None uses the `is_landmark` flags (pr_is_lm) of `sig`, in file order; otherwise a
      list of gene ids or symbols, or a file for `read_gene_list`; the list's order is kept.
      Entries match gene ids first, then symbols; a gene not found is an error naming it.
    drop: genes (ids or symbols) removed after selection. MorphDiff's released code uses 977 genes
      and does not say which landmark is missing (its CDRP data came with 977), so reproducing it
      means dropping one gene: `drop=[gene], n_expected=977`.
    n_expected: the number of genes the result must have (None: no check).
    """
    if landmarks is None:
        if "is_landmark" not in sig.genes.columns:
            raise ValueError(f"{sig.source}: no landmark flags (pr_is_lm) in the gene fields "
                             f"{list(sig.genes.columns)}; pass landmarks= a gene list or file")
        columns = np.flatnonzero(sig.genes["is_landmark"].to_numpy(dtype=bool))
    else:
        names = (read_gene_list(landmarks) if isinstance(landmarks, (str, os.PathLike))
                 else [str(g) for g in landmarks])
        duplicated = pd.Index(names)[pd.Index(names).duplicated()].unique().tolist()
        if duplicated:
            raise ValueError(f"landmark list names genes more than once: {_first(duplicated)}")
        columns = _resolve_genes(sig.genes, names, sig.source)
    if drop:
        chosen = sig.genes.iloc[columns]
        drop_columns = set(_resolve_genes(chosen.reset_index(drop=True), drop, sig.source).tolist())
        columns = np.asarray([c for i, c in enumerate(columns) if i not in drop_columns])
    if n_expected is not None and len(columns) != n_expected:
        raise ValueError(f"{sig.source}: selected {len(columns)} landmark genes, expected "
                         f"{n_expected} (pass n_expected=None to accept)")
    return sig.take(genes=columns)


# ----------------------------------------------------------------------------------------------
# Pairing.


def parse_dose(value) -> float | None:
    """Dose in µM from '10 uM', '10 µM', '10.0 um', '500 nM', '1 mM', '10' (µM) or a number.

    Null values (-666, NaN, '') give None. The value is rounded to 9 significant digits.
    """
    return _parse_quantity(value, _DOSE_UNITS, "dose")


def parse_time(value) -> float | None:
    """Time in hours from '24 h', '24', '6 hr', '30 min', '2 d' or a number."""
    return _parse_quantity(value, _TIME_UNITS, "time")


def pair_expression(perturbations: pd.DataFrame, sig: Signatures, *, key: str = "pert_id",
                    perturbation_column: str = "perturbation",
                    dose: str | tuple[str, str] | None = None,
                    time: str | tuple[str, str] | None = None,
                    cell: str | tuple[str, str] | None = None, aggregate: str = "mean",
                    controls: str = "error") -> tuple[np.ndarray, dict]:
    """One expression vector per row of `perturbations`, in row order (MorphDiff's I_q).

    Args:
      perturbations: e.g. a screen's perturbations.csv (one row per perturbation), or any table
        with one row per (perturbation, dose, ...) to pair.
      sig: signatures, usually after `select_landmarks`.
      key: the signature field matched to `perturbations[perturbation_column]` (exact string).
      dose, time, cell: None, or a column name present in both tables, or a pair
        (perturbations column, signature field). Doses compare in µM (`parse_dose`), times in
        hours (`parse_time`), cells as case-insensitive strings; a missing value matches only a
        missing value.
      aggregate: "mean" or "median" over all matching signatures (replicates).
      controls: what control rows (`is_control` == 1) get: "error" (they need signatures like
        any row), "zeros" (every control row gets the zero vector: a level-5 z-score signature of
        no change), "mean_of_controls" (control rows without signatures get the mean of the
        signatures matched by the control rows that have them).

    Returns:
      (float32 (n_rows, n_genes), report) where report has per row `n_signatures` and
      `signature_ids`, `control_rows_filled` (row indices), and the options used.

    Raises:
      ValueError listing the rows without any matching signature (first 20 and the count),
      or whose matched signatures contain NaN.
    """
    if aggregate not in ("mean", "median"):
        raise ValueError(f"aggregate must be 'mean' or 'median', got {aggregate!r}")
    if controls not in ("error", "zeros", "mean_of_controls"):
        raise ValueError(f"controls must be 'error', 'zeros' or 'mean_of_controls', got "
                         f"{controls!r}")
    if perturbation_column not in perturbations.columns:
        raise ValueError(f"perturbations table has no column {perturbation_column!r}; columns "
                         f"are {list(perturbations.columns)}")
    if key not in sig.meta.columns:
        raise ValueError(f"{sig.source}: no signature field {key!r} to match perturbations on; "
                         f"fields are {list(sig.meta.columns)}")
    factors = []  # (name, perturbations column, signature field, normaliser)
    for name, spec, normalise in (("dose", dose, parse_dose), ("time", time, parse_time),
                                  ("cell", cell, _parse_cell)):
        if spec is None:
            continue
        left, right = (spec, spec) if isinstance(spec, str) else spec
        if left not in perturbations.columns:
            raise ValueError(f"{name}: perturbations table has no column {left!r}")
        if right not in sig.meta.columns:
            raise ValueError(f"{name}: {sig.source} has no signature field {right!r}; fields are "
                             f"{list(sig.meta.columns)}")
        factors.append((name, left, right, normalise))

    ids = [_clean(v) for v in perturbations[perturbation_column]]
    empty = [i for i, v in enumerate(ids) if not v]
    if empty:
        raise ValueError(f"perturbations rows {_first(empty)} have an empty "
                         f"{perturbation_column!r}")
    wanted = set(ids)
    sig_keys = sig.meta[key].astype(str).str.strip().to_numpy()
    groups, by_id = {}, {}
    for row in np.flatnonzero(np.isin(sig_keys, list(wanted))):
        levels = []
        for name, _, field, normalise in factors:
            try:
                levels.append(normalise(sig.meta[field].iloc[row]))
            except ValueError as e:
                raise ValueError(f"{sig.source}: signature {sig.meta['id'].iloc[row]!r} field "
                                 f"{field!r}: {e}") from None
        groups.setdefault((sig_keys[row], *levels), []).append(row)
        by_id.setdefault(sig_keys[row], set()).add(tuple(levels))

    is_control = _control_flags(perturbations, controls)
    n_genes = sig.values.shape[1]
    matrix = np.zeros((len(ids), n_genes), dtype=np.float32)
    matched: list[list[int]] = []
    missing, filled = [], []
    for i, pid in enumerate(ids):
        levels = []
        for name, column, _, normalise in factors:
            try:
                levels.append(normalise(perturbations[column].iloc[i]))
            except ValueError as e:
                raise ValueError(f"perturbations row {i} ({pid}) column {column!r}: {e}") from None
        rows = groups.get((pid, *levels), [])
        matched.append(rows)
        if is_control[i] and controls == "zeros":
            filled.append(i)
            continue
        if not rows:
            if not (is_control[i] and controls == "mean_of_controls"):
                missing.append((i, pid, levels))
            continue
        block = sig.values[rows].astype(np.float64)
        if np.isnan(block).any():
            bad = [sig.meta["id"].iloc[r] for r in rows if np.isnan(sig.values[r]).any()]
            raise ValueError(f"{sig.source}: signatures {_first(bad)} for {pid!r} contain NaN "
                             f"values")
        matrix[i] = block.mean(0) if aggregate == "mean" else np.median(block, axis=0)
    if missing:
        described = []
        for i, pid, levels in missing[:20]:
            text = pid + "".join(f" {f[0]}={v}" for f, v in zip(factors, levels))
            if pid in by_id and factors:
                text += f" (signatures exist at {sorted(by_id[pid], key=str)[:3]})"
            described.append(text)
        raise ValueError(
            f"no expression signature in {sig.source} for {len(missing)} of {len(ids)} "
            f"perturbation rows (matched {perturbation_column!r} to {key!r}"
            + "".join(f", {name} {c}~{field}" for name, c, field, _ in factors) + "): "
            + "; ".join(described) + (f"; ... and {len(missing) - 20} more" if len(missing) > 20
                                      else ""))
    if controls == "mean_of_controls":
        have = [i for i in range(len(ids)) if is_control[i] and matched[i]]
        need = [i for i in range(len(ids)) if is_control[i] and not matched[i]]
        if need and not have:
            raise ValueError(f"controls='mean_of_controls': no control row has a signature in "
                             f"{sig.source} (control rows {_first([ids[i] for i in need])})")
        if need:
            rows = sorted({r for i in have for r in matched[i]})
            matrix[need] = sig.values[rows].astype(np.float64).mean(0)
            filled = need
    report = {
        "key": key, "perturbation_column": perturbation_column, "aggregate": aggregate,
        "controls": controls, "matched_on": [f"{n}:{c}~{f}" for n, c, f, _ in factors],
        "n_genes": n_genes, "n_rows": len(ids),
        "n_signatures": [len(r) for r in matched],
        "signature_ids": [sig.meta["id"].iloc[r].tolist() for r in matched],
        "control_rows_filled": filled,
    }
    return matrix, report


def write_expression(directory: str | os.PathLike, matrix: np.ndarray,
                     genes: pd.DataFrame | Sequence[str]) -> dict:
    """Writes `expression.npy` and `expression_genes.csv` atomically next to perturbations.csv.

    `directory` is a raw screen (RAW_LAYOUT.md) or a built dataset; `matrix` must have one row
    per row of its perturbations.csv. `expression_genes.csv` has one row per column: id, and
    symbol / is_landmark when `genes` is a gene table that has them.
    """
    directory = os.fspath(directory)
    table_path = os.path.join(directory, "perturbations.csv")
    if not os.path.isfile(table_path):
        raise FileNotFoundError(f"{directory} has no perturbations.csv; expression rows follow "
                                f"its order, so write into a raw screen or built dataset")
    matrix = np.asarray(matrix)
    n_rows = len(pd.read_csv(table_path, usecols=[0]))
    if matrix.ndim != 2 or matrix.shape[0] != n_rows:
        raise ValueError(f"expression matrix has shape {matrix.shape}; {table_path} has "
                         f"{n_rows} rows")
    if not np.isfinite(matrix).all():
        raise ValueError("expression matrix contains NaN or infinite values")
    if isinstance(genes, pd.DataFrame):
        gene_table = genes[[c for c in ("id", "symbol", "is_landmark") if c in genes.columns]]
        gene_table = gene_table.assign(id=gene_table["id"].astype(str))
    else:
        gene_table = pd.DataFrame({"id": [str(g) for g in genes]})
    if len(gene_table) != matrix.shape[1]:
        raise ValueError(f"{len(gene_table)} genes for a matrix with {matrix.shape[1]} columns")
    paths = {"expression": os.path.join(directory, "expression.npy"),
             "genes": os.path.join(directory, "expression_genes.csv")}
    mio.atomic_write_text(paths["genes"], gene_table.to_csv(index=False))
    mio.atomic_write_npy(paths["expression"], matrix.astype(np.float32))
    return paths


# ----------------------------------------------------------------------------------------------
# Helpers.

_DOSE_UNITS = {"": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0, "micromolar": 1.0, "nm": 1e-3,
               "pm": 1e-6, "mm": 1e3, "m": 1e6}
_TIME_UNITS = {"": 1.0, "h": 1.0, "hr": 1.0, "hrs": 1.0, "hour": 1.0, "hours": 1.0,
               "m": 1 / 60, "min": 1 / 60, "mins": 1 / 60, "minutes": 1 / 60,
               "d": 24.0, "day": 24.0, "days": 24.0}
_QUANTITY = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\d\s.]*)$")


def _parse_quantity(value, units: dict, what: str) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number, factor = float(value), 1.0
        if math.isnan(number) or number == -666:
            return None
    else:
        text = str(value).strip()
        if text in NULL_VALUES:
            return None
        match = _QUANTITY.match(text)
        unit = match.group(2).lower() if match else None
        if unit not in units:
            raise ValueError(f"cannot read {what} {value!r}; expected a number with an optional "
                             f"unit ({', '.join(u for u in units if u)})")
        number, factor = float(match.group(1)), units[unit]
        if number == -666:
            return None
    return float(f"{number * factor:.9g}")


def _parse_cell(value) -> str | None:
    text = _clean(value)
    return text.casefold() if text else None


def _control_flags(perturbations: pd.DataFrame, controls: str) -> np.ndarray:
    if "is_control" not in perturbations.columns:
        if controls != "error":
            raise ValueError(f"controls={controls!r} needs an is_control column in the "
                             f"perturbations table")
        return np.zeros(len(perturbations), dtype=bool)
    return np.asarray([_flag(v, "is_control") for v in perturbations["is_control"]], dtype=bool)


def _flag(value, where: str) -> bool:
    text = _clean(value).lower()
    if text in ("1", "1.0", "true", "yes"):
        return True
    if text in ("0", "0.0", "false", "no", ""):
        return False
    raise ValueError(f"{where}: expected 0/1, got {value!r}")


def _clean(value) -> str:
    """Metadata value as a stripped string; null markers become ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    return "" if text in NULL_VALUES else text


def _first(items, n: int = 20) -> str:
    items = list(items)
    more = f" ... and {len(items) - n} more ({len(items)} in all)" if len(items) > n else ""
    return f"{items[:n]}{more}"


def _existing(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    return path


def _floats(fields: Sequence[str], where: str, labels: Sequence[str]) -> np.ndarray:
    cleaned = ["nan" if str(v).strip() in NULL_VALUES else v for v in fields]
    try:
        return np.asarray(cleaned, dtype=np.float32)
    except ValueError:
        for label, value in zip(labels, cleaned):
            try:
                float(value)
            except ValueError:
                raise ValueError(f"{where}: value {value!r} (signature {label!r}) is not a "
                                 f"number") from None
        raise


def _is_numeric(column: pd.Series) -> bool:
    values = [v for v in column if v.strip() not in NULL_VALUES]
    if not values:
        return False
    return bool(pd.to_numeric(pd.Series(values), errors="coerce").notna().all())


def _looks_like_meta(name: str) -> bool:
    lower = str(name).lower()
    return lower.startswith(META_PREFIXES) or lower in META_NAMES


def _read_strings(path) -> pd.DataFrame:
    path = _existing(path)
    name = path.lower().removesuffix(".gz")
    sep = "," if name.endswith(".csv") else "\t"
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    table.columns = [str(c).strip() for c in table.columns]
    return table.apply(lambda column: column.map(_clean))


def _with_id(table: pd.DataFrame, key: str | None, path: str) -> pd.DataFrame:
    """`table` with its id column first and named `id`."""
    if key == "":
        if "id" in table.columns:
            raise ValueError(f"{path}: key='' numbers the rows but the table has an 'id' column; "
                             f"pass key='id'")
        ids = pd.Series([str(i) for i in range(len(table))])
    else:
        key = table.columns[0] if key is None else key
        if key not in table.columns:
            raise ValueError(f"{path}: no id column {key!r}; columns are {list(table.columns)}")
        ids = table[key]
        if (ids == "").any():
            rows = np.flatnonzero((ids == "").to_numpy()).tolist()
            raise ValueError(f"{path}: empty ids in column {key!r} at rows {_first(rows)}")
        duplicated = ids[ids.duplicated()].unique().tolist()
        if duplicated:
            raise ValueError(f"{path}: column {key!r} is not a unique id (repeated "
                             f"{_first(duplicated)}); pass key= a unique column, or key='' to "
                             f"number the rows")
        if key != "id" and "id" in table.columns:
            raise ValueError(f"{path}: has an 'id' column but key={key!r}; pass key='id' or "
                             f"rename one of them")
        table = table.drop(columns=[key])
    return pd.concat([ids.rename("id").reset_index(drop=True),
                      table.reset_index(drop=True)], axis=1)


def _is_table(path: str) -> bool:
    """Whether a gene file has a header: a tab or comma in line 1, or a known column name."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    return "\t" in first or "," in first or first in _GENE_COLUMNS


def _read_gene_file(path) -> pd.DataFrame:
    path = _existing(path)
    if not _is_table(path):
        return pd.DataFrame({"id": read_gene_list(path)})
    table = _read_strings(path)
    if "id" not in table.columns:
        if "pr_gene_id" not in table.columns:
            raise ValueError(f"{path}: a gene table needs an 'id' or 'pr_gene_id' column; "
                             f"columns are {list(table.columns)}")
        table = table.rename(columns={"pr_gene_id": "id"})
    return table


def _gene_table(table: pd.DataFrame, source: str) -> pd.DataFrame:
    """Adds `symbol` (and `is_landmark` when flags exist) to a gene table with an `id` column."""
    table = table.copy()
    table["id"] = table["id"].astype(str)
    symbols = next((table[c] for c in _SYMBOL_FIELDS if c in table.columns), None)
    table["symbol"] = symbols.astype(str) if symbols is not None else ""
    flags = next((c for c in _LANDMARK_FIELDS if c in table.columns), None)
    if flags is not None:
        table["is_landmark"] = [_flag(v, f"{source}: gene {g!r} field {flags!r}")
                                for g, v in zip(table["id"], table[flags])]
    return table.reset_index(drop=True)


def _resolve_genes(genes: pd.DataFrame, names: Sequence[str], source: str) -> np.ndarray:
    """Column positions of `names` (gene ids first, then symbols), in the given order."""
    by_id = {g: i for i, g in enumerate(genes["id"])}
    by_symbol: dict[str, list[int]] = {}
    for i, s in enumerate(genes["symbol"]):
        if s:
            by_symbol.setdefault(s, []).append(i)
    positions, missing, ambiguous = [], [], []
    for name in (str(n).strip() for n in names):
        if name in by_id:
            positions.append(by_id[name])
        elif len(by_symbol.get(name, [])) == 1:
            positions.append(by_symbol[name][0])
        elif name in by_symbol:
            ambiguous.append(name)
        else:
            missing.append(name)
    if missing:
        raise ValueError(f"{source}: {len(missing)} genes not found by id or symbol: "
                         f"{_first(missing)}")
    if ambiguous:
        raise ValueError(f"{source}: symbols {_first(ambiguous)} name several genes; use ids")
    return np.asarray(positions, dtype=np.int64)


def _hdf5_fields(group: h5py.Group, path: str) -> pd.DataFrame:
    """Every 1-D dataset of a GCTX META group as a string column, `id` first."""
    columns = {}
    n = group["id"].shape[0]
    for name in ["id"] + sorted(k for k in group.keys() if k != "id"):
        dataset = group[name]
        if not isinstance(dataset, h5py.Dataset) or dataset.shape != (n,):
            raise ValueError(f"{path}: {dataset.name} has shape {getattr(dataset, 'shape', None)}"
                             f"; expected ({n},) like {group.name}/id")
        if h5py.check_string_dtype(dataset.dtype) is not None:
            try:  # Fixed-length HDF5 strings are typed ASCII even when they hold UTF-8 ("µM").
                values = [_clean(v) for v in dataset.asstr("utf-8")[()]]
            except UnicodeDecodeError:
                values = [_clean(v) for v in dataset.asstr("latin-1")[()]]
        elif dataset.dtype.kind in "iu":
            values = [_clean(int(v)) for v in dataset[()]]
        elif dataset.dtype.kind == "f":
            values = [_clean(np.format_float_positional(v, trim="-")) for v in dataset[()]]
        else:
            raise ValueError(f"{path}: {dataset.name} has unsupported dtype {dataset.dtype}")
        columns[name] = values
    table = pd.DataFrame(columns)
    if (table["id"] == "").any():
        raise ValueError(f"{path}: {group.name}/id has empty ids")
    return table


def _join(table: pd.DataFrame, info_path, key: str, what: str) -> pd.DataFrame:
    info = _read_strings(info_path)
    key = key if key in info.columns else info.columns[0]
    duplicated = info[key][info[key].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"{info_path}: repeated {key} values {_first(duplicated)}")
    info = info.set_index(key)
    missing = pd.Index(table["id"]).difference(info.index).tolist()
    if missing:
        raise ValueError(f"{info_path}: no row for {len(missing)} {what} ids {_first(missing)}")
    info = info.loc[table["id"]].reset_index(drop=True)
    kept = table.drop(columns=[c for c in info.columns if c in table.columns and c != "id"])
    return pd.concat([kept.reset_index(drop=True), info], axis=1)
