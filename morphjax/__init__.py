"""morphjax: predict and profile how cells change under perturbations, in JAX/Flax."""

import flax
from jax._src import core as _jax_core

# Parameters are created inside `jax.jit` with out_shardings computed from logical names
# (morphjax.parallel), so modules must be constructible without a mesh in scope.
flax.config.update("flax_always_shard_variable", False)


def _tracer_has_no_sharding(tracer):
    raise AttributeError(f"The 'sharding' attribute is not available on {tracer._error_repr()}.")


# Quadratic tracing: flax NNX's `Variable.set_value` probes `getattr(value, "sharding", None)`
# on every indexed assignment (each `rngs.params()` call bumps a counter this way), and jax
# 0.10's `Tracer.sharding` answers with an AttributeError whose message walks every equation
# traced so far. Model builds and steps with dropout were O(n^2) in the traced graph: ~20% of
# the MorphDiff LDM's set-up on a CPU. The same message without that walk (upstream jax removed
# it, jax-ml/jax#40041); `hasattr`/`getattr` behave as before.
_jax_core.Tracer.sharding = property(_tracer_has_no_sharding)

__version__ = "0.1.0"
