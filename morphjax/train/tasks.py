"""What a model family plugs into the one training loop, and the registry of families."""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import grain
import jax
import ml_collections

from morphjax.train.state import TrainState

# config.task -> "module:Class". Later model families register here.
TASKS = {
    "classifier": "morphjax.train.classifier:ClassifierTask",
    "impa": "morphjax.train.impa:ImpaTask",  # IMPA and GRAPE
    "cpcnn": "morphjax.train.cpcnn:CpcnnTask",  # Cell Painting CNN
    "morphdiff_autoencoder": "morphjax.train.morphdiff:MorphDiffAutoencoderTask",  # stage 1
    "morphdiff_ldm": "morphjax.train.morphdiff:MorphDiffLdmTask",  # stage 2
}


class Task(Protocol):
    """A model family: builds its train state and supplies pure step functions and data.

    `train_step`, `eval_step` and `samples` are traced once under `jax.jit` by the loop; they act
    on a merged `TrainState` (mutating it NNX-style) and return arrays.
    """

    config: ml_collections.ConfigDict

    def build(self, rngs: Any) -> TrainState:
        """Creates models and optimizers (traced under jit with the state's shardings)."""

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        """Infinite, checkpointable iterator of this process's share of each training batch."""

    def eval_dataset(self, process_index: int, process_count: int) -> grain.IterDataset | None:
        """One ordered pass over evaluation batches with a boolean `valid` field, or None."""

    def train_step(self, state: TrainState, batch: Any, rng: jax.Array) -> dict[str, jax.Array]:
        """Updates `state` in place from one global batch; returns scalar metrics incl. `loss`."""

    def eval_step(self, state: TrainState, batch: Any) -> dict[str, jax.Array]:
        """Per-batch metric sums and a `count`; the loop reports sum / count."""

    def samples(self, state: TrainState, batch: Any) -> dict[str, jax.Array]:
        """Image batches (NHWC) to write as PNG grids at sample steps."""


def get_task(config: ml_collections.ConfigDict) -> Task:
    if config.task not in TASKS:
        raise ValueError(f"config.task {config.task!r} is not one of {sorted(TASKS)}")
    module_name, class_name = TASKS[config.task].split(":")
    return getattr(importlib.import_module(module_name), class_name)(config)
