"""Converts pytorch-fid's FID Inception state dict into the NNX `InceptionV3FID`.

The public file `pt_inception-2015-12-05-6726825d.pth` is a torch state dict whose keys are
torchvision's Inception3 names (`Mixed_5b.branch1x1.conv.weight`, `...bn.running_var`, `fc.weight`).
Mapping: conv weight OIHW -> HWIO kernel; BatchNorm weight/bias/running_mean/running_var ->
scale/bias/mean/var (eps 0.001 lives in the module); fc weight (out, in) -> kernel (in, out).
`num_batches_tracked` is training bookkeeping and is dropped. Reading `.pth` needs torch (an
optional dependency used only here); the converted `.npz` loads without torch.

`convert_lpips_vgg16` does the same for LPIPS (morphjax.models.perceptual): torchvision's
`vgg16-397923af.pth` (`features.{0,2,5,...,28}.{weight,bias}`; `classifier.*` ignored) plus LPIPS's
`vgg.pth` heads (`lin{0..4}.model.1.weight`, (1, C, 1, 1)) -> one `.npz`.
"""

from __future__ import annotations

import functools
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from morphjax import io as morphjax_io
from morphjax.features import inception
from morphjax.models import perceptual

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILENAME)
CONVERTED_FILENAME = "inception_fid.npz"
FORMAT_KEY = "__format__"
FORMAT = "morphjax-inception-fid-v1"

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _nnx_path(torch_key: str) -> tuple[str, ...] | None:
    """Torch key -> NNX state path; None for keys that carry no weights."""
    parts = torch_key.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if parts[0] == "fc":
        return ("fc", {"weight": "kernel", "bias": "bias"}[parts[1]])
    if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
        return tuple(parts[:-1]) + ("kernel",)
    if len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_NAMES:
        return tuple(parts[:-1]) + (_BN_NAMES[parts[-1]],)
    raise KeyError(torch_key)


def _to_nnx_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T  # (out, in) -> (in, out)
    return value


@functools.lru_cache(maxsize=4)
def _abstract_split(resize_input: bool, precision: jax.lax.Precision | None):
    """(graphdef, shape-only state) of the module; tracing its init takes seconds, so cached."""
    return nnx.split(inception.create_inception(resize_input=resize_input, precision=precision,
                                                abstract=True))


def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    _, state = _abstract_split(True, jax.lax.Precision.HIGHEST)
    flat = nnx.to_flat_state(state)
    return {tuple(str(k) for k in path): tuple(var.get_value().shape) for path, var in flat}


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Torch-named arrays -> {"Mixed_5b/branch1x1/conv/kernel": HWIO array, ...}, all checked."""
    expected = _expected_shapes()
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("AuxLogits."):
            raise ValueError(
                f"state dict has {key!r}: this is torchvision's ImageNet Inception, not the FID "
                f"Inception ({WEIGHTS_FILENAME}), which has no aux head")
        try:
            path = _nnx_path(key)
        except KeyError:
            raise ValueError(f"unexpected key {key!r} in the Inception state dict") from None
        if path is None:
            continue
        if path not in expected:
            raise ValueError(f"unexpected key {key!r} in the Inception state dict")
        array = _to_nnx_layout(path, np.asarray(value, dtype=np.float32))
        if array.shape != expected[path]:
            raise ValueError(f"{key!r} has shape {np.shape(value)}; the FID Inception expects "
                             f"{expected[path]} after conversion, got {array.shape}")
        converted["/".join(path)] = array
    missing = sorted("/".join(p) for p in expected if "/".join(p) not in converted)
    if missing:
        raise ValueError(f"Inception state dict lacks {len(missing)} weights, e.g. {missing[:3]}")
    return converted


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.pth` state dict as NumPy arrays; torch is imported only here."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path!r} needs torch (`pip install torch`); convert it once on a machine "
            "with torch: `morphjax convert-weights {inception,lpips_vgg16} IN.pth OUT.npz`"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _write_npz(arrays: dict[str, np.ndarray], out_path: str | os.PathLike) -> str:
    """Writes converted weights atomically as `.npz` (suffix added if missing); returns the path."""
    out_path = os.fspath(out_path)
    if not out_path.endswith(".npz"):
        out_path += ".npz"
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    morphjax_io.atomic_write_bytes(out_path, buffer.getvalue())
    return out_path


def convert_inception(in_path: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """`morphjax convert-weights inception IN.pth OUT`: writes the NNX params as `.npz`."""
    arrays = convert_state_dict(read_torch_state_dict(in_path))
    arrays[FORMAT_KEY] = np.array(FORMAT)
    return _write_npz(arrays, out_path)


def inception_from_arrays(arrays: dict[str, np.ndarray], *, resize_input: bool = True,
                          precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
                          ) -> inception.InceptionV3FID:
    """Fills a shape-only `InceptionV3FID` with converted arrays (no random init cost)."""
    graphdef, state = _abstract_split(resize_input, precision)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = "/".join(str(k) for k in path)
        if key not in arrays:
            raise ValueError(f"converted Inception weights lack {key!r}")
        flat.append((path, var.replace(jnp.asarray(arrays[key], jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_converted_inception(path: str | os.PathLike, **kwargs) -> inception.InceptionV3FID:
    """Loads a `.npz` written by `convert_inception` (torch not needed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"converted Inception weights {path!r} do not exist")
    with np.load(path) as data:
        if FORMAT_KEY not in data or str(data[FORMAT_KEY]) != FORMAT:
            raise ValueError(f"{path!r} is not a converted Inception file (written by "
                             "`morphjax convert-weights inception`)")
        arrays = {k: data[k] for k in data.files if k != FORMAT_KEY}
    return inception_from_arrays(arrays, **kwargs)


