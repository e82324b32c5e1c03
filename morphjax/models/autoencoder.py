"""MorphDiff's KL autoencoder ("MVAE"), PatchGAN discriminator and their losses.

Follows the CompVis latent-diffusion first stage that MorphDiff trains on 128x128 five-channel Cell
Painting images (`configs/autoencoder/autoencoder_kl_32x32x4_5c.yaml`; notes
morphdiff_lumic_reference.md section 1): `AutoencoderKL` with the `Encoder` / `Decoder` of
`ldm/modules/diffusionmodules/model.py`, the taming-transformers `NLayerDiscriminator`, and the
loss terms of `ldm/modules/losses/contperceptual.py::LPIPSWithDiscriminator`. The LPIPS network is
not part of this module: `reconstruction_nll` takes its per-sample value as an input.

Images are NHWC; parameters are float32 and `dtype` is the compute dtype. Attribute names follow
the CompVis modules (`down[i].block[j]`, `mid.attn_1`, `nin_shortcut`, `quant_conv`, ...) so that
PyTorch checkpoints map one to one. Convolutions use PyTorch's default init (kernel and bias
uniform in +-1/sqrt(fan_in)), as CompVis does; the discriminator uses taming's `weights_init`.
The encoder has no attention outside the middle block (MorphDiff's `attn_resolutions: []`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from morphjax.models.classifier import CONV_AXES

NUM_GROUPS = 32
NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# PyTorch's Conv2d default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
TORCH_CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
DISC_CONV_INIT = nnx.initializers.normal(0.02)  # taming `weights_init`.
DISC_SLOPE = 0.2


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _conv(in_channels: int, out_channels: int, kernel: int, *, stride: int = 1,
          padding="SAME", use_bias: bool = True, kernel_init=TORCH_CONV_INIT,
          dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=stride,
                    padding=padding, use_bias=use_bias, kernel_init=kernel_init,
                    bias_init=_torch_bias_init(in_channels * kernel * kernel),
                    dtype=dtype, rngs=rngs,
                    kernel_metadata={"out_sharding": CONV_AXES},
                    bias_metadata={"out_sharding": ("conv_out",)})


def _group_norm(channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    if channels % NUM_GROUPS:
        raise ValueError(f"GroupNorm({NUM_GROUPS}) needs a channel count divisible by "
                         f"{NUM_GROUPS}, got {channels}; pick ch as a multiple of {NUM_GROUPS}.")
    return nnx.GroupNorm(channels, num_groups=NUM_GROUPS, epsilon=NORM_EPS, dtype=dtype,
                         rngs=rngs, scale_metadata={"out_sharding": ("conv_out",)},
                         bias_metadata={"out_sharding": ("conv_out",)})


class ResnetBlock(nnx.Module):
    """GroupNorm-swish-conv3x3 twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.norm1 = _group_norm(in_channels, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.norm2 = _group_norm(out_channels, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.nin_shortcut = (_conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                             if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # Dropout is 0 in MorphDiff: omitted.
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return skip + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.norm = _group_norm(channels, dtype=dtype, rngs=rngs)
        self.q = _conv(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.k = _conv(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.v = _conv(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.proj_out = _conv(channels, channels, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, h * w, 1, c) for conv in (self.q, self.k, self.v))
        y = jax.nn.dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v.
        return x + self.proj_out(y.reshape(b, h, w, c))


class Downsample(nnx.Module):
    """Zero-pad bottom/right by one, then conv3x3 stride 2 VALID (CompVis pad (0,1,0,1))."""

    def __init__(self, channels: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)),
                          dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, channels: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution level: residual blocks, then an optional Downsample or Upsample."""

    def __init__(self, blocks: list[ResnetBlock], *, downsample: Downsample | None = None,
                 upsample: Upsample | None = None):
        self.block = nnx.List(blocks)
        self.downsample = downsample
        self.upsample = upsample

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class MidBlock(nnx.Module):
    """ResnetBlock, self-attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, dtype=dtype, rngs=rngs)
        self.attn_1 = AttnBlock(channels, dtype=dtype, rngs=rngs)
        self.block_2 = ResnetBlock(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    """CompVis `Encoder`: conv_in, num_res_blocks ResnetBlocks per level (widths ch * ch_mult),
    a Downsample after every level but the last, mid block, GroupNorm-swish-conv_out.

    Outputs 2 * z_channels (mean and log-variance) when `double_z`, else z_channels.
    """

    def __init__(self, in_channels: int = 5, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 4, double_z: bool = True, *,
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.in_channels = in_channels
        self.conv_in = _conv(in_channels, ch, 3, dtype=dtype, rngs=rngs)
        levels = []
        block_in = ch
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, dtype=dtype, rngs=rngs))
                block_in = ch * mult
            down = (Downsample(block_in, dtype=dtype, rngs=rngs)
                    if i != len(ch_mult) - 1 else None)
            levels.append(Level(blocks, downsample=down))
        self.down = nnx.List(levels)
        self.mid = MidBlock(block_in, dtype=dtype, rngs=rngs)
        self.norm_out = _group_norm(block_in, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(block_in, 2 * z_channels if double_z else z_channels, 3,
                              dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """CompVis `Decoder`: conv_in, mid block, num_res_blocks + 1 ResnetBlocks per level from the
    deepest up, an Upsample after every level but the first, GroupNorm-swish-conv_out.

    `up[i]` is level i (CompVis order), so the forward pass walks `up` in reverse.
    """

    def __init__(self, out_channels: int = 5, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 4, *,
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        block_in = ch * ch_mult[-1]
        self.conv_in = _conv(z_channels, block_in, 3, dtype=dtype, rngs=rngs)
        self.mid = MidBlock(block_in, dtype=dtype, rngs=rngs)
        levels = []
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i], dtype=dtype, rngs=rngs))
                block_in = ch * ch_mult[i]
            up = Upsample(block_in, dtype=dtype, rngs=rngs) if i != 0 else None
            levels.insert(0, Level(blocks, upsample=up))
        self.up = nnx.List(levels)
        self.norm_out = _group_norm(block_in, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(block_in, out_channels, 3, dtype=dtype, rngs=rngs)

    def hidden(self, z: jax.Array) -> jax.Array:
        """The activation conv_out acts on (the adaptive GAN weight differentiates there)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return jax.nn.silu(self.norm_out(h))

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.conv_out(self.hidden(z))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over NHWC latents (CompVis `DiagonalGaussianDistribution`)."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Splits (..., 2C) moments into mean and log-variance; clamps it to [-30, 20]."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """(B,) KL to N(0, I): 0.5 * sum(mu^2 + var - 1 - logvar) over H, W, C."""
        terms = self.mean ** 2 + self.var - 1.0 - self.logvar
        return 0.5 * terms.sum(axis=tuple(range(1, terms.ndim)))


class AutoencoderKL(nnx.Module):
    """KL-regularised autoencoder (CompVis `AutoencoderKL`; MorphDiff MVAE, notes section 1).

    At MorphDiff's config (the defaults) it maps (B, 128, 128, 5) images to (B, 32, 32, 4)
    latents and has 55,330,537 parameters. `resolution` is the nominal input size used by
    `latent_shape`; the network is fully convolutional and accepts any size divisible by
    2 ** (len(ch_mult) - 1).
    """

    def __init__(self, in_channels: int = 5, out_channels: int = 5, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 4, embed_dim: int = 4, double_z: bool = True,
                 resolution: int = 128, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if not double_z:
            raise ValueError("AutoencoderKL needs double_z=True: the encoder must output a mean "
                             "and a log-variance per latent channel.")
        if not ch_mult or num_res_blocks < 1:
            raise ValueError(f"AutoencoderKL needs a non-empty ch_mult and num_res_blocks >= 1, "
                             f"got ch_mult={ch_mult}, num_res_blocks={num_res_blocks}.")
        self.in_channels, self.embed_dim = in_channels, embed_dim
        self.factor = 2 ** (len(ch_mult) - 1)
        self.resolution = resolution
        self.encoder = Encoder(in_channels, ch, ch_mult, num_res_blocks, z_channels, True,
                               dtype=dtype, rngs=rngs)
        self.decoder = Decoder(out_channels, ch, ch_mult, num_res_blocks, z_channels,
                               dtype=dtype, rngs=rngs)
        self.quant_conv = _conv(2 * z_channels, 2 * embed_dim, 1, dtype=dtype, rngs=rngs)
        self.post_quant_conv = _conv(embed_dim, z_channels, 1, dtype=dtype, rngs=rngs)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the latent for a `resolution`-sized input."""
        size = self.resolution // self.factor
        return size, size, self.embed_dim

    def last_layer(self) -> nnx.Param:
        """Decoder conv_out kernel: the layer the adaptive GAN weight is measured at."""
        return self.decoder.conv_out.kernel

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        if (x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % self.factor
                or x.shape[2] % self.factor):
            raise ValueError(f"AutoencoderKL.encode expects NHWC images (B, H, W, "
                             f"{self.in_channels}) with H, W divisible by {self.factor}, "
                             f"got {x.shape}.")
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z: jax.Array) -> jax.Array:
        if z.ndim != 4 or z.shape[-1] != self.embed_dim:
            raise ValueError(f"AutoencoderKL.decode expects latents (B, h, w, {self.embed_dim}), "
                             f"got {z.shape}.")
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None,
                 sample_posterior: bool = True) -> tuple[jax.Array, DiagonalGaussian]:
        """(reconstruction, posterior); decodes a posterior sample, or its mode."""
        posterior = self.encode(x)
        if sample_posterior:
            if rng is None:
                raise ValueError("AutoencoderKL with sample_posterior=True needs an rng key.")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        return self.decode(z), posterior


class PatchDiscriminator(nnx.Module):
    """PatchGAN (taming `NLayerDiscriminator`, BatchNorm): 4x4 convs with padding 1, LeakyReLU 0.2.

    n_layers stride-2 convs (the first without norm), one stride-1 conv + BN, and a 1-channel
    stride-1 conv; convs followed by BN have no bias. Conv kernels N(0, 0.02), BN scale
    N(1, 0.02), bias 0. A 128 px input gives (B, 14, 14, 1) logits (`output_size`).
    """

    def __init__(self, in_channels: int = 5, ndf: int = 64, n_layers: int = 3, *,
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator needs n_layers >= 1, got {n_layers}.")
        self.in_channels, self.n_layers = in_channels, n_layers
        pad = ((1, 1), (1, 1))
        widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]
        self.conv_in = _conv(in_channels, ndf, 4, stride=2, padding=pad,
                             kernel_init=DISC_CONV_INIT, dtype=dtype, rngs=rngs)
        convs, norms = [], []
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1
            convs.append(_conv(widths[n - 1], widths[n], 4, stride=stride, padding=pad,
                               use_bias=False, kernel_init=DISC_CONV_INIT, dtype=dtype,
                               rngs=rngs))
            norms.append(nnx.BatchNorm(widths[n], momentum=0.9, epsilon=1e-5, dtype=dtype,
                                       scale_init=_bn_scale_init, rngs=rngs,
                                       scale_metadata={"out_sharding": ("conv_out",)},
                                       bias_metadata={"out_sharding": ("conv_out",)}))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.conv_out = _conv(widths[-1], 1, 4, padding=pad, kernel_init=DISC_CONV_INIT,
                              dtype=dtype, rngs=rngs)

    def output_size(self, size: int) -> int:
        """Spatial size of the logit map for a size x size input (4x4 convs, padding 1)."""
        for _ in range(self.n_layers):
            size = size // 2  # (size + 2 - 4) // 2 + 1
        return size - 2  # two stride-1 convs: size + 2 - 4 + 1 each.

    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        """(B, h, w, 1) float32 patch logits; BN uses batch statistics when `train`."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"PatchDiscriminator expects NHWC images (B, H, W, "
                             f"{self.in_channels}), got {x.shape}.")
        h = jax.nn.leaky_relu(self.conv_in(x), DISC_SLOPE)
        for conv, norm in zip(self.convs, self.norms):
            h = jax.nn.leaky_relu(norm(conv(h), use_running_average=not train), DISC_SLOPE)
        return self.conv_out(h).astype(jnp.float32)


def _bn_scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


# --- Loss terms of `LPIPSWithDiscriminator` (contperceptual.py). ---

def kl_loss(posterior: DiagonalGaussian) -> jax.Array:
    """Per-sample KL summed over H, W, C, averaged over the batch (CompVis sum / B)."""
    return posterior.kl().mean()


def reconstruction_nll(x: jax.Array, xrec: jax.Array, perceptual: jax.Array | None = None,
                       logvar: jax.Array | float = 0.0) -> jax.Array:
    """(|x - xrec| + perceptual) / exp(logvar) + logvar, summed over all elements / B.

    `perceptual` is a per-sample (B,) term (MorphDiff: perceptual_weight * LPIPS averaged over
    channels), broadcast onto every pixel as in CompVis. MorphDiff's logvar stays 0.
    """
    if x.shape != xrec.shape:
        raise ValueError(f"reconstruction_nll: x {x.shape} and xrec {xrec.shape} differ.")
    rec = jnp.abs(x.astype(jnp.float32) - xrec.astype(jnp.float32))
    if perceptual is not None:
        perceptual = jnp.asarray(perceptual, jnp.float32)
        if perceptual.shape != (x.shape[0],):
            raise ValueError(f"reconstruction_nll: perceptual must have shape ({x.shape[0]},), "
                             f"one value per sample, got {perceptual.shape}.")
        rec = rec + perceptual.reshape((-1,) + (1,) * (x.ndim - 1))
    nll = rec / jnp.exp(logvar) + logvar
    return nll.sum() / x.shape[0]


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Discriminator hinge loss 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (jax.nn.relu(1.0 - logits_real).mean() + jax.nn.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator adversarial loss -mean(D(fake))."""
    return -logits_fake.mean()


def adaptive_weight(nll_grad_norm: jax.Array, g_grad_norm: jax.Array,
                    disc_weight: float = 0.5) -> jax.Array:
    """disc_weight * clip(||dNLL/dW|| / (||dG/dW|| + 1e-4), 0, 1e4), no gradient through it.

    The norms are of the gradients w.r.t. the decoder's last layer (`AutoencoderKL.last_layer`).
    """
    ratio = jnp.clip(nll_grad_norm / (g_grad_norm + 1e-4), 0.0, 1e4)
    return disc_weight * jax.lax.stop_gradient(ratio)


def disc_factor(step: jax.Array | int, disc_start: int = 50001,
                factor: float = 1.0) -> jax.Array:
    """GAN loss factor: 0 before `disc_start`, `factor` from it on (CompVis `adopt_weight`)."""
    return jnp.where(jnp.asarray(step) < disc_start, 0.0, factor)
