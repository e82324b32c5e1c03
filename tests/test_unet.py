"""Diffusion U-Net (MorphDiff): reference parameter counts, NumPy re-derivations of the layers,
zero output at init, remat parity, use of the context and sharded parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval as pe
from scipy.special import erf

from morphjax import parallel
from morphjax.models.impa import count_params
from morphjax.models.unet import (Attention, Downsample, ResBlock, SpatialTransformer, UNet,
                                  Upsample, timestep_embedding)

TINY = dict(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2,
            context_dim=12)
# Every block type (down/up ResBlocks, transformers in and out, middle) at a fraction of the
# compile time of TINY; numerical tests run on this one at 8x8.
MICRO = dict(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(2,),
             num_heads=2, context_dim=12)
# One level, no resampling, a transformer only in the middle: the cheapest U-Net to compile
# gradients for.
PICO = dict(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
            num_heads=2, context_dim=12)


@pytest.fixture(scope="module", autouse=True)
def fast_tracing():
    """Each RngCount update under a trace reads `.sharding` of a tracer, and JAX then scans the
    whole trace to word an error-origin message nobody sees: quadratic in model size (~15 s for
    the MorphDiff U-Net under `nnx.eval_shape`, 1 s without). Only that unused text changes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pe.DynamicJaxprTracer, "_origin_msg", lambda self: "", raising=False)
        yield


@pytest.fixture(scope="module")
def tiny_abstract():
    return nnx.eval_shape(lambda: UNet(**TINY, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def micro():
    """MICRO with random parameters; tests that modify it take an `nnx.clone`."""
    return random_filled(lambda: UNet(**MICRO, rngs=nnx.Rngs(0)))


def random_filled(build, seed: int = 0) -> nnx.Module:
    """The abstract module of `build` filled with random values, zero-initialised layers included.

    Eager initialisation compiles one small program per parameter shape (seconds); NumPy values
    cost nothing and make every layer, zero-initialised ones too, take part in the output.
    """
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), leaf.dtype)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def inputs(batch: int, seed: int = 0, size: int = 8, tokens: int = 5):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, size, size, 4)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    context = jnp.asarray(rng.normal(size=(batch, tokens, 12)), jnp.float32)
    return x, t, context


@nnx.jit
def apply(model, x, t, context):
    return model(x, t, context)


@nnx.jit
def loss_and_grads(model, x, t, context, target):
    return nnx.value_and_grad(lambda m: jnp.mean((m(x, t, context) - target) ** 2))(model)


# -- NumPy references --------------------------------------------------------------------------

def np_group_norm(x, scale, bias, eps, groups=32):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups).astype(np.float64)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_conv(x, kernel, bias, stride=1):
    """Cross-correlation with torch padding k // 2 on every side."""
    k = kernel.shape[0]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h_out = (x.shape[1] + 2 * pad - k) // stride + 1
    w_out = (x.shape[2] + 2 * pad - k) // stride + 1
    out = np.zeros((x.shape[0], h_out, w_out, kernel.shape[-1]))
    for dy in range(k):
        for dx in range(k):
            patch = xp[:, dy:dy + stride * h_out:stride, dx:dx + stride * w_out:stride]
            out += patch @ kernel[dy, dx]
    return out + bias


def np_attention(x, context, p, heads):
    q, k, v = x @ p["to_q"]["kernel"], context @ p["to_k"]["kernel"], context @ p["to_v"]["kernel"]
    b, n, inner = q.shape
    d = inner // heads
    q = q.reshape(b, n, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, inner)
    return out @ p["to_out"]["kernel"] + p["to_out"]["bias"]


def np_params(module):
    return jax.tree.map(lambda a: np.asarray(a, np.float64),
                        nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def np_randn(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape)


# -- MorphDiff configuration -------------------------------------------------------------------

def test_morphdiff_parameter_count():
    """notes section 2/5: 378,499,012 params, SpatialTransformers 104,379,840, 21 blocks."""
    model = nnx.eval_shape(lambda: UNet(rngs=nnx.Rngs(0)))
    assert count_params(model) == 378_499_012
    transformers = [m for _, m in nnx.iter_graph(model) if isinstance(m, SpatialTransformer)]
    assert len(transformers) == 21
    assert sum(len(m.blocks) for m in transformers) == 21
    assert sum(count_params(m) for m in transformers) == 104_379_840
    # Time embedding 192 -> 768 -> 768; cross-attention keys from 12-d context tokens.
    assert model.time_embed_1.kernel.shape == (192, 768)
    assert transformers[0].blocks[0].cross_attention.to_k.kernel.shape == (12, 192)
    assert transformers[-1].blocks[0].self_attention.heads == 8


# -- layers against NumPy ------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [192, 7])
def test_timestep_embedding_matches_numpy(dim):
    t = np.array([0, 1, 17, 999], np.float64)
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
    if dim % 2:
        expected = np.concatenate([expected, np.zeros((4, 1))], axis=1)
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.int32), dim))
    assert got.shape == (4, dim)
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 sin/cos of t * f, t < 1000.


