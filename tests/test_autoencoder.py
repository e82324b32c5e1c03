"""MorphDiff KL autoencoder, PatchGAN and losses: exact reference parameter counts, a PyTorch
re-derivation of the CompVis forward (NCHW), posterior maths and loss terms against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from morphjax.models.autoencoder import (AutoencoderKL, DiagonalGaussian, PatchDiscriminator,
                                         adaptive_weight, disc_factor, generator_adv_loss,
                                         hinge_d_loss, kl_loss, reconstruction_nll)
from morphjax.models.classifier import CONV_AXES

SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)


def count(module) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def flat_params(module) -> dict[str, np.ndarray]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        out[".".join(map(str, path))] = np.asarray(var.get_value())
    return out


def fast_rngs(seed: int) -> nnx.Rngs:
    """RBG keys: on CPU, eager initialisers compile several times faster than with threefry."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def small_ae():
    return AutoencoderKL(**SMALL, rngs=fast_rngs(0))


@pytest.fixture(scope="module")
def small_disc():
    return PatchDiscriminator(in_channels=5, ndf=8, n_layers=3, rngs=fast_rngs(4))


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (2, 32, 32, 5), minval=-1.0, maxval=1.0)


# --- Parameter counts: MorphDiff repo modules instantiated in torch (notes section 5). ---

def test_morphdiff_autoencoder_parameter_counts():
    ae = nnx.eval_shape(lambda: AutoencoderKL(rngs=nnx.Rngs(0)))
    assert count(ae.encoder) == 22_362_760
    assert count(ae.decoder) == 32_967_685
    assert count(ae.quant_conv) + count(ae.post_quant_conv) == 92
    assert count(ae) == 55_330_537
    assert ae.latent_shape == (32, 32, 4)
    out = jax.eval_shape(lambda m, x: m(x, jax.random.key(0)), ae,
                         jax.ShapeDtypeStruct((2, 128, 128, 5), jnp.float32))
    assert out[0].shape == (2, 128, 128, 5)
    assert out[1].mean.shape == out[1].logvar.shape == (2, 32, 32, 4)


def test_patch_discriminator_parameter_count_and_output_size():
    disc = nnx.eval_shape(lambda: PatchDiscriminator(rngs=nnx.Rngs(0)))
    assert count(disc) == 2_767_681  # BN scale/bias counted, running stats not.
    out = jax.eval_shape(lambda m, x: m(x), disc,
                         jax.ShapeDtypeStruct((3, 128, 128, 5), jnp.float32))
    # k4 p1: stride 2 maps n -> floor((n + 2 - 4) / 2) + 1, stride 1 maps n -> n - 1.
    size = 128
    for _ in range(3):
        size = (size + 2 - 4) // 2 + 1
    size = size - 1 - 1
    assert size == 14 and disc.output_size(128) == 14
    assert out.shape == (3, 14, 14, 1)


def test_every_parameter_carries_logical_axis_names(small_ae):
    disc = nnx.eval_shape(lambda: PatchDiscriminator(ndf=8, rngs=nnx.Rngs(0)))
    for module in (small_ae, disc):
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            expected = CONV_AXES if var.ndim == 4 else ("conv_out",)
            assert names == expected, path


def test_init_follows_pytorch_and_taming(small_ae, small_disc):
    kernel = np.asarray(small_ae.encoder.mid.block_1.conv1.kernel.get_value())  # fan_in 9*64.
    bound = 1 / math.sqrt(9 * 64)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
    np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.05)
    bias = np.asarray(small_ae.encoder.mid.block_1.conv1.bias.get_value())
    assert np.abs(bias).max() <= bound and bias.std() > 0
    np.testing.assert_allclose(np.asarray(small_disc.convs[2].kernel.get_value()).std(), 0.02,
                               rtol=0.02)
    scale = np.concatenate([np.asarray(n.scale.get_value()) for n in small_disc.norms])
    assert scale.size == 16 + 32 + 64
    np.testing.assert_allclose(scale.mean(), 1.0, atol=0.006)
    np.testing.assert_allclose(scale.std(), 0.02, rtol=0.2)
    assert not any(np.asarray(n.bias.get_value()).any() for n in small_disc.norms)


# --- PyTorch re-derivation of CompVis Encoder/Decoder and taming NLayerDiscriminator. ---

