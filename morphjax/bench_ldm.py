"""`morphjax bench ldm`: MorphDiff latent-diffusion train step and DDIM sampling throughput.

The model is the diffusion stage of configs/morphdiff.py (issue 9, Deliver 8): the U-Net plus the
frozen random expression projection (`ExpressionContext`, G genes -> 1024 x 12 tokens at the
paper config), AdamW and the EMA copy as configured. The train step is `MorphDiffLdmTask`'s own
(z ~ N(mean, var) from posterior moments, scaled, eps target, L1 loss) compiled by the training
loop with the config's sharding rules; FSDP shards parameters and optimizer state whenever the
mesh has fsdp > 1. The frozen autoencoder of a real run is left out of the state (the train step
never calls it), and the inputs are random: latents `image_size / 2^(len(ch_mult) - 1)` square with
`embed_dim` channels, and random expression vectors.

Per (batch, mesh) row: compile seconds, median train-step ms over `steps` steps after `warmup`,
train images/s, DDIM images/s (the fori_loop sampler over `ddim_steps`, batch sharded like the
train batch, EMA weights), parameters, planned parameter + optimizer + EMA bytes per device,
the compiled step's temp/argument bytes (XLA memory analysis) and the device's peak bytes where the
backend reports them (not on CPU). `plan_only` skips compiling and timing: shapes, shardings and
the traced (lowered) step only, which is the way to check the paper config on a CPU.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import pandas as pd
from flax import nnx

from morphjax import config as cfg
from morphjax import diffusion
from morphjax import parallel
from morphjax.config import MESH_AXES
from morphjax.train import loop
from morphjax.train.morphdiff import MorphDiffLdmTask, MorphDiffState, schedule_from_config
from morphjax.train.optim import make_optimizer

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS, "morphdiff.py") + ":jump_orf"
MiB = 2**20
# XLA CPU options that trade step speed for compile time (tests, smoke runs).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
COLUMNS = ("batch", "mesh", "devices", "params", "planned MiB/dev", "argument MiB", "temp MiB",
           "peak MiB/dev", "compile s", "step ms", "train img/s", "DDIM compile s",
           "DDIM img/s")


class BenchLdmTask(MorphDiffLdmTask):
    """MorphDiffLdmTask without a dataset or a trained autoencoder (random latents, G genes)."""

    def __init__(self, config: ml_collections.ConfigDict, num_genes: int = 977):
        if config.task != "morphdiff_ldm":
            raise ValueError(f"bench ldm needs a diffusion-stage config (task morphdiff_ldm), got "
                             f"task {config.task!r}; drop ',autoencoder' from --config")
        self.config = config
        self.ae_config = config  # The LDM config carries the autoencoder section too.
        self.spec = None
        self.channels = 0
        self.schedule = schedule_from_config(config)
        self.genes = int(num_genes)
        self._cache = {}

    load_pretrained = None  # Random weights: no autoencoder run, no latent scale factor.

    def build(self, rngs: nnx.Rngs) -> MorphDiffState:
        c = self.config
        ldm = self.build_ldm(rngs)
        optimizer = nnx.Optimizer(ldm, make_optimizer(c.optimizer, c.train.total_steps),
                                  wrt=nnx.Param)
        return MorphDiffState({"ldm": ldm}, {"ldm": optimizer}, frozen={},
                              ema_decay=c.train.ema_decay)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        a = self.config.autoencoder
        size = self.config.data.image_size // 2 ** (len(a.ch_mult) - 1)
        return (batch_size, size, size, a.embed_dim)

    def random_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        shape = self.latent_shape(batch_size)
        mean = rng.standard_normal(shape, dtype=np.float32)
        logvar = np.full(shape, -4.0, np.float32)
        return {"moments": np.concatenate([mean, logvar], axis=-1),
                "expression": rng.standard_normal((batch_size, self.genes), dtype=np.float32)}


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}; unnamed axes are 1."""
    sizes = {axis: 1 for axis in MESH_AXES}
    for item in filter(None, (s.strip() for s in text.split(","))):
        axis, sep, value = item.partition("=")
        if not sep or axis not in MESH_AXES:
            raise ValueError(f"--mesh {text!r}: write AXIS=SIZE pairs with AXIS in {MESH_AXES}")
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: size of {axis!r} is not an integer") from None
    return sizes


