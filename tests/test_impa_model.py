"""IMPA / GRAPE networks: paper parameter counts, PyTorch forward parity, shapes, init, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from morphjax.models.impa import (ConditionEncoder, Discriminator, Generator, ResBlock,
                                  StyleEncoder, count_params)

SMALL = dict(dim_in=8, max_conv_dim=32)
STYLE = 8


def abstract_count(build) -> int:
    return count_params(nnx.eval_shape(build))


# IMPA reference counts (torch, notes/impa_reference.md 1.8). cpg0000: 3 modality heads of 249
# outputs each; RxRx1: 3 batches; condition encoders are [embedding ; noise] -> 64.
@pytest.mark.parametrize("name, build, expected", [
    ("G bbbc021", lambda r: Generator(96, 3, rngs=r), 24_318_595),
    ("G cpg0000", lambda r: Generator(96, 5, rngs=r), 24_319_877),
    ("G rxrx1", lambda r: Generator(96, 6, rngs=r), 24_320_518),
    ("G 128px", lambda r: Generator(128, 3, rngs=r), 24_318_595),
    ("E bbbc021", lambda r: StyleEncoder(96, 3, rngs=r), 14_329_472),
    ("E cpg0000", lambda r: StyleEncoder(96, 5, rngs=r), 14_330_624),
    ("E rxrx1", lambda r: StyleEncoder(96, 6, rngs=r), 14_331_200),
    ("E 128px", lambda r: StyleEncoder(128, 3, rngs=r), 16_164_480),
    ("D 5 drugs", lambda r: Discriminator(96, 3, 5, rngs=r), 14_299_205),
    ("D 34 drugs", lambda r: Discriminator(96, 3, 34, rngs=r), 14_314_082),
    ("D cpg0000", lambda r: Discriminator(96, 5, 249, num_heads=3, rngs=r), 14_681_003),
    ("D rxrx1", lambda r: Discriminator(96, 6, 3, rngs=r), 14_299_907),
    # Ours at 128 px: final conv 4x4 (IMPA hard-codes 3x3: 14,296,640 + 513 p).
    ("D 128px (ours)", lambda r: Discriminator(128, 3, 10, rngs=r), 16_131_648 + 513 * 10),
    ("f bbbc021", lambda r: ConditionEncoder(1024, 16, rngs=r), 66_624),
    ("f 128px", lambda r: ConditionEncoder(1024, 8, rngs=r), 66_112),
    ("f rxrx1", lambda r: ConditionEncoder(100, 10, rngs=r), 7_104),
])
def test_param_counts_match_impa(name, build, expected):
    assert abstract_count(lambda: build(nnx.Rngs(0))) == expected, name


def test_multimodal_condition_encoders_match_impa():
    dims = (1224, 328, 456)  # cpg0000 compound / CRISPR / ORF embeddings, noise 20.
    total = sum(abstract_count(lambda d=d: ConditionEncoder(d, 20, rngs=nnx.Rngs(0)))
                for d in dims)
    assert total == 132_544


# --- PyTorch re-derivation of IMPA (NCHW), written from the notes, for forward parity. ---

def torch_reference():
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    def lrelu(x):
        return F.leaky_relu(x, 0.2)

    class ResBlk(nn.Module):
        def __init__(self, dim_in, dim_out, normalize=False, downsample=False):
            super().__init__()
            self.normalize, self.downsample = normalize, downsample
            self.conv1 = nn.Conv2d(dim_in, dim_in, 3, 1, 1)
            self.conv2 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)
            if normalize:
                self.norm1 = nn.InstanceNorm2d(dim_in, affine=True)
                self.norm2 = nn.InstanceNorm2d(dim_in, affine=True)
            if dim_in != dim_out:
                self.shortcut = nn.Conv2d(dim_in, dim_out, 1, 1, 0, bias=False)

        def forward(self, x):
            s = self.shortcut(x) if hasattr(self, "shortcut") else x
            if self.downsample:
                s = F.avg_pool2d(s, 2)
            h = self.norm1(x) if self.normalize else x
            h = self.conv1(lrelu(h))
            if self.downsample:
                h = F.avg_pool2d(h, 2)
            h = self.norm2(h) if self.normalize else h
            h = self.conv2(lrelu(h))
            return (s + h) / math.sqrt(2)

    class AdaIN(nn.Module):
        def __init__(self, style_dim, channels):
            super().__init__()
            self.norm = nn.InstanceNorm2d(channels, affine=False)
            self.fc = nn.Linear(style_dim, 2 * channels)

        def forward(self, x, s):
            gamma, beta = torch.chunk(self.fc(s)[:, :, None, None], 2, dim=1)
            return (1 + gamma) * self.norm(x) + beta

    class AdainResBlk(nn.Module):
        def __init__(self, dim_in, dim_out, style_dim, upsample=False):
            super().__init__()
            self.upsample = upsample
            self.norm1, self.norm2 = AdaIN(style_dim, dim_in), AdaIN(style_dim, dim_out)
            self.conv1 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)
            self.conv2 = nn.Conv2d(dim_out, dim_out, 3, 1, 1)
            if dim_in != dim_out:
                self.shortcut = nn.Conv2d(dim_in, dim_out, 1, 1, 0, bias=False)

        def forward(self, x, s):
            up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
            skip = up(x) if self.upsample else x
            skip = self.shortcut(skip) if hasattr(self, "shortcut") else skip
            h = lrelu(self.norm1(x, s))
            h = self.conv1(up(h) if self.upsample else h)
            h = self.conv2(lrelu(self.norm2(h, s)))
            return (h + skip) / math.sqrt(2)

    class TorchGenerator(nn.Module):
        def __init__(self, img_size, c, style_dim, dim_in, max_conv_dim):
            super().__init__()
            self.from_rgb = nn.Conv2d(c, dim_in, 3, 1, 1)
            self.encoder, self.decoder = nn.ModuleList(), nn.ModuleList()
            self.to_rgb_norm = nn.InstanceNorm2d(dim_in, affine=True)
            self.to_rgb = nn.Conv2d(dim_in, c, 1, 1, 0)
            for _ in range(math.ceil(math.log2(img_size)) - 4):
                dim_out = min(dim_in * 2, max_conv_dim)
                self.encoder.append(ResBlk(dim_in, dim_out, normalize=True, downsample=True))
                self.decoder.insert(0, AdainResBlk(dim_out, dim_in, style_dim, upsample=True))
                dim_in = dim_out
            for _ in range(2):
                self.encoder.append(ResBlk(dim_out, dim_out, normalize=True))
                self.decoder.insert(0, AdainResBlk(dim_out, dim_out, style_dim))

        def forward(self, x, s):
            x = self.from_rgb(x)
            for block in self.encoder:
                x = block(x)
            content = x
            for block in self.decoder:
                x = block(x, s)
            return content, self.to_rgb(lrelu(self.to_rgb_norm(x)))

    class Trunk(nn.Module):
        def __init__(self, img_size, c, dim_in, max_conv_dim):
            super().__init__()
            self.from_rgb = nn.Conv2d(c, dim_in, 3, 1, 1)
            self.blocks = nn.ModuleList()
            size = img_size
            for _ in range(math.ceil(math.log2(img_size)) - 2):
                dim_out = min(dim_in * 2, max_conv_dim)
                self.blocks.append(ResBlk(dim_in, dim_out, downsample=True))
                dim_in, size = dim_out, size // 2
            self.conv = nn.Conv2d(dim_out, dim_out, size, 1, 0)

        def forward(self, x):
            x = self.from_rgb(x)
            for block in self.blocks:
                x = block(x)
            return lrelu(self.conv(lrelu(x))).view(x.shape[0], -1)

    class TorchStyleEncoder(nn.Module):
        def __init__(self, img_size, c, style_dim, dim_in, max_conv_dim):
            super().__init__()
            self.trunk = Trunk(img_size, c, dim_in, max_conv_dim)
            self.head = nn.Linear(max_conv_dim, style_dim)

        def forward(self, x):
            return self.head(self.trunk(x))

    class TorchDiscriminator(nn.Module):
        def __init__(self, img_size, c, num_domains, dim_in, max_conv_dim, num_heads):
            super().__init__()
            self.trunk = Trunk(img_size, c, dim_in, max_conv_dim)
            self.heads = nn.ModuleList(nn.Conv2d(max_conv_dim, num_domains, 1, 1, 0)
                                       for _ in range(num_heads))

        def forward(self, x, y, head):
            h = self.trunk(x)[:, :, None, None]
            return torch.stack([self.heads[int(m)](h[i:i + 1]).view(-1)[int(j)]
                                for i, (j, m) in enumerate(zip(y, head))])

    return torch, TorchGenerator, TorchStyleEncoder, TorchDiscriminator


def random_model(build, seed: int = 1) -> nnx.Module:
    """`build()` with NumPy-drawn parameters (no per-shape XLA compiles): He-scaled kernels and
    random biases / norm affines, so parity sees every parameter's wiring."""
    model = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.standard_normal(x.shape, np.float32)
        if len(x.shape) > 1:
            return jnp.asarray(noise * math.sqrt(2 / math.prod(x.shape[:-1])))
        is_scale = any(getattr(k, "key", None) == "scale" for k in path)
        return jnp.asarray(float(is_scale) + 0.1 * noise)

    nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.state(model, nnx.Param)))
    return model


