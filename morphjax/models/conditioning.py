"""Perturbation id -> style vector: embedding tables read by condition encoders.

IMPA (impa.txt eqs. 1-2): s = f_m([e_d ; z]) with a fixed prior embedding e_d (Morgan fingerprint,
gene vector) and one encoder f_m per modality m, all mapping into one shared style space.
Batch correction (IMPA) and GRAPE (grape.txt 3.3) learn the table instead (random-normal init);
GRAPE's learned table is its product, the gene representation.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from morphjax.models.impa import ConditionEncoder


class FixedEmbedding(nnx.Variable):
    """A prior embedding table: checkpointed with the model, never optimised."""


class PerturbationConditioner(nnx.Module):
    """Rows of per-modality tables -> per-modality condition encoders -> one style space.

    `tables`: modality -> (num_ids, dim) fixed matrices; or `learned_dim` > 0 for a single
    learned (num_ids, learned_dim) table. `modality_of[i]` is the modality index of id i.
    """

    def __init__(self, modality_of: np.ndarray, *, tables: Mapping[str, np.ndarray] | None = None,
                 learned_dim: int = 0, noise_dim: int, style_dim: int, num_layers: int = 1,
                 hidden_dim: int = 512, rngs: nnx.Rngs):
        modality_of = np.asarray(modality_of, np.int32)
        if learned_dim > 0:
            self.modalities = ("learned",)
            init = jax.random.normal(rngs.params(), (modality_of.size, learned_dim), jnp.float32)
            self.tables = nnx.List([nnx.Param(init, out_sharding=(None, None))])
            modality_of = np.zeros_like(modality_of)
        else:
            if not tables:
                raise ValueError("PerturbationConditioner needs fixed `tables` or learned_dim > 0")
            self.modalities = tuple(tables)
            self.tables = nnx.List([FixedEmbedding(jnp.asarray(t, jnp.float32))
                                    for t in tables.values()])
        self.modality_of = FixedEmbedding(jnp.asarray(modality_of))
        self.encoders = nnx.List([
            ConditionEncoder(table.shape[1], noise_dim, style_dim, hidden_dim=hidden_dim,
                             num_layers=num_layers, rngs=rngs)
            for table in self.tables])

    def embeddings(self, ids: jax.Array) -> list[jax.Array]:
        """The table rows of `ids`, one array per modality."""
        return [table[...][ids] for table in self.tables]

    def __call__(self, ids: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        modality = self.modality_of[...][ids]
        style = None
        for m, (encoder, rows) in enumerate(zip(self.encoders, self.embeddings(ids))):
            s = encoder(rows, noise)
            style = s if style is None else jnp.where((modality == m)[:, None], s, style)
        return style


EXPRESSION_MODES = ("frozen_random", "learned")


class ExpressionContext(nnx.Module):
    """L1000 expression vector (B, G) -> cross-attention context tokens (B, T, D).

    MorphDiff (`ldm/modules/encoders/modules_new.py` `GeneEmbedder`, notes section 2): one
    Linear(G, T * D) with bias, no nonlinearity, reshaped row-major to (B, T, D); the reference
    uses G = 977 genes, T = 1024 tokens of D = 12 (12,017,664 parameters).

    mode "frozen_random" is the reference (`cond_stage_trainable: False`): torch's default Linear
    init, weight and bias ~ U(+-1/sqrt(G)), drawn from `seed` alone (not from the model's rngs)
    and held in `FixedEmbedding` variables, so checkpoints keep it and optimizers never touch it.
    mode "learned" is an nnx.Linear trained with the model (same init, from `rngs`).
    """

    def __init__(self, num_genes: int = 977, num_tokens: int = 1024, context_dim: int = 12, *,
                 mode: str = "frozen_random", seed: int = 0, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        if mode not in EXPRESSION_MODES:
            raise ValueError(f"ExpressionContext mode must be one of {EXPRESSION_MODES}, "
                             f"got {mode!r}.")
        if min(num_genes, num_tokens, context_dim) < 1:
            raise ValueError(f"ExpressionContext needs positive num_genes, num_tokens and "
                             f"context_dim, got {num_genes}, {num_tokens}, {context_dim}.")
        self.num_genes, self.num_tokens, self.context_dim = num_genes, num_tokens, context_dim
        self.mode, self.dtype = mode, dtype
        features = num_tokens * context_dim
        bound = 1 / np.sqrt(num_genes)
        if mode == "learned":
            if rngs is None:
                raise ValueError("ExpressionContext(mode='learned') needs rngs.")
            def init(key, shape, dtype=jnp.float32):
                return jax.random.uniform(key, shape, dtype, -bound, bound)

            self.linear = nnx.Linear(num_genes, features, kernel_init=init, bias_init=init,
                                     dtype=dtype, rngs=rngs,
                                     kernel_metadata={"out_sharding": (None, None)},
                                     bias_metadata={"out_sharding": (None,)})
        else:
            w_key, b_key = jax.random.split(jax.random.key(seed, impl="threefry2x32"))
            self.kernel = FixedEmbedding(jax.random.uniform(
                w_key, (num_genes, features), jnp.float32, -bound, bound))
            self.bias = FixedEmbedding(jax.random.uniform(
                b_key, (features,), jnp.float32, -bound, bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, num_genes) expression -> (B, num_tokens, context_dim) tokens."""
        if x.ndim != 2 or x.shape[-1] != self.num_genes:
            raise ValueError(f"ExpressionContext expects (B, {self.num_genes}) expression "
                             f"vectors (num_genes={self.num_genes}), got {x.shape}.")
        if self.mode == "learned":
            out = self.linear(x)
        else:
            kernel = self.kernel[...].astype(self.dtype)
            out = x.astype(self.dtype) @ kernel + self.bias[...].astype(self.dtype)
        return out.reshape(x.shape[0], self.num_tokens, self.context_dim)
