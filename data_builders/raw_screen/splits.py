"""Train/test splits of a screen's cells.

- `random_cells`: a seeded random `test_fraction` of all found cells goes to test.
- `plates`: every cell of the plates in `holdout` goes to test (controls included).
- `perturbations`: the cells of the perturbations in `holdout` go to test; with no holdout a
  seeded `test_fraction` of the screen's non-control perturbations (at least one) is drawn.
- `scaffold`: compounds are grouped by Bemis-Murcko scaffold and whole groups go to test
  (`morphjax.chem.scaffold_split`, over one SMILES per compound perturbation); genetic
  perturbations and compounds without SMILES stay in train.
- `given`: the split the screen's files define (IMPA's SPLIT column, DeepProfiler's Split): a
  per-cell `split` column of "train"/"test" set by the real-layout builder.

For `perturbations` and `scaffold`, control cells are needed on both sides: a held-out
perturbation is predicted from control images (IMPA's control -> treated translation), so a
seeded random `test_fraction` of the control cells goes to test and the rest to train.
Fractions count found cells (before border and QC exclusion), so the kept cells follow them
approximately.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from morphjax import chem

SPLITS = ("random_cells", "plates", "perturbations", "scaffold", "given")

_CELL_STREAM, _PERTURBATION_STREAM, _CONTROL_STREAM, _SCAFFOLD_STREAM = range(4)


def _random_subset(n: int, fraction: float, seed: int, stream: int) -> np.ndarray:
    """Boolean mask with exactly round(fraction * n) True entries at seeded positions."""
    mask = np.zeros(n, dtype=bool)
    order = np.random.default_rng([seed, stream]).permutation(n)
    mask[order[: int(round(fraction * n))]] = True
    return mask


def assign_splits(
    cells: pd.DataFrame,
    perturbations: pd.DataFrame,
    *,
    split: str,
    test_fraction: float,
    holdout: Sequence[str],
    seed: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """`is_test` for every row of `cells` (columns Metadata_Plate, perturbation_id) and a
    summary of what was held out."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    holdout = [str(h) for h in holdout]
    if holdout and split not in ("plates", "perturbations"):
        raise ValueError(
            f"holdout {holdout} is only used with split='plates' or 'perturbations', "
            f"not {split!r}.")
    if split == "given":
        if "split" not in cells.columns:
            raise ValueError("split='given' needs a screen whose builder reads a split from its "
                             "files (e.g. IMPA's SPLIT column); this screen has none.")
        return cells["split"].to_numpy() == "test", {"given": True}
    if split != "plates" and not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    n = len(cells)
    pid = cells["perturbation_id"].to_numpy()
    is_control_row = perturbations["is_control"].to_numpy().astype(bool)
    is_control = is_control_row[pid]

    if split == "random_cells":
        return _random_subset(n, test_fraction, seed, _CELL_STREAM), {}

    if split == "plates":
        if not holdout:
            raise ValueError("split='plates' needs holdout=<plate names> for the test side.")
        plates = cells["Metadata_Plate"].to_numpy()
        unknown = sorted(set(holdout) - set(plates))
        if unknown:
            raise ValueError(
                f"Held-out plate(s) {unknown} have no cells; plates are {sorted(set(plates))}.")
        return np.isin(plates, holdout), {"test_plates": sorted(set(holdout))}

    ids = perturbations["perturbation"].to_numpy()
    if split == "perturbations":
        present = np.unique(pid[~is_control])
        if holdout:
            lookup = pd.Index(ids)
            missing = [h for h in holdout if h not in lookup]
            if missing:
                raise ValueError(
                    f"Held-out perturbation(s) {missing} are not in perturbations.csv.")
            test_ids = lookup.get_indexer(holdout)
            controls = [ids[i] for i in test_ids if is_control_row[i]]
            if controls:
                raise ValueError(
                    f"Held-out perturbation(s) {controls} are controls; controls are split "
                    "randomly between train and test, hold out treated perturbations only.")
        else:
            if len(present) == 0:
                raise ValueError("split='perturbations': the screen has no treated cells.")
            k = max(1, int(round(test_fraction * len(present))))
            rng = np.random.default_rng([seed, _PERTURBATION_STREAM])
            test_ids = np.sort(rng.choice(present, size=k, replace=False))
        treated_test = np.isin(pid, test_ids)
        info = {"test_perturbations": sorted(str(ids[i]) for i in test_ids)}
    else:  # scaffold
        present = np.unique(pid[~is_control])
        table = perturbations.iloc[present]
        compound = (table["type"] == "compound") & (table["smiles"] != "")
        compound_ids = present[compound.to_numpy()]
        if len(compound_ids) == 0:
            raise ValueError("split='scaffold': no treated compound with a SMILES in the screen.")
        is_test = chem.scaffold_split(
            list(perturbations["smiles"].to_numpy()[compound_ids]), test_fraction,
            int(np.random.default_rng([seed, _SCAFFOLD_STREAM]).integers(2**31)))
        test_ids = compound_ids[is_test]
        treated_test = np.isin(pid, test_ids)
        no_smiles = present[((table["type"] == "compound") & (table["smiles"] == "")).to_numpy()]
        info = {
            "test_perturbations": sorted(str(ids[i]) for i in test_ids),
            "test_scaffolds": sorted(
                {chem.murcko_scaffold(s) for s in perturbations["smiles"].to_numpy()[test_ids]}),
            "compounds_without_smiles_in_train": sorted(str(ids[i]) for i in no_smiles),
        }
    control_test = np.zeros(n, dtype=bool)
    control_test[is_control] = _random_subset(
        int(is_control.sum()), test_fraction, seed, _CONTROL_STREAM)
    return treated_test | control_test, info
