"""`morphjax bench ldm`: the tiny-preset table timed on 2 devices with FSDP, planned on 1 and 2
(no timing assertions)."""

import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from morphjax import bench_ldm as bl
from morphjax.models.unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "morphdiff.py") + ":tiny"
# One level, attention everywhere: every kind of U-Net block, at the smallest compile.
SMALL = ("unet.channel_mult=(1,)", "unet.attention_resolutions=(1,)",
         "unet.model_channels=32", "diffusion.num_timesteps=100", "train.ema_decay=0.999",
         "fsdp_min_size=1024")  # Small enough that FSDP shards the tiny U-Net.
GENES, TOKENS, CONTEXT = 50, 16, 12


def _unet_params() -> int:
    unet = nnx.eval_shape(lambda: UNet(4, 4, model_channels=32, channel_mult=(1,),
                                       num_res_blocks=1, attention_resolutions=(1,),
                                       num_heads=2, context_dim=CONTEXT, rngs=nnx.Rngs(0)))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(unet, nnx.Param)))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_ldm")
    # One timed row (each row compiles a train step and a sampler); memory plans need no compile.
    t = bl.bench_ldm(TINY, batches=(4,), meshes=("fsdp=2",), steps=1, warmup=0,
                     ddim_steps=2, num_genes=GENES, overrides=SMALL,
                     compiler_options=bl.FAST_COMPILE, out=str(out))
    return t, out


@pytest.fixture(scope="module")
def plans():
    return bl.bench_ldm(TINY, batches=(2, 8), meshes=("data=1", "fsdp=2"), plan_only=True,
                        num_genes=GENES, overrides=SMALL)


def test_rows_columns_and_files(table):
    t, out = table
    assert list(t["mesh"]) == ["data=1,fsdp=2,tensor=1"]
    assert list(t["devices"]) == [2] and list(t["batch"]) == [4]
    for col in ("params", "planned MiB/dev", "temp MiB", "argument MiB", "step ms",
                "train img/s", "DDIM img/s", "compile s", "train img/s / row 1"):
        assert col in t.columns and np.isfinite(t[col].astype(float)).all(), col
    assert np.isnan(t["peak MiB/dev"]).all()  # The CPU reports no peak bytes.
    np.testing.assert_allclose(t["train img/s"], 4e3 / t["step ms"])
    assert t["planned MiB/dev / row 1"].iloc[0] == 1.0
    md = (out / "bench_ldm.md").read_text()
    assert "| batch | mesh |" in md and "n/a" in md and "fsdp=2" in md
    assert (out / "bench_ldm.csv").read_text().startswith("batch,mesh,devices,params")


def test_params_and_planned_bytes_match_closed_forms(plans):
    t = plans[plans["batch"] == 2]
    unet = _unet_params()
    projection = GENES * TOKENS * CONTEXT + TOKENS * CONTEXT  # Frozen Linear(G, T * D).
    assert (t["params"] == unet + projection + 1).all()  # + the latent scale factor.
    # One device holds the U-Net 4x (params, Adam mu and nu, EMA) and the projection 2x (model,
    # EMA copy), float32, plus a handful of scalars (steps, counts, latent scale factors).
    one = t["planned MiB/dev"].iloc[0] * bl.MiB
    assert 0 <= one - 4 * (4 * unet + 2 * projection) < 64
    # fsdp=2 halves every leaf of >= 2^16 elements along a dimension divisible by 2.
    assert t["planned MiB/dev"].iloc[1] < t["planned MiB/dev"].iloc[0]


def test_plan_only_and_bad_arguments(plans):
    t = plans
    assert list(t["batch"]) == [2, 8, 2, 8] or sorted(t["batch"]) == [2, 2, 8, 8]
    assert "step ms" not in t.columns and "trace s" in t.columns
    with pytest.raises(ValueError, match="--mesh"):
        bl.parse_mesh("data:2")
    with pytest.raises(ValueError, match="needs 16 devices"):
        bl.bench_ldm(TINY, batches=(16,), meshes=("data=16",), plan_only=True)
    with pytest.raises(ValueError, match="autoencoder"):
        bl.bench_ldm(TINY + ",autoencoder", batches=(2,), plan_only=True)
