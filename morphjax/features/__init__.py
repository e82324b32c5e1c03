"""Feature extractors for metrics and profiling: the FID Inception and trained morphjax models."""

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
    "Extractor",
    "InceptionV3FID",
    "MORPHDIFF_RGB_WEIGHTS",
    "convert_inception",
    "find_inception_weights",
    "get_extractor",
    "load_converted_inception",
    "load_inception",
    "to_rgb",
]
