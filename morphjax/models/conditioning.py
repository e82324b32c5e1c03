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
