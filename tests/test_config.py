"""Config loading, overrides and validation: errors must name the offending key."""

import glob
import os

import pytest

from morphjax import config as cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER = os.path.join(ROOT, "configs", "classifier.py")


def test_every_config_preset_builds_and_validates():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
    assert files
    for path in files:
        module = cfg.load_module(path)
        presets = getattr(module, "PRESETS", {None: None})
        for preset in presets:
            spec = path if preset is None else f"{path}:{preset}"
            config = cfg.load_config(spec)
            cfg.validate(config, num_devices=8)


def test_override_types_are_checked():
    config = cfg.load_config(f"{CLASSIFIER}:tiny", [
        "train.batch_size=64", "optimizer.learning_rate=1e-3", "data.balance_classes=false",
        "model.widths=(4, 8, 16)", "optimizer.name=adam"])
    assert config.train.batch_size == 64 and isinstance(config.train.batch_size, int)
    assert config.optimizer.learning_rate == pytest.approx(1e-3)
    assert config.data.balance_classes is False
    assert config.model.widths == (4, 8, 16)
    assert config.optimizer.name == "adam"
    # An int where a float is expected is fine; the reverse is not.
    assert cfg.load_config(f"{CLASSIFIER}:tiny", ["optimizer.learning_rate=1"]).optimizer.learning_rate == 1.0
    with pytest.raises(cfg.ConfigError, match="train.batch_size.*expects an int"):
        cfg.load_config(f"{CLASSIFIER}:tiny", ["train.batch_size=3.5"])
    with pytest.raises(cfg.ConfigError, match="data.balance_classes.*expects a bool"):
        cfg.load_config(f"{CLASSIFIER}:tiny", ["data.balance_classes=maybe"])
    with pytest.raises(cfg.ConfigError, match="model.widths.*expects a tuple"):
        cfg.load_config(f"{CLASSIFIER}:tiny", ["model.widths=8"])


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load_config(f"{CLASSIFIER}:tiny", ["train.batch_szie=64"])
    assert "'train.batch_szie'" in str(e.value) and "'train.batch_size'" in str(e.value)
    with pytest.raises(cfg.ConfigError, match="'optimiser.learning_rate'.*'optimizer.learning_rate'"):
        cfg.load_config(f"{CLASSIFIER}:tiny", ["optimiser.learning_rate=0.1"])
    with pytest.raises(cfg.ConfigError, match="expected key=value"):
        cfg.load_config(f"{CLASSIFIER}:tiny", ["train.batch_size"])
    with pytest.raises(cfg.ConfigError, match="section"):
        cfg.load_config(f"{CLASSIFIER}:tiny", ["train=1"])


def test_mesh_and_batch_validation():
    config = cfg.load_config(f"{CLASSIFIER}:tiny")
    assert cfg.mesh_shape(config, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    cfg.apply_overrides(config, {"mesh.fsdp": 4})
    assert cfg.mesh_shape(config, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    cfg.apply_overrides(config, {"mesh.fsdp": 3})
    with pytest.raises(cfg.ConfigError, match="does not fit 8 devices"):
        cfg.validate(config, 8)
    cfg.apply_overrides(config, {"mesh.data": 2, "mesh.fsdp": 2})
    with pytest.raises(cfg.ConfigError, match="uses 4 devices but 8 are available"):
        cfg.validate(config, 8)
    cfg.apply_overrides(config, {"mesh.data": -1, "mesh.fsdp": 1, "train.batch_size": 36})
    with pytest.raises(cfg.ConfigError, match="train.batch_size=36.*data\\*fsdp=8"):
        cfg.validate(config, 8)
    cfg.apply_overrides(config, {"train.batch_size": 32, "train.grad_accum_steps": 3})
    with pytest.raises(cfg.ConfigError, match="grad_accum_steps"):
        cfg.validate(config, 8)
    cfg.apply_overrides(config, {"train.grad_accum_steps": 4})  # micro-batch 8 over 8 devices
    cfg.validate(config, 8)
    cfg.apply_overrides(config, {"sharding_rules": (("conv_out", "model"),)})
    with pytest.raises(cfg.ConfigError, match="unknown mesh axis 'model'"):
        cfg.validate(config, 8)


def test_config_json_round_trip_keeps_tuples():
    config = cfg.load_config(f"{CLASSIFIER}:tiny")
    again = cfg.from_json(cfg.to_json(config))
    assert again.model.widths == config.model.widths
    assert again.sharding_rules == config.sharding_rules
    assert cfg.to_json(again) == cfg.to_json(config)


def test_sweep_points_apply_as_overrides():
    points = cfg.load_sweep(f"{CLASSIFIER}:tiny")
    assert len(points) >= 2
    rates = set()
    for point in points:
        config = cfg.load_config(f"{CLASSIFIER}:tiny")
        cfg.apply_overrides(config, point)
        rates.add(config.optimizer.learning_rate)
    assert len(rates) == len(points)


def test_missing_config_file_is_named():
    with pytest.raises(cfg.ConfigError, match="nope.py"):
        cfg.load_config("configs/nope.py:tiny")