def load_inception(path: str | os.PathLike, **kwargs) -> inception.InceptionV3FID:
    """Loads the FID Inception from the torch `.pth` file or a converted `.npz`."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        return load_converted_inception(path, **kwargs)
    return inception_from_arrays(convert_state_dict(read_torch_state_dict(path)), **kwargs)


# -- LPIPS VGG16 ----------------------------------------------------------------------------------

def convert_lpips_state_dicts(vgg16: dict[str, np.ndarray],
                              lin: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision VGG16 + LPIPS lin state dicts -> the arrays `perceptual.lpips_from_arrays` reads.

    Every key of both dicts is checked (the VGG16 `classifier.*` head is dropped); conv weights
    go OIHW -> HWIO, lin weights (1, C, 1, 1) -> (C,).
    """
    expected = perceptual.lpips_vgg16_keys()
    sources = {}  # torch key -> (npz key, torch shape)
    for i, torch_index in enumerate(perceptual.VGG16_TORCH_INDEX):
        h, w, c_in, c_out = expected[f"net/kernels/{i}"]
        sources[f"features.{torch_index}.weight"] = (f"net/kernels/{i}", (c_out, c_in, h, w))
        sources[f"features.{torch_index}.bias"] = (f"net/biases/{i}", (c_out,))
    lin_sources = {f"lin{i}.model.1.weight": (f"lins/{i}", (1, c, 1, 1))
                   for i, c in enumerate(perceptual.lpips_lin_widths())}
    converted = {}
    for name, state, table in (("VGG16", vgg16, sources), ("LPIPS lin", lin, lin_sources)):
        for key, value in state.items():
            if name == "VGG16" and key.startswith("classifier."):
                continue
            if key not in table:
                raise ValueError(f"unexpected key {key!r} in the {name} state dict")
            out_key, shape = table[key]
            value = np.asarray(value, np.float32)
            if value.shape != shape:
                raise ValueError(f"{name} {key!r} has shape {value.shape}, expected {shape}")
            if value.ndim == 4 and out_key.startswith("net/"):
                value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            converted[out_key] = value.reshape(expected[out_key])
        missing = [k for k in table if table[k][0] not in converted]
        if missing:
            raise ValueError(f"the {name} state dict lacks {len(missing)} keys, e.g. {missing[:3]}")
    return converted


def convert_lpips_vgg16(vgg16_pth: str | os.PathLike, lin_pth: str | os.PathLike,
                        out_npz: str | os.PathLike) -> str:
    """`morphjax convert-weights lpips_vgg16 VGG16_PTH OUT --lin LIN_PTH`: writes one `.npz`."""
    arrays = convert_lpips_state_dicts(read_torch_state_dict(vgg16_pth),
                                       read_torch_state_dict(lin_pth))
    perceptual.lpips_from_arrays(arrays)  # Same checks as at load time.
    arrays[FORMAT_KEY] = np.array(perceptual.LPIPS_VGG16_FORMAT)
    return _write_npz(arrays, out_npz)