def _mesh_devices(mesh: dict[str, int]) -> list[jax.Device]:
    """All devices when an axis is -1, else the first data*fsdp*tensor of them."""
    devices = jax.devices()
    if -1 in mesh.values():
        return devices
    n = math.prod(mesh.values())
    if n > len(devices):
        raise ValueError(f"--mesh {mesh} needs {n} devices; {len(devices)} are available")
    return devices[:n]


def _peak_bytes(device: jax.Device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _mib(value) -> float:
    return float("nan") if value is None else value / MiB


def _count_params(abstract_state: nnx.State) -> int:
    """Trained U-Net parameters + the frozen projection (the model, not optimizer or EMA)."""
    models = abstract_state["models"]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(models))


def bench_row(config: ml_collections.ConfigDict, batch_size: int, mesh: dict[str, int], *,
              steps: int = 10, warmup: int = 2, ddim_steps: int = 50, num_genes: int = 977,
              plan_only: bool = False, compiler_options: dict | None = None) -> dict:
    """One (batch, mesh) row of the table; see the module docstring for the columns."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.batch_size = batch_size
    config.train.grad_accum_steps = 1
    config.mesh = dict(mesh)
    devices = _mesh_devices(mesh)
    task = BenchLdmTask(config, num_genes)
    s = loop.setup(config, task, devices)
    sizes = cfg.mesh_shape(config, len(devices))
    row = {"batch": batch_size, "mesh": ",".join(f"{a}={sizes[a]}" for a in MESH_AXES),
           "devices": len(devices), "params": _count_params(s.abstract_state),
           "planned MiB/dev":
               parallel.planned_bytes_per_device(s.abstract_state, s.shardings) / MiB}
    batch_sharding = parallel.batch_sharding(s.mesh)
    train_step = loop.compile_train_step(s)
    shape = task.latent_shape(batch_size)

    def sample(state, expression, rng):
        ldm = nnx.merge(s.graphdef, state).eval_model("ldm")
        return diffusion.ddim_sample(ldm.denoise, task.schedule, shape,
                                     task.context(ldm, expression), rng, steps=ddim_steps,
                                     eta=config.sample.eta,
                                     parameterization=config.loss.parameterization)

    sampler = jax.jit(sample, in_shardings=(s.shardings, batch_sharding,
                                            parallel.replicated(s.mesh)),
                      out_shardings=batch_sharding)
    abstract = parallel.with_shardings(s.abstract_state, s.shardings)
    host_batch = task.random_batch(batch_size)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                      for k, v in host_batch.items()}
    start = time.perf_counter()
    lowered = train_step.lower(abstract, abstract_batch)
    lowered_sampler = sampler.lower(abstract, abstract_batch["expression"], jax.random.key(0))
    if plan_only:
        row["trace s"] = time.perf_counter() - start
        return row
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    row["compile s"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled_sampler = lowered_sampler.compile(compiler_options=compiler_options)
    row["DDIM compile s"] = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    if analysis is not None:
        row["argument MiB"] = analysis.argument_size_in_bytes / MiB
        row["temp MiB"] = analysis.temp_size_in_bytes / MiB

    state = s.init_state()
    batch = parallel.global_batch(host_batch, batch_sharding)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError(f"bench ldm: non-finite loss at batch {batch_size}, mesh {mesh}")
    step_s = float(np.median(times))
    row["step ms"] = 1e3 * step_s
    row["train img/s"] = batch_size / step_s

    expression = batch["expression"]
    jax.block_until_ready(compiled_sampler(state, expression, jax.random.key(0)))  # Warm-up.
    t0 = time.perf_counter()
    jax.block_until_ready(compiled_sampler(state, expression, jax.random.key(1)))
    row["DDIM img/s"] = batch_size / (time.perf_counter() - t0)
    peak = _peak_bytes(devices[0])
    row["peak MiB/dev"] = _mib(peak)
    del state
    return row


def format_table(table: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.4g}"
        return f"{v:,}" if isinstance(v, (int, np.integer)) else str(v)

    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    lines = ["| " + " | ".join(fmt(v) for v in row) + " |"
             for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *lines])


def bench_ldm(config: str = DEFAULT_CONFIG, *, batches: Sequence[int] = (8, 64),
              meshes: Sequence[str] = ("data=-1",), steps: int = 10, warmup: int = 2,
              ddim_steps: int = 50, dtype: str | None = None, remat: bool = False,
              num_genes: int = 977, overrides: Sequence[str] = (), plan_only: bool = False,
              compiler_options: dict | None = None, out: str | None = None) -> pd.DataFrame:
    """Prints (and returns) one row per (batch, mesh); ratio columns are vs the first row.

    `config` is `path:PRESET` of configs/morphdiff.py (diffusion stage); `meshes` are
    'data=..,fsdp=..' strings; `compiler_options` go to XLA (e.g. FAST_COMPILE for tests,
    which makes the steps slower). With `out`, writes OUT/bench_ldm.md and OUT/bench_ldm.csv.
    """
    if steps < 1 or warmup < 0 or ddim_steps < 1:
        raise ValueError(f"steps ({steps}) and ddim_steps ({ddim_steps}) must be >= 1 and "
                         f"warmup ({warmup}) >= 0")
    sets = list(overrides)
    if dtype:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype {dtype!r}: choose float32 or bfloat16")
        sets.append(f"compute_dtype={dtype}")
    if remat:
        sets.append("unet.remat=True")
    c = cfg.load_config(config, sets)
    rows = []
    for mesh in meshes:
        for batch in batches:
            row = bench_row(c, int(batch), parse_mesh(mesh), steps=steps, warmup=warmup,
                            ddim_steps=ddim_steps, num_genes=num_genes, plan_only=plan_only,
                            compiler_options=compiler_options)
            rows.append(row)
            print(f"  batch {row['batch']}, mesh {row['mesh']}: done", flush=True)
    table = pd.DataFrame(rows)
    table = table[[col for col in (*COLUMNS, "trace s") if col in table.columns]]
    for col in ("planned MiB/dev", "step ms", "train img/s", "DDIM img/s"):
        if col in table.columns:
            table[f"{col} / row 1"] = table[col] / table[col].iloc[0]
    u, k = c.unet, c.conditioning
    latent = BenchLdmTask(c, num_genes).latent_shape(1)[1:]
    device = jax.devices()[0]
    title = (f"MorphDiff LDM ({c.preset}): U-Net {u.model_channels} x {tuple(u.channel_mult)}, "
             f"latent {latent[0]}x{latent[1]}x{latent[2]}, {num_genes} genes -> "
             f"{k.num_tokens} x {k.context_dim} tokens ({k.mode}), {c.compute_dtype}"
             f"{', remat' if c.unet.remat else ''}; {device.platform} "
             f"{getattr(device, 'device_kind', '')}, jax {jax.__version__}; "
             + ("plan only (traced, not compiled)" if plan_only else
                f"median of {steps} steps after {warmup} warm-up, DDIM {ddim_steps} steps"))
    print(title)
    text = format_table(table)
    print(text)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench_ldm.md"), "w") as f:
            f.write(f"# bench ldm\n\n{title}\n\n{text}\n")
        table.to_csv(os.path.join(out, "bench_ldm.csv"), index=False)
    return table