def torch_autoencoder(params, torch, ch_mult, num_res_blocks):
    """CompVis AutoencoderKL forward in NCHW from an NNX parameter dict (HWIO kernels)."""
    F = torch.nn.functional
    P = {k: torch.from_numpy(v.copy()) for k, v in params.items()}

    def conv(h, name, stride=1, padding=None):
        w = P[name + ".kernel"].permute(3, 2, 0, 1)
        pad = w.shape[-1] // 2 if padding is None else padding
        return F.conv2d(h, w, P[name + ".bias"], stride=stride, padding=pad)

    def norm(h, name):
        return F.group_norm(h, 32, P[name + ".scale"], P[name + ".bias"], eps=1e-6)

    def swish(h):
        return h * torch.sigmoid(h)

    def resnet(x, name):
        h = conv(swish(norm(x, name + ".norm1")), name + ".conv1")
        h = conv(swish(norm(h, name + ".norm2")), name + ".conv2")
        if name + ".nin_shortcut.kernel" in P:
            x = conv(x, name + ".nin_shortcut")
        return x + h

    def attn(x, name):
        h = norm(x, name + ".norm")
        q, k, v = (conv(h, f"{name}.{n}") for n in "qkv")
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w_ = torch.softmax(torch.bmm(q, k.reshape(b, c, hh * ww)) * c ** -0.5, dim=2)
        h = torch.bmm(v.reshape(b, c, hh * ww), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + conv(h, name + ".proj_out")

    def mid(h, name):
        return resnet(attn(resnet(h, name + ".block_1"), name + ".attn_1"), name + ".block_2")

    def encode(x):
        h = conv(x, "encoder.conv_in")
        for i in range(len(ch_mult)):
            for j in range(num_res_blocks):
                h = resnet(h, f"encoder.down.{i}.block.{j}")
            if i != len(ch_mult) - 1:
                h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", 2, 0)
        h = mid(h, "encoder.mid")
        h = conv(swish(norm(h, "encoder.norm_out")), "encoder.conv_out")
        return conv(h, "quant_conv")

    def decode(z):
        h = mid(conv(conv(z, "post_quant_conv"), "decoder.conv_in"), "decoder.mid")
        for i in reversed(range(len(ch_mult))):
            for j in range(num_res_blocks + 1):
                h = resnet(h, f"decoder.up.{i}.block.{j}")
            if i != 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = conv(h, f"decoder.up.{i}.upsample.conv")
        return conv(swish(norm(h, "decoder.norm_out")), "decoder.conv_out")

    return encode, decode


def nchw(torch, x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_autoencoder_matches_pytorch_compvis_rederivation(small_ae, images):
    torch = pytest.importorskip("torch")
    encode, decode = torch_autoencoder(flat_params(small_ae), torch, SMALL["ch_mult"],
                                       SMALL["num_res_blocks"])
    posterior = small_ae.encode(images)
    moments = nhwc(encode(nchw(torch, images)))
    np.testing.assert_allclose(posterior.mean, moments[..., :4], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(posterior.logvar, moments[..., 4:], atol=1e-4, rtol=1e-4)
    z = jax.random.normal(jax.random.key(2), (2, 16, 16, 4))
    np.testing.assert_allclose(small_ae.decode(z), nhwc(decode(nchw(torch, z))),
                               atol=1e-4, rtol=1e-4)


def test_discriminator_matches_pytorch_taming_rederivation(small_disc):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    disc = small_disc
    P = {k: torch.from_numpy(v.copy()) for k, v in flat_params(disc).items()}
    x = jax.random.normal(jax.random.key(5), (4, 32, 32, 5))

    def w(name):
        return P[name + ".kernel"].permute(3, 2, 0, 1)

    h = F.leaky_relu(F.conv2d(nchw(torch, x), w("conv_in"), P["conv_in.bias"], 2, 1), 0.2)
    for n, stride in enumerate((2, 2, 1)):
        h = F.conv2d(h, w(f"convs.{n}"), None, stride, 1)
        h = F.batch_norm(h, None, None, P[f"norms.{n}.scale"], P[f"norms.{n}.bias"],
                         training=True, eps=1e-5)
        h = F.leaky_relu(h, 0.2)
    ref = nhwc(F.conv2d(h, w("conv_out"), P["conv_out.bias"], 1, 1))
    out = disc(x, train=True)
    assert out.shape == (4, disc.output_size(32), disc.output_size(32), 1) == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


# --- Posterior. ---

def test_forward_shapes_mode_sample_and_kl(small_ae, images):
    rng = jax.random.key(7)
    rec, posterior = small_ae(images, rng)
    assert rec.shape == images.shape and rec.dtype == jnp.float32
    assert posterior.mean.shape == (2, 16, 16, 4)
    np.testing.assert_array_equal(posterior.mode(), posterior.mean)
    # The sample is mean + exp(logvar / 2) * eps with eps drawn from the given key.
    eps = np.asarray(jax.random.normal(rng, posterior.mean.shape))
    mean, logvar = np.asarray(posterior.mean, np.float64), np.asarray(posterior.logvar, np.float64)
    z = mean + np.exp(0.5 * logvar) * eps
    np.testing.assert_allclose(posterior.sample(rng), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rec, small_ae.decode(jnp.asarray(z, jnp.float32)),
                               rtol=1e-4, atol=1e-5)
    rec_mode, _ = small_ae(images, sample_posterior=False)
    np.testing.assert_allclose(rec_mode, small_ae.decode(posterior.mean), rtol=1e-5, atol=1e-6)
    # KL(N(mu, var) || N(0, 1)) per element, summed over latent H, W, C.
    kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(posterior.kl(), kl, rtol=1e-5)
    np.testing.assert_allclose(kl_loss(posterior), kl.sum() / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="rng"):
        small_ae(images)


def test_posterior_logvar_is_clamped(small_ae, images):
    ae = nnx.clone(small_ae)
    raw = np.asarray(ae.quant_conv(ae.encoder(images)))
    np.testing.assert_allclose(ae.encode(images).logvar, raw[..., 4:], rtol=1e-6)
    old_bias = np.asarray(ae.quant_conv.bias.get_value())
    ae.quant_conv.bias.set_value(jnp.array([0, 0, 0, 0, 1e4, -1e4, 1e4, old_bias[7]]))
    logvar = np.asarray(ae.encode(images).logvar)
    assert (logvar[..., 0] == 20).all() and (logvar[..., 2] == 20).all()
    assert (logvar[..., 1] == -30).all()
    np.testing.assert_allclose(logvar[..., 3], raw[..., 7], rtol=1e-6)
    dist = DiagonalGaussian.from_moments(jnp.array([[[[0.5, 100.0]]]]))
    assert float(dist.logvar[0, 0, 0, 0]) == 20.0 and float(dist.mean[0, 0, 0, 0]) == 0.5


def test_bad_shapes_are_rejected(small_ae):
    with pytest.raises(ValueError, match="divisible by 2"):
        small_ae.encode(jnp.zeros((1, 31, 32, 5)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 5\)"):
        small_ae.encode(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="latents"):
        small_ae.decode(jnp.zeros((1, 16, 16, 8)))
    with pytest.raises(ValueError, match="divisible by 32"):
        AutoencoderKL(ch=48, rngs=nnx.Rngs(0))


# --- Loss terms (contperceptual.py). ---

def test_reconstruction_nll_matches_numpy():
    rng = np.random.default_rng(0)
    x, xrec = rng.normal(size=(2, 3, 4, 4, 5)).astype(np.float32)
    perceptual = np.array([0.1, 0.5, 2.0], np.float32)
    logvar = 0.3
    rec = np.abs(x - xrec) + perceptual[:, None, None, None]
    expected = (rec / np.exp(logvar) + logvar).sum() / 3
    np.testing.assert_allclose(reconstruction_nll(x, xrec, perceptual, logvar), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(reconstruction_nll(x, xrec), np.abs(x - xrec).sum() / 3,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="perceptual"):
        reconstruction_nll(x, xrec, perceptual[:2])


def test_hinge_and_generator_losses_match_numpy():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(2, 4, 14, 14, 1)).astype(np.float32) * 2
    expected = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
    np.testing.assert_allclose(hinge_d_loss(real, fake), expected, rtol=1e-6)
    np.testing.assert_allclose(generator_adv_loss(fake), -fake.mean(), rtol=1e-6)


def test_adaptive_weight_matches_direct_gradients():
    # Tiny decoder "last layer" W: y = W h. nll = sum|x - y|, g = -mean(v . y).
    rng = np.random.default_rng(2)
    W, h, x, v = (rng.normal(size=s).astype(np.float32)
                  for s in ((3, 4), (4, 6), (3, 6), (3, 6)))
    grad_nll = jax.grad(lambda w: jnp.abs(x - w @ h).sum())(jnp.asarray(W))
    grad_g = jax.grad(lambda w: -(v * (w @ h)).mean())(jnp.asarray(W))
    # Closed forms: d/dW sum|x - Wh| = -sign(x - Wh) h^T; d/dW -mean(v * Wh) = -v h^T / v.size.
    np_nll = -np.sign(x - W @ h) @ h.T
    np_g = -(v @ h.T) / v.size
    expected = 0.5 * np.clip(np.linalg.norm(np_nll) / (np.linalg.norm(np_g) + 1e-4), 0, 1e4)
    got = adaptive_weight(jnp.linalg.norm(grad_nll), jnp.linalg.norm(grad_g))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(adaptive_weight(3.0, 0.0, disc_weight=1.0), 1e4)
    np.testing.assert_allclose(adaptive_weight(2.0, 1.0, disc_weight=0.5), 0.5 * 2 / 1.0001)
    assert float(jax.grad(lambda a: adaptive_weight(a, 1.0))(2.0)) == 0.0  # detached.


def test_last_layer_is_decoder_conv_out(small_ae):
    assert small_ae.last_layer() is small_ae.decoder.conv_out.kernel
    assert small_ae.last_layer().shape == (3, 3, 32, 5)


def test_disc_factor_switches_on_at_disc_start():
    assert float(disc_factor(0)) == 0.0
    assert float(disc_factor(50_000)) == 0.0
    assert float(disc_factor(50_001)) == 1.0
    traced = jax.jit(lambda s: disc_factor(s, disc_start=10, factor=0.7))
    assert float(traced(9)) == 0.0
    np.testing.assert_allclose(traced(10), 0.7)
