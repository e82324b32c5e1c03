"""Image classifier task: cross-entropy on labelled crops with class-balanced epochs.

The foundation task (generated shapes) and later the weakly supervised Cell Painting CNN
(cell_painting_cnn.txt, Methods: treatment classification, balanced epochs, augmentation) share it.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from morphjax import data
from morphjax.models.classifier import SmallCNN
from morphjax.train.grads import value_and_grad
from morphjax.train.optim import make_optimizer
from morphjax.train.state import TrainState

MODEL = "classifier"


def _to_model_range(images: jax.Array) -> jax.Array:
    return images * 2.0 - 1.0  # [0, 1] -> [-1, 1]


class ClassifierTask:
    """Builds `SmallCNN`, trains it with cross-entropy, reports loss and accuracy."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        d = config.data
        if d.name != "shapes":
            raise ValueError(f"data.name {d.name!r}: the classifier task reads 'shapes'")
        arrays = data.make_shapes_dataset(
            d.num_train + d.num_eval, image_size=d.image_size, channels=d.channels,
            num_classes=d.num_classes, class_weights=d.class_weights or None, seed=d.seed)
        self.train_arrays = {k: v[:d.num_train] for k, v in arrays.items()}
        self.eval_arrays = {k: v[d.num_train:] for k, v in arrays.items()}

    # -- data ---------------------------------------------------------------------------------
    def _local_batch(self, process_count: int) -> int:
        return self.config.train.batch_size // process_count

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        d = self.config.data
        return data.make_train_dataset(
            data.ArraySource(self.train_arrays), batch_size=self._local_batch(process_count),
            seed=self.config.seed, transform=data.make_augment(d.augment),
            labels=self.train_arrays["label"], balance_classes=d.balance_classes,
            process_index=process_index, process_count=process_count, num_workers=d.num_workers)

    def eval_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        return data.make_eval_dataset(
            data.ArraySource(self.eval_arrays), batch_size=self._local_batch(process_count),
            transform=lambda item: {**item, "image": data.to_float(item["image"])},
            process_index=process_index, process_count=process_count)

    # -- model ----------------------------------------------------------------------------------
    def build(self, rngs: nnx.Rngs) -> TrainState:
        c = self.config
        model = SmallCNN(c.data.channels, c.data.num_classes, c.model.widths,
                         dtype=jnp.dtype(c.compute_dtype), rngs=rngs)
        optimizer = nnx.Optimizer(model, make_optimizer(c.optimizer, c.train.total_steps),
                                  wrt=nnx.Param)
        return TrainState({MODEL: model}, {MODEL: optimizer}, ema_decay=c.train.ema_decay)

    @staticmethod
    def loss(model: SmallCNN, batch: dict[str, jax.Array], rng: jax.Array):
        del rng  # No stochastic layers.
        logits = model(_to_model_range(batch["image"]), train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return loss, {"accuracy": accuracy}

    def train_step(self, state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
        model = state.models[MODEL]
        loss, aux, grads = value_and_grad(self.loss, model, batch, rng,
                                          accum_steps=self.config.train.grad_accum_steps)
        state.optimizers[MODEL].update(model, grads)
        return {"loss": loss, "accuracy": aux["accuracy"], "grad_norm": optax.tree.norm(grads)}

    def eval_step(self, state: TrainState, batch: dict[str, jax.Array]):
        model = state.eval_model(MODEL)
        logits = model(_to_model_range(batch["image"]), train=False)
        valid = batch["valid"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
        return {"loss": (ce * valid).sum(), "accuracy": (correct * valid).sum(),
                "count": valid.sum()}

    def samples(self, state: TrainState, batch: dict[str, Any]):
        del state
        return {"train_inputs": batch["image"][:16]}

