"""Latent-diffusion U-Net with cross-attention (MorphDiff).

Follows the CompVis latent-diffusion `UNetModel` (`ldm/modules/diffusionmodules/openaimodel.py`,
legacy=True, `use_spatial_transformer=True`) and its `SpatialTransformer`
(`ldm/modules/attention.py`), which MorphDiff trains on 32x32x4 VAE latents conditioned on L1000
expression tokens (morphdiff.txt, Methods; config `configs/ldm/morph_5c.yaml`). The MorphDiff
configuration has 378,499,012 parameters, 104,379,840 of them in 21 SpatialTransformers.

`dims=1` gives the same network over sequences (B, L, C): kernel-3 convolutions, resampling along
the length, and transformers whose tokens are the positions. LUMIC denoises 384-d DINO embeddings
this way, as a length-384 sequence (lumic.txt; `welch-lab/LUMIC` `unet_1d.py`). Without a
`context_dim` the cross-attention attends to the tokens themselves, as in the reference when no
context is given.

Images are NHWC; parameters are float32 and `dtype` is the compute dtype. Group and layer norms
run in float32 (the reference's `GroupNorm32`). Initialisers are torch's defaults
(`kaiming_uniform(a=sqrt(5))` weights, U(+-1/sqrt(fan_in)) biases); the convolutions the reference
wraps in `zero_module` start at zero, so the network outputs exactly zero at init.

Not included: `num_head_channels`, class-label embeddings, the codebook-id head and the plain
(non-transformer) attention block, none of which MorphDiff uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from morphjax.models.classifier import CONV_AXES

LINEAR_AXES = ("embed", "mlp")
ATTENTION_IN_AXES = ("embed", "heads")
ATTENTION_OUT_AXES = ("heads", "embed")
NUM_GROUPS = 32
RESBLOCK_NORM_EPS = 1e-5  # GroupNorm32 (torch default eps).
TRANSFORMER_NORM_EPS = 1e-6  # attention.py `Normalize`.
LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm default.

# torch default nn.Linear / nn.Conv2d weights: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
TORCH_KERNEL_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
ZEROS = nnx.initializers.zeros_init()


def _torch_bias_init(fan_in: int):
    """torch's default bias init, U(+-1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _check_dims(dims: int) -> None:
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 (sequences, B L C) or 2 (images, B H W C), got {dims}.")


