"""Evaluation of MorphDiff runs (morphdiff.txt, Fig. 3/4 and "Evaluation setup").

For every treated perturbation with real held-out cells (seen and unseen / OOD), `evaluate_run`
compares against `n` real cells of that perturbation: from the test split for seen ones, from
every split for unseen ones, which neither stage trained on:

* `g2i`: `n` cells generated from the perturbation's expression vector (DDIM from noise);
* `i2i`: `n` random test-split control cells transformed under that vector (SDEdit);
* `impa` (optional): the same control cells transferred by an IMPA run on the same dataset;
* `controls`: the same control cells untransformed (the "predict no change" baseline);
* `reconstructed`: the real cells through the frozen autoencoder (encode, decode): the ceiling
  set by the first stage, since every generated cell is a decoded latent.
* `controls_reconstructed`: the control cells through the autoencoder, "no change" as the
  decoder renders it. A model that beats it but not `controls` has learned the perturbation
  and is held back by its first stage; its `shift_cosine` is the part of any generated shift
  that the decoder alone explains.

Per feature space (classical always; `cpcnn` with a Cell Painting CNN run; `inception` when
its weights exist, on RGB composites with morphdiff.txt's channel weights, plus the Inception
Score of every kind) on standardised, PCA-projected features (`impa_eval.Projection`): FID, KID,
RBF MMD (CMMD-style, one bandwidth per space: the median pairwise distance of the reference
cells), density and coverage (k = `eval.knn`). In the standardised space: `shift_cosine`, the
cosine between (mean generated - mean control) and (mean real - mean control), and the fraction
of the 10 features the perturbation moves most whose sign the generation gets right.

Summaries over {all, seen, unseen} x {all, strong}: strong = controls-vs-real FID at or above
the `eval.strong_quantile` of its group. Retrieval (Fig. 4e/f): per-perturbation mean classical
profiles, z-scored on the control cells, of generated cells as queries against the real profiles
of the other perturbations (cosine similarity of means; the paper uses a Wasserstein distance
between DeepProfiler embeddings). A hit shares the label: `moa` when annotated, else `complex`
(genetic perturbations), else the first `target_gene` (compounds) -- the synthetic screens
annotate few MoAs. Top-k accuracy (a hit among the k nearest), interpolated mAP and folds of
enrichment at the top 10% (metrics/retrieval.py), for real-as-query and the random expectation.

Conditioning gain (`conditioning_gain`): the denoising loss of the same real cells' latents under
a control's expression context minus under their own, with the same noise. It says whether the
U-Net uses the expression vector at all, which no image metric separates from decoder effects.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from morphjax import diffusion, impa_eval, metrics
from morphjax import morphdiff_sample as mds
from morphjax.io import atomic_write_json
from morphjax.runs import Run, load_run

SPACES = ("classical", "cpcnn", "inception")
GROUPS = ("all", "seen", "unseen")
TOP_FEATURES = 10
RETRIEVAL_KS = (1, 5)


# -- pure pieces ---------------------------------------------------------------------------------

def shift_cosine(generated: np.ndarray, real: np.ndarray, control: np.ndarray) -> float:
    """cos(mean(generated) - mean(control), mean(real) - mean(control)) of (N, F) features."""
    pred = generated.mean(0) - control.mean(0)
    true = real.mean(0) - control.mean(0)
    return float(pred @ true / (np.linalg.norm(pred) * np.linalg.norm(true) + 1e-12))


def sign_agreement(generated: np.ndarray, real: np.ndarray, control: np.ndarray,
                   top: int = TOP_FEATURES) -> float:
    """Of the `top` features with the largest |mean(real) - mean(control)|, the fraction whose
    generated shift has the same sign."""
    pred = generated.mean(0) - control.mean(0)
    true = real.mean(0) - control.mean(0)
    order = np.argsort(-np.abs(true), kind="stable")[:top]
    return float(np.mean(np.sign(pred[order]) == np.sign(true[order])))


def retrieval_labels(perturbations: pd.DataFrame) -> np.ndarray:
    """One retrieval label per perturbation: `moa`, else `complex`, else the first `target_gene`
    ('' when none). A `|`-separated moa keeps all its MoAs (a hit shares any, as the paper)."""
    out = []
    for _, row in perturbations.iterrows():
        moa = str(row.get("moa", "") or "").strip()
        complex_ = str(row.get("complex", "") or "").strip()
        targets = [t for t in str(row.get("target_gene", "") or "").split("|") if t.strip()]
        out.append(moa or complex_ or (targets[0].strip() if targets else ""))
    return np.array(out, dtype=object)


def _hits(labels: Sequence[str]) -> np.ndarray:
    """(N, N) bool: i and j share a `|`-separated label token (diagonal included)."""
    tokens = [set(t for t in str(lab).split("|") if t) for lab in labels]
    return np.array([[bool(a & b) for b in tokens] for a in tokens])


def cosine_matrix(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    q = queries / (np.linalg.norm(queries, axis=1, keepdims=True) + 1e-12)
    r = references / (np.linalg.norm(references, axis=1, keepdims=True) + 1e-12)
    return q @ r.T


def topk_accuracy(similarity: np.ndarray, hits: np.ndarray, k: int) -> float:
    """Fraction of queries (rows with a hit off the diagonal) with a hit among the k most
    similar other references (self excluded; ties broken by lower index)."""
    n = len(similarity)
    off = ~np.eye(n, dtype=bool)
    queries = (hits & off).any(1)
    correct = []
    for i in np.flatnonzero(queries):
        others = np.flatnonzero(off[i])
        order = others[np.argsort(-similarity[i, others], kind="stable")[:k]]
        correct.append(hits[i, order].any())
    return float(np.mean(correct))


def random_topk_accuracy(hits: np.ndarray, k: int) -> float:
    """Expected top-k accuracy of a random ranking: 1 - C(N-1-m, k) / C(N-1, k) per query."""
    from math import comb  # noqa: PLC0415

    n = len(hits)
    m = (hits & ~np.eye(n, dtype=bool)).sum(1)
    m = m[m > 0]
    return float(np.mean([1.0 - comb(n - 1 - mi, k) / comb(n - 1, k) for mi in m]))


def retrieval_scores(queries: np.ndarray, references: np.ndarray, labels: Sequence[str], *,
                     ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """Query profile i ranks the reference profiles j != i (row i of both = perturbation i)."""
    similarity = cosine_matrix(queries, references)
    hits = _hits(labels)
    out = {f"top{k}": topk_accuracy(similarity, hits, k) for k in ks}
    out["map"] = metrics.interpolated_map(similarity, list(labels))
    out["folds_of_enrichment_top10"] = metrics.folds_of_enrichment(similarity, list(labels),
                                                                   top=0.1)
    out["queries"] = int((hits & ~np.eye(len(hits), dtype=bool)).any(1).sum())
    return out


def random_retrieval(labels: Sequence[str], *, ks: Sequence[int] = RETRIEVAL_KS,
                     draws: int = 20, seed: int = 0) -> dict[str, float]:
    """Random expectation: exact for top-k, mean over `draws` random similarities for mAP."""
    hits = _hits(labels)
    rng = np.random.default_rng(seed)
    out = {f"top{k}": random_topk_accuracy(hits, k) for k in ks}
    out["map"] = float(np.mean([metrics.interpolated_map(rng.random((len(hits), len(hits))),
                                                         list(labels)) for _ in range(draws)]))
    return out


def summarize(per: dict, seen: set, strong_quantile: float) -> dict:
    """Means over {all, seen, unseen} x {all, strong} of every metric of `per`.

    `per[p]["metrics"][kind][metric]` and `per[p][key][kind]` for key in (shift_cosine,
    sign_agreement); strong: `per[p]["metrics"]["controls"]["fid"]` at or above the
    `strong_quantile` of the group.
    """
    out = {}
    for group in GROUPS:
        members = [p for p in per if group == "all" or (p in seen) == (group == "seen")]
        if not members:
            continue
        fid = np.array([per[p]["metrics"]["controls"]["fid"] for p in members])
        cut = np.quantile(fid, strong_quantile)
        for subset, chosen in (("all", members),
                               ("strong", [p for p, f in zip(members, fid) if f >= cut])):
            entry = {"n_perturbations": len(chosen), "perturbations": [int(p) for p in chosen]}
            kinds = per[chosen[0]]["metrics"]
            for kind in kinds:
                have = [p for p in chosen if kind in per[p]["metrics"]]
                names = per[have[0]]["metrics"][kind]
                entry[kind] = {m: float(np.mean([per[p]["metrics"][kind][m] for p in have
                                                 if m in per[p]["metrics"][kind]]))
                               for m in names}
                for key in ("shift_cosine", "sign_agreement"):
                    if kind in per[have[0]].get(key, {}):
                        entry[kind][key] = float(np.mean([per[p][key][kind] for p in have]))
            out[f"{group}/{subset}"] = entry
    return out


# -- feature spaces ------------------------------------------------------------------------------

def cpcnn_extractor(cpcnn_run: str, channels: Sequence[str]):
    """A trained Cell Painting CNN's pooled features of [-1, 1] images in `channels` order,
    prepared as its training crops (its channels by name, resized, min-max per channel)."""
    import jax  # noqa: PLC0415

    from morphjax.embed import cnn_feature_fn  # noqa: PLC0415
    from morphjax.features import get_extractor  # noqa: PLC0415
    from morphjax.train.cpcnn import MODEL  # noqa: PLC0415

    run = load_run(cpcnn_run)
    if run.config.task != "cpcnn":
        raise ValueError(f"cpcnn_run {cpcnn_run} is a {run.config.task!r} run, not a Cell "
                         "Painting CNN (configs/cpcnn.py)")
    wanted = tuple(run.task.cellset.channel_names)
    missing = [c for c in wanted if c not in channels]
    if missing:
        raise ValueError(f"cpcnn_run {cpcnn_run} needs channels {missing} that the generated "
                         f"cells ({tuple(channels)}) lack")
    index = np.array([list(channels).index(c) for c in wanted])
    size, layer = run.config.data.image_size, run.config.model.feature_layer
    fn, params = cnn_feature_fn(run.state.models[MODEL].backbone, layer)

    def apply(images):
        x = (images[..., index] + 1.0) / 2.0
        if x.shape[1] != size:
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "linear")
        low = x.min(axis=(1, 2), keepdims=True)
        high = x.max(axis=(1, 2), keepdims=True)
        return fn(params, (x - low) / (high - low + 1e-7))

    return get_extractor("model", apply=apply, label=f"cpcnn/{layer} ({cpcnn_run})")


def _extractors(run: Run, spaces, cpcnn_run, inception_weights) -> tuple[dict, dict, object]:
    """Feature extractors by space, skipped spaces with why, the Inception logits (IS) or None."""
    spaces = list(dict.fromkeys(["classical", *spaces]))
    if cpcnn_run and "cpcnn" not in spaces:
        spaces.append("cpcnn")
    if inception_weights and "inception" not in spaces:
        spaces.append("inception")
    unknown = [s for s in spaces if s not in SPACES]
    if unknown:
        raise ValueError(f"spaces {unknown} are not among {SPACES}")
    out, skipped, logits = {}, {}, None
    for space in spaces:
        if space == "classical":
            out.update(impa_eval.feature_extractors(run, ["classical"]))
        elif space == "cpcnn":
            if not cpcnn_run:
                raise ValueError("spaces has 'cpcnn' but no cpcnn_run (a Cell Painting CNN "
                                 "workdir) was given")
            out[space] = cpcnn_extractor(cpcnn_run, run.task.spec.channels)
        else:
            try:
                out[space], logits = inception_extractors(inception_weights,
                                                          run.task.spec.channels)
            except FileNotFoundError as error:
                skipped[space] = str(error).split(".")[0]
    return out, skipped, logits


def inception_extractors(weights: str | None, channels: Sequence[str], model=None):
    """Inception-v3 (FID weights) on RGB composites with morphdiff.txt's channel weights
    ("Evaluation setup"): (pool3 features for FID/KID/..., logits for the IS)."""
    from morphjax.features import convert, get_extractor, registry  # noqa: PLC0415

    if model is None:
        model = convert.load_inception(registry.find_inception_weights(weights))
    kw = dict(model=model, rgb="weights", channel_names=tuple(channels))
    return get_extractor("inception", **kw), get_extractor("inception", output="logits", **kw)


def inception_scores(extractor, images: dict[str, np.ndarray], splits: int = 10) -> dict:
    """Inception Score (mean, std over `splits`) of every kind's cells, all perturbations pooled
    (morphdiff.txt "Evaluation": higher is better)."""
    out = {}
    for kind, x in images.items():
        x = x[np.isfinite(x).all(axis=(1, 2, 3))]
        if len(x) < 2:
            continue
        mean, std = metrics.inception_score(impa_eval.extract(extractor, x),
                                            splits=min(splits, len(x)))
        out[kind] = {"mean": float(mean), "std": float(std)}
    return out


def _median_distance(x: np.ndarray, n: int = 1000, seed: int = 0) -> float:
    x = x[np.random.default_rng(seed).permutation(len(x))[:n]]
    d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 0))
    return float(np.median(d[np.triu_indices(len(x), 1)]))


def pair_metrics(real: np.ndarray, fake: np.ndarray, k: int, sigma: float,
                 seed: int) -> dict[str, float]:
    """FID / KID / coverage (impa_eval.distribution_metrics), RBF MMD^2 and density."""
    out = impa_eval.distribution_metrics(real, fake, k, seed)
    out["mmd"] = float(metrics.mmd_rbf(real, fake, sigma))
    if min(len(real), len(fake)) > k + 1:
        out["density"] = float(metrics.prdc(real, fake, k=k)["density"])
    return out


# -- generation ----------------------------------------------------------------------------------

def _impa_cells(impa_workdir: str, run: Run, names: list[str], owner: np.ndarray,
                controls: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """IMPA transfers of `controls` (row i to perturbation names[owner[i]]) where IMPA knows the
    perturbation; returns (images, known mask over rows)."""
    impa = load_run(impa_workdir)
    ispec = impa.task.spec
    if tuple(ispec.channels) != tuple(run.task.spec.channels) or (
            impa.config.data.image_size != run.config.data.image_size):
        raise ValueError(f"impa_workdir {impa_workdir} sees {tuple(ispec.channels)} at "
                         f"{impa.config.data.image_size} px; the MorphDiff run "
                         f"{tuple(run.task.spec.channels)} at {run.config.data.image_size} px")
    table = ispec.perturbations["perturbation"].astype(str).tolist()
    usable = set(np.concatenate([ispec.seen, ispec.unseen]).tolist())
    ids = np.array([table.index(names[p]) if names[p] in table and table.index(names[p]) in
                    usable else -1 for p in owner])
    known = ids >= 0
    out = np.full_like(controls, np.nan)
    if known.any():
        out[known] = impa_eval.generate(impa, controls[known], ids[known], seed=seed)
    return out, known


# -- does the LDM use its condition? -------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1))
def _paired_losses(task, graphdef, state, moments, expression, baseline, rng):
    """Per-example denoising losses of the same noised latents (same t, same noise) under the
    cells' own expression context and under `baseline` contexts: (B, 2)."""
    ldm = nnx.merge(graphdef, state).eval_model("ldm")
    z = jnp.split(moments, 2, axis=-1)[0] * ldm.scale_factor.get_value()  # Posterior means.
    loss = task.config.loss

    def per_example(e):
        _, aux = diffusion.diffusion_loss(ldm.denoise, task.schedule, z, task.context(ldm, e),
                                          rng, parameterization=loss.parameterization,
                                          loss_type=loss.loss_type)
        return aux["loss_per_example"]

    return jnp.stack([per_example(expression), per_example(baseline)], axis=-1)