def test_time_embedding_mlp_matches_numpy(micro):
    model = micro
    t = np.array([3, 500])
    p = np_params(model)
    sinusoid = np.asarray(timestep_embedding(jnp.asarray(t), 32), np.float64)
    h = np_silu(sinusoid @ p["time_embed_1"]["kernel"] + p["time_embed_1"]["bias"])
    expected = h @ p["time_embed_2"]["kernel"] + p["time_embed_2"]["bias"]
    np.testing.assert_allclose(np.asarray(model.time_embedding(jnp.asarray(t))), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_down_matches_numpy(scale_shift):
    """Norm, SiLU, avg-pool of h and x, conv, (1 + scale) * norm + shift, zero conv, 1x1 skip."""
    block = random_filled(lambda: ResBlock(32, 16, 64, use_scale_shift_norm=scale_shift,
                                           down=True, rngs=nnx.Rngs(0)))
    x, emb = np_randn(2, 2, 8, 8, 32), np_randn(3, 2, 16)
    p = np_params(block)
    pool = lambda a: a.reshape(2, 4, 2, 4, 2, -1).mean(axis=(2, 4))  # noqa: E731
    h = np_silu(np_group_norm(x, p["in_norm"]["norm"]["scale"], p["in_norm"]["norm"]["bias"],
                              1e-5))
    h = np_conv(pool(h), p["in_conv"]["kernel"], p["in_conv"]["bias"])
    emb_out = (np_silu(emb) @ p["emb_proj"]["kernel"] + p["emb_proj"]["bias"])[:, None, None]
    out_norm = lambda a: np_group_norm(a, p["out_norm"]["norm"]["scale"],  # noqa: E731
                                       p["out_norm"]["norm"]["bias"], 1e-5)
    if scale_shift:
        h = out_norm(h) * (1 + emb_out[..., :64]) + emb_out[..., 64:]
    else:
        h = out_norm(h + emb_out)
    h = np_conv(np_silu(h), p["out_conv"]["kernel"], p["out_conv"]["bias"])
    expected = np_conv(pool(x), p["skip"]["kernel"], p["skip"]["bias"]) + h
    got = nnx.jit(lambda b, x, e: b(x, e))(block, jnp.asarray(x, jnp.float32),
                                           jnp.asarray(emb, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_downsample_pads_like_torch():
    """Stride-2 conv3x3 with one pixel of padding on every side (XLA 'SAME' would pad 0/1)."""
    layer = random_filled(lambda: Downsample(32, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    x = np_randn(1, 1, 8, 8, 32)
    p = np_params(layer)
    expected = np_conv(x, p["conv"]["kernel"], p["conv"]["bias"], stride=2)
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), expected,
                               rtol=1e-4, atol=1e-4)


def test_attention_matches_numpy():
    layer = random_filled(lambda: Attention(16, heads=2, dim_head=8, context_dim=12,
                                            dtype=jnp.float32, rngs=nnx.Rngs(0)))
    x, context = np_randn(1, 2, 6, 16), np_randn(2, 2, 5, 12)
    expected = np_attention(x, context, np_params(layer), heads=2)
    got = layer(jnp.asarray(x, jnp.float32), jnp.asarray(context, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_spatial_transformer_matches_numpy():
    """GroupNorm(eps 1e-6), proj_in, [x + self-attn, x + cross-attn, x + GEGLU], proj_out, + x."""
    layer = random_filled(lambda: SpatialTransformer(32, heads=2, dim_head=16, context_dim=12,
                                                     dtype=jnp.float32, rngs=nnx.Rngs(0)))
    x, context = np_randn(2, 2, 4, 4, 32), np_randn(3, 2, 5, 12)
    p = np_params(layer)
    h = np_group_norm(x, p["norm"]["norm"]["scale"], p["norm"]["norm"]["bias"], 1e-6)
    h = np_conv(h, p["proj_in"]["kernel"], p["proj_in"]["bias"]).reshape(2, 16, 32)
    b = p["blocks"][0]
    ln = lambda a, n: np_layer_norm(a, b[n]["norm"]["scale"], b[n]["norm"]["bias"])  # noqa: E731
    h = h + np_attention(ln(h, "norm1"), ln(h, "norm1"), b["self_attention"], heads=2)
    h = h + np_attention(ln(h, "norm2"), context, b["cross_attention"], heads=2)
    a, gate = np.split(ln(h, "norm3") @ b["ff"]["proj_in"]["kernel"] + b["ff"]["proj_in"]["bias"],
                       2, axis=-1)
    geglu = a * gate * 0.5 * (1 + erf(gate / np.sqrt(2)))
    h = h + geglu @ b["ff"]["proj_out"]["kernel"] + b["ff"]["proj_out"]["bias"]
    expected = x + np_conv(h.reshape(2, 4, 4, 32), p["proj_out"]["kernel"], p["proj_out"]["bias"])
    got = nnx.jit(lambda m, x, c: m(x, c))(layer, jnp.asarray(x, jnp.float32),
                                          jnp.asarray(context, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


# -- whole network -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [{}, dict(resblock_updown=False, use_scale_shift_norm=False)])
def test_tiny_forward_shape(variant):
    """TINY at 16x16x4 with (B, 5, 12) context (traced, not compiled)."""
    model = nnx.eval_shape(lambda: UNet(**TINY, **variant, rngs=nnx.Rngs(0)))
    x, t, context = inputs(2, size=16)
    out = nnx.eval_shape(lambda m, x, t, c: m(x, t, c), model, x, t, context)
    assert out.shape == (2, 16, 16, 4) and out.dtype == jnp.float32
    if variant:
        assert isinstance(model.input_blocks[3].layers[0], Downsample)


def test_output_is_zero_at_init_and_learns():
    # The rbg generator initialises a few seconds faster on CPU (fewer per-shape compiles).
    model = UNet(**PICO, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    x, t, context = inputs(2)
    assert np.all(np.asarray(apply(model, x, t, context)) == 0.0)  # zero-init output conv

    target = jnp.asarray(np_randn(9, 2, 8, 8, 4), jnp.float32)
    _, grads = loss_and_grads(model, x, t, context, target)
    tx = optax.sgd(0.1)

    @jax.jit
    def sgd_step(params, grads):
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    nnx.update(model, sgd_step(nnx.state(model, nnx.Param), grads))
    assert np.abs(np.asarray(apply(model, x, t, context))).max() > 1e-4


def test_structure_and_skip_channels(tiny_abstract):
    """TINY: input [conv, res, res, down, res+T, res+T], output 3 + 3 blocks with skips."""
    model = tiny_abstract
    kinds = [[type(layer).__name__ for layer in block.layers] for block in model.input_blocks]
    assert kinds == [["Conv"], ["ResBlock"], ["ResBlock"], ["ResBlock"],
                     ["ResBlock", "SpatialTransformer"], ["ResBlock", "SpatialTransformer"]]
    assert model.input_blocks[3].layers[0].down
    # Output ResBlocks take h + the matching skip: 64+64, 64+64, 64+32 | 64+32, 32+32, 32+32.
    widths = [block.layers[0].in_norm.norm.scale.shape[0] for block in model.output_blocks]
    assert widths == [128, 128, 96, 96, 64, 64]
    assert model.output_blocks[2].layers[-1].up
    assert [type(layer).__name__ for layer in model.middle_block.layers] == \
        ["ResBlock", "SpatialTransformer", "ResBlock"]


def test_context_changes_output(micro):
    model = nnx.clone(micro)
    x, t, context = inputs(8)
    other = context + jnp.asarray(np_randn(5, *context.shape), jnp.float32)
    a, b = np.asarray(apply(model, x, t, context)), np.asarray(apply(model, x, t, other))
    assert np.abs(a - b).max() > 1e-3
    # Only the cross-attention reads the context: with its values zeroed the output ignores it.
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Attention) and m.to_v.kernel.shape[0] == 12:
            m.to_v.kernel[...] = jnp.zeros_like(m.to_v.kernel[...])
    a, b = np.asarray(apply(model, x, t, context)), np.asarray(apply(model, x, t, other))
    np.testing.assert_array_equal(a, b)


def test_remat_matches_plain():
    x, t, context = inputs(2)
    target = jnp.asarray(np_randn(9, 2, 8, 8, 4), jnp.float32)
    plain = random_filled(lambda: UNet(**PICO, rngs=nnx.Rngs(0)))
    remat = random_filled(lambda: UNet(**PICO, remat=True, rngs=nnx.Rngs(0)))
    loss_a, grads_a = loss_and_grads(plain, x, t, context, target)
    loss_b, grads_b = loss_and_grads(remat, x, t, context, target)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6),
                 nnx.to_pure_dict(grads_a), nnx.to_pure_dict(grads_b))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads_a))
    # The remat model really is checkpointed: one remat region per block (input, middle, output).
    graphdef, state = nnx.split(remat)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, t, context))(state))
    assert jaxpr.count("remat2[") == len(remat.input_blocks) + 1 + len(remat.output_blocks)


