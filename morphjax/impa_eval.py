"""Inference and evaluation of IMPA / GRAPE runs (impa.txt, Methods "Evaluation"; grape.txt 4).

* `generate`: control cells + perturbation ids (+ noise) -> predicted cells, jitted, batched.
* `evaluate_run`: per perturbation and averaged, FID / KID / coverage of generated vs real
  treated test cells, next to the "untransformed controls" baseline (controls compared with the
  same real cells), in the classical feature space (and Inception when weights are given); MoA
  accuracy of a classifier with the discriminator's architecture trained on real cells; seen vs
  unseen perturbations and the Tanimoto similarity of unseen compounds to the nearest training
  compound; batch-mixing metrics for batch correction; gene-embedding clustering for GRAPE.
  Writes metrics.json, results.csv and plots.

Feature-space metrics are computed on standardised features (z-scored with the real test cells'
statistics, constant features dropped) projected on their first `pca_dims` principal components,
because per-perturbation sample counts (~200) are smaller than the raw feature count.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from flax import nnx

from morphjax import chem, metrics
from morphjax.io import atomic_write_json
from morphjax.models import impa as impa_models
from morphjax.runs import Run, load_run
from morphjax.train import impa as impa_task


# -- data and generation -------------------------------------------------------------------------

def read_images(run: Run, split: str, indices: np.ndarray) -> np.ndarray:
    """Examples `indices` of `split` as float32 [-1, 1] model-space images (evaluation transform)."""
    source = run.task.source(split)
    d = run.config.data
    return np.stack([impa_task.prepare_image(source[int(i)]["image"], d.image_size, None,
                                             dequantize=d.dequantize, flip_prob=0.0)
                     for i in indices]) if len(indices) else np.zeros(
        (0, d.image_size, d.image_size, len(run.task.spec.channels)), np.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _transfer(task, graphdef, state, images, ids, noise):
    """One compile per (task, model structure, batch shape), shared by every `generate` call."""
    return task.transfer(nnx.merge(graphdef, state), images, ids, noise)


def generate(run: Run, images: np.ndarray, ids: np.ndarray, *, seed: int = 0,
             batch_size: int = 64) -> np.ndarray:
    """G(x_i, f([e_{ids_i} ; z_i])) for every row, in [-1, 1]; fixed-size batches (one compile)."""
    graphdef, state = nnx.split(run.state)
    fn = functools.partial(_transfer, run.task, graphdef, state)
    ids = np.asarray(ids, np.int32)
    out = []
    key = jax.random.key(seed)
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], ids[start:start + batch_size]
        pad = batch_size - len(x)
        x = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
        y = np.concatenate([y, np.repeat(y[-1:], pad, 0)]) if pad else y
        noise = run.task.noise(jax.random.fold_in(key, start), batch_size)
        out.append(np.asarray(fn(jnp.asarray(x), jnp.asarray(y), noise))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros_like(images)


def styles(run: Run, ids: np.ndarray, n_noise: int = 1, seed: int = 0) -> np.ndarray:
    """Style vectors f([e_id ; z]) for each id and `n_noise` noise draws: (len(ids) * n_noise, S)."""
    mapping = run.state.eval_model("mapping")
    ids = np.repeat(np.asarray(ids, np.int32), n_noise)
    noise = run.task.noise(jax.random.key(seed), len(ids))
    return np.asarray(nnx.jit(lambda m, i, z: m(i, z))(mapping, jnp.asarray(ids), noise))


def perturbation_index(run: Run, name: str) -> int:
    table = run.task.spec.perturbations
    match = np.flatnonzero(table["perturbation"].astype(str).to_numpy() == name)
    if not match.size:
        close = [n for n in table["perturbation"].astype(str) if name.lower() in n.lower()][:5]
        raise ValueError(f"perturbation {name!r} is not in the dataset"
                         + (f"; did you mean {close}?" if close else ""))
    return int(match[0])


# -- feature spaces ------------------------------------------------------------------------------

def feature_extractors(run: Run, spaces: Sequence[str], inception_weights: str | None = None):
    """name -> callable(images [-1, 1]) -> (N, F) features."""
    from morphjax.features import get_extractor  # noqa: PLC0415

    channels = run.task.spec.channels
    out = {}
    for space in spaces:
        if space == "classical":
            cell = next((c for c in channels if c.lower() in ("actin", "agp", "er", "tubulin")), None)
            nucleus = next((c for c in channels if c.lower() in ("dna", "dapi", "hoechst")),
                           channels[0])
            out[space] = get_extractor("classical", channel_names=channels,
                                       nucleus_channel=nucleus, cell_channel=cell)
        elif space == "inception":
            out[space] = get_extractor("inception", weights=inception_weights, rgb="first3")
        else:
            raise ValueError(f"unknown feature space {space!r}; use classical or inception")
    return out


def extract(extractor, images: np.ndarray, batch_size: int = 128, quantize: bool = True
            ) -> np.ndarray:
    """Features of [-1, 1] images, by default after 8-bit quantisation (how real crops are
    stored); fixed-size batches so the extractor compiles once."""
    if quantize:
        images = impa_task.to_uint8(images).astype(np.float32) / 127.5 - 1.0
    parts = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        pad = batch_size - len(x)
        x = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
        parts.append(np.asarray(extractor.apply(jnp.asarray(x)))[:batch_size - pad])
    return np.concatenate(parts).astype(np.float64)


def variance_filter(reference: np.ndarray, freq_cut: float = 0.05, unique_cut: float = 0.01
                    ) -> np.ndarray:
    """Features worth keeping, pycytominer's `variance_threshold` rule: drop a feature when its
    second most common value is rarer than `freq_cut` x the most common one, or when it has fewer
    than `unique_cut` x N distinct values. Such near-constant features (e.g. intensities that sit
    at the 8-bit floor in real cells) would otherwise dominate any z-scored distance."""
    keep = np.zeros(reference.shape[1], bool)
    for j in range(reference.shape[1]):
        _, counts = np.unique(reference[:, j], return_counts=True)
        if counts.size < 2 or counts.size < unique_cut * len(reference):
            continue
        top2 = np.sort(counts)[-2:]
        keep[j] = top2[0] >= freq_cut * top2[1]
    return keep


class Projection:
    """Variance-filtered features z-scored with reference statistics, then PCA to `dims`."""

    def __init__(self, reference: np.ndarray, dims: int):
        self.mean = reference.mean(0)
        std = reference.std(0)
        self.keep = variance_filter(reference) & (std > 0)
        self.std = std[self.keep]
        z = (reference[:, self.keep] - self.mean[self.keep]) / self.std
        _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
        self.components = vt[:min(dims, vt.shape[0])].T

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x[:, self.keep] - self.mean[self.keep]) / self.std) @ self.components

    def standardized(self, x: np.ndarray) -> np.ndarray:
        return (x[:, self.keep] - self.mean[self.keep]) / self.std


def distribution_metrics(real: np.ndarray, fake: np.ndarray, k: int, seed: int) -> dict[str, float]:
    n = min(len(real), len(fake))
    kid_mean, _ = metrics.kid(real, fake, subsets=50, subset_size=max(2, n // 2), seed=seed)
    out = {"fid": metrics.fid(real, fake), "kid": kid_mean}
    if n > k + 1:
        out["coverage"] = metrics.prdc(real, fake, k=k)["coverage"]
    return {key: float(v) for key, v in out.items()}


# -- classifiers with the discriminator's architecture -------------------------------------------

def train_image_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *,
                           steps: int, batch_size: int = 32, dim_in: int = 32,
                           max_conv_dim: int = 256, seed: int = 0):
    """Trains a `Discriminator`-architecture classifier (impa.txt: MoA accuracy) on real images.

    Returns the trained model. Adam 1e-4 with IMPA's betas, flips as augmentation.
    """
    model = impa_models.Discriminator(images.shape[1], images.shape[-1], num_classes,
                                      dim_in=dim_in, max_conv_dim=max_conv_dim,
                                      rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-4, b1=0.0, b2=0.99), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model.logits(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(len(images), size=batch_size)
        x = images[idx]
        flip = rng.random(batch_size) < 0.5
        x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        state, _ = step(state, jnp.asarray(x), jnp.asarray(labels[idx], jnp.int32))
    model, _ = nnx.merge(graphdef, state)
    return model


def classify(model, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Class ids from a `train_image_classifier` model; fixed-size batches (one compile)."""
    from morphjax.features import get_extractor  # noqa: PLC0415

    logits = get_extractor("model", apply=model.logits, label="logits")
    return extract(logits, images, batch_size, quantize=False).argmax(-1)


