"""Feature extractors for metrics and profiling: the FID Inception, trained morphjax models and
classical CellProfiler-style features."""

from morphjax.features.classical import (
    ClassicalConfig,
    classical_feature_fn,
    classical_features,
    discriminative_features,
)
from morphjax.features.convert import (
    convert_inception,
    load_converted_inception,
    load_inception,
)
from morphjax.features.inception import InceptionV3FID
from morphjax.features.registry import (
    MORPHDIFF_RGB_WEIGHTS,
    Extractor,
    find_inception_weights,
    get_extractor,
    to_rgb,
)

__all__ = [
    "ClassicalConfig",
    "Extractor",
    "InceptionV3FID",
    "MORPHDIFF_RGB_WEIGHTS",
    "classical_feature_fn",
    "classical_features",
    "convert_inception",
    "discriminative_features",
    "find_inception_weights",
    "get_extractor",
    "load_converted_inception",
    "load_inception",
    "to_rgb",
]
