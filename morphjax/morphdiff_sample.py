"""MorphDiff inference: G2I (expression -> cells from noise) and I2I (control cells -> perturbed).

`morphjax sample --workdir W --mode g2i|i2i --perturbation NAME` writes OUT/<name>_<mode>.png
(rows: control | generated | real, per channel as the training grids), OUT/<name>_<mode>_rgb.png
(the same rows as RGB composites with the weights of morphdiff.txt, "Evaluation setup") and
OUT/<name>_<mode>.npz (uint8 arrays). G2I is DDIM from noise (reference gene2img: 100 steps,
eta 0); I2I is SDEdit from test-split control cells (reference img2img: strength 0.55, 50 steps).
Unseen perturbations are generated from their expression vectors like any other.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from morphjax.io import atomic_write_bytes
from morphjax.logging import save_image_rows
from morphjax.runs import Run, load_run
from morphjax.train import impa as impa_task
from morphjax.train import morphdiff as md

MODES = ("g2i", "i2i")


def check_run(run: Run) -> None:
    c = run.config
    if c.task != "morphdiff_ldm":
        raise ValueError(f"{run.workdir} is a {c.task!r} run; MorphDiff sampling needs "
                         "the diffusion stage (configs/morphdiff.py:PRESET)")
    if c.sample.guidance_scale != 1.0 and c.loss.cond_drop_prob <= 0:
        raise ValueError(f"guidance scale {c.sample.guidance_scale} needs a run trained with "
                         f"condition dropout, but {run.workdir} has loss.cond_drop_prob = "
                         f"{c.loss.cond_drop_prob}: its unconditional prediction is untrained. "
                         "Use guidance 1, or train with --set loss.cond_drop_prob=0.1")


def load(workdir: str, guidance_scale: float | None = None) -> Run:
    """A MorphDiff diffusion run, optionally sampled with classifier-free guidance."""
    overrides = {} if guidance_scale is None else {"sample.guidance_scale": float(guidance_scale)}
    run = load_run(workdir, overrides=overrides)
    check_run(run)
    return run


def perturbation_index(run: Run, name: str) -> int:
    names = run.task.spec.perturbations["perturbation"].astype(str).tolist()
    if name not in names:
        close = [n for n in names if name.lower() in n.lower()][:5]
        raise ValueError(f"perturbation {name!r} is not in {run.config.data.path}"
                         + (f"; did you mean one of {close}?" if close else ""))
    return names.index(name)


def read_cells(run: Run, split: str, indices: np.ndarray) -> np.ndarray:
    """Examples `indices` of `split` as float32 [-1, 1] images in the model's channels."""
    spec, size = run.task.spec, run.config.data.image_size
    source = md.open_split(spec.dataset_dir, split)
    if not len(indices):
        return np.zeros((0, size, size, len(spec.channels)), np.float32)
    return np.stack([md.to_model_space(source[int(i)]["image"], spec.channel_index, size)
                     for i in indices])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _g2i(task, graphdef, steps, state, expression, rng):
    return task.generate(nnx.merge(graphdef, state), expression, rng, steps=steps)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _i2i(task, graphdef, steps, strength, state, images, expression, rng):
    return task.transform(nnx.merge(graphdef, state), images, expression, rng, strength=strength,
                          steps=steps)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reconstruct(task, graphdef, state, images, rng):
    train_state = nnx.merge(graphdef, state)
    return task.decode(train_state, task.encode(train_state, images, rng))


@functools.partial(jax.jit, static_argnums=(0,))
def _ae_round_trip(graphdef, state, images, rng):
    ae = nnx.merge(graphdef, state)
    return jnp.clip(ae.decode(ae.encode(images).sample(rng)), -1.0, 1.0)


def map_batches(fn, arrays: list[np.ndarray], batch_size: int, seed: int) -> np.ndarray:
    """fn(*batch, rng) over fixed-size batches (the last padded): one compile for all."""
    n, out = len(arrays[0]), []
    key = jax.random.key(seed)
    for start in range(0, n, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        pad = batch_size - len(chunk[0])
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) if pad else c for c in chunk]
        result = fn(*[jnp.asarray(c) for c in chunk], jax.random.fold_in(key, start))
        out.append(np.asarray(result)[:batch_size - pad])
    return np.concatenate(out)


def generate_g2i(run: Run, expression: np.ndarray, *, seed: int = 0, steps: int | None = None,
                 batch_size: int = 32) -> np.ndarray:
    """One generated cell per row of `expression` (N, G), float32 [-1, 1] NHWC."""
    check_run(run)
    graphdef, state = nnx.split(run.state)
    steps = int(steps or run.config.sample.ddim_steps)
    fn = functools.partial(_g2i, run.task, graphdef, steps, state)
    return map_batches(fn, [np.asarray(expression, np.float32)], batch_size, seed)


def generate_i2i(run: Run, images: np.ndarray, expression: np.ndarray, *, seed: int = 0,
                 strength: float | None = None, steps: int | None = None,
                 batch_size: int = 32) -> np.ndarray:
    """Control cell i transformed under expression row i (SDEdit), float32 [-1, 1] NHWC."""
    check_run(run)
    if len(images) != len(expression):
        raise ValueError(f"{len(images)} control images for {len(expression)} expression rows")
    s = run.config.sample
    graphdef, state = nnx.split(run.state)
    strength = float(s.i2i_strength if strength is None else strength)
    steps = int(steps or s.i2i_steps)
    fn = functools.partial(_i2i, run.task, graphdef, steps, strength, state)
    return map_batches(fn, [np.asarray(images, np.float32), np.asarray(expression, np.float32)],
                    batch_size, seed)


