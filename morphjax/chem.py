"""RDKit helpers: SMILES parsing, Morgan fingerprints, Tanimoto similarity, scaffold splits.

IMPA embeds compounds as Morgan fingerprints (impa.txt, "Perturbation embedding"); the
synthetic screen makes a compound's effect a smooth function of the same fingerprints, and
held-out-compound splits group molecules by Bemis-Murcko scaffold so that test compounds are
structurally new (the usual scaffold split of MoleculeNet / chemprop).
"""

from collections.abc import Sequence

import numpy as np
from rdkit import Chem
from rdkit import rdBase
from rdkit.Chem import rdFingerprintGenerator
from rdkit.Chem.Scaffolds import MurckoScaffold


def parse_smiles(smiles: str) -> Chem.Mol:
    """The molecule of `smiles`; ValueError naming the SMILES if RDKit cannot parse it."""
    if not isinstance(smiles, str) or not smiles.strip():
        raise ValueError(f"Invalid SMILES {smiles!r}: expected a non-empty string.")
    with rdBase.BlockLogs():  # The ValueError below says it; keep RDKit's log off stderr.
        mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        raise ValueError(f"Invalid SMILES {smiles!r}: RDKit could not parse it.")
    return mol


def morgan_fingerprints(
    smiles: Sequence[str], radius: int = 2, n_bits: int = 2048
) -> np.ndarray:
    """Morgan (ECFP-like) bit fingerprints, uint8 array of shape (len(smiles), n_bits)."""
    if isinstance(smiles, str):
        raise TypeError("morgan_fingerprints takes a sequence of SMILES, not one string.")
    if radius < 0 or n_bits < 1:
        raise ValueError(f"Need radius >= 0 and n_bits >= 1, got {radius} and {n_bits}.")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    fingerprints = np.zeros((len(smiles), n_bits), dtype=np.uint8)
    for i, s in enumerate(smiles):
        fingerprints[i] = generator.GetFingerprintAsNumPy(parse_smiles(s))
    return fingerprints


def tanimoto(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Tanimoto similarity |a & b| / |a | b| between rows of two bit matrices, shape (Na, Nb).

    Rows are 0/1 vectors (any nonzero counts as 1). Two empty fingerprints have similarity 0,
    as in RDKit's `DataStructs.TanimotoSimilarity`.
    """
    a = np.atleast_2d(np.asarray(a) != 0).astype(np.float64)
    b = np.atleast_2d(np.asarray(b) != 0).astype(np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"tanimoto needs two (N, n_bits) matrices with equal n_bits, got {a.shape} and "
            f"{b.shape}.")
    intersection = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def murcko_scaffold(smiles: str) -> str:
    """Canonical SMILES of the Bemis-Murcko scaffold (ring systems + linkers, side chains
    removed, atom types kept); "" for an acyclic molecule."""
    mol = parse_smiles(smiles)
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)


def scaffold_split(smiles: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """Boolean `is_test` per molecule, keeping each Murcko scaffold group on one side.

    Rule: molecules are grouped by `murcko_scaffold`; acyclic molecules (scaffold "") share
    no ring system, so each distinct acyclic molecule (canonical SMILES) is its own group.
    The groups are visited in a random order drawn from `seed`, and a group goes to test
    when it fits, i.e. the test count stays <= round(test_fraction * N); groups that would
    overshoot stay in train. The walk stops once the target is met. If no group fits (every
    group is larger than the target) the smallest group, first in the seeded order, goes to
    test so that the test side is never empty.
    """
    if isinstance(smiles, str):
        raise TypeError("scaffold_split takes a sequence of SMILES, not one string.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    n = len(smiles)
    if n == 0:
        return np.zeros(0, dtype=bool)
    keys = []
    for s in smiles:
        scaffold = murcko_scaffold(s)
        keys.append(scaffold if scaffold else "acyclic:" + Chem.MolToSmiles(parse_smiles(s)))
    group_names, group_of = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    sizes = np.bincount(group_of, minlength=len(group_names))
    order = np.random.default_rng(seed).permutation(len(group_names))
    target = int(round(test_fraction * n))
    test_groups = []
    n_test = 0
    for g in order:
        if n_test >= target:
            break
        if n_test + sizes[g] <= target:
            test_groups.append(g)
            n_test += sizes[g]
    if not test_groups:
        test_groups.append(order[np.argmin(sizes[order])])
    return np.isin(group_of, test_groups)