def conditioning_gain(run: Run, cells: pd.DataFrame, *, repeats: int = 4, seed: int = 0,
                      batch_size: int = 64) -> pd.DataFrame:
    """How much the trained U-Net's denoising relies on the expression vector.

    For each row of `cells` (cells.csv rows: split, split_index, perturbation_id), the cached
    latent is noised `repeats` times (t uniform, as in training) and denoised twice with the same
    noise: with its perturbation's context and with a random control's. `gain` = loss under the
    control context - loss under its own. A U-Net that ignores the condition has gain 0 exactly;
    a positive gain means the expression vector tells it about the cell, which is what G2I and
    I2I need. Returns one row per cell and repeat: cell (row of `cells`), perturbation_id,
    repeat, loss, loss_control_context, gain.
    """
    mds.check_run(run)
    task, spec = run.task, run.task.spec
    controls = np.flatnonzero(spec.is_control)
    if not controls.size:
        raise ValueError(f"{spec.dataset_dir} has no control perturbation to compare with")
    moments, ids = [], []
    for split, group in cells.groupby("split", sort=True):
        cache = task.latent_cache(split)
        for i in group["split_index"].to_numpy():
            item = cache[int(i)]
            moments.append(item["moments"])
            ids.append(int(item["perturbation_id"]))
    moments, ids = np.stack(moments).astype(np.float32), np.asarray(ids)
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(run.state)
    fn = functools.partial(_paired_losses, task, graphdef, state)
    rows = []
    for r in range(repeats):
        baseline = rng.choice(controls, len(ids))
        losses = mds.map_batches(fn, [moments, spec.expression[ids], spec.expression[baseline]],
                                 batch_size, seed * 1000 + r)
        rows.append(pd.DataFrame({"cell": np.arange(len(ids)), "perturbation_id": ids,
                                  "repeat": r, "loss": losses[:, 0],
                                  "loss_control_context": losses[:, 1]}))
    out = pd.concat(rows, ignore_index=True)
    out["gain"] = out["loss_control_context"] - out["loss"]
    return out


