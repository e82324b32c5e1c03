"""InceptionV3 in the FID variant (pytorch-fid's `fid_inception_v3`), in Flax NNX, NHWC.

The FID Inception (weights `pt_inception-2015-12-05-6726825d.pth`, ported from TensorFlow's
`inception-2015-12-05`) is torchvision's Inception3 with 1008 classes, no aux head and four
patched blocks (pytorch-fid `inception.py`):

* FIDInceptionA / FIDInceptionC / FIDInceptionE_1: the pool branch averages over a 3x3 window
  without counting the zero padding (TensorFlow's average pool, `count_include_pad=False`);
* FIDInceptionE_2 (Mixed_7c): the pool branch is a 3x3 *max* pool.

Every conv is conv (no bias) -> BatchNorm (eps 0.001) -> ReLU. Attribute names follow the torch
state dict keys (`Mixed_6b.branch7x7_2.conv.weight`) so the converter maps names one to one.
The 2048-d pool3 features (pytorch-fid block 3) feed FID/KID/PRDC; the 1008 logits feed IS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
BN_EPSILON = 1e-3


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nnx.Module):
    """torchvision `BasicConv2d`: conv without bias, BatchNorm in inference mode, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int],
                 *, stride: int = 1, padding: int | tuple[int, int] = 0,
                 precision: jax.lax.Precision | None, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel), strides=stride,
                             padding=((ph, ph), (pw, pw)), use_bias=False, precision=precision,
                             rngs=rngs)
        self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=BN_EPSILON,
                                rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x: jax.Array, size: int, stride: int, padding: int = 0) -> jax.Array:
    """torch `max_pool2d` (floor mode; padding counts as -inf)."""
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1),
                                 (1, stride, stride, 1), pads)


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """torch `avg_pool2d(3, stride 1, padding 1, count_include_pad=False)`."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
    return total / count


class InceptionA(nnx.Module):
    """FIDInceptionA (Mixed_5b/5c/5d)."""

    def __init__(self, cin: int, pool_features: int, *, precision, rngs: nnx.Rngs):
        kw = dict(precision=precision, rngs=rngs)
        self.branch1x1 = BasicConv(cin, 64, 1, **kw)
        self.branch5x5_1 = BasicConv(cin, 48, 1, **kw)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv(cin, pool_features, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """torchvision InceptionB (Mixed_6a): grid reduction 35 -> 17."""

    def __init__(self, cin: int, *, precision, rngs: nnx.Rngs):
        kw = dict(precision=precision, rngs=rngs)
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, _max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
    """FIDInceptionC (Mixed_6b..6e): factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int, *, precision, rngs: nnx.Rngs):
        kw = dict(precision=precision, rngs=rngs)
        self.branch1x1 = BasicConv(cin, 192, 1, **kw)
        self.branch7x7_1 = BasicConv(cin, c7, 1, **kw)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv(cin, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """torchvision InceptionD (Mixed_7a): grid reduction 17 -> 8."""

    def __init__(self, cin: int, *, precision, rngs: nnx.Rngs):
        kw = dict(precision=precision, rngs=rngs)
        self.branch3x3_1 = BasicConv(cin, 192, 1, **kw)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                      self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (Mixed_7b, average pool without padding) or E_2 (Mixed_7c, max pool)."""

    def __init__(self, cin: int, *, max_pool: bool, precision, rngs: nnx.Rngs):
        kw = dict(precision=precision, rngs=rngs)
        self.max_pool = max_pool
        self.branch1x1 = BasicConv(cin, 320, 1, **kw)
        self.branch3x3_1 = BasicConv(cin, 384, 1, **kw)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv(cin, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = _max_pool(x, 3, 1, 1) if self.max_pool else _avg_pool_3x3_exclude_pad(x)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """torch `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing), NHWC.

    pytorch-fid resizes this way; `jax.image.resize` antialiases by default when shrinking,
    which would change the features, so antialiasing is off here.
    """
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images, (n, size, size, c), method="bilinear", antialias=False)


class InceptionV3FID(nnx.Module):
    """The FID Inception: NHWC RGB images in [-1, 1] -> (pool3 (N, 2048), logits (N, 1008)).

    `resize_input` resizes any input to 299x299 first (pytorch-fid's default). Inputs must already
    be in [-1, 1] (pytorch-fid with `normalize_input=False`, as IMPA calls it). Logits are the fc
    layer with its bias; torch-fidelity's IS uses the same fc without bias (`logits_unbiased`), see
    `unbiased_logits`.
    """

    def __init__(self, *, resize_input: bool = True,
                 precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
                 rngs: nnx.Rngs):
        kw = dict(precision=precision, rngs=rngs)
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, max_pool=False, **kw)
        self.Mixed_7c = InceptionE(2048, max_pool=True, **kw)
        self.fc = nnx.Linear(FEATURE_DIM, NUM_LOGITS, precision=precision, rngs=rngs)

    def pool3(self, images: jax.Array) -> jax.Array:
        """pytorch-fid blocks 0-3: the 2048-d final average pool."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC with 3 channels, got shape {images.shape}")
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool(x, 3, 2)
        x = _max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return x.mean(axis=(1, 2))

    def unbiased_logits(self, pool: jax.Array) -> jax.Array:
        """fc without bias: torch-fidelity's `logits_unbiased` (its IS default)."""
        return self.fc(pool) - self.fc.bias[...]

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        pool = self.pool3(images)
        return pool, self.fc(pool)


def create_inception(*, resize_input: bool = True,
                     precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
                     abstract: bool = False) -> InceptionV3FID:
    """Builds the module with random weights, or shape-only (`abstract`) for loading into."""
    def make():
        return InceptionV3FID(resize_input=resize_input, precision=precision, rngs=nnx.Rngs(0))
    return nnx.eval_shape(make) if abstract else make()
