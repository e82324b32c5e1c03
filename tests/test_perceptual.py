"""Perceptual losses: LPIPS-VGG16 parameter counts (notes/morphdiff_lumic_reference.md section 5),
the torch-weights converter against a direct torch re-computation, LPIPS against a NumPy
re-derivation, MorphDiff's per-channel rule, and the Cell Painting CNN fallback."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from morphjax import cli
from morphjax.features import convert
from morphjax.models import perceptual
from morphjax.models.efficientnet import EfficientNet
from morphjax.models.perceptual import (LPIPS, CellPaintingPerceptual, FrozenWeight,
                                        VGG16Features, load_lpips_vgg16, load_perceptual)
from conftest import materialise

SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
TORCH_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# One compiled call per module and shape: eager dispatch of these networks is slow on CPU.
call = nnx.jit(lambda model, a, b: model(a, b))


def test_parameter_counts_match_morphdiff_lpips():
    model = nnx.eval_shape(lambda: LPIPS())
    assert size(nnx.state(model.net, FrozenWeight)) == 14_714_688
    assert size(nnx.state(model.lins, FrozenWeight)) == 1_472
    assert size(nnx.state(model, FrozenWeight)) == 14_716_160
    assert size(nnx.state(model, nnx.Param)) == 0  # Nothing an optimizer would update.


# -- converter -----------------------------------------------------------------------------------

def torch_state_dicts(seed: int = 0) -> tuple[dict, dict]:
    """A torchvision-named VGG16 state dict (He-scaled random values) and an LPIPS lin dict."""
    rng = np.random.default_rng(seed)
    vgg, c_in = {}, 3
    for index, c_out in zip(TORCH_CONVS, VGG_WIDTHS):
        vgg[f"features.{index}.weight"] = rng.normal(
            0, np.sqrt(2 / (9 * c_in)), (c_out, c_in, 3, 3)).astype(np.float32)
        vgg[f"features.{index}.bias"] = rng.normal(0, 0.1, (c_out,)).astype(np.float32)
        c_in = c_out
    vgg["classifier.0.weight"] = rng.normal(size=(8, 4)).astype(np.float32)  # Ignored.
    vgg["classifier.0.bias"] = np.zeros(8, np.float32)
    lin = {f"lin{i}.model.1.weight": rng.uniform(0, 0.1, (1, c, 1, 1)).astype(np.float32)
           for i, c in enumerate((64, 128, 256, 512, 512))}
    return vgg, lin


def save_torch(state: dict, path) -> str:
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return str(path)


def torch_taps(vgg: dict, x_nhwc: np.ndarray) -> list[np.ndarray]:
    """relu1_2 .. relu5_3 by torch.nn.functional on the raw state dict, as NHWC arrays."""
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    h = torch.from_numpy(((x_nhwc - SHIFT) / SCALE).transpose(0, 3, 1, 2).copy())
    taps, k = [], 0
    for stage, n in enumerate((2, 2, 3, 3, 3)):
        if stage:
            h = f.max_pool2d(h, 2, 2)
        for _ in range(n):
            i = TORCH_CONVS[k]
            h = f.relu(f.conv2d(h, torch.from_numpy(vgg[f"features.{i}.weight"]),
                                torch.from_numpy(vgg[f"features.{i}.bias"]), padding=1))
            k += 1
        taps.append(h.numpy().transpose(0, 2, 3, 1))
    return taps


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(vgg dict, lin dict, vgg .pth, lin .pth, converted .npz), converted through the CLI."""
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("lpips")
    vgg, lin = torch_state_dicts()
    vgg_pth, lin_pth = save_torch(vgg, d / "vgg16.pth"), save_torch(lin, d / "vgg.pth")
    assert cli.main(["convert-weights", "lpips_vgg16", vgg_pth, str(d / "lpips"),
                     "--lin", lin_pth]) == 0
    return vgg, lin, vgg_pth, lin_pth, str(d / "lpips.npz")


@pytest.fixture(scope="module")
def lpips(converted):
    return load_lpips_vgg16(converted[4])


def test_converted_vgg16_taps_match_torch(converted, lpips):
    vgg, lin = converted[:2]
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    taps = lpips.net(jnp.asarray(x))
    want = torch_taps(vgg, x)
    assert [t.shape for t in taps] == [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256),
                                       (2, 4, 4, 512), (2, 2, 2, 512)]
    for got, ref in zip(taps, want):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4 * ref.std())
    for i, w in enumerate(lpips.lins):
        np.testing.assert_array_equal(np.asarray(w[...]), lin[f"lin{i}.model.1.weight"].ravel())