def summarize_gain(gains: pd.DataFrame, groups: dict[str, Sequence[int]]) -> dict:
    """Mean gain, its standard error over cells and the gain relative to the control-context
    loss, per group of perturbation ids."""
    out = {}
    for name, members in groups.items():
        g = gains[gains["perturbation_id"].isin(list(members))]
        if not len(g):
            continue
        per_cell = g.groupby("cell")["gain"].mean()
        out[name] = {"n_perturbations": int(g["perturbation_id"].nunique()),
                     "cells": int(len(per_cell)), "gain": float(g["gain"].mean()),
                     "gain_se": float(per_cell.std(ddof=1) / np.sqrt(len(per_cell)))
                     if len(per_cell) > 1 else float("nan"),
                     "relative_gain": float(g["gain"].mean() / g["loss_control_context"].mean())}
    return out


def held_out_cells(spec, eval_split: str) -> pd.DataFrame:
    """cells.csv rows no stage trained on: `eval_split` (controls and seen perturbations), and
    every split of the unseen perturbations, which both stages left out."""
    cells = spec.cells
    return cells[(cells["split"] == eval_split) | np.isin(cells["perturbation_id"], spec.unseen)]


# -- the evaluation ------------------------------------------------------------------------------

def evaluate_run(workdir: str, out_dir: str, *, spaces: Sequence[str] = ("classical",),
                 cpcnn_run: str | None = None, inception_weights: str | None = None,
                 samples_per_perturbation: int | None = None,
                 modes: Sequence[str] = ("g2i", "i2i"), seed: int = 0,
                 impa_workdir: str | None = None, pca_dims: int = 32,
                 max_seen: int | None = None, guidance_scale: float | None = None) -> dict:
    """Evaluates a MorphDiff diffusion run on its test split; writes metrics.json, results.csv.

    Every unseen perturbation is evaluated; `max_seen` caps the seen ones (a random subset drawn
    with `seed`), since G2I/I2I sampling is the cost of an evaluation on a CPU.
    `guidance_scale` (default the run's `sample.guidance_scale`) samples with classifier-free
    guidance; MorphDiff samples without (scale 1).
    """
    bad = [m for m in modes if m not in mds.MODES]
    if bad or not modes:
        raise ValueError(f"modes {list(modes)} must be a non-empty subset of {mds.MODES}")
    run = mds.load(workdir, guidance_scale)
    c, spec = run.config, run.task.spec
    n_max = int(samples_per_perturbation or c.eval.samples_per_perturbation)
    names = spec.perturbations["perturbation"].astype(str).tolist()
    seen = set(int(p) for p in spec.seen)
    pool = held_out_cells(spec, c.data.eval_split)
    counts = np.bincount(pool["perturbation_id"], minlength=len(names))
    targets = [int(p) for p in np.concatenate([spec.seen, spec.unseen]) if counts[p] >= 2]
    if not targets:
        raise ValueError(f"no treated perturbation has >= 2 cells in split {c.data.eval_split!r}")
    rng = np.random.default_rng(seed)
    if max_seen is not None:
        seen_targets = [p for p in targets if p in seen]
        keep = set(rng.choice(seen_targets, min(max_seen, len(seen_targets)), replace=False)
                   .tolist()) if seen_targets else set()
        targets = [p for p in targets if p not in seen or p in keep]

    # Real cells, control cells, generated cells: one flat array each.
    real, owner, picked = [], [], []
    for p in targets:
        mine = pool[pool["perturbation_id"] == p]
        pick = mine.iloc[np.sort(rng.choice(len(mine), min(n_max, len(mine)), replace=False))]
        real.append(np.concatenate([mds.read_cells(run, split, group["split_index"].to_numpy())
                                    for split, group in pick.groupby("split", sort=True)]))
        owner.append(np.full(len(pick), p))
        picked.append(pick)
    owner = np.concatenate(owner)
    print(f"conditioning gain: {len(owner)} real cells' latents")
    gains = conditioning_gain(run, pd.concat(picked), seed=seed)
    images = {"real": np.concatenate(real)}
    del real
    images["controls"] = mds.control_cells(run, len(owner), seed)
    expression = spec.expression[owner]
    if "g2i" in modes:
        print(f"G2I: {len(owner)} cells for {len(targets)} perturbations")
        images["g2i"] = mds.generate_g2i(run, expression, seed=seed)
    if "i2i" in modes:
        print(f"I2I: {len(owner)} cells for {len(targets)} perturbations")
        images["i2i"] = mds.generate_i2i(run, images["controls"], expression, seed=seed + 1)
    print(f"autoencoder round trip: {len(owner)} real cells")
    images["reconstructed"] = mds.reconstruct(run, images["real"], seed=seed + 2)
    images["controls_reconstructed"] = mds.reconstruct(run, images["controls"], seed=seed + 3)
    impa_known = None
    if impa_workdir:
        images["impa"], impa_known = _impa_cells(impa_workdir, run, names, owner,
                                                 images["controls"], seed)
    kinds = [k for k in ("g2i", "i2i", "impa", "reconstructed", "controls_reconstructed",
                         "controls") if k in images]

    extractors, skipped, inception_logits = _extractors(run, spaces, cpcnn_run,
                                                        inception_weights)
    labels = retrieval_labels(spec.perturbations)
    result = {"perturbations": {p: {"name": names[p], "seen": p in seen,
                                    "label": str(labels[p]), "real_cells": int((owner == p).sum())}
                                for p in targets},
              "kinds": kinds, "skipped_spaces": skipped, "feature_spaces": {}}
    rows = []
    for space, extractor in extractors.items():
        print(f"features: {space} ({extractor.label})")
        feats = {}
        for kind, x in images.items():
            rows_ok = impa_known if kind == "impa" else np.ones(len(owner), bool)
            f = impa_eval.extract(extractor, x[rows_ok])
            full = np.full((len(owner), f.shape[1]), np.nan)
            full[rows_ok] = f
            feats[kind] = full
        projection = impa_eval.Projection(np.concatenate([feats["real"], feats["controls"]]),
                                          pca_dims)
        proj = {k: projection(v) for k, v in feats.items()}
        std = {k: projection.standardized(v) for k, v in feats.items()}
        sigma = _median_distance(np.concatenate([proj["real"], proj["controls"]]), seed=seed)
        per = {}
        for p in targets:
            m = owner == p
            entry = {"metrics": {}, "shift_cosine": {}, "sign_agreement": {}}
            for kind in kinds:
                mk = m & np.isfinite(proj[kind]).all(1)
                if mk.sum() < 2:
                    continue
                entry["metrics"][kind] = pair_metrics(proj["real"][m], proj[kind][mk],
                                                      c.eval.knn, sigma, seed)
                if kind != "controls":
                    entry["shift_cosine"][kind] = shift_cosine(std[kind][mk], std["real"][m],
                                                               std["controls"])
                    entry["sign_agreement"][kind] = sign_agreement(
                        std[kind][mk], std["real"][m], std["controls"])
                rows.append({"space": space, "perturbation": names[p], "seen": p in seen,
                             "kind": kind, **entry["metrics"][kind],
                             "shift_cosine": entry["shift_cosine"].get(kind),
                             "sign_agreement": entry["sign_agreement"].get(kind)})
            per[p] = entry
        space_result = {"label": extractor.label, "mmd_sigma": sigma, "per_perturbation": per,
                        "summary": summarize(per, seen, c.eval.strong_quantile)}
        if space == "classical":
            result["retrieval"] = profile_retrieval(feats, owner, targets, labels, kinds,
                                                    projection.keep, seed)
        result["feature_spaces"][space] = space_result
    if inception_logits is not None:
        result["inception_score"] = inception_scores(inception_logits, images)

    groups = {"all": targets, "seen": [p for p in targets if p in seen],
              "unseen": [p for p in targets if p not in seen]}
    result["conditioning_gain"] = {
        "summary": summarize_gain(gains, groups),
        "per_perturbation": {names[p]: float(g["gain"].mean())
                             for p, g in gains.groupby("perturbation_id")}}
    result["run"] = {"workdir": run.workdir, "step": run.step, "preset": c.get("preset"),
                     "dataset": c.data.path, "samples_per_perturbation": n_max,
                     "modes": list(modes), "guidance_scale": c.sample.guidance_scale,
                     "impa_workdir": impa_workdir,
                     "cpcnn_run": cpcnn_run}
    os.makedirs(out_dir, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(out_dir, "results.csv"), index=False)
    atomic_write_json(os.path.join(out_dir, "metrics.json"), _jsonable(result))
    return result


