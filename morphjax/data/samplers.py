"""Epoch samplers as infinite `grain.MapDataset`s.

Each sampler builds one index table per epoch from `(seed, epoch)` alone, so item `i` is a
pure function of `(seed, i)`: grain's iterator state (`next_index`) is enough to checkpoint
and resume the stream, and every process computes the same global order before taking its
slice. Tables are cached for the most recent epochs.
"""

import abc
import sys

import grain
import numpy as np

_CACHED_EPOCHS = 2


class _EpochSampler(grain.MapDataset):
    """Infinite dataset; item i reads the parent at `table(epoch)[i % epoch_length]`."""

    def __init__(self, parent: grain.MapDataset, seed: int, epoch_length: int):
        super().__init__(parent)
        _check_seed(seed)
        self._seed = int(seed)
        self.epoch_length = int(epoch_length)
        self._tables = {}

    def __len__(self) -> int:
        return sys.maxsize

    @abc.abstractmethod
    def _make_table(self, epoch: int) -> np.ndarray:
        """The parent indices read in `epoch` (subclasses define the sampling)."""

    def _table(self, epoch: int) -> np.ndarray:
        table = self._tables.get(epoch)
        if table is None:
            table = self._make_table(epoch)
            # Build a new dict and swap it in: safe against grain's reader threads.
            kept = {e: t for e, t in self._tables.items() if e > epoch - _CACHED_EPOCHS}
            kept[epoch] = table
            self._tables = kept
        return table

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(int(index), self.epoch_length)
        return self._read(self._table(epoch), position)

    def _read(self, table: np.ndarray, position: int):
        return self._parent[int(table[position])]


def _check_seed(seed: int) -> None:
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")


def _check_per_example(name: str, values: np.ndarray, parent: grain.MapDataset) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array with one entry per example, got shape {values.shape}.")
    if len(values) != len(parent):
        raise ValueError(
            f"{name} has {len(values)} entries but the dataset has {len(parent)} examples; "
            "they must match one to one."
        )
    return values


def _group_by_value(values: np.ndarray):
    """Distinct values, their counts, and member indices sorted by value (one slice per value)."""
    distinct, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    members = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return distinct, counts, starts, members


def balanced_epoch_indices(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Example indices of one class-balanced epoch, shuffled.

    Cell Painting CNN paper (Methods, "Training cell painting models"): each epoch draws the
    median class count from every class; classes with at least that many examples are sampled
    without replacement (fresh cells each epoch), smaller classes are oversampled with
    replacement. For an even number of classes the median is rounded down.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}.")
    _check_seed(seed)
    _, counts, starts, members = _group_by_value(labels)
    per_class = int(np.median(counts))
    rng = np.random.default_rng([int(seed), int(epoch)])
    picks = []
    for start, count in zip(starts, counts):
        pool = members[start : start + count]
        picks.append(rng.choice(pool, size=per_class, replace=count < per_class))
    return rng.permutation(np.concatenate(picks))


class _ClassBalanced(_EpochSampler):

    def __init__(self, parent, labels, seed):
        labels = _check_per_example("labels", labels, parent)
        if len(labels) == 0:
            raise ValueError("class_balanced needs a non-empty dataset.")
        _, counts = np.unique(labels, return_counts=True)
        super().__init__(parent, seed, epoch_length=len(counts) * int(np.median(counts)))
        self._labels = labels
        self.num_classes = len(counts)

    def _make_table(self, epoch):
        return balanced_epoch_indices(self._labels, self._seed, epoch)

    def __str__(self) -> str:
        return f"ClassBalanced(classes={self.num_classes}, epoch_length={self.epoch_length})"


def class_balanced(parent: grain.MapDataset, labels: np.ndarray, seed: int) -> grain.MapDataset:
    """Infinite class-balanced stream over `parent`; see `balanced_epoch_indices`.

    `labels[i]` is the class of `parent[i]`. The result has an `epoch_length` attribute
    (classes x median count).
    """
    return _ClassBalanced(parent, labels, seed)


class _ControlTreatedPairs(_EpochSampler):

    def __init__(self, parent, is_control, perturbation, seed, balance_perturbations):
        is_control = _check_per_example("is_control", is_control, parent)
        if is_control.dtype != bool:
            raise TypeError(f"is_control must be a boolean array, got dtype {is_control.dtype}.")
        perturbation = _check_per_example("perturbation", perturbation, parent)
        controls = np.flatnonzero(is_control)
        treated = np.flatnonzero(~is_control)
        if controls.size == 0:
            raise ValueError(
                "control_treated_pairs: no control examples (is_control is all False).")
        if treated.size == 0:
            raise ValueError("control_treated_pairs: no treated examples (is_control is all True).")
        super().__init__(parent, seed, epoch_length=controls.size)
        self._controls = controls
        self._treated = treated
        self._balance = bool(balance_perturbations)
        _, self._pert_counts, self._pert_starts, members = _group_by_value(perturbation[treated])
        self._treated_by_pert = treated[members]

    def _make_table(self, epoch):
        rng = np.random.default_rng([self._seed, int(epoch)])
        controls = rng.permutation(self._controls)
        n = controls.size
        if self._balance:
            pert = rng.integers(len(self._pert_counts), size=n)
            within = rng.integers(self._pert_counts[pert])
            treated = self._treated_by_pert[self._pert_starts[pert] + within]
        else:
            treated = self._treated[rng.integers(self._treated.size, size=n)]
        return np.stack([controls, treated])

    def _read(self, table, position):
        return {
            "control": self._parent[int(table[0, position])],
            "treated": self._parent[int(table[1, position])],
        }

    def __str__(self) -> str:
        return (
            f"ControlTreatedPairs(controls={self._controls.size}, treated={self._treated.size}, "
            f"balance_perturbations={self._balance})"
        )


def control_treated_pairs(
    parent: grain.MapDataset,
    is_control: np.ndarray,
    perturbation: np.ndarray,
    seed: int,
    balance_perturbations: bool = False,
) -> grain.MapDataset:
    """Infinite stream of `{"control": parent[c], "treated": parent[t]}` pairs.

    IMPA (Methods; reference solver): one epoch visits every control once in a fresh order and
    pairs it with a treated (non-control) example drawn uniformly from all treated examples, so
    target perturbations follow their image frequency. `balance_perturbations=True` draws the
    perturbation uniformly first and then one of its cells (GRAPE's balanced sampler).
    The result has an `epoch_length` attribute (the number of controls).
    """
    return _ControlTreatedPairs(parent, is_control, perturbation, seed, balance_perturbations)
