"""morphjax.chem against RDKit's own fingerprint, similarity and scaffold functions."""

import os

import numpy as np
import pandas as pd
import pytest
from rdkit import Chem
from rdkit import DataStructs
from rdkit.Chem import AllChem
from rdkit.Chem.Scaffolds import MurckoScaffold

from morphjax import chem

BBBC021_SMILES = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "bbbc021",
    "BBBC021_compound_smiles.csv")

SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O",  # aspirin
    "OC(=O)c1ccccc1O",  # salicylic acid: same benzene scaffold
    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",  # caffeine
    "CCO",  # ethanol: acyclic
    "CCCCO",  # butanol: acyclic
    "c1ccc2ccccc2c1",  # naphthalene
    "Cc1ccc2ccccc2c1",  # 2-methylnaphthalene: naphthalene scaffold
    "C1CCNCC1C(=O)O",  # a piperidine
    "O=C(O)c1ccncc1",  # isonicotinic acid: pyridine scaffold
    "CC(C)Cc1ccc(cc1)C(C)C(=O)O",  # ibuprofen: benzene scaffold
]


def _smiles_table():
    if os.path.exists(BBBC021_SMILES):
        return list(pd.read_csv(BBBC021_SMILES)["smiles"])
    return SMILES


def _rdkit_bitvects(smiles, radius, n_bits):
    gen = AllChem.GetMorganGenerator(radius=radius, fpSize=n_bits)
    return [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles]


def test_parse_smiles_rejects_bad_input_naming_it():
    assert chem.parse_smiles("CCO").GetNumAtoms() == 3
    for bad in ["C1CC", "not_a_smiles", ""]:
        with pytest.raises(ValueError, match="Invalid SMILES") as info:
            chem.parse_smiles(bad)
        assert repr(bad) in str(info.value)


def test_morgan_fingerprints_match_rdkit_bits():
    smiles = SMILES + _smiles_table()[:12]
    for radius, n_bits in [(2, 2048), (3, 1024)]:
        fps = chem.morgan_fingerprints(smiles, radius=radius, n_bits=n_bits)
        assert fps.dtype == np.uint8 and fps.shape == (len(smiles), n_bits)
        for row, bv in zip(fps, _rdkit_bitvects(smiles, radius, n_bits)):
            on = np.zeros(n_bits, np.uint8)
            on[list(bv.GetOnBits())] = 1
            np.testing.assert_array_equal(row, on)
    # Radius changes the bits: the helper really passes it through.
    assert not np.array_equal(
        chem.morgan_fingerprints(SMILES, radius=1), chem.morgan_fingerprints(SMILES, radius=2))


def test_morgan_fingerprints_name_the_bad_smiles():
    with pytest.raises(ValueError, match="C1CC"):
        chem.morgan_fingerprints(["CCO", "C1CC"])


def test_tanimoto_matches_bulk_tanimoto():
    smiles = SMILES + _smiles_table()
    fps = chem.morgan_fingerprints(smiles, n_bits=1024)
    bitvects = _rdkit_bitvects(smiles, 2, 1024)
    sims = chem.tanimoto(fps[:7], fps)
    assert sims.shape == (7, len(smiles))
    for i in range(7):
        expected = DataStructs.BulkTanimotoSimilarity(bitvects[i], bitvects)
        np.testing.assert_allclose(sims[i], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(chem.tanimoto(fps, fps)), 1.0)


def test_tanimoto_of_empty_fingerprints_is_zero():
    empty = np.zeros((1, 16), np.uint8)
    ones = np.ones((1, 16), np.uint8)
    assert chem.tanimoto(empty, empty)[0, 0] == 0.0
    assert chem.tanimoto(empty, ones)[0, 0] == 0.0
    with pytest.raises(ValueError, match="n_bits"):
        chem.tanimoto(np.zeros((2, 8)), np.zeros((2, 16)))


def test_murcko_scaffold_matches_rdkit():
    for s in SMILES + _smiles_table():
        expected = MurckoScaffold.MurckoScaffoldSmiles(smiles=s, includeChirality=False)
        assert chem.murcko_scaffold(s) == expected
    assert chem.murcko_scaffold("CCO") == ""
    assert chem.murcko_scaffold("CC(=O)Oc1ccccc1C(=O)O") == "c1ccccc1"


def _groups(smiles):
    keys = []
    for s in smiles:
        scaffold = MurckoScaffold.MurckoScaffoldSmiles(smiles=s, includeChirality=False)
        keys.append(scaffold or "acyclic:" + Chem.CanonSmiles(s))
    return np.asarray(keys)


@pytest.mark.parametrize("fraction", [0.2, 0.3, 0.5])
def test_scaffold_split_keeps_scaffold_groups_together(fraction):
    smiles = SMILES + _smiles_table()
    groups = _groups(smiles)
    target = round(fraction * len(smiles))
    seen = set()
    for seed in range(6):
        is_test = chem.scaffold_split(smiles, fraction, seed)
        assert is_test.dtype == bool and is_test.shape == (len(smiles),)
        assert not set(groups[is_test]) & set(groups[~is_test])
        assert 0 < is_test.sum() <= target
        np.testing.assert_array_equal(is_test, chem.scaffold_split(smiles, fraction, seed))
        seen.add(tuple(is_test))
    assert len(seen) > 1, "different seeds should give different splits"


def test_scaffold_split_acyclic_molecules_are_separate_groups():
    # Four acyclic molecules and one large benzene group: the acyclic ones fill the test side
    # one by one, never as a single "" group.
    smiles = ["CCO", "CCCO", "CCCCO", "CCN"] + ["c1ccccc1" + "C" * k for k in range(1, 7)]
    for seed in range(10):
        is_test = chem.scaffold_split(smiles, 0.2, seed)
        assert is_test.sum() == 2
        assert not is_test[4:].any()


def test_scaffold_split_never_empty_and_validates():
    # One group of 3 exceeds the 0.1 * 5 target; the smallest group is used instead.
    smiles = ["c1ccccc1C", "c1ccccc1CC", "c1ccccc1O", "C1CCCCC1C", "C1CCCCC1O"]
    is_test = chem.scaffold_split(smiles, 0.1, 0)
    np.testing.assert_array_equal(is_test, [False, False, False, True, True])
    with pytest.raises(ValueError, match="test_fraction"):
        chem.scaffold_split(smiles, 1.0, 0)
    with pytest.raises(ValueError, match="C1CC"):
        chem.scaffold_split(["CCO", "C1CC"], 0.5, 0)
