"""Gradients with optional accumulation over micro-batches, for any task's loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _split_micro(x: jax.Array, steps: int) -> jax.Array:
    # Micro-batch i takes rows i, i + steps, ...: each device keeps its own rows (no resharding).
    return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)


def value_and_grad(loss_fn: LossFn, model: Any, batch: Any, rng: jax.Array, *,
                   accum_steps: int = 1) -> tuple[jax.Array, dict[str, jax.Array], nnx.State]:
    """`loss_fn(model, batch, rng) -> (loss, aux)`; returns (loss, aux, grads w.r.t. nnx.Param).

    With `accum_steps > 1` the batch is cut into that many micro-batches whose gradients are
    averaged inside one `lax.scan`, so peak activation memory is that of one micro-batch.
    Non-parameter state (normalisation statistics) is threaded through the micro-batches.
    """
    if accum_steps == 1:
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)  # w.r.t. nnx.Param of arg 0
        (loss, aux), grads = grad_fn(model, batch, rng)
        return loss, aux, grads

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def micro_loss(params, rest, micro_batch, micro_rng):
        merged = nnx.merge(graphdef, params, rest, copy=True)
        loss, aux = loss_fn(merged, micro_batch, micro_rng)
        return loss, (aux, nnx.state(merged, nnx.Not(nnx.Param)))

    def body(carry, micro_batch):
        grad_sum, rest, index = carry
        (loss, (aux, rest)), grads = jax.value_and_grad(micro_loss, has_aux=True)(
            params, rest, micro_batch, jax.random.fold_in(rng, index))
        return (jax.tree.map(jnp.add, grad_sum, grads), rest, index + 1), (loss, aux)

    micro_batches = jax.tree.map(lambda x: _split_micro(x, accum_steps), batch)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, rest, _), (losses, aux) = jax.lax.scan(body, (zeros, rest, 0), micro_batches)
    nnx.update(model, rest)
    grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
    return losses.mean(), jax.tree.map(lambda a: a.mean(0), aux), grads
