"""TFDS builders that turn raw screens (synthetic or real) into ArrayRecord datasets."""
