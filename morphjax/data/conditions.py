"""Perturbation embeddings: the vectors condition encoders read (impa.txt, "Perturbation embedding").

Compounds get RDKit Morgan fingerprints (radius 2, 1024 bits, binary) from their SMILES; genetic
perturbations get their target gene's vector from a gene-embedding file (Gene2Vec text or CSV) or,
on the synthetic screen, its provided `gene_embeddings.npy`; CRISPR guides and siRNAs may add a
k-mer profile of their sequence (stand-in for the paper's HyenaDNA sequence embedding, whose
weights cannot be shipped). One matrix per modality, one row per perturbation id of the dataset.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from morphjax import chem, io

GENETIC = ("crispr", "orf", "sirna")


def read_gene_embeddings(path: str | os.PathLike) -> pd.DataFrame:
    """Gene -> vector table from a Gene2Vec/word2vec text file or a CSV indexed by gene symbol.

    Text format: optional header line "<n> <dim>", then "<GENE> v1 v2 ..." per line (spaces or
    tabs). CSV: first column the gene symbol, other columns the vector (IMPA's embedding CSVs).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gene embedding file {path} does not exist")
    if path.endswith(".csv"):
        table = pd.read_csv(path, index_col=0)
        table.index = table.index.astype(str)
    else:
        rows, names = [], []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue  # word2vec header
                try:
                    rows.append([float(v) for v in parts[1:]])
                except ValueError:
                    raise ValueError(f"{path}:{number}: expected '<gene> <numbers...>', got "
                                     f"{line.strip()[:80]!r}") from None
                names.append(parts[0])
        widths = {len(r) for r in rows}
        if len(widths) != 1:
            raise ValueError(f"{path}: rows have different lengths {sorted(widths)}")
        table = pd.DataFrame(rows, index=names)
    if table.index.duplicated().any():
        raise ValueError(f"{path}: duplicated genes {list(table.index[table.index.duplicated()][:5])}")
    if not np.isfinite(table.to_numpy(np.float64)).all():
        raise ValueError(f"{path}: non-finite values in the embedding table")
    return table.astype(np.float32)


def kmer_profile(sequences: Sequence[str], k: int) -> np.ndarray:
    """Normalised k-mer counts over ACGT (4**k columns); empty sequences give zeros."""
    kmers = {"".join(p): i for i, p in enumerate(itertools.product("ACGT", repeat=k))}
    out = np.zeros((len(sequences), len(kmers)), np.float32)
    for row, sequence in enumerate(sequences):
        sequence = sequence.upper().replace("U", "T")
        for i in range(len(sequence) - k + 1):
            index = kmers.get(sequence[i:i + k])
            if index is not None:
                out[row, index] += 1
        out[row] /= max(out[row].sum(), 1.0)
    return out


def cached_morgan(smiles: Sequence[str], radius: int, n_bits: int, cache_dir: str | None
                  ) -> np.ndarray:
    """Morgan fingerprints, cached on disk by the hash of the SMILES list and settings."""
    key = hashlib.sha1(json.dumps([list(smiles), radius, n_bits]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"morgan_r{radius}_{n_bits}_{key}.npy") if cache_dir else None
    if path and os.path.isfile(path):
        return np.load(path)
    fingerprints = chem.morgan_fingerprints(list(smiles), radius=radius, n_bits=n_bits)
    if path:
        io.atomic_write_npy(path, fingerprints)
    return fingerprints


def _modality(row: pd.Series) -> str:
    modality = str(row.get("modality", "") or "")
    if modality:
        return modality
    return "compound" if row["type"] in ("compound", "control") else str(row["type"])


def perturbation_modalities(perturbations: pd.DataFrame) -> list[str]:
    """Modality of each perturbation: the table's `modality` column, else compound/genetic type."""
    return [_modality(row) for _, row in perturbations.iterrows()]


def perturbation_embeddings(dataset_dir: str, perturbations: pd.DataFrame, *,
                            morgan_bits: int = 1024, morgan_radius: int = 2,
                            gene_embeddings: str = "", sequence_kmer: int = 0,
                            cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """One (num_perturbations, dim) float32 matrix per modality; rows of other modalities are 0.

    Controls keep a zero row (they are inputs, never targets, in perturbation mode).
    """
    modalities = perturbation_modalities(perturbations)
    names = perturbations["perturbation"].astype(str).tolist()
    is_control = perturbations["is_control"].astype(int).to_numpy().astype(bool)
    genes = _gene_table(dataset_dir, gene_embeddings) if any(
        t in GENETIC for t in perturbations["type"]) else None
    out = {}
    for modality in dict.fromkeys(modalities):
        rows = [i for i, m in enumerate(modalities) if m == modality and not is_control[i]]
        types = set(perturbations["type"].iloc[rows]) if rows else set()
        if types <= {"compound"}:
            smiles = perturbations["smiles"].iloc[rows].astype(str).tolist()
            missing = [names[i] for i, s in zip(rows, smiles) if not s.strip()]
            if missing:
                raise ValueError(f"compounds without SMILES cannot be embedded: {missing[:10]}; "
                                 "add their SMILES to perturbations.csv")
            block = cached_morgan(smiles, morgan_radius, morgan_bits, cache_dir).astype(np.float32)
        else:
            targets = perturbations["target_gene"].iloc[rows].astype(str).tolist()
            missing = sorted({g for g in targets if g not in genes.index})
            if missing:
                raise ValueError(f"no gene embedding for target genes {missing[:10]} "
                                 f"({len(missing)} in all) of modality {modality!r}")
            block = genes.loc[targets].to_numpy(np.float32)
            if sequence_kmer:
                sequences = perturbations["sequence"].iloc[rows].astype(str).tolist()
                block = np.concatenate([block, kmer_profile(sequences, sequence_kmer)], axis=1)
        matrix = np.zeros((len(names), block.shape[1] if rows else 1), np.float32)
        matrix[rows] = block
        out[modality] = matrix
    return out


def _gene_table(dataset_dir: str, path: str) -> pd.DataFrame:
    if path:
        return read_gene_embeddings(path)
    vectors = os.path.join(dataset_dir, "gene_embeddings.npy")
    screen = os.path.join(dataset_dir, "screen.json")
    if not (os.path.isfile(vectors) and os.path.isfile(screen)):
        raise FileNotFoundError(
            f"{dataset_dir} has genetic perturbations but no gene_embeddings.npy/screen.json; pass a "
            "Gene2Vec file with --set data.gene_embeddings=PATH")
    with open(screen) as f:
        genes = json.load(f)["genes"]
    return pd.DataFrame(np.load(vectors).astype(np.float32), index=genes)