def test_converter_rejects_bad_keys_and_shapes(converted, tmp_path):
    vgg, lin = converted[:2]
    with pytest.raises(ValueError, match=r"'features\.1\.weight'"):
        convert.convert_lpips_state_dicts({**vgg, "features.1.weight": vgg["features.0.bias"]},
                                          lin)
    bad = dict(vgg, **{"features.5.weight": vgg["features.5.weight"][:, :-1]})
    with pytest.raises(ValueError, match=r"'features\.5\.weight' has shape \(128, 63, 3, 3\)"):
        convert.convert_lpips_state_dicts(bad, lin)
    with pytest.raises(ValueError, match=r"lacks 1 keys.*lin3\.model\.1\.weight"):
        convert.convert_lpips_state_dicts(vgg, {k: v for k, v in lin.items() if "lin3" not in k})
    with pytest.raises(ValueError, match=r"'lin2\.model\.1\.weight' has shape"):
        convert.convert_lpips_state_dicts(vgg, {**lin, "lin2.model.1.weight": np.ones((1, 2))})
    with pytest.raises(ValueError, match="negative"):
        convert.convert_lpips_vgg16(converted[2], save_torch(
            {**lin, "lin0.model.1.weight": -lin["lin0.model.1.weight"]}, tmp_path / "neg.pth"),
            tmp_path / "out.npz")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        convert.convert_lpips_vgg16(tmp_path / "nowhere.pth", converted[3], tmp_path / "o.npz")
    assert cli.main(["convert-weights", "lpips_vgg16", converted[2], str(tmp_path / "o")]) == 2


# -- LPIPS distance -------------------------------------------------------------------------------

def numpy_distance(taps0, taps1, weights) -> np.ndarray:
    total = 0.0
    for f0, f1, w in zip(taps0, taps1, weights):
        f0, f1 = np.asarray(f0, np.float64), np.asarray(f1, np.float64)
        n0 = f0 / (np.sqrt((f0 ** 2).sum(-1, keepdims=True)) + 1e-10)
        n1 = f1 / (np.sqrt((f1 ** 2).sum(-1, keepdims=True)) + 1e-10)
        total = total + ((n0 - n1) ** 2 * np.asarray(w, np.float64)).sum(-1).mean(axis=(1, 2))
    return total


def test_lpips_matches_numpy_rederivation(lpips, converted):
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    # d(x, y), d(x, x), d(y, x) in one call.
    out = np.asarray(call(lpips, jnp.asarray(np.concatenate([x, x, y])),
                          jnp.asarray(np.concatenate([y, x, x]))))
    lin = [converted[1][f"lin{i}.model.1.weight"].ravel() for i in range(5)]
    taps = lpips.net(jnp.asarray(np.concatenate([x, y])))
    want = numpy_distance([t[:1] for t in taps], [t[1:] for t in taps], lin)
    assert out.shape == (3,) and want[0] > 0
    np.testing.assert_allclose(out[0], want[0], rtol=1e-4)
    np.testing.assert_allclose(out[1], 0.0, atol=1e-12)
    np.testing.assert_allclose(out[2], out[0], rtol=1e-5)


def test_per_channel_lpips_is_mean_of_single_channel_calls_and_has_gradients(lpips):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    y = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)

    @nnx.jit
    def value_and_grad(fn, a, b):
        return nnx.value_and_grad(lambda b: fn(a, b).sum())(b), fn(a, b)

    fn = perceptual.PerChannelLPIPS(lpips, 3)
    (_, g), got = value_and_grad(fn, jnp.asarray(x), jnp.asarray(y))
    # Channel c alone, repeated to RGB: one single-channel LPIPS call per batch row.
    singles = np.asarray(call(lpips, jnp.asarray(np.repeat(x[0].transpose(2, 0, 1)[..., None],
                                                           3, -1)),
                              jnp.asarray(np.repeat(y[0].transpose(2, 0, 1)[..., None], 3, -1))))
    assert got.shape == (1,) and singles.shape == (3,)
    np.testing.assert_allclose(np.asarray(got), singles.mean(keepdims=True), rtol=1e-5)
    assert not np.isclose(singles[0], singles[1])  # The channels really differ.
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0


