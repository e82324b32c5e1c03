"""Load `configs/<file>.py:<arg>`, apply `--set a.b=value` overrides, validate before anything compiles.

Configs are ml_collections files with `get_config(arg)` (big_vision style) and an optional
`get_sweep(arg)` returning a tuple of override dicts. Every run resolves its config once, writes
it to the workdir, and a resumed run checks it got the same one.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
    """A config value is missing, unknown or does not fit the run."""


def load_module(path: str):
    """Imports a config file by path."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    name = "morphjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(arg) function")
    return module


def split_spec(spec: str) -> tuple[str, str | None]:
    """`configs/classifier.py:tiny` -> ("configs/classifier.py", "tiny")."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Builds the config named by `spec`, applies `key=value` overrides and locks it."""
    path, arg = split_spec(spec)
    module = load_module(path)
    config = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    config = ml_collections.ConfigDict(config)  # Copy: never mutate what the file returned.
    config.lock()
    apply_overrides(config, parse_overrides(overrides))
    return config


def load_sweep(spec: str) -> tuple[dict[str, Any], ...]:
    """Returns the points of `get_sweep(arg)`, each a dict of dotted key -> value."""
    path, arg = split_spec(spec)
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"config file {path!r} has no get_sweep(arg) function")
    points = module.get_sweep(arg) if arg is not None else module.get_sweep()
    return tuple(dict(p) for p in points)


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.batch_size=64")
        out[key.strip()] = value
    return out


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, full + "."))
    return keys


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    candidates = flat_keys(config)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _parent_and_leaf(config: ml_collections.ConfigDict, key: str):
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise _unknown_key(config, key)
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise _unknown_key(config, key)
    return node, leaf


def coerce(key: str, text_or_value: Any, current: Any) -> Any:
    """Converts an override to the type of the current value, or raises naming the key."""
    value = text_or_value
    if isinstance(text_or_value, str) and not isinstance(current, str):
        try:
            value = ast.literal_eval(text_or_value)
        except (ValueError, SyntaxError):
            value = text_or_value
    if current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects a bool, got {text_or_value!r}")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} expects an int, got {text_or_value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} expects a float, got {text_or_value!r}")
        return float(value)
    if isinstance(current, str):
        return str(value)
    if isinstance(current, tuple):
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple):
            raise ConfigError(f"config key {key!r} expects a tuple, got {text_or_value!r}; "
                              f"write a Python literal, e.g. --set \"{key}=('a', 'b')\"")
        return value
    raise ConfigError(f"config key {key!r} of type {type(current).__name__} cannot be overridden")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Sets dotted keys in place; unknown keys and wrong types raise ConfigError."""
    for key, raw in overrides.items():
        node, leaf = _parent_and_leaf(config, key)
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a section; set one of its fields instead")
        with node.unlocked():
            node[leaf] = coerce(key, raw, current)


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves `config.mesh` (one -1 entry fills the remaining devices) against the device count."""
    sizes = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
    unknown = [k for k in config.mesh.keys() if k not in MESH_AXES]
    if unknown:
        raise ConfigError(f"mesh axis {unknown[0]!r} is not one of {MESH_AXES}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {fill}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ConfigError(f"mesh sizes must be positive or -1, got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {sizes} does not fit {num_devices} devices: {num_devices} is not divisible "
                f"by the fixed axes' product {fixed}")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh {sizes} uses {fixed} devices but {num_devices} are available; set one axis to -1")
    return sizes


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Checks a training config against the devices before anything compiles."""
    for section in ("train", "mesh", "optimizer"):
        if section not in config:
            raise ConfigError(f"config has no {section!r} section")
    sizes = mesh_shape(config, num_devices)
    batch_shards = sizes["data"] * sizes["fsdp"]
    train = config.train
    if train.batch_size <= 0:
        raise ConfigError(f"train.batch_size must be positive, got {train.batch_size}")
    if train.grad_accum_steps <= 0 or train.batch_size % train.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={train.batch_size} is not divisible by "
            f"train.grad_accum_steps={train.grad_accum_steps}")
    micro = train.batch_size // train.grad_accum_steps
    if micro % batch_shards:
        raise ConfigError(
            f"train.batch_size={train.batch_size} (micro-batch {micro}) is not divisible by the "
            f"data-parallel size data*fsdp={batch_shards}")
    if train.batch_size % num_processes:
        raise ConfigError(
            f"train.batch_size={train.batch_size} is not divisible by the {num_processes} processes")
    # `train.epochs > 0` lets the task derive total_steps from the dataset (Cell Painting CNN).
    from_epochs = train.get("epochs", 0) > 0
    for key in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if train[key] <= 0 and not (key == "total_steps" and from_epochs):
            raise ConfigError(f"train.{key} must be positive, got {train[key]}")
    if not 0.0 <= train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {train.ema_decay}")
    for rule in config.sharding_rules:
        if len(rule) != 2:
            raise ConfigError(f"sharding rule {rule!r} must be (logical_name, mesh_axes)")
        axes = rule[1] if isinstance(rule[1], tuple) else (rule[1],)
        for axis in axes:
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(f"sharding rule {rule!r} names unknown mesh axis {axis!r}")


def apply_preset(c: ml_collections.ConfigDict, overrides: dict, name: str) -> None:
    """Sets a preset's `overrides` ({section: {field: value}}), refusing fields the config lacks."""
    for section, values in overrides.items():
        for key, value in values.items():
            if key not in c[section]:
                raise KeyError(f"preset {name!r} sets unknown field {section}.{key}")
            c[section][key] = value


def to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuilds a config written by `to_json` (lists back to tuples)."""

    def tuples(x):
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return x

    return ml_collections.ConfigDict(tuples(json.loads(text)))
