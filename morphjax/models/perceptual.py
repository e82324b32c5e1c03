"""Perceptual distances for the autoencoder loss: LPIPS-VGG16 and a Cell Painting CNN fallback.

MorphDiff's VAE loss (notes/morphdiff_lumic_reference.md section 1, taming `contperceptual.py`) adds
`perceptual_weight * p_loss` to |x - xrec|, where p_loss is LPIPS (Zhang et al. 2018, VGG16
variant, taming `lpips.py`) computed on each of the C channels repeated to 3, then averaged over
the channels. This module gives that (B,) term for `autoencoder.reconstruction_nll`.

LPIPS: ScalingLayer, the torchvision VGG16 `features` trunk tapped after relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3, each tap unit-normalised over channels (eps 1e-10), squared difference,
1x1 "lin" head (non-negative, no bias; its dropout is off in eval), spatial mean, sum over taps.
The trunk comes from torchvision's ImageNet `vgg16-397923af.pth` and the heads from LPIPS's
`vgg.pth`; `morphjax.features.convert.convert_lpips_vgg16` turns them into one `.npz`.

Fallback (no ImageNet weights wanted or available): `CellPaintingPerceptual`, the same distance on
activations of a morphjax-trained Cell Painting CNN (EfficientNet) with uniform 1/C_l weights. It
is a feature distance, not LPIPS: its heads were never fitted to human judgements.

All weights are `FrozenWeight` variables, not `nnx.Param`: optimizers built on `nnx.Param` never
see them, and the forward passes stop gradients into them. They carry no sharding annotation
(small, replicated). Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from morphjax.models.efficientnet import EfficientNet

# LPIPS ScalingLayer (x - shift) / scale, for RGB inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
# torchvision vgg16 `features`: conv widths per stage; a 2x2 max-pool separates the stages.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG16_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# Index of each conv in torchvision's `features` Sequential (ReLU and MaxPool fill the gaps).
VGG16_TORCH_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
LPIPS_VGG16_FORMAT = "morphjax-lpips-vgg16-v1"
FORMAT_KEY = "__format__"
# Cell Painting CNN inputs: per-crop per-channel min-max (train/cpcnn.py `minmax_normalize`).
MINMAX_EPS = 1e-7

PerceptualFn = Callable[[jax.Array, jax.Array], jax.Array]


class FrozenWeight(nnx.Variable):
    """A pretrained weight of a perceptual network: checkpointed and loaded, never optimised."""


def _frozen(variable: nnx.Variable) -> jax.Array:
    return jax.lax.stop_gradient(variable[...])


def vgg16_conv_shapes(in_channels: int = 3) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(HWIO kernel shape, bias shape) of the 13 convolutions, in order."""
    shapes, c_in = [], in_channels
    for stage in VGG16_STAGES:
        for c_out in stage:
            shapes.append(((3, 3, c_in, c_out), (c_out,)))
            c_in = c_out
    return shapes


def lpips_lin_widths() -> tuple[int, ...]:
    """Channels of the five LPIPS taps (= widths of the lin heads): 64, 128, 256, 512, 512."""
    return tuple(stage[-1] for stage in VGG16_STAGES)


