"""Optimizers from config sections, so paper presets read like their methods sections."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """`constant`, `cosine` (to 0 at total_steps), `warmup_cosine` or `warmup_constant`.

    `warmup_constant` is CompVis `LambdaLinearScheduler` as MorphDiff's LDM uses it: a linear
    ramp from 1e-6 x lr to lr over `warmup_steps`, then constant.
    """
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.learning_rate, total_steps)
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(total_steps, cfg.warmup_steps + 1))
    if cfg.schedule == "warmup_constant":
        return optax.join_schedules(
            [optax.linear_schedule(1e-6 * cfg.learning_rate, cfg.learning_rate, cfg.warmup_steps),
             optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    raise ValueError(f"optimizer.schedule {cfg.schedule!r} is not one of constant, cosine, "
                     "warmup_cosine, warmup_constant")


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """SGD (with momentum), Adam or AdamW with optional global-norm clipping."""
    lr = learning_rate_schedule(cfg, total_steps)
    if cfg.name == "sgd":
        tx = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.get("nesterov", False))
        if cfg.weight_decay:
            tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    elif cfg.name == "adam":
        tx = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        if cfg.weight_decay:  # L2 penalty added to the gradient (torch Adam's weight_decay).
            tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    elif cfg.name == "adamw":
        tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer.name {cfg.name!r} is not one of sgd, adam, adamw")
    if cfg.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx


def optimizer_config(name: str = "adam", learning_rate: float = 1e-3, **overrides) -> ml_collections.ConfigDict:
    """A complete optimizer section; configs override only what their paper states."""
    cfg = ml_collections.ConfigDict(dict(
        name=name, learning_rate=learning_rate, schedule="constant", warmup_steps=0,
        momentum=0.9, nesterov=False, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        grad_clip_norm=0.0))
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"unknown optimizer field {key!r}")
        cfg[key] = value
    return cfg
