"""Test setup: 8 fake CPU devices so sharded code runs without accelerators (DESIGN.md, Testing)."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# Grain worker processes read absl flags; outside absl.app.run they must be parsed once.
flags.FLAGS(sys.argv[:1], known_only=True)


import pytest  # noqa: E402


def build_tiny_screen(tmp_path_factory, preset: str) -> str:
    """A tiny synthetic screen of `preset`, built with 32 px crops; returns its dataset dir."""
    from data_builders.raw_screen import build_raw_screen
    from data_builders.synthetic_screen import simulate_screen

    root = tmp_path_factory.mktemp(preset)
    simulate_screen(preset, "tiny", root / "raw", seed=0, progress=False)
    build_raw_screen(root / "raw", root / "dataset", crop_size=32)
    return str(root / "dataset")


@pytest.fixture(scope="session")
def tiny_screen(tmp_path_factory):
    """bbbc021_like tiny: 3 compounds x 2 doses + DMSO on 2 replicate plates."""
    return build_tiny_screen(tmp_path_factory, "bbbc021_like")


@pytest.fixture(scope="session")
def ops_screen(tmp_path_factory):
    return build_tiny_screen(tmp_path_factory, "ops_like")


def materialise(abstract, seed: int):
    """A concrete model with random, well-scaled values of the abstract model's shapes.

    Running the initialisers eagerly costs ~15 s for B0 on 2 cores; forward behaviour does not
    depend on where the values came from (the initialisers are tested on one block below).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if name == "count":
            return jnp.zeros(leaf.shape, leaf.dtype)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), leaf.dtype)
        if name in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
