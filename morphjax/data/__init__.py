"""Grain input pipelines: sources, epoch samplers, augmentation, train/eval datasets."""

from morphjax.data.augment import augment_crop
from morphjax.data.augment import make_augment
from morphjax.data.augment import resized_crop
from morphjax.data.augment import to_float
from morphjax.data.pipeline import make_eval_dataset
from morphjax.data.pipeline import make_train_dataset
from morphjax.data.samplers import balanced_epoch_indices
from morphjax.data.samplers import class_balanced
from morphjax.data.samplers import control_treated_pairs
from morphjax.data.shapes import make_shapes_dataset
from morphjax.data.sources import ArraySource
from morphjax.data.sources import Subset
from morphjax.data.sources import tfds_source

__all__ = [
    "ArraySource",
    "Subset",
    "augment_crop",
    "balanced_epoch_indices",
    "class_balanced",
    "control_treated_pairs",
    "make_augment",
    "make_eval_dataset",
    "make_shapes_dataset",
    "make_train_dataset",
    "resized_crop",
    "tfds_source",
    "to_float",
]