def copy_to_torch(model: nnx.Module, torch_model, torch) -> None:
    """NNX params -> torch state dict: HWIO -> OIHW, (in, out) -> (out, in), same module paths."""
    state = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var.get_value() if hasattr(var, "get_value") else var.value)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        name = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
        state[".".join(map(str, path[:-1] + (name,)))] = torch.from_numpy(value.copy())
    torch_model.load_state_dict(state, strict=True)


def to_nchw(torch, x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def from_nchw(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def assert_close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("img_size", [32, 48])
def test_generator_matches_torch(img_size):
    torch, TorchGenerator, _, _ = torch_reference()
    model = random_model(lambda: Generator(img_size, 3, STYLE, **SMALL, rngs=nnx.Rngs(0)))
    ref = TorchGenerator(img_size, 3, STYLE, **SMALL)
    copy_to_torch(model, ref, torch)
    x = normal(2, 2, img_size, img_size, 3)
    s = normal(3, 2, STYLE)
    content, image = nnx.jit(lambda m, x, s: m(x, s))(model, x, s)
    with torch.no_grad():
        ref_content, ref_image = ref(to_nchw(torch, x), torch.from_numpy(np.array(s)))
    down = 2 ** (math.ceil(math.log2(img_size)) - 4)
    assert content.shape == (2, img_size // down, img_size // down, min(8 * down, 32))
    assert_close(content, from_nchw(ref_content))
    assert_close(image, from_nchw(ref_image))
    assert image.shape == x.shape and image.dtype == jnp.float32


@pytest.mark.parametrize("img_size", [32, 48])
def test_style_encoder_matches_torch(img_size):
    torch, _, TorchStyleEncoder, _ = torch_reference()
    model = random_model(lambda: StyleEncoder(img_size, 3, STYLE, **SMALL, rngs=nnx.Rngs(0)))
    ref = TorchStyleEncoder(img_size, 3, STYLE, **SMALL)
    copy_to_torch(model, ref, torch)
    x = normal(2, 3, img_size, img_size, 3)
    style = nnx.jit(lambda m, x: m(x))(model, x)
    with torch.no_grad():
        expected = ref(to_nchw(torch, x)).numpy()
    assert style.shape == (3, STYLE)
    assert_close(style, expected)


@pytest.mark.parametrize("img_size", [32, 48])
def test_discriminator_matches_torch(img_size):
    torch, _, _, TorchDiscriminator = torch_reference()
    model = random_model(
        lambda: Discriminator(img_size, 5, 4, **SMALL, num_heads=3, rngs=nnx.Rngs(0)))
    ref = TorchDiscriminator(img_size, 5, 4, **SMALL, num_heads=3)
    copy_to_torch(model, ref, torch)
    x = normal(2, 4, img_size, img_size, 5)
    y = jnp.array([0, 3, 1, 2])
    head = jnp.array([2, 0, 1, 2])
    out = nnx.jit(lambda m, x, y, h: m(x, y, h))(model, x, y, head)
    with torch.no_grad():
        expected = ref(to_nchw(torch, x), np.asarray(y), np.asarray(head)).numpy()
    assert out.shape == (4,)
    assert_close(out, expected)
    # An int head equals the per-sample path with that head everywhere.
    logits = model.logits(x, 1)
    assert logits.shape == (4, 4)
    assert_close(model.logits(x, jnp.ones(4, jnp.int32)), logits)
    assert_close(model(x, y, 1), np.take_along_axis(np.asarray(logits), np.asarray(y)[:, None],
                                                    axis=1)[:, 0])
    assert model.features(x).shape == (4, SMALL["max_conv_dim"])


@pytest.mark.parametrize("img_size", [96, 128])
def test_paper_scale_shapes(img_size):
    b = 2
    x = jax.ShapeDtypeStruct((b, img_size, img_size, 3), jnp.float32)
    s = jax.ShapeDtypeStruct((b, 64), jnp.float32)
    y = jax.ShapeDtypeStruct((b,), jnp.int32)

    def run(x, s, y):
        rngs = nnx.Rngs(0)
        style_encoder = StyleEncoder(img_size, 3, rngs=rngs)
        discriminator = Discriminator(img_size, 3, 5, rngs=rngs)
        content, image = Generator(img_size, 3, rngs=rngs)(x, s)
        return (content, image, style_encoder(x), style_encoder.features(x), discriminator(x, y),
                discriminator.features(x))

    content, image, style, style_features, logits, features = jax.eval_shape(run, x, s, y)
    assert content.shape == (b, img_size // 8, img_size // 8, 512)
    assert image.shape == (b, img_size, img_size, 3)
    assert style.shape == (b, 64) and style_features.shape == (b, 512)
    assert logits.shape == (b,) and features.shape == (b, 512)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    x = normal(2, 2, 32, 32, 3)
    s = normal(3, 2, STYLE)
    full = random_model(lambda: Generator(32, 3, STYLE, **SMALL, rngs=nnx.Rngs(0)))
    half = random_model(lambda: Generator(32, 3, STYLE, **SMALL, dtype=jnp.bfloat16,
                                          rngs=nnx.Rngs(0)))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(half, nnx.Param))} == {jnp.dtype("float32")}
    forward = nnx.jit(lambda m, x, s: m(x, s)[1])
    ref, out = forward(full, x, s), forward(half, x, s)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_he_init_statistics():
    block = ResBlock(256, 512, normalize=True, downsample=True, rngs=nnx.Rngs(0))
    kernel = np.asarray(block.conv2.kernel[...])  # 3 x 3 x 256 x 512
    std = math.sqrt(2 / (3 * 3 * 256))
    assert abs(kernel.std() / std - 1) < 0.01
    assert abs(kernel.mean()) < 0.01 * std
    # Untruncated normal, as torch kaiming_normal_: ~4.55% beyond 2 sigma (0 if truncated).
    assert abs(np.mean(np.abs(kernel) > 2 * std) - 0.0455) < 0.003
    assert not np.any(np.asarray(block.conv2.bias[...]))
    np.testing.assert_array_equal(np.asarray(block.norm1.scale[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(block.norm1.bias[...]), 0.0)
    encoder = ConditionEncoder(1024, 16, rngs=nnx.Rngs(0))
    weights = np.asarray(encoder.layers[0].kernel[...])
    assert abs(weights.std() / math.sqrt(2 / 1040) - 1) < 0.02


def test_condition_encoder_impa_and_grape():
    impa = ConditionEncoder(12, 4, style_dim=6, rngs=nnx.Rngs(0))
    e, z = jnp.ones((3, 12)), jnp.zeros((3, 4))
    assert impa(e, z).shape == (3, 6)
    with pytest.raises(ValueError, match="noise_dim=4"):
        impa(e)
    with pytest.raises(ValueError, match="expected 4"):
        impa(e, jnp.zeros((3, 5)))
    # Single Linear, no activation: linear in [e ; z].
    layer = impa.layers[0]
    ez = jnp.concatenate([e, z], axis=-1)
    np.testing.assert_allclose(impa(e, z), ez @ layer.kernel[...] + layer.bias[...], rtol=1e-6)

    grape = random_model(
        lambda: ConditionEncoder(10, 0, style_dim=6, hidden_dim=7, num_layers=3,
                                 rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="noise_dim=0"):
        grape(e[:, :10], jnp.zeros((3, 1)))
    m = normal(5, 3, 10)
    h = m
    for i, layer in enumerate(grape.layers):
        h = h @ layer.kernel[...] + layer.bias[...]
        h = jax.nn.relu(h) if i < 2 else h
    np.testing.assert_allclose(grape(m), h, rtol=1e-5, atol=1e-6)
    assert float(grape(m).min()) < 0  # No ReLU after the last layer.


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        Generator(100, 3, rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: StyleEncoder(32, 3, STYLE, **SMALL, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        model(jnp.zeros((1, 48, 48, 3)))