def reconstruct(run: Run, images: np.ndarray, *, seed: int = 0,
                batch_size: int = 32) -> np.ndarray:
    """decode(posterior sample of encode(images)): the frozen autoencoder's round trip, the best
    any latent the diffusion model generates can look (the "rFID" of latent-diffusion papers).
    `run` is a diffusion run or, to check a first stage before training on it, an autoencoder
    run."""
    if run.config.task == "morphdiff_autoencoder":
        graphdef, state = nnx.split(run.state.eval_model("autoencoder"))
        fn = functools.partial(_ae_round_trip, graphdef, state)
    else:
        check_run(run)
        graphdef, state = nnx.split(run.state)
        fn = functools.partial(_reconstruct, run.task, graphdef, state)
    return map_batches(fn, [np.asarray(images, np.float32)], batch_size, seed)


def control_cells(run: Run, n: int, seed: int = 0) -> np.ndarray:
    """`n` control cells of the evaluation split (with replacement if there are fewer)."""
    spec, split = run.task.spec, run.config.data.eval_split
    rows = spec.split_rows(split)
    rows = rows[spec.is_control[rows["perturbation_id"]]]
    if not len(rows):
        raise ValueError(f"split {split!r} of {spec.dataset_dir} has no control cells")
    rng = np.random.default_rng(seed)
    pick = rng.choice(rows["split_index"].to_numpy(), size=n, replace=len(rows) < n)
    return read_cells(run, split, pick)


def real_cells(run: Run, perturbation: int, n: int, seed: int = 0) -> np.ndarray:
    """Up to `n` real cells of `perturbation` (evaluation split first, then training)."""
    spec, d = run.task.spec, run.config.data
    for split in (d.eval_split, d.train_split):
        rows = spec.split_rows(split)
        pool = rows.loc[rows["perturbation_id"] == perturbation, "split_index"].to_numpy()
        if pool.size:
            rng = np.random.default_rng(seed)
            return read_cells(run, split, rng.choice(pool, min(n, pool.size), replace=False))
    return read_cells(run, d.eval_split, np.zeros(0, np.int64))


def composite_weights(channels) -> np.ndarray:
    """(C, 3) RGB weights: MorphDiff's when every channel has one (Cell Painting); else the
    first three channels as blue, green, red (BBBC021's DNA / tubulin / actin display)."""
    from morphjax.features.registry import MORPHDIFF_RGB_WEIGHTS, rgb_weight_matrix  # noqa: PLC0415

    if {c.lower() for c in channels} <= {k.lower() for k in MORPHDIFF_RGB_WEIGHTS}:
        return rgb_weight_matrix(channels)
    weights = np.zeros((len(channels), 3), np.float32)
    for i in range(min(3, len(channels))):
        weights[i, 2 - i] = 1.0
    return weights


def rgb_composite(images: np.ndarray, channels) -> np.ndarray:
    """[-1, 1] NHWC cells -> uint8 RGB (`composite_weights`), min-max per image and channel."""
    x = (np.asarray(images, np.float32) + 1.0) / 2.0
    rgb = np.einsum("nhwc,cd->nhwd", x, composite_weights(channels))
    lo = rgb.min(axis=(1, 2), keepdims=True)
    hi = rgb.max(axis=(1, 2), keepdims=True)
    return np.round(255 * (rgb - lo) / np.maximum(hi - lo, 1e-8)).astype(np.uint8)


def _npz_bytes(**arrays) -> bytes:
    import io  # noqa: PLC0415

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def sample(run: Run, perturbation: str, out_dir: str, *, mode: str = "g2i", n: int = 16,
           strength: float | None = None, steps: int | None = None, seed: int = 0
           ) -> dict[str, str]:
    """Writes the grids and arrays for one perturbation; returns their paths."""
    check_run(run)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    p = perturbation_index(run, perturbation)
    expression = np.repeat(run.task.spec.expression[p][None], n, axis=0)
    controls = control_cells(run, n, seed)
    if mode == "g2i":
        generated = generate_g2i(run, expression, seed=seed, steps=steps)
    else:
        generated = generate_i2i(run, controls, expression, seed=seed, strength=strength,
                                 steps=steps)
    real = real_cells(run, p, n, seed)
    padded = np.full_like(controls, -1.0)
    padded[:len(real)] = real
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in perturbation)
    stem = os.path.join(out_dir, f"{safe}_{mode}")
    os.makedirs(out_dir, exist_ok=True)
    labels = ["control", f"generated ({mode.upper()})", "real"]
    rows = [impa_task.to_uint8(controls), impa_task.to_uint8(generated),
            impa_task.to_uint8(padded)]
    save_image_rows(stem + ".png", rows, row_labels=labels)
    channels = run.task.spec.channels
    rgb_rows = [rgb_composite(x, channels) for x in (controls, generated, padded)]
    save_image_rows(stem + "_rgb.png", rgb_rows, row_labels=labels, normalize="none",
                    channel_colors=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    atomic_write_bytes(stem + ".npz", _npz_bytes(
        control=rows[0], generated=rows[1], real=impa_task.to_uint8(real),
        expression=expression[0], perturbation=np.array(perturbation), mode=np.array(mode)))
    return {"grid": stem + ".png", "rgb": stem + "_rgb.png", "arrays": stem + ".npz"}
