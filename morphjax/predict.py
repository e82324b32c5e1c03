"""`morphjax sample` and `morphjax embed` for IMPA / GRAPE runs.

sample: control cells -> cells under a named perturbation, written as a PNG grid (rows: control |
generated | real treated) and an .npz of uint8 arrays; optional style-space interpolation
between two perturbations. embed: the perturbation (style) space and GRAPE's learned gene table
as tables with perturbation metadata, ready for pandas/scanpy.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from morphjax import impa_eval
from morphjax.io import atomic_write_bytes
from morphjax.logging import save_image_rows
from morphjax.runs import Run
from morphjax.train import impa as impa_task

META = ("perturbation", "type", "is_control", "moa", "target_gene", "complex", "modality")


def _npz_bytes(**arrays) -> bytes:
    import io  # noqa: PLC0415

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _source_cells(run: Run, n: int, from_controls: bool, seed: int) -> np.ndarray:
    c, spec = run.config, run.task.spec
    test = impa_task.split_cells(spec, c.data.eval_split)
    if from_controls:
        test = test[test["is_control"].astype(bool)]
        if not len(test):
            raise ValueError(f"split {c.data.eval_split!r} has no control cells")
    rng = np.random.default_rng(seed)
    pick = rng.choice(test["split_index"].to_numpy(), size=n, replace=len(test) < n)
    return impa_eval.read_images(run, c.data.eval_split, pick)


def _real_cells(run: Run, perturbation: int, n: int, seed: int) -> np.ndarray:
    c, spec = run.config, run.task.spec
    key = "perturbation_id" if run.task.paired else c.data.domain
    for split in (c.data.eval_split, c.data.train_split):
        rows = impa_task.split_cells(spec, split)
        pool = rows.loc[rows[key] == perturbation, "split_index"].to_numpy()
        if pool.size:
            rng = np.random.default_rng(seed)
            return impa_eval.read_images(run, split, rng.choice(pool, size=min(n, pool.size),
                                                                replace=False))
    return np.zeros((0, *_source_cells(run, 1, False, seed).shape[1:]), np.float32)


def target_id(run: Run, name: str) -> int:
    """Perturbation name (paired modes) or domain id/name (transfer modes) -> condition id."""
    if run.task.paired:
        return impa_eval.perturbation_index(run, name)
    vocab = {"batch_id": "batches", "plate_id": "plates", "cell_line_id": "cell_lines"}
    domain = run.config.data.domain
    if domain == "perturbation_id":
        return impa_eval.perturbation_index(run, name)
    if name.isdigit():
        return int(name)
    from data_builders.raw_screen import read_tables  # noqa: PLC0415

    table = read_tables(run.config.data.path).get(vocab.get(domain, ""))
    if table is None or name not in set(table["name"].astype(str)):
        raise ValueError(f"{name!r} is not a value of {domain}; pass its id or name")
    return int(table.loc[table["name"].astype(str) == name, "id"].iloc[0])


def sample(run: Run, perturbation: str, out_dir: str, *, n: int = 16, from_controls: bool = True,
           interpolate_to: str | None = None, steps: int = 8, seed: int = 0) -> dict[str, str]:
    """Writes the sample grid (and interpolation grid) for one perturbation; returns the paths."""
    p = target_id(run, perturbation)
    sources = _source_cells(run, n, from_controls, seed)
    generated = impa_eval.generate(run, sources, np.full(n, p), seed=seed)
    real = _real_cells(run, p, n, seed)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in perturbation)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"grid": os.path.join(out_dir, f"{safe}.png"),
             "arrays": os.path.join(out_dir, f"{safe}.npz")}
    rows = [impa_task.to_uint8(sources), impa_task.to_uint8(generated)]
    labels = ["control" if from_controls else "input", "generated"]
    if len(real):  # Fewer real cells than samples: the rest of the row stays black.
        padded = np.full_like(rows[0], 0)
        padded[:len(real)] = impa_task.to_uint8(real)
        rows.append(padded)
        labels.append("real")
    save_image_rows(paths["grid"], rows, row_labels=labels)
    atomic_write_bytes(paths["arrays"], _npz_bytes(
        source=rows[0], generated=rows[1], real=impa_task.to_uint8(real),
        perturbation=np.array(perturbation)))
    if interpolate_to:
        q = target_id(run, interpolate_to)
        grid = interpolate(run, sources[: min(4, n)], p, q, steps=steps, seed=seed)
        paths["interpolation"] = os.path.join(
            out_dir, f"{safe}_to_{''.join(ch if ch.isalnum() else '_' for ch in interpolate_to)}.png")
        save_image_rows(paths["interpolation"], [impa_task.to_uint8(r) for r in grid],
                        row_labels=[f"cell {i}" for i in range(len(grid))])
    return paths


def interpolate(run: Run, sources: np.ndarray, a: int, b: int, *, steps: int = 8,
                seed: int = 0) -> np.ndarray:
    """G(x, (1 - t) s_a + t s_b) for t in [0, 1]: (cells, steps, H, W, C), same noise for a, b."""
    state = run.state
    noise = run.task.noise(jax.random.key(seed), 1)
    mapping, generator = state.eval_model("mapping"), state.eval_model("generator")
    style = nnx.jit(lambda m, i, z: m(i, z))
    s_a = style(mapping, jnp.array([a], jnp.int32), noise)
    s_b = style(mapping, jnp.array([b], jnp.int32), noise)
    t = jnp.linspace(0.0, 1.0, steps)[:, None]
    mixed = (1 - t) * s_a + t * s_b
    decode = nnx.jit(lambda g, x, s: g(x, s)[1])
    rows = []
    for x in sources:
        rows.append(np.asarray(decode(generator, jnp.repeat(jnp.asarray(x)[None], steps, 0),
                                      mixed)))
    return np.stack(rows)


def embed(run: Run, out_dir: str, *, n_noise: int = 20, seed: int = 0) -> dict[str, str]:
    """Writes the perturbation style table (mean over noise draws) and, when the run learns one,
    its embedding table (GRAPE genes, IMPA batch embeddings), as Parquet with metadata columns."""
    spec = run.task.spec
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    if run.task.paired:
        ids = np.concatenate([spec.seen, spec.unseen]).astype(np.int32)
        meta = spec.perturbations.iloc[ids][[c for c in META if c in spec.perturbations]]
        meta = meta.rename(columns=lambda c: f"Metadata_{c}").reset_index(drop=True)
        meta.insert(0, "Metadata_perturbation_id", ids)
        meta["Metadata_seen"] = np.isin(ids, spec.seen)
    else:
        ids = np.arange(spec.num_domains, dtype=np.int32)
        meta = pd.DataFrame({"Metadata_domain_id": ids})
        if run.config.data.domain == "perturbation_id":
            meta = pd.concat([meta, spec.perturbations[[c for c in META if c in spec.perturbations]]
                              .rename(columns=lambda c: f"Metadata_{c}").reset_index(drop=True)],
                             axis=1)
    k = n_noise if run.config.model.noise_dim else 1
    style = impa_eval.styles(run, ids, n_noise=k, seed=seed).reshape(len(ids), k, -1).mean(1)
    table = pd.concat([meta, pd.DataFrame(style, columns=[f"style_{i}" for i in
                                                           range(style.shape[1])])], axis=1)
    paths["styles"] = _write_table(table, os.path.join(out_dir, "perturbation_styles"))
    if run.config.model.learned_embedding_dim:
        learned = impa_eval.learned_table(run)[ids]
        table = pd.concat([meta, pd.DataFrame(learned, columns=[f"emb_{i}" for i in
                                                                 range(learned.shape[1])])], axis=1)
        name = "gene_embeddings" if run.config.data.domain == "perturbation_id" else \
            "domain_embeddings"
        paths["learned"] = _write_table(table, os.path.join(out_dir, name))
    return paths


def _write_table(table: pd.DataFrame, stem: str) -> str:
    """Parquet (pycytominer, copairs and scanpy read it), written atomically."""
    path = stem + ".parquet"
    tmp = f"{path}.{os.getpid()}.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path
