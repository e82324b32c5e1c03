"""Does the synthetic screen carry real but non-trivial signal? Classical statistics, no deep model.

For each preset: build (or reuse) the screen, compute per-crop statistics (per-channel intensity
quantiles, foreground area, texture, centre/periphery ratio), then print
  * control-vs-treated separability per MoA (or complex): cross-validated AUC of a shrunk LDA,
  * same-MoA vs different-MoA similarity of control-normalised perturbation profiles (cosine),
  * plate predictability among controls (nearest-centroid accuracy vs chance): batch effects,
and write a PNG grid of example crops per perturbation.

  python experiments/synthetic_screen_report.py --scale tiny --workdir /tmp/screens
  python experiments/synthetic_screen_report.py --preset cellpainting_like --scale small --workdir /tmp/screens
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd
from scipy import ndimage, stats

from data_builders.raw_screen import build_raw_screen, open_split, read_tables
from data_builders.synthetic_screen import PRESETS, simulate_screen
from morphjax.logging import save_image_rows


def crop_statistics(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 crops -> (N, F) classical per-crop statistics."""
    x = images.astype(np.float32) / 255.0
    n, h, w, c = x.shape
    flat = x.reshape(n, h * w, c)
    quantiles = np.quantile(flat, (0.1, 0.5, 0.9, 0.99), axis=1).transpose(1, 0, 2).reshape(n, -1)
    mean, std = flat.mean(1), flat.std(1)
    threshold = flat.mean(1, keepdims=True) + flat.std(1, keepdims=True)
    area = (flat > threshold).mean(1)
    laplace = np.stack([ndimage.laplace(x[..., k], mode="nearest") for k in range(c)], -1)
    texture = (laplace.reshape(n, h * w, c) ** 2).mean(1)
    yy, xx = np.mgrid[:h, :w]
    centre = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 6) ** 2
    centre_ratio = x[:, centre].mean(1) / (x[:, ~centre].mean(1) + 1e-3)
    return np.concatenate([mean, std, quantiles, area, np.log(texture + 1e-6), centre_ratio], 1)


def auc(scores_neg: np.ndarray, scores_pos: np.ndarray) -> float:
    """Mann-Whitney AUC: P(score of a positive > score of a negative)."""
    u = stats.mannwhitneyu(scores_pos, scores_neg, alternative="two-sided").statistic
    return float(u / (len(scores_pos) * len(scores_neg)))


def lda_auc(neg: np.ndarray, pos: np.ndarray, seed: int, folds: int = 2) -> float:
    """Cross-validated AUC of a shrunk linear discriminant (pooled covariance + 10 % identity)."""
    rng = np.random.default_rng(seed)
    fold_neg, fold_pos = rng.integers(0, folds, len(neg)), rng.integers(0, folds, len(pos))
    scores_neg, scores_pos = np.empty(len(neg)), np.empty(len(pos))
    for f in range(folds):
        a, b = neg[fold_neg != f], pos[fold_pos != f]
        if len(a) < 2 or len(b) < 2:
            return float("nan")
        cov = np.cov(np.concatenate([a - a.mean(0), b - b.mean(0)]).T)
        cov += 0.1 * np.trace(cov) / len(cov) * np.eye(len(cov))
        direction = np.linalg.solve(cov, b.mean(0) - a.mean(0))
        scores_neg[fold_neg == f] = neg[fold_neg == f] @ direction
        scores_pos[fold_pos == f] = pos[fold_pos == f] @ direction
    return auc(scores_neg, scores_pos)