# -- the evaluation ------------------------------------------------------------------------------

def _pick(rng, pool: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(pool, size=n, replace=len(pool) < n)


def evaluate_run(workdir: str, out_dir: str, *, spaces: Sequence[str] = ("classical",),
                 inception_weights: str | None = None, samples_per_perturbation: int | None = None,
                 moa_steps: int | None = None, pca_dims: int = 32, seed: int = 0,
                 data_path: str | None = None) -> dict:
    """Evaluates a trained run on its test split; writes metrics.json, results.csv and plots."""
    run = load_run(workdir, overrides={"data.path": data_path} if data_path else None)
    os.makedirs(out_dir, exist_ok=True)
    if run.config.data.mode in impa_task.PAIRED_MODES:
        result = _evaluate_perturbations(run, out_dir, spaces, inception_weights,
                                         samples_per_perturbation, moa_steps, pca_dims, seed)
    else:
        result = _evaluate_transfer(run, out_dir, spaces, inception_weights,
                                    samples_per_perturbation, pca_dims, seed)
    result["run"] = {"workdir": run.workdir, "step": run.step, "preset": run.config.get("preset"),
                     "mode": run.config.data.mode, "dataset": run.config.data.path}
    atomic_write_json(os.path.join(out_dir, "metrics.json"), result)
    return result


def _evaluate_perturbations(run, out_dir, spaces, inception_weights, per_perturbation,
                            moa_steps, pca_dims, seed) -> dict:
    c, spec = run.config, run.task.spec
    rng = np.random.default_rng(seed)
    per_perturbation = per_perturbation or c.eval.samples_per_perturbation
    test = impa_task.split_cells(spec, c.data.eval_split)
    controls = test.loc[test["is_control"].astype(bool), "split_index"].to_numpy()
    if not controls.size:
        raise ValueError(f"the {c.data.eval_split!r} split has no control cells to transform")
    names = spec.perturbations["perturbation"].astype(str).to_numpy()
    targets = [int(p) for p in np.concatenate([spec.seen, spec.unseen])
               if (test["perturbation_id"] == p).sum() >= 2 * c.eval.knn + 2]
    if not targets:
        raise ValueError("no perturbation has enough test cells to evaluate")

    control_images = read_images(run, c.data.eval_split, controls)
    real, fake, base, owner = [], [], [], []
    for p in targets:
        pool = test.loc[test["perturbation_id"] == p, "split_index"].to_numpy()
        n = min(per_perturbation, pool.size)
        real.append(read_images(run, c.data.eval_split, _pick(rng, pool, n)))
        chosen = _pick(rng, np.arange(len(control_images)), n)
        base.append(control_images[chosen])
        fake.append(generate(run, control_images[chosen], np.full(n, p), seed=seed + p))
        owner.append(np.full(n, p))
    owner = np.concatenate(owner)
    images = {"real": np.concatenate(real), "generated": np.concatenate(fake),
              "controls_baseline": np.concatenate(base)}

    seen = set(spec.seen.tolist())
    extractors = feature_extractors(run, spaces, inception_weights)
    moa = _moa_classifier(run, moa_steps, seed)
    if moa is not None:
        from morphjax.features import get_extractor  # noqa: PLC0415

        extractors["moa_cnn"] = get_extractor(
            "model", apply=moa["model"].features,
            label=f"MoA classifier (discriminator architecture, {moa['steps']} steps) trunk")
    result = {"perturbations": {int(p): {"name": names[p], "seen": p in seen,
                                         "moa": str(spec.perturbations["moa"].iloc[p])}
                                for p in targets},
              "feature_spaces": {}}
    rows = []
    for space, extractor in extractors.items():
        feats = {k: extract(extractor, v) for k, v in images.items()}
        projection = Projection(np.concatenate([feats["real"], feats["controls_baseline"]]),
                                pca_dims)
        proj = {k: projection(v) for k, v in feats.items()}
        space_result = {"per_perturbation": {}, "label": extractor.label}
        for p in targets:
            m = owner == p
            entry = {}
            for kind in ("generated", "controls_baseline"):
                entry[kind] = distribution_metrics(proj["real"][m], proj[kind][m], c.eval.knn,
                                                   seed)
            std = {k: projection.standardized(v[m]).mean(0) for k, v in feats.items()}
            true_shift = std["real"] - std["controls_baseline"]
            pred_shift = std["generated"] - std["controls_baseline"]
            entry["shift_cosine"] = float(true_shift @ pred_shift / (
                np.linalg.norm(true_shift) * np.linalg.norm(pred_shift) + 1e-12))
            # Of the 10 features the perturbation moves most, how many move the same way.
            top = np.argsort(-np.abs(true_shift))[:10]
            entry["top_feature_sign_agreement"] = float(
                np.mean(np.sign(pred_shift[top]) == np.sign(true_shift[top])))
            space_result["per_perturbation"][int(p)] = entry
            for kind in ("generated", "controls_baseline"):
                generated = kind == "generated"
                rows.append({"space": space, "perturbation": names[p], "seen": p in seen,
                             "kind": kind, **entry[kind],
                             "shift_cosine": entry["shift_cosine"] if generated else None,
                             "top_feature_sign_agreement":
                                 entry["top_feature_sign_agreement"] if generated else None})
        space_result["summary"] = _summaries(space_result["per_perturbation"], targets, seen,
                                             c.eval.strong_quantile)
        result["feature_spaces"][space] = space_result
        if space == "classical" and extractor.feature_names:
            _plot_feature_violins(out_dir, feats, owner, targets, names,
                                  list(np.asarray(extractor.feature_names)))

    if moa is not None:
        moa_of = spec.perturbations["moa"].astype(str).to_numpy()
        truth = np.array([moa["classes"].index(moa_of[p]) if moa_of[p] in moa["classes"] else -1
                          for p in owner])
        known = truth >= 0
        result["moa_accuracy"] = {kind: float((classify(moa["model"], v[known]) == truth[known])
                                              .mean()) for kind, v in images.items()}
        result["moa_accuracy"].update(classes=len(moa["classes"]), steps=moa["steps"])
    result["unseen_tanimoto"] = _unseen_tanimoto(spec)
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(out_dir, "results.csv"), index=False)
    _plot_style_space(run, out_dir, seed)
    return result


