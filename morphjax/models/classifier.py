"""A small convolutional classifier: the foundation task that exercises the training machinery."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

CONV_AXES = ("kh", "kw", "conv_in", "conv_out")


class ConvBlock(nnx.Module):
    """Conv3x3 (no bias: a BatchNorm follows) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), strides=stride, padding="SAME",
                             use_bias=False, dtype=dtype, rngs=rngs,
                             kernel_metadata={"out_sharding": CONV_AXES})
        self.norm = nnx.BatchNorm(out_channels, momentum=0.9, dtype=dtype, rngs=rngs,
                                  scale_metadata={"out_sharding": ("conv_out",)},
                                  bias_metadata={"out_sharding": ("conv_out",)})

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return nnx.relu(self.norm(self.conv(x), use_running_average=not train))


class SmallCNN(nnx.Module):
    """Stem, then one stride-2 block per width, global average pool and a linear head."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (32, 64, 128),
                 *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.stem = ConvBlock(in_channels, widths[0], stride=1, dtype=dtype, rngs=rngs)
        self.stages = nnx.List([ConvBlock(a, b, stride=2, dtype=dtype, rngs=rngs)
                                for a, b in zip(widths[:-1], widths[1:])])
        self.head = nnx.Linear(widths[-1], num_classes, dtype=dtype, rngs=rngs,
                               kernel_metadata={"out_sharding": ("embed", "classes")})

    def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = self.stem(x, train=train)
        for stage in self.stages:
            x = stage(x, train=train)
        return x.mean(axis=(1, 2))

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return self.head(self.features(x, train=train)).astype(jnp.float32)
