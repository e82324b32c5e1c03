"""The one training loop every morphjax model goes through.

A task builds a `TrainState`; the loop splits it once into (graphdef, state), computes the state's
shardings from logical names and the mesh, and compiles one pure step with `jax.jit`
(donated state, explicit in/out shardings; `nnx.jit` would re-traverse the object graph on every
call). The step's rng is the run seed folded with the step number, and the data iterator is
checkpointed with the state, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from morphjax import config as cfg
from morphjax import diffusion
from morphjax import parallel
from morphjax.checkpoint import Checkpointer
from morphjax.io import atomic_write_text
from morphjax.logging import MetricWriter, ProgressBar, save_image_grid
from morphjax.train.tasks import Task, get_task


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or Inf; nothing after the last good checkpoint was saved."""


@dataclasses.dataclass
class TrainResult:
    graphdef: Any
    state: nnx.State
    step: int
    eval_metrics: dict[str, float]


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass
class Setup:
    """Everything derived from a config before training: mesh, task, abstract state, shardings."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    task: Task
    graphdef: Any
    abstract_state: nnx.State
    shardings: nnx.State

    def init_state(self) -> nnx.State:
        """Creates the parameters directly in their shardings (no replicated copy first)."""
        build = lambda: nnx.state(self.task.build(nnx.Rngs(self.config.seed)))  # noqa: E731
        lowered = jax.jit(build, out_shardings=self.shardings).lower()
        # Init runs once: on CPU, XLA's optimising passes over hundreds of RNG calls cost ~5x
        # more time (tens of seconds for a GAN) than they could ever save.
        options = _FAST_COMPILE if self.mesh.devices.flat[0].platform == "cpu" else {}
        state = lowered.compile(compiler_options=options)()
        load_pretrained = getattr(self.task, "load_pretrained", None)
        if load_pretrained is None:
            return state
        # Weights from a file (e.g. ImageNet EfficientNet) replace the random init, resharded.
        return jax.device_put(load_pretrained(nnx.merge(self.graphdef, state)), self.shardings)


def setup(config: ml_collections.ConfigDict, task: Task | None = None,
          devices: Sequence[jax.Device] | None = None) -> Setup:
    """Validates the config against the devices and derives the sharded abstract state."""
    devices = jax.devices() if devices is None else list(devices)
    cfg.validate(config, len(devices), jax.process_count())
    mesh = parallel.make_mesh(cfg.mesh_shape(config, len(devices)), devices)
    task = get_task(config) if task is None else task
    abstract = nnx.eval_shape(lambda: task.build(nnx.Rngs(config.seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = parallel.state_shardings(abstract_state, mesh, config.sharding_rules,
                                         config.fsdp_min_size)
    return Setup(config, mesh, task, graphdef, abstract_state, shardings)


# -- compiled steps -----------------------------------------------------------------------------

def compile_train_step(s: Setup) -> Callable:
    seed, ema_decay = s.config.seed, s.config.train.ema_decay
    ema_warmup = s.config.train.get("ema_warmup", False)

    def step(state, batch):
        train_state = nnx.merge(s.graphdef, state)
        rng = jax.random.fold_in(jax.random.key(seed), train_state.step.get_value())
        metrics = s.task.train_step(train_state, batch, rng)
        if ema_decay > 0:
            # LitEma warm-up (CompVis): min(decay, (1 + n) / (10 + n)) at update n = step + 1.
            decay = (diffusion.ema_decay(train_state.step.get_value() + 1, ema_decay)
                     if ema_warmup else ema_decay)
            train_state.update_ema(decay)
        train_state.step.set_value(train_state.step.get_value() + 1)
        return nnx.state(train_state), metrics

    return jax.jit(step, in_shardings=(s.shardings, parallel.batch_sharding(s.mesh)),
                   out_shardings=(s.shardings, parallel.replicated(s.mesh)), donate_argnums=0)


def compile_state_fn(s: Setup, fn: Callable) -> Callable:
    """jit of `fn(train_state, batch)` for eval and sample hooks (state not donated)."""

    def call(state, batch):
        return fn(nnx.merge(s.graphdef, state), batch)

    return jax.jit(call, in_shardings=(s.shardings, parallel.batch_sharding(s.mesh)),
                   out_shardings=parallel.replicated(s.mesh))


def evaluate(s: Setup, state: nnx.State, eval_fn: Callable) -> dict[str, float]:
    """One pass over the task's eval split: sum of per-batch sums / total count."""
    dataset = s.task.eval_dataset(jax.process_index(), jax.process_count())
    if dataset is None:
        return {}
    sharding = parallel.batch_sharding(s.mesh)
    totals: dict[str, float] = {}
    for batch in dataset:
        sums = jax.device_get(eval_fn(state, parallel.global_batch(batch, sharding)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = totals.pop("count", 0.0)
    return {key: value / max(count, 1.0) for key, value in totals.items()}


# -- the loop -----------------------------------------------------------------------------------

class _StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint and exit at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.requested:  # Second signal: give up immediately.
            raise KeyboardInterrupt
        print(f"\nreceived signal {signum}: saving a checkpoint at the next step, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _config_differences(saved_json: str, config: ml_collections.ConfigDict) -> list[str]:
    saved = cfg.to_json(cfg.from_json(saved_json)).splitlines()
    current = cfg.to_json(config).splitlines()
    return [line for line in difflib.unified_diff(saved, current, "checkpoint", "now", n=0, lineterm="")
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def _check_finite(step: int, metrics: dict[str, np.ndarray], last_good: int | None, workdir: str):
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
    if bad:
        where = (f"the last good checkpoint is step {last_good} in {workdir}/checkpoints"
                 if last_good is not None else "no checkpoint was written")
        values = ", ".join(f"{k}={float(np.asarray(metrics[k]).mean())}" for k in bad)
        raise NonFiniteLossError(
            f"non-finite training metrics at step {step}: {values}; training stopped and {where}. "
            "Lower the learning rate or check the input data before resuming.")


def train(config: ml_collections.ConfigDict, workdir: str, *, task: Task | None = None,
          devices: Sequence[jax.Device] | None = None) -> TrainResult:
    """Trains to `config.train.total_steps`, resuming from the newest checkpoint in `workdir`.

    `devices` defaults to all devices; the mesh in `config.mesh` must fit them.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    s = setup(config, task, devices)
    t = config.train
    config_json = cfg.to_json(config)
    process_index, process_count = jax.process_index(), jax.process_count()

    train_iter = iter(s.task.train_dataset(process_index, process_count))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                                async_save=t.async_checkpoint)
    start = checkpointer.latest_step()
    if start is None:
        start = 0
        state = s.init_state()
    else:
        state, saved_json = checkpointer.restore(start, s.abstract_state, s.shardings, train_iter)
        print(f"resumed from step {start} in {workdir}")
        for line in _config_differences(saved_json, config):
            print(f"  config differs from the checkpoint's: {line.strip()}")
    if process_index == 0:
        atomic_write_text(os.path.join(workdir, "config.json"), config_json)

    train_step = compile_train_step(s)
    eval_fn = compile_state_fn(s, s.task.eval_step)
    sample_fn = compile_state_fn(s, s.task.samples)
    sample_columns = getattr(s.task, "sample_columns", None)  # None: a square grid
    batch_sharding = parallel.batch_sharding(s.mesh)
    writer = MetricWriter(workdir)
    last_good = start if start > 0 else None
    eval_metrics: dict[str, float] = {}
    window: dict[str, list[float]] = {}

    def finish(step: int, metrics) -> None:
        host = jax.device_get(metrics)
        _check_finite(step, host, last_good, workdir)
        for key, value in host.items():
            window.setdefault(key, []).append(float(np.mean(value)))
        progress.update(step, **{k: v for k, v in host.items() if np.ndim(v) == 0})

    step = start
    try:
        with _StopRequest() as stop, ProgressBar(
                t.total_steps, initial_step=start, examples_per_step=t.batch_size,
                log_every=t.log_every) as progress:
            pending = None
            while step < t.total_steps:
                batch = parallel.global_batch(next(train_iter), batch_sharding)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = train_step(state, batch)
                if pending is not None:  # Checked one step late so the device never idles.
                    finish(*pending)
                step += 1
                pending = (step, metrics)
                is_last = step == t.total_steps
                if step % t.log_every == 0 or is_last:
                    finish(*pending)
                    pending = None
                    writer.write_scalars(step, {k: float(np.mean(v)) for k, v in window.items()})
                    window.clear()
                if t.sample_every and (step % t.sample_every == 0 or is_last):
                    images = jax.device_get(sample_fn(state, batch))
                    for name, grid in images.items():
                        save_image_grid(os.path.join(workdir, "samples", f"{name}_{step:07d}.png"),
                                        np.asarray(grid), ncols=sample_columns)
                if t.eval_every and (step % t.eval_every == 0 or is_last):
                    eval_metrics = evaluate(s, state, eval_fn)
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                    print(f"step {step}: eval " + " ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()))
                if step % t.checkpoint_every == 0 or is_last or stop.requested:
                    if pending is not None:
                        finish(*pending)
                        pending = None
                    checkpointer.save(step, state, train_iter, config_json)
                    last_good = step
                if stop.requested:
                    print(f"stopped at step {step}; re-run the same command to resume")
                    break
    finally:
        checkpointer.close()
        writer.close()
    return TrainResult(s.graphdef, state, step, eval_metrics)


# -- dry run ------------------------------------------------------------------------------------

def _count(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def describe(config: ml_collections.ConfigDict, task: Task | None = None) -> str:
    """Table of parameters per module and the per-device parameter + optimizer memory."""
    s = setup(config, task)
    params = nnx.state(nnx.merge(s.graphdef, s.abstract_state).models, nnx.Param)
    rows = []
    for model_name, model_params in params.items():
        for child, child_params in model_params.items():
            if all(isinstance(k, int) for k in child_params.keys()):  # nnx.List: one row per item
                rows += [(f"{model_name}.{child}.{i}", _count(p)) for i, p in child_params.items()]
            else:
                rows.append((f"{model_name}.{child}", _count(child_params)))
    width = max([len(r[0]) for r in rows] + [len("total")])
    lines = [f"{'module':<{width}}  {'parameters':>12}", "-" * (width + 14)]
    lines += [f"{name:<{width}}  {count:>12,}" for name, count in rows]
    lines += ["-" * (width + 14), f"{'total':<{width}}  {sum(c for _, c in rows):>12,}", ""]
    mib = lambda b: f"{b / 2**20:,.2f} MiB"  # noqa: E731
    mesh = dict(s.mesh.shape)
    lines.append(f"mesh {mesh} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
                 "per-device memory:")
    for part in ("models", "optimizers", "ema"):
        if part in s.abstract_state:  # An empty part (no EMA) has no entry.
            planned = parallel.planned_bytes_per_device(s.abstract_state[part], s.shardings[part])
            lines.append(f"  {part:<11}{mib(planned):>14}")
    total = parallel.planned_bytes_per_device(s.abstract_state, s.shardings)
    lines.append(f"  {'total':<11}{mib(total):>14}")
    return "\n".join(lines)