def load_crops(dataset_dir: str, max_cells: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    tables = read_tables(dataset_dir)
    cells = tables["cells"]
    images, rows = [], []
    for split in ("train", "test"):
        source = open_split(dataset_dir, split)
        for i in range(len(source)):
            item = source[i]
            images.append(np.asarray(item["image"]))
            rows.append(int(item["cell_index"]))
    order = np.random.default_rng(seed).permutation(len(images))[:max_cells]
    meta = cells.iloc[[rows[i] for i in order]].reset_index(drop=True)
    complexes = tables["perturbations"].set_index("perturbation_id")["complex"]
    meta["complex"] = meta["perturbation_id"].map(complexes)
    return np.stack([images[i] for i in order]), meta


def report(preset: str, dataset_dir: str, out_png: str, max_cells: int, seed: int) -> dict:
    images, meta = load_crops(dataset_dir, max_cells, seed)
    features = crop_statistics(images)
    is_control = meta["is_control"].to_numpy().astype(bool)
    controls = features[is_control]
    mu, sd = controls.mean(0), controls.std(0) + 1e-6
    z = (features - mu) / sd
    # Compounds group by MoA, genetic perturbations by protein complex.
    moa, complex_ = meta["moa"].fillna("").astype(str), meta["complex"].fillna("").astype(str)
    meta["group"] = moa.where(moa != "", complex_)
    groups, group_col = meta["group"], "MoA/complex"

    print(f"\n== {preset}: {len(meta)} crops, {int(is_control.sum())} controls, "
          f"{meta['Metadata_Perturbation'].nunique()} perturbations, {features.shape[1]} statistics")
    print(f"control vs treated separability per {group_col} (cross-validated LDA AUC):")
    aucs = {}
    for name in sorted(set(groups[~is_control]) - {""}):
        pos = z[(groups == name).to_numpy() & ~is_control]
        if len(pos) >= 8:
            aucs[name] = lda_auc(z[is_control], pos, seed)
    for name, value in sorted(aucs.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<40} {value:.3f}  (n={int(((groups == name) & ~is_control).sum())})")

    profiles = pd.DataFrame(z[~is_control]).groupby(
        meta.loc[~is_control, "Metadata_Perturbation"].to_numpy()).mean()
    labels = meta.drop_duplicates("Metadata_Perturbation").set_index("Metadata_Perturbation")
    labels = labels.loc[profiles.index, "group"].to_numpy()
    unit = profiles.to_numpy() / (np.linalg.norm(profiles.to_numpy(), axis=1, keepdims=True) + 1e-9)
    cosine = unit @ unit.T
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] != "")
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    same_moa = float(cosine[same & off_diagonal].mean()) if (same & off_diagonal).any() else float("nan")
    different_moa = float(cosine[~same & off_diagonal].mean())
    print(f"profile cosine similarity: same {group_col} {same_moa:.3f} vs different {different_moa:.3f}")

    plates = meta.loc[is_control, "Metadata_Plate"].astype(str).to_numpy()
    plate_accuracy, chance = float("nan"), float("nan")
    if len(set(plates)) > 1:
        fold = np.random.default_rng(seed).integers(0, 2, len(plates))
        correct = 0
        for f in (0, 1):
            train_x, train_y = controls[fold != f], plates[fold != f]
            names = sorted(set(train_y))
            centroids = np.stack([train_x[train_y == p].mean(0) for p in names])
            test_x = (controls[fold == f] - mu) / sd
            d = (((test_x[:, None] - (centroids[None] - mu) / sd)) ** 2).sum(-1)
            correct += int((np.array(names)[d.argmin(1)] == plates[fold == f]).sum())
        plate_accuracy = correct / len(plates)
        chance = float(pd.Series(plates).value_counts(normalize=True).max())
        print(f"plate predictability among controls: accuracy {plate_accuracy:.3f} "
              f"(majority-class chance {chance:.3f})")

    shown = meta.groupby("Metadata_Perturbation").head(8)
    chosen = list(dict.fromkeys(meta.loc[is_control, "Metadata_Perturbation"]))[:1]
    chosen += list(dict.fromkeys(meta.loc[~is_control, "Metadata_Perturbation"]))[:11]
    rows, row_labels = [], []
    for name in chosen:
        index = shown.index[shown["Metadata_Perturbation"] == name]
        if len(index) == 8:
            rows.append(images[index])
            row_labels.append(str(name)[:18])
    if rows:
        save_image_rows(out_png, rows, row_labels=row_labels)
        print(f"example crops per perturbation: {out_png}")
    return {"auc": aucs, "same_moa": same_moa, "different_moa": different_moa,
            "plate_accuracy": plate_accuracy, "plate_chance": chance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="preset(s) to report (default: all)")
    parser.add_argument("--scale", default="tiny", choices=("tiny", "small", "full"))
    parser.add_argument("--workdir", required=True, help="where screens are built (reused if present)")
    parser.add_argument("--max-cells", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for preset in args.preset or sorted(PRESETS):
        root = os.path.join(args.workdir, f"{preset}_{args.scale}")
        raw, dataset = os.path.join(root, "raw"), os.path.join(root, "dataset")
        if not os.path.exists(os.path.join(raw, "screen.json")):
            simulate_screen(preset, args.scale, raw, seed=args.seed)
        if not os.path.exists(os.path.join(dataset, "build_report.json")):
            build_raw_screen(raw, dataset, seed=args.seed)
        report(preset, dataset, os.path.join(root, "examples.png"), args.max_cells, args.seed)


if __name__ == "__main__":
    main()
