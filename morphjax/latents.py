"""Latent cache of a trained MorphDiff autoencoder: posterior moments of every crop, in ArrayRecord.

The LDM stage trains on z ~ N(mean, exp(logvar)) of frozen-encoder posteriors. Encoding every
step (as the reference does) costs a full encoder pass per batch; the moments are encoded once
per split instead and stored as one float32 record per crop (mean and logvar concatenated on the
channel axis, record i = example i of the split), next to the autoencoder run:

  <autoencoder workdir>/latents/step_<N>/<split>.array_record
  <autoencoder workdir>/latents/step_<N>/<split>.json     shape, count, dataset, channels

A cache is reused when its JSON matches the dataset, channels, image size and checkpoint step,
and rebuilt (atomically: written under a temporary name, then renamed) otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from morphjax.io import atomic_write_json
from morphjax.logging import ProgressBar

CACHE_BATCH = 64


class LatentCache:
    """Random access to cached moments: items {"moments": (h, w, 2c) float32, "perturbation_id"}."""

    def __init__(self, path: str, shape: tuple[int, ...], perturbation_ids: np.ndarray):
        self.path, self.shape = path, tuple(shape)
        self._ids = np.asarray(perturbation_ids, np.int64)
        self._source = grain.sources.ArrayRecordDataSource([path])
        if len(self._source) != len(self._ids):
            raise ValueError(f"{path} holds {len(self._source)} latents for {len(self._ids)} "
                             "cells; delete it to re-encode")

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        moments = np.frombuffer(self._source[index], np.float32).reshape(self.shape)
        return {"moments": moments, "perturbation_id": np.int32(self._ids[index])}

    def moments(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self[int(i)]["moments"] for i in indices])


def _load_autoencoder_run(workdir: str):
    from morphjax.runs import load_run  # noqa: PLC0415

    run = load_run(workdir)
    if run.config.task != "morphdiff_autoencoder":
        raise ValueError(f"{workdir} is a {run.config.task!r} run, not a MorphDiff autoencoder")
    return run


def autoencoder_params(workdir: str) -> dict[tuple, np.ndarray]:
    """Flat {path: array} of the trained autoencoder's parameters (its EMA copy if kept)."""
    run = _load_autoencoder_run(workdir)
    params = nnx.state(run.state.eval_model("autoencoder"), nnx.Param)
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(params)}


def ensure_cache(autoencoder_workdir: str, spec, split: str) -> LatentCache:
    """The cache of `split` of `spec` (an ExpressionScreen), encoding it first if needed."""
    from morphjax.checkpoint import Checkpointer  # noqa: PLC0415
    from morphjax.train.morphdiff import open_split, read_run_config, to_model_space  # noqa: PLC0415

    checkpoints = Checkpointer(os.path.join(autoencoder_workdir, "checkpoints"), async_save=False)
    step = checkpoints.latest_step()
    checkpoints.close()
    if step is None:
        raise FileNotFoundError(f"{autoencoder_workdir} has no checkpoint; train the autoencoder "
                                "first (configs/morphdiff.py:PRESET,autoencoder)")
    ae_config = read_run_config(autoencoder_workdir)
    size = int(ae_config.data.image_size)
    directory = os.path.join(autoencoder_workdir, "latents", f"step_{step}")
    path, meta_path = (os.path.join(directory, f"{split}.{ext}") for ext in ("array_record", "json"))
    rows = spec.split_rows(split)
    ids = rows["perturbation_id"].to_numpy()
    expected = {"dataset": os.path.abspath(spec.dataset_dir), "split": split,
                "channels": list(spec.channels), "image_size": size, "step": int(step),
                "count": int(len(rows))}
    if os.path.isfile(meta_path) and os.path.isfile(path):
        meta = _read_json(meta_path)
        if {k: meta.get(k) for k in expected} == expected:
            return LatentCache(path, tuple(meta["shape"]), ids)
        print(f"latent cache {path} was made for other data or weights: re-encoding")

    run = _load_autoencoder_run(autoencoder_workdir)
    autoencoder = run.state.eval_model("autoencoder")
    graphdef, state = nnx.split(autoencoder)

    @jax.jit
    def encode(state, images):
        posterior = nnx.merge(graphdef, state).encode(images)
        return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)

    from array_record.python import array_record_module  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    source = open_split(spec.dataset_dir, split)
    tmp = os.path.join(directory, f".{split}.array_record.tmp")
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    shape = None
    try:
        with ProgressBar(len(rows), desc=f"encoding {split} latents",
                         examples_per_step=1) as progress:
            for start in range(0, len(rows), CACHE_BATCH):
                index = range(start, min(start + CACHE_BATCH, len(rows)))
                batch = np.stack([to_model_space(source[i]["image"], spec.channel_index, size)
                                  for i in index])
                pad = CACHE_BATCH - len(batch)  # One compiled shape for the last batch too.
                padded = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
                moments = np.asarray(encode(state, padded))[:len(batch)].astype(np.float32)
                shape = moments.shape[1:]
                for m in moments:
                    writer.write(m.tobytes())
                progress.update(index[-1] + 1)
    finally:
        writer.close()
    os.replace(tmp, path)
    atomic_write_json(meta_path, {**expected, "shape": list(shape or ())})
    return LatentCache(path, tuple(shape or ()), ids)


def scale_factor(cache: LatentCache, rows: pd.DataFrame, *, seed: int = 0,
                 max_examples: int = 4096) -> float:
    """1 / std(z) over posterior samples of (up to `max_examples`) training latents.

    CompVis `scale_by_std` takes the std of the first training batch (8 crops); a larger
    sample gives the same quantity with less noise.
    """
    rng = np.random.default_rng(seed)
    index = rows["split_index"].to_numpy()
    if index.size > max_examples:
        index = rng.choice(index, max_examples, replace=False)
    moments = cache.moments(np.sort(index))
    mean, logvar = np.split(moments, 2, axis=-1)
    z = mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * rng.standard_normal(mean.shape)
    std = float(z.std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"the cached latents in {cache.path} have std {std}; is the autoencoder "
                         "trained?")
    return 1.0 / std


def _read_json(path: str) -> dict:
    import json  # noqa: PLC0415

    with open(path) as f:
        return json.load(f)