def _conv(in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, dims: int = 2,
          zero: bool = False, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """`dims`-D conv with torch padding (kernel // 2 on each side), torch init or zeros."""
    pad = kernel // 2
    return nnx.Conv(in_channels, out_channels, (kernel,) * dims, strides=stride,
                    padding=((pad, pad),) * dims,
                    kernel_init=ZEROS if zero else TORCH_KERNEL_INIT,
                    bias_init=ZEROS if zero else _torch_bias_init(in_channels * kernel ** dims),
                    dtype=dtype, rngs=rngs,
                    kernel_metadata={"out_sharding": CONV_AXES[2 - dims:]},
                    bias_metadata={"out_sharding": ("conv_out",)})


def _linear(in_features: int, out_features: int, axes: tuple[str, str], *,
            use_bias: bool = True, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=use_bias,
                      kernel_init=TORCH_KERNEL_INIT, bias_init=_torch_bias_init(in_features),
                      dtype=dtype, rngs=rngs, kernel_metadata={"out_sharding": axes},
                      bias_metadata={"out_sharding": axes[1:]})


def _avg_pool2(x: jax.Array) -> jax.Array:
    """Average pooling by 2 along every spatial axis, stride 2 (sizes are checked to be even)."""
    spatial = x.shape[1:-1]
    split = [d for n in spatial for d in (n // 2, 2)]
    pooled_axes = tuple(range(2, 2 + 2 * len(spatial), 2))
    return x.reshape(x.shape[0], *split, x.shape[-1]).mean(axis=pooled_axes)


def _upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling along every spatial axis."""
    for axis in range(1, x.ndim - 1):
        x = jnp.repeat(x, 2, axis=axis)
    return x


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos(t f), sin(t f)], f_i = max_period^(-i / (dim // 2)).

    CompVis `timestep_embedding` (cosine half first); an odd `dim` gets a trailing zero. float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm(nnx.Module):
    """32-group GroupNorm computed in float32, cast back to the input dtype (`GroupNorm32`)."""

    def __init__(self, channels: int, epsilon: float, *, rngs: nnx.Rngs):
        if channels % NUM_GROUPS:
            raise ValueError(f"GroupNorm needs channels divisible by {NUM_GROUPS}, got {channels}; "
                             f"choose model_channels (and channel_mult) so every width is.")
        self.norm = nnx.GroupNorm(channels, num_groups=NUM_GROUPS, epsilon=epsilon,
                                  dtype=jnp.float32, rngs=rngs,
                                  scale_metadata={"out_sharding": ("conv_out",)},
                                  bias_metadata={"out_sharding": ("conv_out",)})

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, eps 1e-5 (torch default), computed in float32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, dtype=jnp.float32, rngs=rngs,
                                  scale_metadata={"out_sharding": ("embed",)},
                                  bias_metadata={"out_sharding": ("embed",)})

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x.astype(jnp.float32)).astype(x.dtype)


class ResBlock(nnx.Module):
    """Residual block conditioned on the time embedding (openaimodel.py `ResBlock`).

    norm -> SiLU -> [2x down/up on h and x] -> conv3x3; time embedding -> SiLU -> Linear gives
    (scale, shift) applied as norm(h) * (1 + scale) + shift (`use_scale_shift_norm`) or a bias
    added before the norm; then SiLU -> dropout -> zero-init conv3x3. The skip is a 1x1 conv when
    the width changes. `dims=1`: kernel-3 convs over (B, L, C).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, *,
                 dropout: float = 0.0, use_scale_shift_norm: bool = True, up: bool = False,
                 down: bool = False, dims: int = 2, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        if up and down:
            raise ValueError("ResBlock takes up=True or down=True, not both.")
        _check_dims(dims)
        out_channels = out_channels or channels
        self.up, self.down = up, down
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = GroupNorm(channels, RESBLOCK_NORM_EPS, rngs=rngs)
        self.in_conv = _conv(channels, out_channels, 3, dims=dims, dtype=dtype, rngs=rngs)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_proj = _linear(emb_channels, emb_out, ("embed", "conv_out"), dtype=dtype,
                                rngs=rngs)
        self.out_norm = GroupNorm(out_channels, RESBLOCK_NORM_EPS, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.out_conv = _conv(out_channels, out_channels, 3, dims=dims, zero=True, dtype=dtype,
                              rngs=rngs)
        self.skip = (_conv(channels, out_channels, 1, dims=dims, dtype=dtype, rngs=rngs)
                     if out_channels != channels else None)

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = nnx.silu(self.in_norm(x))
        if self.down:
            h, x = _avg_pool2(h), _avg_pool2(x)
        elif self.up:
            h, x = _upsample2(h), _upsample2(x)
        h = self.in_conv(h)
        emb_out = self.emb_proj(nnx.silu(emb)).astype(h.dtype)
        emb_out = emb_out.reshape(emb_out.shape[0], *(1,) * (h.ndim - 2), emb_out.shape[-1])
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        h = nnx.silu(h)
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.out_conv(h)
        skip = self.skip(x) if self.skip is not None else x
        return skip + h


class Downsample(nnx.Module):
    """Stride-2 conv3x3 (kernel 3 for dims=1) with padding 1 (`Downsample`, conv_resample=True)."""

    def __init__(self, channels: int, *, dims: int = 2, dtype: jnp.dtype, rngs: nnx.Rngs):
        _check_dims(dims)
        self.conv = _conv(channels, channels, 3, stride=2, dims=dims, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest x2 then conv3x3 (kernel 3 for dims=1) (`Upsample`, conv_resample=True)."""

    def __init__(self, channels: int, *, dims: int = 2, dtype: jnp.dtype, rngs: nnx.Rngs):
        _check_dims(dims)
        self.conv = _conv(channels, channels, 3, dims=dims, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(_upsample2(x))


class Attention(nnx.Module):
    """Multi-head attention of `x` to `context` (self-attention when context is None).

    attention.py `CrossAttention`: to_q/to_k/to_v without bias, to_out with bias, scale
    dim_head^-1/2, softmax in float32.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 *, dtype: jnp.dtype, rngs: nnx.Rngs):
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = _linear(query_dim, inner, ATTENTION_IN_AXES, use_bias=False, dtype=dtype,
                            rngs=rngs)
        self.to_k = _linear(context_dim, inner, ATTENTION_IN_AXES, use_bias=False, dtype=dtype,
                            rngs=rngs)
        self.to_v = _linear(context_dim, inner, ATTENTION_IN_AXES, use_bias=False, dtype=dtype,
                            rngs=rngs)
        self.to_out = _linear(inner, query_dim, ATTENTION_OUT_AXES, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda a: a.reshape(*a.shape[:2], self.heads, self.dim_head)  # noqa: E731
        out = jax.nn.dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.reshape(*out.shape[:2], -1))


class FeedForward(nnx.Module):
    """GEGLU feed-forward, inner width 4 * dim (attention.py `FeedForward(glu=True)`)."""

    def __init__(self, dim: int, mult: int = 4, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.proj_in = _linear(dim, 2 * mult * dim, LINEAR_AXES, dtype=dtype, rngs=rngs)
        self.proj_out = _linear(mult * dim, dim, LINEAR_AXES[::-1], dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj_in(x), 2, axis=-1)
        return self.proj_out(h * jax.nn.gelu(gate, approximate=False))


class TransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention to context, GEGLU MLP, each residual
    (attention.py `BasicTransformerBlock`). With context_dim None the second attention attends
    to the tokens themselves."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, *,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, rngs=rngs)
        self.self_attention = Attention(dim, heads, dim_head, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, rngs=rngs)
        self.cross_attention = Attention(dim, heads, dim_head, context_dim, dtype=dtype,
                                         rngs=rngs)
        self.norm3 = LayerNorm(dim, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attention(self.norm1(x))
        x = x + self.cross_attention(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nnx.Module):
    """GroupNorm (eps 1e-6) -> conv1x1 -> tokens -> depth x TransformerBlock -> zero-init
    conv1x1 -> + input (attention.py `SpatialTransformer`). Tokens are the pixels (dims=2) or
    the sequence positions (dims=1); context_dim None: no external context."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int | None,
                 depth: int = 1, *, dims: int = 2, dtype: jnp.dtype, rngs: nnx.Rngs):
        _check_dims(dims)
        inner = heads * dim_head
        self.norm = GroupNorm(channels, TRANSFORMER_NORM_EPS, rngs=rngs)
        self.proj_in = _conv(channels, inner, 1, dims=dims, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(inner, heads, dim_head, context_dim,
                                                 dtype=dtype, rngs=rngs) for _ in range(depth)])
        self.proj_out = _conv(inner, channels, 1, dims=dims, zero=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        tokens = self.proj_in(self.norm(x))
        grid = tokens.shape[:-1]
        tokens = tokens.reshape(x.shape[0], -1, tokens.shape[-1])
        if context is not None:
            context = context.astype(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.reshape(*grid, -1))


class Block(nnx.Module):
    """Layers applied in order; ResBlocks get the time embedding, transformers the context
    (openaimodel.py `TimestepEmbedSequential`)."""

    def __init__(self, layers: Sequence[nnx.Module]):
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array, emb: jax.Array, context: jax.Array | None) -> jax.Array:
        for layer in self.layers:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _call_block(block: Block, x: jax.Array, emb: jax.Array,
                context: jax.Array | None) -> jax.Array:
    return block(x, emb, context)


class UNet(nnx.Module):
    """Diffusion U-Net with cross-attention (openaimodel.py `UNetModel`, legacy=True).

    `attention_resolutions` are downsampling factors (1 = full resolution) whose levels get a
    SpatialTransformer after each ResBlock; the middle block always has one. Heads = num_heads,
    dim_head = width // num_heads. Defaults are the MorphDiff config (`morph_5c.yaml`).
    `remat=True` recomputes each block's activations in the backward pass (`nnx.remat`).
    `dims=1` makes it a U-Net over sequences (B, L, C); `context_dim=None` drops the external
    context (the cross-attention then attends to the tokens).
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 4, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 2, 4, 4), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (1, 2, 4, 8), num_heads: int = 8,
                 transformer_depth: int = 1, context_dim: int | None = 12,
                 use_scale_shift_norm: bool = True, resblock_updown: bool = True,
                 dropout: float = 0.0, remat: bool = False, dims: int = 2, *,
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if not channel_mult or num_res_blocks < 1:
            raise ValueError(f"UNet needs a non-empty channel_mult and num_res_blocks >= 1, got "
                             f"channel_mult={channel_mult}, num_res_blocks={num_res_blocks}.")
        _check_dims(dims)
        for width in {model_channels * m for m in channel_mult}:
            if width % num_heads:
                raise ValueError(f"UNet width {width} (model_channels x channel_mult) is not "
                                 f"divisible by num_heads={num_heads}.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels, self.context_dim = model_channels, context_dim
        self.num_downsamples = len(channel_mult) - 1
        self.remat, self.dims = remat, dims
        emb_dim = 4 * model_channels

        def res(cin, cout=None, **kw):
            return ResBlock(cin, emb_dim, cout, dropout=dropout,
                            use_scale_shift_norm=use_scale_shift_norm, dims=dims, dtype=dtype,
                            rngs=rngs, **kw)

        def transformer(ch):
            return SpatialTransformer(ch, num_heads, ch // num_heads, context_dim,
                                      transformer_depth, dims=dims, dtype=dtype, rngs=rngs)

        self.time_embed_1 = _linear(model_channels, emb_dim, LINEAR_AXES, dtype=dtype, rngs=rngs)
        self.time_embed_2 = _linear(emb_dim, emb_dim, LINEAR_AXES[::-1], dtype=dtype, rngs=rngs)

        input_blocks = [Block([_conv(in_channels, model_channels, 3, dims=dims, dtype=dtype,
                                     rngs=rngs)])]
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                input_blocks.append(Block(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = (res(ch, down=True) if resblock_updown
                        else Downsample(ch, dims=dims, dtype=dtype, rngs=rngs))
                input_blocks.append(Block([down]))
                skip_channels.append(ch)
                ds *= 2
        self.input_blocks = nnx.List(input_blocks)
        self.middle_block = Block([res(ch), transformer(ch), res(ch)])

        output_blocks = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, up=True) if resblock_updown
                                  else Upsample(ch, dims=dims, dtype=dtype, rngs=rngs))
                    ds //= 2
                output_blocks.append(Block(layers))
        self.output_blocks = nnx.List(output_blocks)
        self.out_norm = GroupNorm(ch, RESBLOCK_NORM_EPS, rngs=rngs)
        self.out_conv = _conv(ch, out_channels, 3, dims=dims, zero=True, dtype=dtype, rngs=rngs)

    def time_embedding(self, t: jax.Array) -> jax.Array:
        """(B,) timesteps -> (B, 4 * model_channels): sinusoid -> Linear -> SiLU -> Linear."""
        emb = timestep_embedding(t, self.model_channels).astype(self.time_embed_1.dtype)
        return self.time_embed_2(nnx.silu(self.time_embed_1(emb)))

    def _check_inputs(self, x: jax.Array, t: jax.Array, context: jax.Array | None) -> None:
        factor = 2 ** self.num_downsamples
        layout = "(B, L, C)" if self.dims == 1 else "(B, H, W, C) NHWC"
        if x.ndim != self.dims + 2 or x.shape[-1] != self.in_channels:
            raise ValueError(f"UNet(dims={self.dims}) x must be {layout} with C = "
                             f"{self.in_channels}, got {x.shape}.")
        if any(n % factor for n in x.shape[1:-1]):
            raise ValueError(f"UNet x spatial size {x.shape[1:-1]} must be divisible by "
                             f"{factor} (2 ** (len(channel_mult) - 1)).")
        if t.shape != (x.shape[0],):
            raise ValueError(f"UNet t must be ({x.shape[0]},) timesteps, got {t.shape}.")
        if self.context_dim is None:
            if context is not None:
                raise ValueError("UNet built with context_dim=None takes context=None, got "
                                 f"{context.shape}.")
        elif context is None or context.ndim != 3 or context.shape[0] != x.shape[0] or \
                context.shape[-1] != self.context_dim:
            shape = None if context is None else context.shape
            raise ValueError(f"UNet context must be ({x.shape[0]}, tokens, {self.context_dim}), "
                             f"got {shape}.")

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Noisy inputs (B, H, W, C) (dims=2) or (B, L, C) (dims=1), timesteps (B,), context
        tokens (B, tokens, context_dim) or None -> prediction shaped like x with out_channels,
        float32."""
        t = jnp.asarray(t)
        self._check_inputs(x, t, context)
        run = nnx.remat(_call_block) if self.remat else _call_block
        emb = self.time_embedding(t)
        h = x.astype(self.out_conv.dtype)
        skips = []
        for block in self.input_blocks:
            h = run(block, h, emb, context)
            skips.append(h)
        h = run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = run(block, jnp.concatenate([h, skips.pop()], axis=-1), emb, context)
        return self.out_conv(nnx.silu(self.out_norm(h))).astype(jnp.float32)