def test_sharded_forward_matches_single_device(micro):
    model = micro
    x, t, context = inputs(8)
    expected = np.asarray(apply(model, x, t, context))
    mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    sharded = [jax.device_put(a, parallel.batch_sharding(mesh)) for a in (x, t, context)]
    out = apply(model, *sharded)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    # Logical names on every kernel: rules conv_out/heads/mlp -> tensor split them as intended.
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = (("conv_out", "tensor"), ("heads", "tensor"), ("mlp", "tensor"))
    specs = nnx.to_pure_dict(parallel.state_shardings(nnx.state(model), mesh, rules,
                                                      fsdp_min_size=2**40))
    block = specs["input_blocks"][3]["layers"][1]["blocks"][0]
    assert block["cross_attention"]["to_k"]["kernel"].spec == jax.P(None, "tensor")
    assert block["self_attention"]["to_out"]["kernel"].spec == jax.P("tensor", None)
    assert block["ff"]["proj_in"]["kernel"].spec == jax.P(None, "tensor")
    assert block["ff"]["proj_out"]["kernel"].spec == jax.P("tensor", None)
    assert specs["time_embed_1"]["kernel"].spec == jax.P(None, "tensor")
    assert specs["input_blocks"][1]["layers"][0]["in_conv"]["kernel"].spec == \
        jax.P(None, None, None, "tensor")


