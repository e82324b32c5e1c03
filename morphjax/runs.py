"""A finished (or running) training run on disk: its config and trained state, for inference."""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from flax import nnx

from morphjax import config as cfg
from morphjax.checkpoint import restore_state
from morphjax.train import loop
from morphjax.train.state import TrainState


@dataclasses.dataclass
class Run:
    workdir: str
    config: ml_collections.ConfigDict
    setup: loop.Setup
    state: TrainState  # merged: call models directly (EMA copies via state.eval_model)
    step: int

    @property
    def task(self):
        return self.setup.task


def _fits_one(config: ml_collections.ConfigDict) -> bool:
    return all(int(config.mesh[a]) in (1, -1) for a in ("data", "fsdp", "tensor"))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's `config.json`, without restoring any state (e.g. to dispatch on its task)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a morphjax run directory (no config.json)")
    with open(path) as f:
        return cfg.from_json(f.read())


def load_run(workdir: str, step: int | None = None, overrides: dict | None = None) -> Run:
    """Reads `workdir/config.json` and restores the newest (or `step`) checkpoint.

    `overrides` replace config fields (e.g. {"data.path": ...} when the dataset moved).
    """
    config = read_config(workdir)
    for key, value in (overrides or {}).items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    s = loop.setup(config, devices=jax.devices()[:1]) if _fits_one(config) else loop.setup(config)
    state, step = restore_state(os.path.join(workdir, "checkpoints"), s.abstract_state,
                                s.shardings, step)
    return Run(os.path.abspath(workdir), config, s, nnx.merge(s.graphdef, state), step)