# Each query kind's profiles are z-scored on the controls as that kind's pipeline renders them:
# decoded cells carry the decoder's common bias, which would otherwise swamp every profile.
RETRIEVAL_CONTROLS = {"g2i": "controls_reconstructed", "i2i": "controls_reconstructed",
                      "reconstructed": "controls_reconstructed"}


def profile_retrieval(feats: dict[str, np.ndarray], owner: np.ndarray, targets: Sequence[int],
                      labels: np.ndarray, kinds: Sequence[str], keep: np.ndarray,
                      seed: int = 0) -> dict:
    """MoA retrieval of mean profiles (morphdiff.txt Fig. 4): generated queries, real references.

    A profile is the mean of a perturbation's cells z-scored on control cells; real references on
    the real controls, decoded queries (G2I, I2I, round trip) on the decoder's rendering of the
    controls when it was computed (RETRIEVAL_CONTROLS), as a screen normalises each plate to its
    own controls.
    """
    labelled = [p for p in targets if labels[p]]
    queries = [k for k in kinds if k not in ("controls", "controls_reconstructed")]

    def controls_of(kind):
        name = RETRIEVAL_CONTROLS.get(kind)
        return feats[name if name in feats else "controls"][:, keep]

    ok = np.all([controls_of(k).std(0) > 0 for k in ["real", *queries]], axis=0)

    def profiles(kind):
        ctrl = controls_of(kind)[:, ok]
        z = (feats[kind][:, keep][:, ok] - ctrl.mean(0)) / ctrl.std(0)
        return np.stack([np.nanmean(z[owner == p], axis=0) for p in labelled])

    lab = [str(labels[p]) for p in labelled]
    hits = _hits(lab)
    if len(lab) < 3 or not (hits & ~np.eye(len(lab), dtype=bool)).any():
        return {"skipped": "fewer than 2 perturbations share a retrieval label"}
    reference = profiles("real")
    out = {"perturbations": len(lab), "labels": len(set(lab)), "real": retrieval_scores(
        reference, reference, lab), "random": random_retrieval(lab, seed=seed)}
    for kind in queries:
        q = profiles(kind)
        if np.isfinite(q).all():
            out[kind] = retrieval_scores(q, reference, lab)
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return x


