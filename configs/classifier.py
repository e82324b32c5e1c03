"""Small CNN classifier on generated fluorescence-like shapes: the foundation task.

It exercises the whole machinery (sharded jit step, class-balanced Grain input with augmentation,
Orbax checkpoints, EMA, eval and sample hooks) on data that needs no download.

  morphjax train --config configs/classifier.py:tiny --workdir /tmp/classifier
  morphjax train --config configs/classifier.py:small --workdir /tmp/classifier --dry-run
  morphjax sweep --config configs/classifier.py:tiny --workdir /tmp/classifier_sweep

Presets: `tiny` (tests, seconds on a CPU) and `small` (minutes on a CPU).
"""

import ml_collections

from morphjax.train.optim import optimizer_config

PRESETS = {
    "tiny": dict(image_size=16, widths=(16, 32), num_train=256, num_eval=64, batch_size=32,
                 total_steps=40, log_every=10, eval_every=20, checkpoint_every=10, sample_every=0),
    "small": dict(image_size=32, widths=(32, 64, 128), num_train=4000, num_eval=1000,
                  batch_size=64, total_steps=1500, log_every=50, eval_every=500,
                  checkpoint_every=500, sample_every=500),
}


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[arg]
    c = ml_collections.ConfigDict()
    c.task = "classifier"
    c.seed = 0
    c.compute_dtype = "float32"  # bfloat16 on accelerators.

    c.data = dict(
        name="shapes", seed=1, image_size=p["image_size"], channels=3, num_classes=4,
        num_train=p["num_train"], num_eval=p["num_eval"],
        class_weights=(0.4, 0.3, 0.2, 0.1),  # Imbalanced on purpose: balanced epochs correct it.
        balance_classes=True,  # Each class resampled to the median class count per epoch.
        num_workers=0,
        # Cell Painting CNN augmentation (cell_painting_cnn.txt, Methods).
        augment=dict(enabled=True, image_key="image", flips=True, rot90=True, crop_prob=0.5,
                     crop_scale=(0.8, 1.0), brightness=0.1, contrast=0.2),
    )
    c.model = dict(widths=p["widths"])
    c.optimizer = optimizer_config("sgd", learning_rate=0.05, momentum=0.9)

    c.train = dict(
        total_steps=p["total_steps"], batch_size=p["batch_size"], grad_accum_steps=1,
        log_every=p["log_every"], eval_every=p["eval_every"], sample_every=p["sample_every"],
        checkpoint_every=p["checkpoint_every"], keep_checkpoints=3, async_checkpoint=True,
        ema_decay=0.0,
    )

    # Parallelism: -1 fills the remaining devices. Batch is split over data x fsdp.
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding_rules = (("conv_out", "tensor"), ("classes", None), ("embed", None))
    c.fsdp_min_size = 1024  # Smaller arrays stay replicated under FSDP.
    return c


def get_sweep(arg: str = "small"):
    del arg
    return tuple({"optimizer.learning_rate": lr} for lr in (0.01, 0.05))
