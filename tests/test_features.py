"""Feature extractors: FID Inception conversion and forward vs a torch reference, RGB composites."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from morphjax import features
from morphjax.features import convert, inception, registry

try:  # torch is the reference here (pytorch-fid semantics) and reads the .pth; optional.
    import torch
    F = torch.nn.functional
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


# torchvision Inception3 (num_classes=1008, aux_logits=False) with pytorch-fid's patched blocks:
# (name, in, out, kernel (h, w), stride, padding (h, w)) of every BasicConv2d.
def _block_a(p, cin, pool):
    return [(f"{p}.branch1x1", cin, 64, (1, 1), 1, (0, 0)),
            (f"{p}.branch5x5_1", cin, 48, (1, 1), 1, (0, 0)),
            (f"{p}.branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
            (f"{p}.branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
            (f"{p}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
            (f"{p}.branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
            (f"{p}.branch_pool", cin, pool, (1, 1), 1, (0, 0))]


def _block_b(p, cin):
    return [(f"{p}.branch3x3", cin, 384, (3, 3), 2, (0, 0)),
            (f"{p}.branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
            (f"{p}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
            (f"{p}.branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0))]


def _block_c(p, cin, c7):
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return [(f"{p}.branch1x1", cin, 192, (1, 1), 1, (0, 0)),
            (f"{p}.branch7x7_1", cin, c7, (1, 1), 1, (0, 0)),
            (f"{p}.branch7x7_2", c7, c7, *row), (f"{p}.branch7x7_3", c7, 192, *col),
            (f"{p}.branch7x7dbl_1", cin, c7, (1, 1), 1, (0, 0)),
            (f"{p}.branch7x7dbl_2", c7, c7, *col), (f"{p}.branch7x7dbl_3", c7, c7, *row),
            (f"{p}.branch7x7dbl_4", c7, c7, *col), (f"{p}.branch7x7dbl_5", c7, 192, *row),
            (f"{p}.branch_pool", cin, 192, (1, 1), 1, (0, 0))]


def _block_d(p, cin):
    return [(f"{p}.branch3x3_1", cin, 192, (1, 1), 1, (0, 0)),
            (f"{p}.branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
            (f"{p}.branch7x7x3_1", cin, 192, (1, 1), 1, (0, 0)),
            (f"{p}.branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
            (f"{p}.branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
            (f"{p}.branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0))]


def _block_e(p, cin):
    return [(f"{p}.branch1x1", cin, 320, (1, 1), 1, (0, 0)),
            (f"{p}.branch3x3_1", cin, 384, (1, 1), 1, (0, 0)),
            (f"{p}.branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
            (f"{p}.branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
            (f"{p}.branch3x3dbl_1", cin, 448, (1, 1), 1, (0, 0)),
            (f"{p}.branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
            (f"{p}.branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
            (f"{p}.branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
            (f"{p}.branch_pool", cin, 192, (1, 1), 1, (0, 0))]


CONVS = {c[0]: c for c in (
    [("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)), ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
     ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)), ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
     ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0))]
    + _block_a("Mixed_5b", 192, 32) + _block_a("Mixed_5c", 256, 64)
    + _block_a("Mixed_5d", 288, 64) + _block_b("Mixed_6a", 288)
    + _block_c("Mixed_6b", 768, 128) + _block_c("Mixed_6c", 768, 160)
    + _block_c("Mixed_6d", 768, 160) + _block_c("Mixed_6e", 768, 192)
    + _block_d("Mixed_7a", 768) + _block_e("Mixed_7b", 1280) + _block_e("Mixed_7c", 2048))}

# torchvision inception_v3(num_classes=1008, aux_logits=False): trainable parameters.
FID_INCEPTION_PARAMS = 23_850_960


def _synthetic_state_dict(seed):
    """Random weights under pytorch-fid's key names and shapes; activations stay O(1)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, cin, cout, (kh, kw), _, _ in CONVS.values():
        std = np.sqrt(2.0 / (cin * kh * kw))
        sd[f"{name}.conv.weight"] = rng.normal(0, std, (cout, cin, kh, kw)).astype(np.float32)
        sd[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        sd[f"{name}.bn.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
        sd[f"{name}.bn.running_mean"] = rng.normal(0, 0.1, cout).astype(np.float32)
        sd[f"{name}.bn.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        sd[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
    sd["fc.weight"] = rng.normal(0, 2048 ** -0.5, (1008, 2048)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.1, 1008).astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(state dict, .pth path, converted .npz path, loaded NNX model)."""
    sd = _synthetic_state_dict(0)
    directory = tmp_path_factory.mktemp("inception")
    pth = directory / convert.WEIGHTS_FILENAME
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
    npz = convert.convert_inception(pth, directory / "converted.npz")
    return sd, pth, npz, features.load_converted_inception(npz)


# ----------------------------------------------------------------------------------------------
# Torch reference forward (NCHW, torch's own conv/pool/resize ops), pytorch-fid semantics.


def _t_conv(sd, x, name):
    _, _, _, _, stride, padding = CONVS[name]
    x = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
    x = F.batch_norm(x, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"],
                     sd[f"{name}.bn.weight"], sd[f"{name}.bn.bias"], training=False, eps=1e-3)
    return F.relu(x)


def _t_seq(sd, x, *names):
    for name in names:
        x = _t_conv(sd, x, name)
    return x


def _t_avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _torch_inception(sd, x):
    """pool3 and logits of pytorch-fid's FID Inception for NCHW input in [-1, 1]."""
    c = lambda y, *names: _t_seq(sd, y, *names)  # noqa: E731
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = F.max_pool2d(c(x, "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"), 3, 2)
    x = F.max_pool2d(c(x, "Conv2d_3b_1x1", "Conv2d_4a_3x3"), 3, 2)
    for p in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = torch.cat([c(x, f"{p}.branch1x1"), c(x, f"{p}.branch5x5_1", f"{p}.branch5x5_2"),
                       c(x, *(f"{p}.branch3x3dbl_{i}" for i in (1, 2, 3))),
                       c(_t_avg(x), f"{p}.branch_pool")], 1)
    p = "Mixed_6a"
    x = torch.cat([c(x, f"{p}.branch3x3"), c(x, *(f"{p}.branch3x3dbl_{i}" for i in (1, 2, 3))),
                   F.max_pool2d(x, 3, 2)], 1)
    for p in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = torch.cat([c(x, f"{p}.branch1x1"), c(x, *(f"{p}.branch7x7_{i}" for i in (1, 2, 3))),
                       c(x, *(f"{p}.branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5))),
                       c(_t_avg(x), f"{p}.branch_pool")], 1)
    p = "Mixed_7a"
    x = torch.cat([c(x, f"{p}.branch3x3_1", f"{p}.branch3x3_2"),
                   c(x, *(f"{p}.branch7x7x3_{i}" for i in (1, 2, 3, 4))),
                   F.max_pool2d(x, 3, 2)], 1)
    for p, pool in (("Mixed_7b", _t_avg), ("Mixed_7c", lambda y: F.max_pool2d(y, 3, 1, 1))):
        b3 = c(x, f"{p}.branch3x3_1")
        bd = c(x, f"{p}.branch3x3dbl_1", f"{p}.branch3x3dbl_2")
        x = torch.cat([c(x, f"{p}.branch1x1"),
                       c(b3, f"{p}.branch3x3_2a"), c(b3, f"{p}.branch3x3_2b"),
                       c(bd, f"{p}.branch3x3dbl_3a"), c(bd, f"{p}.branch3x3dbl_3b"),
                       c(pool(x), f"{p}.branch_pool")], 1)
    pool3 = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
    return pool3, F.linear(pool3, sd["fc.weight"], sd["fc.bias"])


# ----------------------------------------------------------------------------------------------


def test_state_dict_shapes_and_parameter_count():
    sd = _synthetic_state_dict(1)
    trainable = sum(v.size for k, v in sd.items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert trainable == FID_INCEPTION_PARAMS
    assert len(CONVS) == 94
    model = inception.create_inception(abstract=True)
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == FID_INCEPTION_PARAMS
    stats = nnx.state(model, nnx.BatchStat)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(stats)) == 2 * sum(
        c[2] for c in CONVS.values())
    converted = convert.convert_state_dict(sd)  # checks every shape against the module
    assert len(converted) == 94 * 5 + 2


@needs_torch
def test_converter_round_trips_exactly(weights):
    sd, _, _, model = weights
    state = nnx.state(model)
    for name in ("Conv2d_1a_3x3", "Mixed_6b.branch7x7_2", "Mixed_7c.branch3x3dbl_3b"):
        module = state
        for part in name.split("."):
            module = module[part]
        np.testing.assert_array_equal(np.asarray(module["conv"]["kernel"][...]),
                                      sd[f"{name}.conv.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(np.asarray(module["bn"]["var"][...]),
                                      sd[f"{name}.bn.running_var"])
        np.testing.assert_array_equal(np.asarray(module["bn"]["scale"][...]),
                                      sd[f"{name}.bn.weight"])
    np.testing.assert_array_equal(np.asarray(state["fc"]["kernel"][...]), sd["fc.weight"].T)
    np.testing.assert_array_equal(np.asarray(state["fc"]["bias"][...]), sd["fc.bias"])
    # The .pth loads directly too (torch present), to the same values.
    direct = nnx.state(features.load_inception(weights[1]))
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_torch
def test_first_conv_matches_lax_nchw_reference(weights):
    sd, _, _, model = weights
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 37, 41)).astype(np.float32)
    name = "Conv2d_1a_3x3"
    ref = jax.lax.conv_general_dilated(x, sd[f"{name}.conv.weight"], (2, 2), "VALID",
                                       dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                       precision=jax.lax.Precision.HIGHEST)
    ref = np.asarray(ref)
    scale = sd[f"{name}.bn.weight"] / np.sqrt(sd[f"{name}.bn.running_var"] + 1e-3)
    ref = (ref - sd[f"{name}.bn.running_mean"][:, None, None]) * scale[:, None, None]
    ref = np.maximum(ref + sd[f"{name}.bn.bias"][:, None, None], 0).transpose(0, 2, 3, 1)
    out = np.asarray(model.Conv2d_1a_3x3(jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@needs_torch
@pytest.mark.parametrize("size", [96, 512])
def test_resize_matches_torch_bilinear(size):
    x = np.random.default_rng(size).uniform(-1, 1, (1, size, size + 3, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299),
                        mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(inception.resize_bilinear(jnp.asarray(x))), ref,
                               atol=2e-6)


@pytest.fixture(scope="module")
def forward(weights):
    """The module's forward, jitted once per input shape for the whole file."""
    graphdef, state = nnx.split(weights[3])
    fn = jax.jit(lambda s, im: nnx.merge(graphdef, s)(im))
    return lambda images: fn(state, jnp.asarray(images))


@needs_torch
def test_forward_matches_torch_reference(weights, forward):
    """96x96 input: resize, all blocks (incl. the FID pooling patches), pool3 and logits."""
    sd, _, _, model = weights
    x = np.random.default_rng(3).uniform(-1, 1, (1, 96, 96, 3)).astype(np.float32)
    with torch.no_grad():
        ref_pool, ref_logits = _torch_inception({k: torch.from_numpy(v) for k, v in sd.items()},
                                                torch.from_numpy(x.transpose(0, 3, 1, 2)))
    pool, logits = forward(x)
    np.testing.assert_allclose(np.asarray(pool), ref_pool.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), ref_logits.numpy(), rtol=1e-4, atol=1e-4)
    unbiased = features.get_extractor("inception", model=model, output="logits_unbiased")(x)
    np.testing.assert_allclose(np.asarray(unbiased), ref_logits.numpy() - sd["fc.bias"],
                               rtol=1e-4, atol=1e-4)


@needs_torch
def test_forward_shapes_on_299_images(forward):
    images = np.random.default_rng(4).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
    pool, logits = forward(images)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert np.all(np.isfinite(np.asarray(logits))) and float(np.std(np.asarray(pool))) > 0


@needs_torch
@pytest.mark.parametrize("rgb", ["weights", "first3"])
def test_extractor_composites_five_channels(weights, forward, rgb):
    """5-channel inputs in [-1, 1] go through to_rgb, then pool3; batched extraction."""
    images = np.random.default_rng(5).uniform(-1, 1, (2, 96, 96, 5)).astype(np.float32)
    extractor = features.get_extractor("inception", model=weights[3], rgb=rgb)
    assert extractor.dim == 2048 and rgb in extractor.label
    if rgb == "weights":
        composite = np.asarray(features.to_rgb((images + 1) / 2, normalize=True)) * 2 - 1
    else:
        composite = images[..., :3]
    expected = np.concatenate([np.asarray(forward(composite[i:i + 1])[0]) for i in range(2)])
    np.testing.assert_allclose(extractor.extract(images, batch_size=1), expected,
                               rtol=1e-5, atol=1e-5)


def test_missing_weights_error_names_location(tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHJAX_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        features.get_extractor("inception")
    message = str(err.value)
    assert os.path.join(str(tmp_path), "pt_inception-2015-12-05-6726825d.pth") in message
    assert "$MORPHJAX_WEIGHTS/pt_inception-2015-12-05-6726825d.pth" in message
    assert "--weights" in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        features.get_extractor("inception", weights=tmp_path / "nowhere.pth")


@needs_torch
def test_weights_found_in_weights_dir(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHJAX_WEIGHTS", str(tmp_path))
    os.symlink(weights[2], tmp_path / convert.CONVERTED_FILENAME)
    assert registry.find_inception_weights() == str(tmp_path / convert.CONVERTED_FILENAME)


def test_converter_rejects_wrong_files(tmp_path):
    sd = _synthetic_state_dict(6)
    bad = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    with pytest.raises(ValueError, match="aux head"):
        convert.convert_state_dict(bad)
    bad = dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(ValueError, match="fc.weight"):
        convert.convert_state_dict(bad)
    bad = {k: v for k, v in sd.items() if not k.startswith("Mixed_7c.branch_pool.bn")}
    with pytest.raises(ValueError, match="lacks"):
        convert.convert_state_dict(bad)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a converted Inception"):
        convert.load_converted_inception(tmp_path / "other.npz")


def test_to_rgb_weights_are_morphdiffs():
    # morphdiff.txt "Evaluation setup": ER(1,0,0) RNA(0,1,0) DNA(0,0,1) Mito(.5,.5,0) AGP(.5,0,.5).
    names = ("DNA", "ER", "RNA", "AGP", "Mito")
    expected = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    np.testing.assert_array_equal(registry.rgb_weight_matrix(names), expected)
    x = np.random.default_rng(7).uniform(0, 1, (2, 8, 9, 5)).astype(np.float32)
    dna, er, rna, agp, mito = np.moveaxis(x, -1, 0)
    ref = np.stack([er + 0.5 * mito + 0.5 * agp, rna + 0.5 * mito, dna + 0.5 * agp], -1)
    np.testing.assert_allclose(np.asarray(features.to_rgb(x)), ref, rtol=1e-6)
    # Channel order is by name, not position.
    perm = [4, 2, 0, 3, 1]
    np.testing.assert_allclose(
        np.asarray(features.to_rgb(x[..., perm], channel_names=[names[i] for i in perm])), ref,
        rtol=1e-6)
    norm = np.asarray(features.to_rgb(x, normalize=True))
    np.testing.assert_allclose(norm, ref / np.array([2.0, 1.5, 1.5]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(features.to_rgb(x, "first3")), x[..., :3])
    with pytest.raises(ValueError, match="channel_names"):
        features.to_rgb(x[..., :4])
    with pytest.raises(ValueError, match="mode"):
        features.to_rgb(x, "rgb")


class _TinyNet(nnx.Module):
    """Stands in for a trained morphjax model with a `features` method."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def features(self, x):
        return jax.nn.relu(self.conv(x)).mean(axis=(1, 2))


def test_model_extractor_wraps_trained_model_features():
    model = _TinyNet(nnx.Rngs(0))
    images = np.random.default_rng(8).normal(size=(8, 16, 16, 3)).astype(np.float32)
    extractor = features.get_extractor("model", apply=model.features, label="small_cnn", dim=16)
    expected = np.asarray(model.features(jnp.asarray(images)))
    np.testing.assert_allclose(np.asarray(extractor(images)), expected, rtol=1e-5, atol=1e-6)
    # Sharded over 8 devices along the batch: same features.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(images, jax.NamedSharding(mesh, jax.P("data")))
    np.testing.assert_allclose(np.asarray(extractor(sharded)), expected, rtol=1e-5, atol=1e-6)
    plain = features.get_extractor("model", apply=lambda x: x.mean(axis=(1, 2)))
    np.testing.assert_allclose(np.asarray(plain(images)), images.mean(axis=(1, 2)), atol=1e-7)
    with pytest.raises(ValueError, match="unknown feature extractor"):
        features.get_extractor("cellprofiler")