# -- tables --------------------------------------------------------------------------------------

TABLE_METRICS = ("fid", "kid", "mmd", "density", "coverage", "shift_cosine", "sign_agreement")
KIND_TITLES = {"g2i": "G2I", "i2i": "I2I", "impa": "IMPA", "reconstructed": "AE round trip",
               "controls_reconstructed": "controls via AE", "controls": "controls"}


def summary_table(result: dict, space: str = "classical") -> str:
    """Markdown: one row per (group, metric), one column per kind (G2I | I2I | IMPA | AE round
    trip | controls via AE | controls)."""
    summary = result["feature_spaces"][space]["summary"]
    kinds = result["kinds"]
    lines = ["| group | metric | " + " | ".join(KIND_TITLES[k] for k in kinds) + " |",
             "|---|---|" + "---:|" * len(kinds)]
    for group, entry in summary.items():
        label = f"{group} ({entry['n_perturbations']})"
        for metric in TABLE_METRICS:
            cells = [entry.get(k, {}).get(metric) for k in kinds]
            if all(v is None for v in cells):
                continue
            text = ["" if v is None else f"{v:.4g}" for v in cells]
            lines.append(f"| {label} | {metric} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def perturbation_table(result: dict, space: str = "classical", metric: str = "fid") -> str:
    """Markdown: `metric` per perturbation and kind; unseen first, then by the controls' distance
    (strongest first), so a group mean can be traced to the perturbations behind it."""
    per = result["feature_spaces"][space]["per_perturbation"]
    info = result["perturbations"]
    kinds = result["kinds"]
    order = sorted(per, key=lambda p: (info[p]["seen"],
                                       -per[p]["metrics"]["controls"][metric]))
    lines = ["| perturbation | seen | " + " | ".join(KIND_TITLES[k] for k in kinds) + " |",
             "|---|---|" + "---:|" * len(kinds)]
    for p in order:
        cells = [per[p]["metrics"].get(k, {}).get(metric) for k in kinds]
        lines.append(f"| {info[p]['name']} | {'yes' if info[p]['seen'] else 'no'} | "
                     + " | ".join("" if v is None else f"{v:.4g}" for v in cells) + " |")
    return "\n".join(lines)


def gain_table(result: dict) -> str:
    """Markdown: the conditioning gain per group (see `conditioning_gain`)."""
    lines = ["| group | perturbations | cells | loss gain from the expression context | "
             "standard error | relative to the control-context loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for group, g in result["conditioning_gain"]["summary"].items():
        lines.append(f"| {group} | {g['n_perturbations']} | {g['cells']} | {g['gain']:.3g} | "
                     f"{g['gain_se']:.2g} | {100 * g['relative_gain']:.2f}% |")
    return "\n".join(lines)


def retrieval_table(result: dict) -> str:
    """Markdown: retrieval of real profiles by generated / real queries, and chance."""
    r = result.get("retrieval", {})
    if "skipped" in r or not r:
        return f"retrieval skipped: {r.get('skipped', 'no classical space')}"
    kinds = [k for k in ("g2i", "i2i", "impa", "reconstructed", "real", "random") if k in r]
    metrics_ = ("top1", "top5", "map", "folds_of_enrichment_top10")
    lines = ["| query | " + " | ".join(metrics_) + " |", "|---|" + "---:|" * len(metrics_)]
    for kind in kinds:
        cells = [r[kind].get(m) for m in metrics_]
        lines.append(f"| {KIND_TITLES.get(kind, kind)} | "
                     + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines)
