"""IMPA / GRAPE networks: AdaIN style-transfer generator, style encoder, multi-task discriminator.

Follows IMPA (Palma et al. 2025, Methods "Architecture", Tables 1-3), which builds on StarGAN v2,
and GRAPE (Bigverdi et al. 2024, Sec. 3.3). Images are NHWC; parameters are float32 and `dtype`
is the compute dtype. Every conv and linear layer uses He init (torch `kaiming_normal_`, fan_in,
untruncated) with zero biases, as the IMPA code does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from morphjax.models.classifier import CONV_AXES

LINEAR_AXES = ("embed", "mlp")
HE_INIT = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")  # "normal" is untruncated.
NEGATIVE_SLOPE = 0.2


def _conv(in_channels: int, out_channels: int, kernel: int, *, use_bias: bool = True,
          padding: str = "SAME", dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(in_channels, out_channels, (kernel, kernel), padding=padding,
                    use_bias=use_bias, kernel_init=HE_INIT, dtype=dtype, rngs=rngs,
                    kernel_metadata={"out_sharding": CONV_AXES},
                    bias_metadata={"out_sharding": ("conv_out",)})


def _linear(in_features: int, out_features: int, *, dtype: jnp.dtype,
            rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, kernel_init=HE_INIT, dtype=dtype, rngs=rngs,
                      kernel_metadata={"out_sharding": LINEAR_AXES},
                      bias_metadata={"out_sharding": LINEAR_AXES[1:]})


def _lrelu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, NEGATIVE_SLOPE)


def _avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2; odd sizes are floored like torch `AvgPool2d(2)`."""
    b, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _check_image(x: jax.Array, img_size: int, channels: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1:] != (img_size, img_size, channels):
        raise ValueError(f"{name} expects images of shape (B, {img_size}, {img_size}, {channels}) "
                         f"(NHWC), got {x.shape}; build it with the data's img_size/in_channels.")


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Normalises each channel of each NHWC image over H, W (biased variance, stats in float32)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=(1, 2), keepdims=True)
    var = x32.var(axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class InstanceNorm(nnx.Module):
    """Instance normalisation with a per-channel affine scale (init 1) and bias (init 0)."""

    def __init__(self, channels: int):
        self.scale = nnx.Param(jnp.ones((channels,)), out_sharding=("conv_out",))
        self.bias = nnx.Param(jnp.zeros((channels,)), out_sharding=("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return instance_norm(x) * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class ResBlock(nnx.Module):
    """Pre-activation residual block of the encoders (IMPA Table 1, encoder column).

    conv2 runs at the downsampled resolution; the 1x1 shortcut conv (no bias) exists only when
    the width changes; the sum is divided by sqrt(2).
    """

    def __init__(self, dim_in: int, dim_out: int, *, normalize: bool = False,
                 downsample: bool = False, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.downsample = downsample
        self.norm1 = InstanceNorm(dim_in) if normalize else None
        self.norm2 = InstanceNorm(dim_in) if normalize else None
        self.conv1 = _conv(dim_in, dim_in, 3, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(dim_in, dim_out, 3, dtype=dtype, rngs=rngs)
        self.shortcut = (_conv(dim_in, dim_out, 1, use_bias=False, dtype=dtype, rngs=rngs)
                         if dim_in != dim_out else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        skip = self.shortcut(x) if self.shortcut is not None else x
        if self.downsample:
            skip = _avg_pool2(skip)
        h = self.norm1(x) if self.norm1 is not None else x
        h = self.conv1(_lrelu(h))
        if self.downsample:
            h = _avg_pool2(h)
        h = self.norm2(h) if self.norm2 is not None else h
        h = self.conv2(_lrelu(h))
        return (skip + h) / math.sqrt(2)


class AdaIN(nnx.Module):
    """Adaptive instance norm (IMPA Eq. 10): (1 + gamma(s)) * IN(x) + beta(s), own Linear each."""

    def __init__(self, style_dim: int, channels: int, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.fc = _linear(style_dim, 2 * channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, style: jax.Array) -> jax.Array:
        gamma, beta = jnp.split(self.fc(style)[:, None, None, :], 2, axis=-1)
        return (1 + gamma) * instance_norm(x) + beta


class AdaINResBlock(nnx.Module):
    """Decoder residual block (IMPA Table 1, decoder column): AdaIN, nearest x2 upsampling."""

    def __init__(self, dim_in: int, dim_out: int, style_dim: int, *, upsample: bool = False,
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.upsample = upsample
        self.norm1 = AdaIN(style_dim, dim_in, dtype=dtype, rngs=rngs)
        self.norm2 = AdaIN(style_dim, dim_out, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(dim_in, dim_out, 3, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(dim_out, dim_out, 3, dtype=dtype, rngs=rngs)
        self.shortcut = (_conv(dim_in, dim_out, 1, use_bias=False, dtype=dtype, rngs=rngs)
                         if dim_in != dim_out else None)

    def __call__(self, x: jax.Array, style: jax.Array) -> jax.Array:
        skip = _upsample2(x) if self.upsample else x
        skip = self.shortcut(skip) if self.shortcut is not None else skip
        h = _lrelu(self.norm1(x, style))
        if self.upsample:
            h = _upsample2(h)
        h = self.conv1(h)
        h = self.conv2(_lrelu(self.norm2(h, style)))
        return (skip + h) / math.sqrt(2)


class Generator(nnx.Module):
    """Content encoder + AdaIN decoder (IMPA Table 2, GRAPE Sec. 3.3); no encoder-decoder skips.

    The encoder has ceil(log2(img_size)) - 4 downsampling blocks (3 at 96 and 128 px) and two
    bottleneck blocks; the content code is (B, img/8, img/8, 512) at those sizes. Output is linear.
    """

    def __init__(self, img_size: int = 96, in_channels: int = 3, style_dim: int = 64,
                 dim_in: int = 64, max_conv_dim: int = 512, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        repeat_num = math.ceil(math.log2(img_size)) - 4
        if repeat_num < 1 or img_size % 2 ** repeat_num:
            raise ValueError(f"Generator img_size={img_size} must be > 16 and divisible by "
                             f"2**(ceil(log2(img_size)) - 4) so the decoder restores the input "
                             f"size (e.g. 32, 48, 64, 96, 128).")
        self.from_rgb = _conv(in_channels, dim_in, 3, dtype=dtype, rngs=rngs)
        encoder, decoder = [], []
        width = dim_in
        for _ in range(repeat_num):
            out = min(width * 2, max_conv_dim)
            encoder.append(ResBlock(width, out, normalize=True, downsample=True, dtype=dtype,
                                    rngs=rngs))
            decoder.insert(0, AdaINResBlock(out, width, style_dim, upsample=True, dtype=dtype,
                                            rngs=rngs))
            width = out
        for _ in range(2):
            encoder.append(ResBlock(width, width, normalize=True, dtype=dtype, rngs=rngs))
            decoder.insert(0, AdaINResBlock(width, width, style_dim, dtype=dtype, rngs=rngs))
        self.encoder = nnx.List(encoder)
        self.decoder = nnx.List(decoder)
        self.to_rgb_norm = InstanceNorm(dim_in)
        self.to_rgb = _conv(dim_in, in_channels, 1, dtype=dtype, rngs=rngs)

    def encode(self, x: jax.Array) -> jax.Array:
        h = self.from_rgb(x)
        for block in self.encoder:
            h = block(h)
        return h

    def decode(self, content: jax.Array, style: jax.Array) -> jax.Array:
        h = content
        for block in self.decoder:
            h = block(h, style)
        return self.to_rgb(_lrelu(self.to_rgb_norm(h))).astype(jnp.float32)

    def __call__(self, x: jax.Array, style: jax.Array) -> tuple[jax.Array, jax.Array]:
        content = self.encode(x)
        return content, self.decode(content, style)


def _trunk_size(img_size: int) -> tuple[int, int]:
    """(number of downsampling blocks, final spatial size) of the style encoder / discriminator."""
    repeat_num = math.ceil(math.log2(img_size)) - 2
    size = img_size
    for _ in range(repeat_num):
        size //= 2
    return repeat_num, size


class _Trunk(nnx.Module):
    """Shared trunk of style encoder and discriminator (IMPA Table 3).

    Conv3x3, ceil(log2(img)) - 2 downsampling ResBlocks without norm, LReLU, a VALID conv whose
    kernel equals the final spatial size, LReLU. The kernel is img_size // 32 at 96 and 128 px,
    as in IMPA; at other sizes (e.g. 32, 64) that formula leaves a spatial map, so we use the
    spatial size itself.
    """

    def __init__(self, img_size: int, in_channels: int, dim_in: int, max_conv_dim: int, *,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        repeat_num, kernel_size = _trunk_size(img_size)
        self.img_size, self.in_channels = img_size, in_channels
        self.from_rgb = _conv(in_channels, dim_in, 3, dtype=dtype, rngs=rngs)
        blocks = []
        width = dim_in
        for _ in range(repeat_num):
            out = min(width * 2, max_conv_dim)
            blocks.append(ResBlock(width, out, downsample=True, dtype=dtype, rngs=rngs))
            width = out
        self.blocks = nnx.List(blocks)
        self.conv = _conv(width, width, kernel_size, padding="VALID", dtype=dtype, rngs=rngs)
        self.features_dim = width

    def __call__(self, x: jax.Array, name: str) -> jax.Array:
        _check_image(x, self.img_size, self.in_channels, name)
        h = self.from_rgb(x)
        for block in self.blocks:
            h = block(h)
        h = _lrelu(self.conv(_lrelu(h)))
        return h.reshape(h.shape[0], -1)


class StyleEncoder(nnx.Module):
    """Image -> style vector, single head shared across conditions (IMPA Table 3)."""

    def __init__(self, img_size: int, in_channels: int, style_dim: int = 64, dim_in: int = 64,
                 max_conv_dim: int = 512, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.trunk = _Trunk(img_size, in_channels, dim_in, max_conv_dim, dtype=dtype, rngs=rngs)
        self.head = _linear(self.trunk.features_dim, style_dim, dtype=dtype, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """(B, 512) activation before the final Linear."""
        return self.trunk(x, "StyleEncoder")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x)).astype(jnp.float32)


class Discriminator(nnx.Module):
    """Multi-task discriminator: one real/fake logit per domain (IMPA Table 3, Methods).

    `num_heads` > 1 gives one 1x1-conv head per perturbation modality (IMPA multimodal cpg0000).
    The same network serves as the MoA classifier with num_domains = number of classes. IMPA's
    final conv is hard-coded 3x3, which is only right at 96 px; ours uses the true spatial size.
    """

    def __init__(self, img_size: int, in_channels: int, num_domains: int, dim_in: int = 64,
                 max_conv_dim: int = 512, num_heads: int = 1, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.trunk = _Trunk(img_size, in_channels, dim_in, max_conv_dim, dtype=dtype, rngs=rngs)
        self.heads = nnx.List([_conv(self.trunk.features_dim, num_domains, 1, dtype=dtype,
                                     rngs=rngs) for _ in range(num_heads)])

    def features(self, x: jax.Array) -> jax.Array:
        """(B, 512) activation before the heads."""
        return self.trunk(x, "Discriminator")

    def logits(self, x: jax.Array, head: int | jax.Array = 0) -> jax.Array:
        """(B, num_domains) logits of one head, or of a per-sample head given as a (B,) array."""
        h = self.features(x)[:, None, None, :]
        if isinstance(head, int):
            return self.heads[head](h)[:, 0, 0].astype(jnp.float32)
        every = jnp.stack([conv(h)[:, 0, 0] for conv in self.heads], axis=1)
        head = jnp.broadcast_to(jnp.asarray(head), (x.shape[0],))
        return jnp.take_along_axis(every, head[:, None, None], axis=1)[:, 0].astype(jnp.float32)

    def __call__(self, x: jax.Array, y: jax.Array, head: int | jax.Array = 0) -> jax.Array:
        """(B,) logit of domain y[i] for sample i."""
        return jnp.take_along_axis(self.logits(x, head), y[:, None], axis=1)[:, 0]


class ConditionEncoder(nnx.Module):
    """Perturbation embedding (+ noise) -> style vector (IMPA "Condition encoder", GRAPE F).

    IMPA: num_layers=1, a single Linear with no activation over [embedding ; noise].
    GRAPE: num_layers=3, noise_dim=0 (no noise, no diversity loss).
    """

    def __init__(self, embedding_dim: int, noise_dim: int, style_dim: int = 64,
                 hidden_dim: int = 512, num_layers: int = 1, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        if num_layers < 1:
            raise ValueError(f"ConditionEncoder needs num_layers >= 1, got {num_layers}.")
        self.noise_dim = noise_dim
        widths = [embedding_dim + noise_dim] + [hidden_dim] * (num_layers - 1) + [style_dim]
        self.layers = nnx.List([_linear(a, b, dtype=dtype, rngs=rngs)
                                for a, b in zip(widths[:-1], widths[1:])])

    def __call__(self, embedding: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        if self.noise_dim and noise is None:
            raise ValueError(f"ConditionEncoder has noise_dim={self.noise_dim}: pass noise of "
                             f"shape (B, {self.noise_dim}).")
        if not self.noise_dim and noise is not None:
            raise ValueError("ConditionEncoder has noise_dim=0 (GRAPE): do not pass noise.")
        h = embedding
        if noise is not None:
            if noise.shape[-1] != self.noise_dim:
                raise ValueError(f"noise has {noise.shape[-1]} features, expected "
                                 f"{self.noise_dim}.")
            h = jnp.concatenate([embedding, noise.astype(embedding.dtype)], axis=-1)
        for layer in self.layers[:-1]:
            h = jax.nn.relu(layer(h))
        return self.layers[-1](h).astype(jnp.float32)


def count_params(module: nnx.Module) -> int:
    """Number of trainable parameters; works on abstract modules from `nnx.eval_shape`."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