class VGG16Features(nnx.Module):
    """torchvision VGG16 `features` (13 conv3x3 + ReLU, max-pools between the 5 stages), NHWC.

    `__call__` takes images in [-1, 1] with 3 channels, applies LPIPS's ScalingLayer and returns
    the five taps relu1_2 .. relu5_3 (float32). The final max-pool is never needed and omitted.
    Weights start at zero: fill them with `load_lpips_vgg16` (there is no ImageNet training here).
    """

    def __init__(self, *, dtype: jnp.dtype = jnp.float32):
        self.dtype = dtype
        self.kernels = nnx.List([FrozenWeight(jnp.zeros(k, jnp.float32))
                                 for k, _ in vgg16_conv_shapes()])
        self.biases = nnx.List([FrozenWeight(jnp.zeros(b, jnp.float32))
                                for _, b in vgg16_conv_shapes()])

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"VGG16Features expects NHWC images with 3 channels, got {x.shape}")
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
        h = ((x.astype(jnp.float32) - shift) / scale).astype(self.dtype)
        taps, k = [], 0
        for s, stage in enumerate(VGG16_STAGES):
            if s > 0:  # torch MaxPool2d(2, 2), floor mode.
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                          "VALID")
            for _ in stage:
                kernel = _frozen(self.kernels[k]).astype(self.dtype)
                bias = _frozen(self.biases[k]).astype(self.dtype)
                h = jax.lax.conv_general_dilated(
                    h, kernel, (1, 1), ((1, 1), (1, 1)),
                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
                h = jax.nn.relu(h + bias)
                k += 1
            taps.append(h.astype(jnp.float32))
        return taps


def normalize_channels(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """x / (||x||_2 over channels + eps) (LPIPS `normalize_tensor`).

    The norm is written so that an all-zero feature vector (a dead ReLU pixel) has a finite
    gradient; the value equals the plain formula.
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return x / (norm + eps)


def tap_distance(taps0: Sequence[jax.Array], taps1: Sequence[jax.Array],
                 weights: Sequence[jax.Array]) -> jax.Array:
    """sum_l mean_hw( sum_c w_lc (n0 - n1)^2 ) over taps l, with n = unit-normalised taps -> (B,)."""
    total = 0.0
    for f0, f1, w in zip(taps0, taps1, weights, strict=True):
        d = jnp.square(normalize_channels(f0.astype(jnp.float32))
                       - normalize_channels(f1.astype(jnp.float32)))
        total = total + jnp.einsum("bhwc,c->b", d, w.astype(jnp.float32)) / (
            d.shape[1] * d.shape[2])
    return total


class LPIPS(nnx.Module):
    """LPIPS (Zhang et al. 2018) with a VGG16 trunk, taming/richzhang `lpips.py` semantics.

    `__call__(x, xrec)`: 3-channel NHWC images in [-1, 1] -> (B,) distances. The lin heads are
    (C_l,) non-negative weights (LPIPS's 1x1 convs C_l -> 1); until trained heads are loaded
    they are uniform, 1/C_l, i.e. the mean over channels.
    """

    def __init__(self, *, dtype: jnp.dtype = jnp.float32):
        self.net = VGG16Features(dtype=dtype)
        self.lins = nnx.List([FrozenWeight(jnp.full((c,), 1.0 / c, jnp.float32))
                              for c in lpips_lin_widths()])

    def __call__(self, x: jax.Array, xrec: jax.Array) -> jax.Array:
        if x.shape != xrec.shape:
            raise ValueError(f"LPIPS: x {x.shape} and xrec {xrec.shape} differ")
        n = x.shape[0]
        taps = self.net(jnp.concatenate([x, xrec], axis=0))  # One trunk pass for both.
        weights = [_frozen(w) for w in self.lins]
        return tap_distance([t[:n] for t in taps], [t[n:] for t in taps], weights)


def per_channel_lpips(lpips: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                      xrec: jax.Array) -> jax.Array:
    """MorphDiff's multi-channel rule: each of the C channels repeated to 3, LPIPS per channel,
    mean over the C channels -> (B,). All channels go through the trunk as one batch."""
    if x.shape != xrec.shape or x.ndim != 4:
        raise ValueError(f"per_channel_lpips: x {x.shape} and xrec {xrec.shape} must be equal "
                         "NHWC shapes")
    b, h, w, c = x.shape

    def split(v):  # (B, H, W, C) -> (C * B, H, W, 3), channel-major.
        v = jnp.moveaxis(v, -1, 0).reshape(c * b, h, w, 1)
        return jnp.repeat(v, 3, axis=-1)

    return lpips(split(x), split(xrec)).reshape(c, b).mean(axis=0)


class PerChannelLPIPS(nnx.Module):
    """`LPIPS` applied with `per_channel_lpips` to C-channel images: (x, xrec) -> (B,)."""

    def __init__(self, lpips: LPIPS, num_channels: int):
        self.lpips = lpips
        self.num_channels = num_channels

    def __call__(self, x: jax.Array, xrec: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.num_channels:
            raise ValueError(f"perceptual loss built for {self.num_channels} channels, got "
                             f"images of shape {x.shape}")
        return per_channel_lpips(self.lpips, x, xrec)


# -- Cell Painting CNN fallback -------------------------------------------------------------------

def default_cnn_taps(backbone: EfficientNet) -> tuple[str, ...]:
    """The output of the last block at each resolution (B0 at 128 px: block1a 64 px, block2b 32,
    block3b 16, block5c 8, block7a 4): five scales, as LPIPS taps VGG16 at five."""
    specs = backbone.specs
    return tuple(f"{s.name}_output" for i, s in enumerate(specs)
                 if i + 1 == len(specs) or specs[i + 1].stride > 1)


def freeze(module: nnx.Module) -> nnx.Module:
    """Turns every `nnx.Param` and `nnx.BatchStat` of `module` into a `FrozenWeight`, in place."""
    for _, m in nnx.iter_modules(module):
        for name, value in list(vars(m).items()):
            if isinstance(value, (nnx.Param, nnx.BatchStat)):
                setattr(m, name, FrozenWeight(value.get_value()))
    return module


class CellPaintingPerceptual(nnx.Module):
    """Feature distance on a Cell Painting CNN: LPIPS's normalise / squared diff / spatial mean /
    sum over taps, on EfficientNet block outputs, with uniform 1/C_l weights. Not LPIPS.

    All C channels go in at once (no per-channel repeat): the CNN was trained on C-channel crops,
    so a single repeated channel is an input it has never seen. Inputs in [-1, 1] are mapped as in
    its training, per image and channel min-max to [0, 1] (train/cpcnn.py `minmax_normalize`, eps
    1e-7); BatchNorm uses its running statistics. The backbone is frozen in place (`freeze`).
    """

    def __init__(self, backbone: EfficientNet, *, taps: Sequence[str] | None = None):
        self.taps = tuple(taps) if taps else default_cnn_taps(backbone)
        unknown = [t for t in self.taps if t not in backbone.layer_names]
        if unknown:
            raise ValueError(f"taps {unknown} are not layers of the backbone; choose from "
                             f"{', '.join(backbone.layer_names)}")
        self.backbone = freeze(backbone)
        self.num_channels = backbone.in_channels

    def features(self, x: jax.Array) -> list[jax.Array]:
        if x.ndim != 4 or x.shape[-1] != self.num_channels:
            raise ValueError(f"the Cell Painting CNN takes {self.num_channels}-channel NHWC "
                             f"images, got shape {x.shape}")
        x = x.astype(jnp.float32)
        low = x.min(axis=(1, 2), keepdims=True)
        high = x.max(axis=(1, 2), keepdims=True)
        x = (x - low) / (high - low + MINMAX_EPS)
        graphdef, frozen, rest = nnx.split(self.backbone, FrozenWeight, ...)
        model = nnx.merge(graphdef, jax.lax.stop_gradient(frozen), rest, copy=True)
        out = model.forward(x, train=False, outputs=self.taps)
        return [out[t].astype(jnp.float32) for t in self.taps]

    def __call__(self, x: jax.Array, xrec: jax.Array) -> jax.Array:
        if x.shape != xrec.shape:
            raise ValueError(f"CellPaintingPerceptual: x {x.shape} and xrec {xrec.shape} differ")
        n = x.shape[0]
        taps = self.features(jnp.concatenate([x, xrec], axis=0))
        weights = [jnp.full((t.shape[-1],), 1.0 / t.shape[-1], jnp.float32) for t in taps]
        return tap_distance([t[:n] for t in taps], [t[n:] for t in taps], weights)


# -- loading --------------------------------------------------------------------------------------

def lpips_vgg16_keys() -> dict[str, tuple[int, ...]]:
    """Converted `.npz` array names -> shapes (HWIO kernels, biases, lin heads)."""
    keys = {}
    for i, (k, b) in enumerate(vgg16_conv_shapes()):
        keys[f"net/kernels/{i}"] = k
        keys[f"net/biases/{i}"] = b
    for i, c in enumerate(lpips_lin_widths()):
        keys[f"lins/{i}"] = (c,)
    return keys


def lpips_from_arrays(arrays: dict[str, np.ndarray], *,
                      dtype: jnp.dtype = jnp.float32) -> LPIPS:
    """An `LPIPS` filled from converted arrays; every name and shape is checked."""
    model = LPIPS(dtype=dtype)
    expected = lpips_vgg16_keys()
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise ValueError(f"LPIPS VGG16 weights lack {len(missing)} arrays, e.g. {missing[:3]}")
    for key, shape in expected.items():
        value = np.asarray(arrays[key], np.float32)
        if value.shape != shape:
            raise ValueError(f"LPIPS VGG16 array {key!r} has shape {value.shape}, expected {shape}")
        if key.startswith("lins/") and (value < 0).any():
            raise ValueError(f"LPIPS lin head {key!r} has negative weights; LPIPS clamps them to "
                             ">= 0, so this is not an LPIPS head file")
        *group, index = key.split("/")
        lists = {("net", "kernels"): model.net.kernels, ("net", "biases"): model.net.biases,
                 ("lins",): model.lins}
        lists[tuple(group)][int(index)].set_value(jnp.asarray(value))
    return model


def load_lpips_vgg16(path: str | os.PathLike, *, dtype: jnp.dtype = jnp.float32) -> LPIPS:
    """Reads a `.npz` written by `morphjax convert-weights lpips_vgg16` (torch not needed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS VGG16 weights {path!r} do not exist; make them with `morphjax convert-weights "
            "lpips_vgg16 vgg16-397923af.pth OUT.npz --lin vgg.pth`")
    with np.load(path) as data:
        if FORMAT_KEY not in data.files or str(data[FORMAT_KEY]) != LPIPS_VGG16_FORMAT:
            raise ValueError(f"{path!r} is not a converted LPIPS VGG16 file (written by "
                             "`morphjax convert-weights lpips_vgg16`)")
        arrays = {k: data[k] for k in data.files if k != FORMAT_KEY}
    return lpips_from_arrays(arrays, dtype=dtype)


def load_perceptual(spec: str, num_channels: int, *, dtype: jnp.dtype = jnp.float32
                    ) -> tuple[PerceptualFn | None, str]:
    """(fn(x, xrec) -> (B,), label) for a spec:

    - "vgg16:/path/lpips_vgg16.npz": LPIPS VGG16 per channel (MorphDiff's loss);
    - "cpcnn:/path/to/workdir": a trained Cell Painting CNN run (`CellPaintingPerceptual`); its
      input channels must be the autoencoder's, in the same order;
    - "none": (None, label): no perceptual term (pass perceptual=None to reconstruction_nll).

    The returned fns are `nnx.Module`s with frozen weights; the label says what the term is, so
    that a feature distance is never reported as LPIPS.
    """
    kind, _, arg = spec.partition(":")
    if kind == "none" and not arg:
        return None, "no perceptual term (L1 reconstruction only)"
    if kind == "vgg16" and arg:
        module = PerChannelLPIPS(load_lpips_vgg16(arg, dtype=dtype), num_channels)
        return module, "LPIPS VGG16 (ImageNet) per channel"
    if kind == "cpcnn" and arg:
        from morphjax.runs import load_run  # noqa: PLC0415 (imports the training stack)
        from morphjax.train.cpcnn import MODEL  # noqa: PLC0415

        run = load_run(arg)
        if run.config.get("task") != "cpcnn":
            raise ValueError(f"perceptual spec {spec!r}: {arg} is a {run.config.get('task')!r} "
                             "run, not a Cell Painting CNN (cpcnn) run")
        backbone = run.state.eval_model(MODEL).backbone
        if backbone.in_channels != num_channels:
            raise ValueError(f"perceptual spec {spec!r}: the CNN takes {backbone.in_channels} "
                             f"channels, the autoencoder {num_channels}")
        channels = tuple(run.config.data.channels) or "dataset order"
        label = (f"Cell Painting CNN features (run {os.path.basename(run.workdir)}, step "
                 f"{run.step}, channels {channels}), uniform weights - not LPIPS")
        return CellPaintingPerceptual(backbone), label
    raise ValueError(f"perceptual spec {spec!r}: use 'vgg16:/path/lpips_vgg16.npz', "
                     "'cpcnn:/path/to/run' or 'none'")
