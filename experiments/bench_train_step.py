"""Train-step throughput: the loop's split/merge + `jax.jit` step against `nnx.jit`, side by side.

Why the loop compiles a pure step over `nnx.split` state instead of calling `nnx.jit` per step:
`nnx.jit` walks the object graph in Python on every call. This prints steps/s and examples/s of
both on the same model, batch and device, and their ratio.

  python experiments/bench_train_step.py --config configs/classifier.py:small --steps 200
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

from morphjax import config as cfg
from morphjax import parallel
from morphjax.train import loop


def _time(step_once, steps: int) -> float:
    step_once()  # compile
    step_once()
    start = time.perf_counter()
    for _ in range(steps):
        out = step_once()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/classifier.py:small")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()

    config = cfg.load_config(args.config, args.overrides)
    s = loop.setup(config)
    batch_np = next(iter(s.task.train_dataset(0, 1)))
    batch = parallel.global_batch(batch_np, parallel.batch_sharding(s.mesh))

    # The loop's step: pure function over split state, donated, explicit shardings.
    state = [s.init_state()]
    jit_step = loop.compile_train_step(s)

    def loop_step():
        state[0], metrics = jit_step(state[0], batch)
        return metrics

    # The same step through nnx.jit on the live object graph.
    train_state = nnx.merge(s.graphdef, s.init_state())
    rng = jax.random.key(config.seed)

    @nnx.jit
    def nnx_step(ts, batch):
        metrics = s.task.train_step(ts, batch, jax.random.fold_in(rng, ts.step.get_value()))
        ts.step.set_value(ts.step.get_value() + 1)
        return metrics

    rows = [("split/merge + jax.jit (morphjax loop)", _time(loop_step, args.steps)),
            ("nnx.jit", _time(lambda: nnx_step(train_state, batch), args.steps))]
    n_leaves = len(jax.tree.leaves(state[0]))
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}  "
          f"config {args.config} {' '.join(args.overrides)}  batch {config.train.batch_size}  "
          f"state leaves {n_leaves}")
    print(f"{'step':<40}{'ms/step':>10}{'steps/s':>10}{'examples/s':>12}{'ratio':>8}")
    base = rows[0][1]
    for name, seconds in rows:
        print(f"{name:<40}{seconds * 1e3:>10.3f}{1 / seconds:>10.1f}"
              f"{config.train.batch_size / seconds:>12.0f}{seconds / base:>8.2f}")


if __name__ == "__main__":
    main()