def _summaries(per: dict, targets: list[int], seen: set, strong_quantile: float) -> dict:
    groups = {"all": targets, "seen": [p for p in targets if p in seen],
              "unseen": [p for p in targets if p not in seen]}
    baseline_fid = np.array([per[p]["controls_baseline"]["fid"] for p in targets])
    cut = np.quantile(baseline_fid, strong_quantile)
    groups["strong"] = [p for p, f in zip(targets, baseline_fid) if f >= cut]
    out = {}
    for group, members in groups.items():
        if not members:
            continue
        out[group] = {"n_perturbations": len(members)}
        for kind in ("generated", "controls_baseline"):
            keys = per[members[0]][kind].keys()
            out[group][kind] = {k: float(np.mean([per[p][kind][k] for p in members])) for k in keys}
        for key in ("shift_cosine", "top_feature_sign_agreement"):
            out[group][key] = float(np.mean([per[p][key] for p in members]))
    return out


def _moa_classifier(run, steps, seed) -> dict | None:
    """MoA classifier with the discriminator's architecture, trained on real treated train cells."""
    c, spec = run.config, run.task.spec
    train = impa_task.split_cells(spec, c.data.train_split)
    train = train[~train["is_control"].astype(bool) & (train["moa"].astype(str) != "")]
    classes = sorted(set(train["moa"].astype(str)))
    if len(classes) < 2:
        return None
    steps = c.eval.moa_classifier_steps if steps is None else steps
    rng = np.random.default_rng(seed)
    idx = _pick(rng, train["split_index"].to_numpy(), min(len(train), 4096))
    x = read_images(run, c.data.train_split, idx)
    lookup = train.set_index("split_index")["moa"].astype(str)
    y = np.array([classes.index(lookup[i]) for i in idx])
    model = train_image_classifier(x, y, len(classes), steps=steps, seed=seed)
    return {"model": model, "classes": classes, "steps": steps}