def test_bad_inputs_name_the_problem(tiny_abstract):
    model = tiny_abstract
    x, t, context = inputs(2, size=16)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(x[:, :15, :15], t, context)
    with pytest.raises(ValueError, match="context"):
        model(x, t, context[..., :8])
    with pytest.raises(ValueError, match="num_heads"):
        UNet(model_channels=32, num_heads=3, rngs=nnx.Rngs(0))


# -- 1-D U-Net (dims=1, LUMIC's sequence U-Net layout) -------------------------------------------

def to_2d_state(module_1d, abstract_2d):
    """2-D parameters equal to the 1-D ones: each kernel-3 conv in the centre row (kh = 1) with
    zeros in the off-centre rows, 1x1 convs as they are, everything else copied."""
    graphdef, state = nnx.split(abstract_2d)
    source = nnx.to_pure_dict(nnx.state(module_1d))

    def place(path, leaf):
        value = source
        for key in path:
            value = value[getattr(key, "key", key)]
        value = np.asarray(value)
        if value.ndim == 3:  # 1-D conv kernel (k, in, out) -> (k, k, in, out)
            k = value.shape[0]
            kernel = np.zeros((k,) + value.shape, value.dtype)
            kernel[k // 2] = value
            value = kernel
        assert value.shape == leaf.shape, (path, value.shape, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(place, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def inputs_1d(batch: int, seed: int = 0, length: int = 8, tokens: int = 5):
    x, t, context = inputs(batch, seed, size=length, tokens=tokens)
    return x[:, 0], t, context


@pytest.fixture(scope="module")
def micro_1d():
    return random_filled(lambda: UNet(**MICRO, dims=1, rngs=nnx.Rngs(0)))


def test_unet_1d_parameter_count():
    """Closed form for C1 below (dims=1, every conv kernel has 3 taps or 1).

    conv(i, o, k) = i*o*k + o, linear(i, o) = i*o + o, GroupNorm/LayerNorm(c) = 2c; emb = 4*32.
    ResBlock(i, o) = gn(i) + conv(i, o, 3) + linear(128, 2o) + gn(o) + conv(o, o, 3)
                     [+ conv(i, o, 1) skip when i != o].
    Transformer(c) (2 heads x c/2, context 12) = gn(c) + 2 conv(c, c, 1) + 3 ln(c)
        + self-attention 3c^2 + linear(c, c) + cross-attention c^2 + 2*12c + linear(c, c)
        + GEGLU linear(c, 8c) + linear(4c, c).
    Layout (channel_mult (1, 2), one ResBlock per level, attention at factor 2):
      time 32 -> 128 -> 128;  in: conv(1, 32, 3), Res(32, 32), Res(32, 32) down,
      Res(32, 64) + T(64);  middle: Res(64, 64), T(64), Res(64, 64);
      out: Res(128, 64) + T(64), Res(96, 64) + T(64) + Res(64, 64) up, Res(96, 32),
      Res(64, 32);  head: gn(32) + conv(32, 1, 3).
    Res(32, 32) = 64 + 3,104 + 8,256 + 64 + 3,104 = 14,592; Res(32, 64) = 37,376;
    Res(64, 64) = 41,472; T(64) = 128 + 8,320 + 384 + 12,288 + 4,160 + 4,096 + 1,536 + 4,160
    + 33,280 + 16,448 = 84,800; Res(128, 64) = 62,144; Res(96, 64) = 53,888; Res(96, 32) = 23,968;
    Res(64, 32) = 19,808.
    Total = 20,736 + 128 + 2 * 14,592 + 37,376 + 3 * 41,472 + 4 * 84,800 + 62,144 + 53,888
    + 23,968 + 19,808 + 64 + 97 = 711,009.
    """
    c1 = dict(in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2),
              num_res_blocks=1, attention_resolutions=(2,), num_heads=2, context_dim=12)

    def conv(i, o, k):
        return i * o * k + o

    def linear(i, o):
        return i * o + o

    def res(i, o):
        return (2 * i + conv(i, o, 3) + linear(128, 2 * o) + 2 * o + conv(o, o, 3)
                + (conv(i, o, 1) if i != o else 0))

    def transformer(c):
        return (2 * c + 2 * conv(c, c, 1) + 3 * 2 * c + 3 * c * c + linear(c, c)
                + c * c + 2 * 12 * c + linear(c, c) + linear(c, 8 * c) + linear(4 * c, c))

    assert (res(32, 32), res(32, 64), res(64, 64), transformer(64)) == \
        (14_592, 37_376, 41_472, 84_800)
    expected = (linear(32, 128) + linear(128, 128) + conv(1, 32, 3) + 2 * res(32, 32)
                + res(32, 64) + 3 * res(64, 64) + 4 * transformer(64) + res(128, 64)
                + res(96, 64) + res(96, 32) + res(64, 32) + 2 * 32 + conv(32, 1, 3))
    assert expected == 711_009
    model_1d = nnx.eval_shape(lambda: UNet(**c1, dims=1, rngs=nnx.Rngs(0)))
    assert count_params(model_1d) == expected
    # The same config in 2-D differs only in the kernel-3 convs: 9 instead of 3 taps each.
    model_2d = nnx.eval_shape(lambda: UNet(**c1, rngs=nnx.Rngs(0)))
    taps3 = sum(int(np.prod(m.kernel.shape)) for _, m in nnx.iter_graph(model_1d)
                if isinstance(m, nnx.Conv) and m.kernel.shape[0] == 3)
    assert count_params(model_2d) - count_params(model_1d) == 2 * taps3
    assert model_1d.input_blocks[0].layers[0].kernel.shape == (3, 1, 32)


@pytest.mark.parametrize("kind", ["res", "res_down", "res_up", "downsample", "upsample",
                                  "transformer"])
def test_1d_blocks_equal_2d_blocks_on_constant_rows(kind):
    """A 1-D block on x (B, L, C) equals the 2-D block on x repeated over 2 rows, with the 1-D
    kernels in the centre row: the off-centre rows only meet zeros, the duplicated rows leave
    group-norm statistics, pooling and attention weights unchanged."""
    builders = {
        "res": lambda d: ResBlock(32, 16, 64, dims=d, rngs=nnx.Rngs(0)),
        "res_down": lambda d: ResBlock(32, 16, down=True, dims=d, rngs=nnx.Rngs(0)),
        "res_up": lambda d: ResBlock(32, 16, use_scale_shift_norm=False, up=True, dims=d,
                                     rngs=nnx.Rngs(0)),
        "downsample": lambda d: Downsample(32, dims=d, dtype=jnp.float32, rngs=nnx.Rngs(0)),
        "upsample": lambda d: Upsample(32, dims=d, dtype=jnp.float32, rngs=nnx.Rngs(0)),
        "transformer": lambda d: SpatialTransformer(32, 2, 16, 12, dims=d, dtype=jnp.float32,
                                                    rngs=nnx.Rngs(0)),
    }
    block_1d = random_filled(lambda: builders[kind](1))
    block_2d = to_2d_state(block_1d, nnx.eval_shape(lambda: builders[kind](2)))
    x = jnp.asarray(np_randn(1, 2, 8, 32), jnp.float32)
    x_rows = jnp.repeat(x[:, None], 2, axis=1)
    extra = {"res": [jnp.asarray(np_randn(2, 2, 16), jnp.float32)],
             "transformer": [jnp.asarray(np_randn(3, 2, 5, 12), jnp.float32)]}
    args = extra.get(kind.split("_")[0], [])
    call = nnx.jit(lambda block, x, *args: block(x, *args))
    got = np.asarray(call(block_1d, x, *args))
    rows = np.asarray(call(block_2d, x_rows, *args))
    length = {"res_down": 4, "downsample": 4, "res_up": 16, "upsample": 16}.get(kind, 8)
    assert got.shape[:2] == (2, length)
    for row in range(rows.shape[1]):
        np.testing.assert_allclose(rows[:, row], got, rtol=1e-5, atol=1e-5)


def test_unet_1d_equals_2d_unet_on_constant_rows(micro_1d):
    """The whole MICRO network: 1-D on (B, L, C) equals 2-D on (B, 2, L, C) with equal rows."""
    model_2d = to_2d_state(micro_1d, nnx.eval_shape(lambda: UNet(**MICRO, rngs=nnx.Rngs(0))))
    x, t, context = inputs_1d(2)
    got = np.asarray(apply(micro_1d, x, t, context))
    assert got.shape == (2, 8, 4) and got.dtype == np.float32
    assert np.abs(got).max() > 1e-2
    rows = np.asarray(apply(model_2d, jnp.repeat(x[:, None], 2, axis=1), t, context))
    for row in range(2):
        np.testing.assert_allclose(rows[:, row], got, rtol=1e-4, atol=1e-4)


def test_unet_1d_zero_at_init_and_uses_time_and_context(micro_1d):
    x, t, context = inputs_1d(2)
    fresh = UNet(**MICRO, dims=1, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    assert np.all(np.asarray(apply(fresh, x, t, context)) == 0.0)  # zero-init output conv
    # With the zero-init layers filled (micro_1d), time and context both reach the output.
    base = np.asarray(apply(micro_1d, x, t, context))
    other_t = np.asarray(apply(micro_1d, x, (t + 250) % 1000, context))
    other_c = np.asarray(apply(micro_1d, x, t, context + 1.0))
    assert np.abs(base - other_t).max() > 1e-3
    assert np.abs(base - other_c).max() > 1e-3


def test_unet_1d_without_context():
    """context_dim=None: the cross-attention attends to the tokens (to_k reads the width)."""
    model = nnx.eval_shape(lambda: UNet(**{**MICRO, "context_dim": None}, dims=1,
                                        rngs=nnx.Rngs(0)))
    x, t, context = inputs_1d(2, length=16)
    out = nnx.eval_shape(lambda m, x, t: m(x, t), model, x, t)
    assert out.shape == (2, 16, 4)
    block = model.middle_block.layers[1].blocks[0]
    assert block.cross_attention.to_k.kernel.shape == (32, 32)
    with pytest.raises(ValueError, match="context=None"):
        model(x, t, context)


def test_unet_1d_bad_inputs_name_the_problem(micro_1d):
    x, t, context = inputs_1d(2)
    with pytest.raises(ValueError, match=r"dims=1.*\(B, L, C\)"):
        micro_1d(x[:, :, None], t, context)
    with pytest.raises(ValueError, match="divisible by 2"):
        micro_1d(x[:, :7], t, context)
    with pytest.raises(ValueError, match="context must be"):
        micro_1d(x, t)
    model_2d = nnx.eval_shape(lambda: UNet(**MICRO, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"dims=2.*\(B, H, W, C\)"):
        model_2d(x, t, context)
    with pytest.raises(ValueError, match="dims must be 1"):
        UNet(**MICRO, dims=3, rngs=nnx.Rngs(0))
