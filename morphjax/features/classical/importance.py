"""Which classical features separate two groups of cells: a random-forest importance ranking.

IMPA (impa.txt, "Feature importance calculation") ranks CellProfiler features by the importance
a 500-tree random forest gives them when classifying control against perturbed cells, then
checks that generated cells shift those features like real ones do.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _feature_matrix(table: pd.DataFrame) -> pd.DataFrame:
    numeric = table.select_dtypes(include=[np.number, bool])
    features = numeric[[c for c in numeric.columns if not str(c).startswith("Metadata_")]]
    if features.shape[1] == 0:
        raise ValueError("table has no numeric feature columns (Metadata_* columns are ignored)")
    bad = [c for c in features.columns if not np.isfinite(features[c].to_numpy(float)).all()]
    if bad:
        raise ValueError(f"{len(bad)} feature columns hold NaN or inf, e.g. {bad[:5]}; "
                         "impute or drop them first")
    return features.astype(np.float64)


def discriminative_features(table: pd.DataFrame, labels, *, n_estimators: int = 500,
                            seed: int = 0, top: int | None = 20, folds: int = 5) -> pd.DataFrame:
    """Features ranked by random-forest importance for telling the two `labels` apart.

    `table`: one row per cell, feature columns (Metadata_* columns and non-numeric ones are
    ignored); `labels`: one of two classes per row (e.g. control / treated). Constant columns
    carry no information and are dropped, and reported. Returns columns `feature`, `importance`
    (mean decrease in impurity, summing to 1), best first, the `top` of them (None: all), with
    `.attrs`: cv_accuracy and cv_accuracy_folds (stratified `folds`-fold), oob_accuracy,
    n_features, n_dropped_constant, dropped_constant, classes, n_per_class.
    """
    try:
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.model_selection import StratifiedKFold, cross_val_score
    except ImportError as e:
        raise ImportError("discriminative_features needs scikit-learn: pip install scikit-learn "
                          "(or pip install 'morphjax[test]')") from e
    labels = np.asarray(labels)
    if labels.shape != (len(table),):
        raise ValueError(f"labels must have one entry per table row ({len(table)}), "
                         f"got shape {labels.shape}")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) != 2:
        raise ValueError(f"labels must hold exactly 2 classes, got {len(classes)}: "
                         f"{classes[:10].tolist()}")
    if counts.min() < 2:
        raise ValueError(f"each class needs >= 2 rows, got {dict(zip(classes.tolist(), counts))}")
    features = _feature_matrix(table)
    constant = [c for c in features.columns if features[c].nunique() <= 1]
    features = features.drop(columns=constant)
    if features.shape[1] == 0:
        raise ValueError(f"all {len(constant)} feature columns are constant")
    forest = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, oob_score=True,
                                    n_jobs=-1)
    splits = StratifiedKFold(n_splits=min(folds, int(counts.min())), shuffle=True,
                             random_state=seed)
    accuracy = cross_val_score(forest, features.to_numpy(), labels, cv=splits)
    forest.fit(features.to_numpy(), labels)
    ranking = pd.DataFrame({"feature": features.columns,
                            "importance": forest.feature_importances_})
    ranking = ranking.sort_values("importance", ascending=False, kind="stable")
    ranking = ranking.reset_index(drop=True)
    if top is not None:
        ranking = ranking.head(top)
    ranking.attrs.update(
        cv_accuracy=float(accuracy.mean()), cv_accuracy_folds=accuracy.tolist(),
        oob_accuracy=float(forest.oob_score_), n_features=int(features.shape[1]),
        n_dropped_constant=len(constant), dropped_constant=constant,
        classes=classes.tolist(), n_per_class=counts.tolist())
    return ranking
