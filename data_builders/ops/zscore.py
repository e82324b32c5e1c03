"""Per-batch channel z-scoring by the non-targeting cells (grape.txt 3.2).

GRAPE normalises every crop "by channel-wise z-scoring using the mean and standard deviation
of the non-targeting control images from the same experiment batch". That is a training-time
transform of the stored uint8 crops: `zscore_statistics` measures, per batch and channel, the
mean and (population) standard deviation of the control crops' pixels in [0, 1] units
(uint8 / 255, the rescaled range of grape.txt 3.2); `zscore` is what a GRAPE data pipeline
applies to a batch of crops with their `batch_id`s.
"""

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from data_builders.raw_screen import open_split, read_build_report, read_tables

STATISTICS_FILE = "zscore_by_batch.csv"
MIN_STD = 1e-6


def zscore_statistics(out_dir: str | os.PathLike,
                      splits: Sequence[str] = ("train",)) -> pd.DataFrame:
    """Per batch and channel: mean, std and cell count of the control (non-targeting) crops
    of `splits` of a built screen. Batches without control cells get NaN mean/std, n_cells 0.

    Only the training split by default, so no statistic is measured on test cells.
    """
    out_dir = os.fspath(out_dir)
    channels = read_build_report(out_dir)["channels"]
    tables = read_tables(out_dir)
    cells, batches = tables["cells"], tables["batches"]
    n_channels = len(channels)
    sums = np.zeros((len(batches), n_channels), np.float64)
    squares = np.zeros((len(batches), n_channels), np.float64)
    pixels = np.zeros(len(batches), np.int64)
    n_cells = np.zeros(len(batches), np.int64)
    for split in splits:
        rows = cells[(cells["split"] == split) & (cells["is_control"] == 1)]
        if rows.empty:
            continue
        source = open_split(out_dir, split)
        for split_index, batch_id in zip(rows["split_index"], rows["batch_id"]):
            item = source[int(split_index)]
            if int(item["batch_id"]) != int(batch_id):
                raise ValueError(
                    f"{out_dir}: cells.csv and the {split} split disagree at split_index "
                    f"{split_index} (batch {batch_id} vs {int(item['batch_id'])}).")
            image = item["image"].astype(np.float64).reshape(-1, n_channels) / 255.0
            sums[batch_id] += image.sum(axis=0)
            squares[batch_id] += (image**2).sum(axis=0)
            pixels[batch_id] += image.shape[0]
            n_cells[batch_id] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / pixels[:, None]
        std = np.sqrt(np.maximum(squares / pixels[:, None] - mean**2, 0.0))
    return pd.DataFrame({
        "batch": np.repeat(batches["name"].to_numpy(), n_channels),
        "batch_id": np.repeat(batches["id"].to_numpy(), n_channels),
        "channel": np.tile(np.asarray(channels, dtype=object), len(batches)),
        "mean": mean.reshape(-1),
        "std": std.reshape(-1),
        "n_cells": np.repeat(n_cells, n_channels),
    })


def write_zscore_statistics(out_dir: str | os.PathLike,
                            splits: Sequence[str] = ("train",)) -> pd.DataFrame:
    """zscore_statistics written to OUT/zscore_by_batch.csv."""
    stats = zscore_statistics(out_dir, splits)
    stats.to_csv(os.path.join(os.fspath(out_dir), STATISTICS_FILE), index=False, na_rep="NaN")
    return stats


def zscore(images: np.ndarray, batch_ids: np.ndarray, stats: pd.DataFrame) -> np.ndarray:
    """uint8 crops (N, H, W, C) -> float32 (x / 255 - mean[batch, c]) / std[batch, c].

    `stats` is zscore_statistics' table (rows per batch_id and channel, channels in dataset
    order). A batch without control statistics is an error naming it.
    """
    images = np.asarray(images)
    batch_ids = np.asarray(batch_ids).reshape(-1)
    if images.ndim != 4 or len(images) != len(batch_ids):
        raise ValueError(
            f"zscore needs images (N, H, W, C) and N batch ids; got {images.shape} and "
            f"{batch_ids.shape}.")
    table = stats.sort_values("batch_id", kind="stable")
    n_channels = images.shape[-1]
    ids = table["batch_id"].to_numpy()[::n_channels]
    if len(table) != len(ids) * n_channels:
        raise ValueError(f"zscore statistics do not have {n_channels} channels per batch.")
    mean = table["mean"].to_numpy(np.float64).reshape(len(ids), n_channels)
    std = table["std"].to_numpy(np.float64).reshape(len(ids), n_channels)
    lookup = pd.Index(ids).get_indexer(batch_ids)
    missing = sorted(set(batch_ids[lookup < 0].tolist()))
    if missing:
        raise ValueError(f"No z-score statistics for batch_id(s) {missing}.")
    no_controls = sorted(set(batch_ids[np.isnan(mean[lookup]).any(axis=1)].tolist()))
    if no_controls:
        raise ValueError(
            f"Batch_id(s) {no_controls} have no non-targeting cells to z-score against.")
    m = mean[lookup][:, None, None, :]
    s = np.maximum(std[lookup], MIN_STD)[:, None, None, :]
    return ((images.astype(np.float64) / 255.0 - m) / s).astype(np.float32)