def _unseen_tanimoto(spec) -> dict:
    table = spec.perturbations
    smiles = table["smiles"].astype(str)
    seen = [p for p in spec.seen if smiles.iloc[p].strip()]
    out = {}
    if not seen:
        return out
    train_fp = chem.morgan_fingerprints(smiles.iloc[seen].tolist(), radius=2, n_bits=1024)
    for p in spec.unseen:
        if smiles.iloc[p].strip():
            fp = chem.morgan_fingerprints([smiles.iloc[p]], radius=2, n_bits=1024)
            out[str(table["perturbation"].iloc[p])] = float(chem.tanimoto(fp, train_fp).max())
    return out


def _evaluate_transfer(run, out_dir, spaces, inception_weights, per_domain, pca_dims, seed) -> dict:
    """Batch correction: every test cell transferred to one reference domain (impa.txt
    "Batch correction"); batch mixing before vs after, and a batch classifier's confusion."""
    c, spec = run.config, run.task.spec
    rng = np.random.default_rng(seed)
    domain = c.data.domain
    test = impa_task.split_cells(spec, c.data.eval_split)
    n = min(len(test), (per_domain or c.eval.samples_per_perturbation) * 8)
    pick = np.sort(rng.choice(len(test), size=n, replace=False))
    rows = test.iloc[pick]
    images = read_images(run, c.data.eval_split, rows["split_index"].to_numpy())
    labels = rows[domain].to_numpy()
    reference = int(np.bincount(labels).argmax())
    corrected = generate(run, images, np.full(n, reference), seed=seed)
    train = impa_task.split_cells(spec, c.data.train_split)
    tidx = _pick(rng, np.arange(len(train)), min(len(train), 4096))
    tx = read_images(run, c.data.train_split, train["split_index"].to_numpy()[tidx])
    model = train_image_classifier(tx, train[domain].to_numpy()[tidx], spec.num_domains,
                                   steps=c.eval.moa_classifier_steps, seed=seed)
    before, after = classify(model, images), classify(model, corrected)
    result = {"reference_domain": reference, "cells": n,
              "batch_classifier": {"accuracy_original": float((before == labels).mean()),
                                   "accuracy_corrected": float((after == labels).mean()),
                                   "fooling_rate": float((after != labels).mean()),
                                   "predicted_reference": float((after == reference).mean())},
              "feature_spaces": {}}
    cell_type = rows["perturbation_id"].to_numpy()
    for space, extractor in feature_extractors(run, spaces, inception_weights).items():
        original, moved = extract(extractor, images), extract(extractor, corrected)
        projection = Projection(original, pca_dims)
        entry = {}
        for kind, f in (("original", projection(original)), ("corrected", projection(moved))):
            clusters = metrics.kmeans(f, k=min(10, len(f) - 1), n_init=10, seed=seed).labels
            entry[kind] = {"silhouette_batch": metrics.silhouette_batch(f, labels, cell_type),
                           "ilisi": float(metrics.ilisi(f, labels,
                                                        perplexity=min(30.0, (len(f) - 1) // 3))),
                           "batch_entropy": metrics.batch_entropy(clusters, labels),
                           "gini": metrics.gini(clusters, labels),
                           "batch_knn_accuracy": metrics.knn_accuracy(f, labels, k=c.eval.knn)}
        result["feature_spaces"][space] = entry
    if c.model.learned_embedding_dim and domain == "perturbation_id":
        result["gene_embeddings"] = gene_embedding_metrics(run, seed=seed)
    return result


# -- GRAPE: the learned gene table ---------------------------------------------------------------

def learned_table(run: Run) -> np.ndarray:
    mapping = run.state.eval_model("mapping")
    return np.asarray(mapping.tables[0][...])


def gene_embedding_metrics(run: Run, seed: int = 0) -> dict:
    """mAP (cosine) and k-means purity/NMI/ARI of gene vectors against complexes (grape.txt 4),
    for the learned table, the screen's true effects when known, and random vectors."""
    spec = run.task.spec
    table = spec.perturbations
    genes = table[(table["complex"].astype(str) != "") & ~table["is_control"].astype(bool)]
    if genes["complex"].nunique() < 2:
        return {}
    ids = genes.index.to_numpy()
    labels = genes["complex"].astype(str).to_numpy()
    candidates = {"learned": learned_table(run)[ids],
                  "random": np.random.default_rng(seed).standard_normal((len(ids), 64))}
    truth = os.path.join(os.path.dirname(os.path.abspath(spec.dataset_dir)), "raw",
                         "ground_truth", "perturbations.csv")
    if os.path.isfile(truth):
        effects = pd.read_csv(truth).set_index("perturbation")
        columns = [col for col in effects.columns if col.startswith("effect_")]
        names = genes["perturbation"].astype(str)
        if names.isin(effects.index).all():
            candidates["true_effects"] = effects.loc[names, columns].to_numpy(np.float64)
    out = {}
    k = len(set(labels))
    meta = pd.DataFrame({"Metadata_complex": labels})
    for name, x in candidates.items():
        ap = metrics.average_precision(x, meta, pos_sameby=["Metadata_complex"], pos_diffby=[],
                                       neg_sameby=[], neg_diffby=["Metadata_complex"])
        clusters = metrics.kmeans(x, k=k, n_init=100, seed=seed).labels
        out[name] = {"mean_ap": float(np.nanmean(ap["average_precision"])),
                     "purity": metrics.purity(labels, clusters), "nmi": metrics.nmi(labels, clusters),
                     "ari": metrics.ari(labels, clusters)}
    return out


# -- plots ---------------------------------------------------------------------------------------

def _plot_style_space(run: Run, out_dir: str, seed: int) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    spec = run.task.spec
    ids = np.concatenate([spec.seen, spec.unseen]).astype(np.int32)
    n_noise = 20 if run.config.model.noise_dim else 1
    s = styles(run, ids, n_noise=n_noise, seed=seed)
    centred = s - s.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    moa = spec.perturbations["moa"].astype(str).to_numpy()[np.repeat(ids, n_noise)]
    unseen = np.isin(np.repeat(ids, n_noise), spec.unseen)
    fig, ax = plt.subplots(figsize=(7, 6))
    colors = plt.get_cmap("tab20")
    for i, label in enumerate(sorted(set(moa))):
        m, color = moa == label, colors(i % 20)
        ax.scatter(xy[m & ~unseen, 0], xy[m & ~unseen, 1], s=8, color=color,
                   label=label or "(none)")
        ax.scatter(xy[m & unseen, 0], xy[m & unseen, 1], s=40, marker="x", color=color)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_title("style space (x: unseen perturbations)")
    ax.legend(fontsize=6, markerscale=2, loc="best")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "style_space_pca.png"), dpi=120)
    plt.close(fig)


def _plot_feature_violins(out_dir, feats, owner, targets, names, feature_names) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    wanted = [f for f in ("Nuclei_AreaShape_Area", "Cells_AreaShape_Area",
                          "Cells_AreaShape_Eccentricity") if f in feature_names]
    wanted += [f for f in feature_names if "Intensity_MeanIntensity" in f and
               f.startswith("Cells_")][:3]
    if not wanted:
        return
    shown = targets[:6]
    fig, axes = plt.subplots(len(wanted), 1, figsize=(max(6, 1.6 * len(shown)), 2.2 * len(wanted)))
    axes = np.atleast_1d(axes)
    for ax, feature in zip(axes, wanted):
        j = feature_names.index(feature)
        data, positions, colors = [], [], []
        for i, p in enumerate(shown):
            m = owner == p
            for k, (kind, color) in enumerate((("controls_baseline", "tab:gray"),
                                               ("generated", "tab:orange"), ("real", "tab:blue"))):
                data.append(feats[kind][m, j])
                positions.append(4 * i + k)
                colors.append(color)
        parts = ax.violinplot(data, positions=positions, showmedians=True)
        for body, color in zip(parts["bodies"], colors):
            body.set_facecolor(color)
        ax.set_xticks([4 * i + 1 for i in range(len(shown))], [names[p] for p in shown],
                      fontsize=7)
        ax.set_ylabel(feature, fontsize=7)
    axes[0].set_title("control (grey) / generated (orange) / real (blue)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "feature_violins.png"), dpi=120)
    plt.close(fig)
