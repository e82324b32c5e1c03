"""Feature spaces for metrics: a registry of extractors keyed by name, and RGB compositing.

* `inception`: the FID Inception (pytorch-fid weights), pool3 2048-d or the 1008 logits.
* `model`: any callable `apply(images NHWC float) -> features`, e.g. a trained morphjax model's
  `features` method, so FID/KID/PRDC can be computed in a domain-specific feature space.
* `classical`: CellProfiler-style features (shape, intensity, texture, ...; features/classical),
  named per column, so metrics and profiles can be read feature by feature.

Each extractor carries a `label` so every reported metric can say which feature space it used.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from morphjax.features import convert
from morphjax.features.classical import classical_feature_fn

DEFAULT_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")

# morphdiff.txt, Methods, "Evaluation setup": ER (1,0,0), RNA (0,1,0), DNA (0,0,1),
# Mito (0.5,0.5,0), AGP (0.5,0,0.5), following CellProfiler's colour composite.
MORPHDIFF_RGB_WEIGHTS = {
    "ER": (1.0, 0.0, 0.0),
    "RNA": (0.0, 1.0, 0.0),
    "DNA": (0.0, 0.0, 1.0),
    "Mito": (0.5, 0.5, 0.0),
    "AGP": (0.5, 0.0, 0.5),
}

WEIGHTS_ENV = "MORPHJAX_WEIGHTS"


def rgb_weight_matrix(channel_names: Sequence[str] = DEFAULT_CHANNELS,
                      weights: dict[str, Sequence[float]] | None = None) -> np.ndarray:
    """(C, 3) compositing matrix for the named channels (names matched case-insensitively)."""
    weights = MORPHDIFF_RGB_WEIGHTS if weights is None else weights
    lookup = {k.lower(): v for k, v in weights.items()}
    rows = []
    for name in channel_names:
        if name.lower() not in lookup:
            raise ValueError(f"channel {name!r} has no RGB weight; weights are given for "
                             f"{sorted(weights)}")
        rows.append(np.asarray(lookup[name.lower()], np.float32))
    matrix = np.stack(rows)
    if matrix.shape[1] != 3:
        raise ValueError(f"RGB weights must have 3 entries per channel, got {matrix.shape[1]}")
    return matrix


def to_rgb(images: np.ndarray | jax.Array, mode: str = "weights", *,
           channel_names: Sequence[str] = DEFAULT_CHANNELS,
           weights: dict[str, Sequence[float]] | None = None,
           normalize: bool = False) -> jax.Array:
    """Composites multi-channel NHWC Cell Painting images to RGB.

    mode "weights": MorphDiff's weighted colour sum (morphdiff.txt "Evaluation setup"),
      R = ER + 0.5 Mito + 0.5 AGP, G = RNA + 0.5 Mito, B = DNA + 0.5 AGP; `normalize` divides each
      RGB channel by its total weight so images in [0, 1] stay in [0, 1].
    mode "first3": the first three channels, as IMPA's evaluation does.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC, got shape {images.shape}")
    if mode == "first3":
        if images.shape[-1] < 3:
            raise ValueError(f"mode 'first3' needs >= 3 channels, got {images.shape[-1]}")
        return images[..., :3]
    if mode != "weights":
        raise ValueError(f"mode must be 'weights' or 'first3', got {mode!r}")
    if images.shape[-1] != len(channel_names):
        raise ValueError(f"images have {images.shape[-1]} channels but channel_names names "
                         f"{len(channel_names)}: {list(channel_names)}")
    matrix = rgb_weight_matrix(channel_names, weights)
    if normalize:
        matrix = matrix / matrix.sum(axis=0, keepdims=True)
    return jnp.einsum("nhwc,cr->nhwr", images.astype(jnp.float32), matrix,
                      precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class Extractor:
    """A feature space: `apply(images) -> (N, dim)` on device, plus a label for reports and,
    where features have names (classical), one name per column."""

    name: str
    label: str
    apply: Callable[[jax.Array], jax.Array]
    dim: int | None = None
    feature_names: tuple[str, ...] | None = None

    def __call__(self, images: np.ndarray | jax.Array) -> jax.Array:
        return self.apply(jnp.asarray(images))

    def extract(self, images: np.ndarray | jax.Array, batch_size: int = 50) -> np.ndarray:
        """Features of all images, computed `batch_size` at a time, as a NumPy array."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = [np.asarray(self(images[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out, axis=0)


def default_weights_dir() -> str:
    return os.environ.get(WEIGHTS_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "morphjax", "weights")


def find_inception_weights(weights: str | os.PathLike | None = None) -> str:
    """The weights file to use: `weights` if given, else the converted `.npz` or the `.pth` in
    `$MORPHJAX_WEIGHTS`; raises with where to put the file when there is none."""
    if weights is not None:
        path = os.fspath(weights)
        if os.path.isfile(path):
            return path
        candidates = [path]
    else:
        directory = default_weights_dir()
        candidates = [os.path.join(directory, convert.CONVERTED_FILENAME),
                      os.path.join(directory, convert.WEIGHTS_FILENAME)]
        for path in candidates:
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        "FID Inception weights not found (looked for " + ", ".join(candidates) + "). "
        f"Download {convert.WEIGHTS_FILENAME} from {convert.WEIGHTS_URL} and put it at "
        f"${WEIGHTS_ENV}/{convert.WEIGHTS_FILENAME} (${WEIGHTS_ENV} defaults to "
        "~/.cache/morphjax/weights) or pass --weights PATH; without torch, convert it once "
        "elsewhere with `morphjax convert-weights inception IN.pth OUT.npz` and point to OUT.npz.")


def _jit_module_method(method: Callable) -> Callable:
    """jits a bound NNX method with the module state as an argument (not baked-in constants).

    The state is the module's at wrap time: wrap again after further training.
    """
    module = method.__self__
    graphdef, state = nnx.split(module)
    name = method.__name__

    @jax.jit
    def pure(state, images):
        return getattr(nnx.merge(graphdef, state), name)(images)

    return lambda images: pure(state, images)


def _inception_extractor(weights: str | os.PathLike | None = None, output: str = "pool3",
                         rgb: str = "first3", channel_names: Sequence[str] = DEFAULT_CHANNELS,
                         resize_input: bool = True, model=None) -> Extractor:
    """Images NHWC in [-1, 1] with 3 channels, or more composited by `rgb`."""
    if output not in ("pool3", "logits", "logits_unbiased"):
        raise ValueError(f"output must be 'pool3', 'logits' or 'logits_unbiased', got {output!r}")
    if rgb not in ("first3", "weights"):
        raise ValueError(f"rgb must be 'first3' or 'weights', got {rgb!r}")
    if model is None:
        model = convert.load_inception(find_inception_weights(weights),
                                       resize_input=resize_input)
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, images):
        net = nnx.merge(graphdef, state)
        if images.shape[-1] != 3:
            if rgb == "first3":
                images = to_rgb(images, "first3")
            else:  # [-1, 1] -> [0, 1], composite with weights summing to 1, back to [-1, 1].
                images = to_rgb((images + 1) / 2, "weights", channel_names=channel_names,
                                normalize=True) * 2 - 1
        pool, logits = net(images)
        if output == "pool3":
            return pool
        return logits if output == "logits" else net.unbiased_logits(pool)

    dim = 2048 if output == "pool3" else 1008
    return Extractor(name="inception", label=f"inception-v3-fid/{output}/{rgb}",
                     apply=lambda images: apply(state, images), dim=dim)


def _model_extractor(apply: Callable, label: str = "model", dim: int | None = None) -> Extractor:
    """Wraps a trained model's feature function so it can serve as the metric feature space."""
    if not callable(apply):
        raise ValueError(f"apply must be callable (images -> features), got {type(apply)}")
    if isinstance(getattr(apply, "__self__", None), nnx.Module):
        fn = _jit_module_method(apply)
    else:
        fn = jax.jit(apply)
    return Extractor(name="model", label=label, apply=fn, dim=dim)


def _classical_extractor(channel_names: Sequence[str] = DEFAULT_CHANNELS,
                         nucleus_channel: str = "DNA", cell_channel: str | None = None,
                         image_shape: Sequence[int] | None = None, **options) -> Extractor:
    """Images NHWC in [-1, 1] (the model range, as for `inception`), clipped to [0, 1] first;
    `options` are morphjax.features.classical.ClassicalConfig fields."""
    fn, names = classical_feature_fn(image_shape, channel_names, nucleus_channel, cell_channel,
                                     **options)

    def apply(images: jax.Array) -> jax.Array:
        return fn(jnp.clip((jnp.asarray(images, jnp.float32) + 1) / 2, 0, 1))

    return Extractor(name="classical", label=f"classical/{len(names)} features", apply=apply,
                     dim=len(names), feature_names=tuple(names))


_REGISTRY: dict[str, Callable[..., Extractor]] = {
    "inception": _inception_extractor,
    "model": _model_extractor,
    "classical": _classical_extractor,
}


def get_extractor(name: str, **kwargs) -> Extractor:
    """Builds the named feature extractor ("inception", "model" or "classical")."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature extractor {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)
