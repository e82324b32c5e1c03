"""The train state: every model, optimizer and EMA copy a task trains, in one NNX module.

Tasks build one `TrainState`; the loop splits it once into (graphdef, state), compiles a pure step
over `state`, and checkpoints `state` whole. A GAN simply has several models and optimizers.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


class TrainState(nnx.Module):
    """Models by name, optimizers by name, EMA copies of the models, and the step counter."""

    def __init__(self, models: Mapping[str, nnx.Module], optimizers: Mapping[str, nnx.Optimizer],
                 *, ema_decay: float = 0.0):
        self.models = nnx.data(dict(models))
        self.optimizers = nnx.data(dict(optimizers))
        self.ema = nnx.data({name: nnx.clone(m) for name, m in models.items()} if ema_decay > 0 else {})
        self.step = nnx.Variable(jnp.zeros((), jnp.int32))

    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * params; normalisation statistics are copied."""
        for name, ema_model in self.ema.items():
            model = self.models[name]
            ema_params = nnx.state(ema_model, nnx.Param)
            params = nnx.state(model, nnx.Param)
            nnx.update(ema_model, jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                               ema_params, params))
            nnx.update(ema_model, nnx.state(model, nnx.BatchStat))

    def eval_model(self, name: str) -> nnx.Module:
        """The EMA copy when the run keeps one, else the trained model."""
        return self.ema.get(name, self.models[name])


class FrozenParam(nnx.Variable):
    """Weights a task uses but never trains (a frozen autoencoder or feature network).

    Optimizers and gradients are taken w.r.t. `nnx.Param`, so these are left alone; checkpoints
    save them with the rest of the state.
    """
