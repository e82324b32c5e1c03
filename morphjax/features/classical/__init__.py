"""Classical CellProfiler-style features of single-cell crops, computed on device in JAX.

Segmentation (segment.py), AreaShape (shape.py), Intensity / Granularity / RadialDistribution /
Correlation (intensity.py) and Haralick texture (texture.py) are assembled per crop in
extract.py; importance.py ranks features that separate control from treated cells (IMPA).
"""

from morphjax.features.classical.extract import (
    ClassicalConfig,
    classical_feature_fn,
    classical_features,
    feature_names,
)
from morphjax.features.classical.importance import discriminative_features

__all__ = ["ClassicalConfig", "classical_feature_fn", "classical_features",
           "discriminative_features", "feature_names"]
