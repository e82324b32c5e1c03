"""morphjax: predict and profile how cells change under perturbations, in JAX/Flax."""

import flax

# Parameters are created inside `jax.jit` with out_shardings computed from logical names
# (morphjax.parallel), so modules must be constructible without a mesh in scope.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
