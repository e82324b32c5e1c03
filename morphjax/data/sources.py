"""Random-access data sources that `grain.MapDataset.source` reads from.

Built screens live as ArrayRecord files written by TFDS builders and are read without
TensorFlow through `tfds.data_source` (DESIGN.md, data flow). Small generated datasets
and tests use `ArraySource` over in-memory arrays.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds


class ArraySource:
    """Random access over a dict of equally long arrays; item i is `{key: array[i]}`.

    Implements grain's RandomAccessDataSource protocol (`__len__`, `__getitem__`).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        if not arrays:
            raise ValueError("ArraySource needs at least one array.")
        arrays = {key: np.asarray(value) for key, value in arrays.items()}
        for key, value in arrays.items():
            if value.ndim == 0:
                raise ValueError(
                    f"ArraySource array {key!r} is a scalar; it needs a leading example axis.")
        first_key = next(iter(arrays))
        length = len(arrays[first_key])
        for key, value in arrays.items():
            if len(value) != length:
                raise ValueError(
                    f"ArraySource array {key!r} has {len(value)} examples but {first_key!r} has "
                    f"{length}; all arrays must share the leading length."
                )
        self._arrays = arrays
        self._length = length

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self._arrays)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not -self._length <= index < self._length:
            raise IndexError(
                f"index {index} out of range for ArraySource of length {self._length}.")
        return {key: value[index] for key, value in self._arrays.items()}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}: {v.dtype}{list(v.shape[1:])}" for k, v in self._arrays.items())
        return f"ArraySource(len={self._length}, {fields})"


class Subset:
    """Random access to `source[indices[i]]`: a split's rows picked by a task (e.g. treated cells)."""

    def __init__(self, source: Sequence[Any], indices: np.ndarray):
        self._source, self._indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> Any:
        return self._source[int(self._indices[i])]


def tfds_source(name: str, split: str, data_dir: str | None = None) -> Sequence[Any]:
    """The whole `split` of a prepared (ArrayRecord) TFDS dataset as a random-access source.

    Never downloads or prepares: a missing dataset is an error naming where it was looked
    for. Per-process sharding happens in the pipeline after the global shuffle (maxtext
    style), so every process opens the same full split.
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} not found in data_dir={data_dir!r}: it is neither a registered "
            "builder nor a prepared dataset there. Import its builder module or pass the data_dir "
            "it was prepared into."
        ) from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Run its builder's "
            "download_and_prepare(file_format='array_record') into that data_dir first."
        )
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
