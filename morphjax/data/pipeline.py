"""Grain input pipelines for training and evaluation.

Every process builds the same global order (same seed), then takes its slice
`[process_index::process_count]` (maxtext's grain pipeline); `batch_size` is per process.
Iterators are grain `DatasetIterator`s: `get_state()` / `set_state()` checkpoint the
position, and since every item is a pure function of (seed, index) a restored iterator
continues with identical batches, augmentations included.
"""

from collections.abc import Callable, Sequence
import sys
from typing import Any

import grain
import jax
import numpy as np

from morphjax.data import samplers

# grain's default (16 threads, 500 elements) is sized for small records; after batching an
# element is a whole batch, so a few in flight per process are enough.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)

_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def _derived_seed(seed: int, stream: int) -> int:
    """Independent 32-bit seeds per use of the run seed.

    grain reshuffles epoch e with seed + e, so run seeds s and s + 1 would share epochs if
    passed through unchanged; hashing them through SeedSequence avoids that.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])


def _as_map_dataset(source: Any) -> grain.MapDataset:
    if isinstance(source, grain.MapDataset):
        return source
    return grain.MapDataset.source(source)


def _process_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"Need 0 <= process_index < process_count, got {index} and {count}.")
    return index, count


def _check_batch_size(batch_size: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size (per process) must be >= 1, got {batch_size}.")


def make_train_dataset(
    source: Sequence[Any] | grain.MapDataset,
    *,
    batch_size: int,
    seed: int,
    transform: Callable[[Any, np.random.Generator], Any] | None = None,
    labels: np.ndarray | None = None,
    balance_classes: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Infinite stream of per-process training batches.

    Order: a fresh global shuffle every epoch (grain's `shuffle().repeat()` reseeds per
    epoch), or class-balanced epochs (`samplers.class_balanced`) with `balance_classes`;
    `labels` (one class per example) are needed then and only length-checked otherwise.
    A `MapDataset` of infinite length (e.g. `control_treated_pairs`) already defines its
    epochs and is used as is. `transform(item, rng)` runs via `random_map` keyed on the
    global index, before the per-process slice, so augmentations do not depend on the
    process layout. Batches drop the remainder; `num_workers > 0` adds `mp_prefetch`.
    """
    _check_batch_size(batch_size)
    index, count = _process_slice(process_index, process_count)
    ds = _as_map_dataset(source)
    infinite = len(ds) >= sys.maxsize
    if balance_classes:
        if labels is None:
            raise ValueError("balance_classes=True needs labels (one class per example).")
        if infinite:
            raise ValueError(
                "balance_classes=True needs a finite dataset; got an infinite sampler.")
        ds = samplers.class_balanced(ds, labels, seed)
    elif labels is not None and len(labels) != len(ds):
        raise ValueError(f"labels has {len(labels)} entries but the source has {len(ds)} examples.")
    elif not infinite:
        if len(ds) == 0:
            raise ValueError("make_train_dataset got an empty source.")
        ds = ds.shuffle(seed=_derived_seed(seed, _SHUFFLE_STREAM)).repeat()
    if transform is not None:
        ds = ds.random_map(transform, seed=_derived_seed(seed, _AUGMENT_STREAM))
    ds = ds[index::count]
    ds = ds.batch(int(batch_size), drop_remainder=True)
    it_ds = ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers)))
    return it_ds


class _PadWithInvalid(grain.MapDataset):
    """Extends `parent` to `length` by repeating its last item; adds a boolean `valid` field."""

    def __init__(self, parent: grain.MapDataset, length: int, num_valid: int):
        super().__init__(parent)
        self._length = length
        self._num_valid = num_valid

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        item = self._parent[min(int(index), len(self._parent) - 1)]
        if not isinstance(item, dict):
            raise TypeError(
                f"Eval examples must be dicts to carry a `valid` mask, got {type(item).__name__}.")
        if "valid" in item:
            raise ValueError(
                "Eval examples already have a 'valid' field; it is reserved for the padding mask.")
        return {**item, "valid": np.bool_(index < self._num_valid)}


def make_eval_dataset(
    source: Sequence[Any] | grain.MapDataset,
    *,
    batch_size: int,
    transform: Callable[[Any], Any] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """One ordered pass over `source`, sliced per process, in equal-shape batches.

    Every process yields the same number of batches (needed for sharded eval); the tail is
    padded by repeating the process's last example with `valid=False`. Across processes
    each example appears exactly once with `valid=True`. `transform(item)` is deterministic.
    """
    _check_batch_size(batch_size)
    index, count = _process_slice(process_index, process_count)
    ds = _as_map_dataset(source)
    total = len(ds)
    if total == 0 or total >= sys.maxsize:
        raise ValueError(f"make_eval_dataset needs a finite, non-empty source; got length {total}.")
    if transform is not None:
        ds = ds.map(transform)
    local = ds[index::count]
    num_valid = len(local)
    if num_valid == 0:  # fewer examples than processes: pad with the last example
        local = ds[total - 1 :]
    per_process = -(-total // count)
    num_batches = -(-per_process // int(batch_size))
    padded = _PadWithInvalid(local, num_batches * int(batch_size), num_valid)
    return padded.batch(int(batch_size)).to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