def test_normalize_channels_has_finite_gradient_at_dead_pixels():
    v = np.zeros((1, 2, 2, 4), np.float32)
    v[0, 0, 0] = [3.0, 4.0, 0.0, 0.0]
    out = perceptual.normalize_channels(jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(out[0, 0, 0]), [0.6, 0.8, 0, 0], rtol=1e-6)
    gz = jax.grad(lambda v: perceptual.normalize_channels(v).sum())(jnp.asarray(v))
    assert np.all(np.isfinite(np.asarray(gz)))


# -- Cell Painting CNN fallback ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnn_perceptual():
    """A tiny EfficientNet filled with random values (eager init takes ~30 s on 2 cores), with
    non-trivial BatchNorm statistics so that eval-mode BatchNorm matters."""
    abstract = nnx.eval_shape(lambda: EfficientNet("b0", in_channels=5, width=0.25, depth=0.34,
                                                   rngs=nnx.Rngs(0)))
    backbone = materialise(abstract, seed=0)
    reference = nnx.clone(backbone)
    return CellPaintingPerceptual(backbone), reference


def test_cell_painting_perceptual(cnn_perceptual):
    model, reference = cnn_perceptual
    assert model.taps == ("block1a_output", "block2a_output", "block3a_output",
                          "block5b_output", "block7a_output")
    assert size(nnx.state(model, nnx.Param)) == 0 and size(nnx.state(model, FrozenWeight)) > 0
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (2, 32, 32, 5)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
    @nnx.jit
    def value_and_grad(m, a, b):  # One compile for the distances and the gradient.
        return m(a, b), nnx.grad(lambda b: m(a, b)[:2].sum())(b)

    out, g = value_and_grad(model, jnp.asarray(np.concatenate([x, x])),
                            jnp.asarray(np.concatenate([y, x])))
    out = np.asarray(out)
    got = out[:2]
    assert out.shape == (4,) and np.all(got > 0)
    np.testing.assert_allclose(out[2:], 0.0, atol=1e-12)  # Batch position changes rounding.

    def minmax(v):  # train/cpcnn.py input normalisation, per image and channel.
        lo, hi = v.min(axis=(1, 2), keepdims=True), v.max(axis=(1, 2), keepdims=True)
        return (v - lo) / (hi - lo + 1e-7)

    taps = nnx.jit(lambda m, v: m.forward(v, outputs=model.taps))(
        reference, jnp.asarray(minmax(np.concatenate([x, y]))))
    f0 = [np.asarray(taps[name][:2]) for name in model.taps]
    f1 = [np.asarray(taps[name][2:]) for name in model.taps]
    want = numpy_distance(f0, f1, [np.full(t.shape[-1], 1 / t.shape[-1]) for t in f0])
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0
    with pytest.raises(ValueError, match="5-channel"):
        model(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)))


# -- load_perceptual -----------------------------------------------------------------------------

def test_load_perceptual_specs_and_labels(converted, tmp_path):
    fn, label = load_perceptual("none", 5)
    assert fn is None and "no perceptual" in label
    fn, label = load_perceptual(f"vgg16:{converted[4]}", 5)
    assert label == "LPIPS VGG16 (ImageNet) per channel"
    assert isinstance(fn, perceptual.PerChannelLPIPS) and fn.num_channels == 5
    x = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match="built for 5 channels"):
        fn(x, x)
    with pytest.raises(FileNotFoundError, match="missing.npz.*convert-weights lpips_vgg16"):
        load_perceptual(f"vgg16:{tmp_path}/missing.npz", 5)
    with pytest.raises(ValueError, match="not a converted LPIPS"):
        np.savez(tmp_path / "other.npz", a=np.zeros(1))
        load_perceptual(f"vgg16:{tmp_path}/other.npz", 5)
    with pytest.raises(FileNotFoundError, match="norun"):
        load_perceptual(f"cpcnn:{tmp_path}/norun", 5)
    with pytest.raises(ValueError, match="'vgg16:/path/lpips_vgg16.npz'"):
        load_perceptual("lpips", 5)


def test_vgg16_features_rejects_wrong_channels():
    with pytest.raises(ValueError, match="3 channels"):
        VGG16Features()(jnp.zeros((1, 8, 8, 5)))
