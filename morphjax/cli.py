"""`morphjax <verb>`: the command line. Each verb exists only once it works end to end."""

from __future__ import annotations

import argparse
import os
import re
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE.py:ARG",
                   help="config file and preset, e.g. configs/classifier.py:tiny")
    p.add_argument("--workdir", required=True, help="run directory (created; resumed if it has checkpoints)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, type-checked, e.g. --set train.batch_size=64 (repeatable)")


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (run the same command on every host)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=int, help="number of hosts/processes")
    g.add_argument("--process-id", type=int, help="this process's index")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-host run, detecting the cluster (SLURM, Cloud TPU) automatically")


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="morphjax", description="Predict and profile how cells change under perturbations.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser(
        "train", help="train a model from a config; re-run the same command to resume",
        description="Train from a config. Re-running the same command on the same workdir resumes "
                    "from the newest checkpoint.")
    _add_config_args(train)
    train.add_argument("--dry-run", action="store_true",
                       help="build model and mesh, print parameters per module and per-device memory, exit")
    _add_distributed_args(train)

    sweep = verbs.add_parser(
        "sweep", help="run every point of a config's get_sweep(), one run directory each",
        description="Expand get_sweep(arg) of a config file into one run directory per point under "
                    "--workdir and train them one after another. Finished points are skipped and "
                    "interrupted ones resume.")
    _add_config_args(sweep)
    sweep.add_argument("--list", action="store_true", help="print the run directories and overrides, then exit")
    return parser.parse_args(argv)


def _init_runtime(args) -> None:
    # Grain worker processes read absl flags; parse them once outside absl.app.run.
    from absl import flags
    flags.FLAGS(sys.argv[:1], known_only=True)
    from morphjax import parallel
    parallel.initialize_distributed(getattr(args, "coordinator", None),
                                    getattr(args, "num_processes", None),
                                    getattr(args, "process_id", None),
                                    auto=getattr(args, "distributed", False))


def run_name(point: dict) -> str:
    """Directory name for one sweep point, e.g. `learning_rate=0.01,batch_size=64`."""
    name = ",".join(f"{key.split('.')[-1]}={value}" for key, value in point.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name) or "default"


def _train(args) -> int:
    from morphjax import config as cfg
    from morphjax.train import loop

    config = cfg.load_config(args.config, args.overrides)
    if args.dry_run:
        print(loop.describe(config))
        return 0
    result = loop.train(config, args.workdir)
    print(f"done: step {result.step}, workdir {os.path.abspath(args.workdir)}")
    return 0


def _sweep(args) -> int:
    from morphjax import config as cfg
    from morphjax.train import loop

    points = cfg.load_sweep(args.config)
    configs = []
    for point in points:  # Resolve every point before training any, so a typo fails fast.
        config = cfg.load_config(args.config, args.overrides)
        cfg.apply_overrides(config, point)
        cfg.validate(config, *_device_counts())
        configs.append((os.path.join(args.workdir, run_name(point)), point, config))
    for workdir, point, _ in configs:
        print(f"{workdir}  {point}")
    if args.list:
        return 0
    for i, (workdir, point, config) in enumerate(configs):
        print(f"[{i + 1}/{len(configs)}] {workdir}")
        loop.train(config, workdir)
    return 0


def _device_counts() -> tuple[int, int]:
    import jax
    return jax.device_count(), jax.process_count()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    _init_runtime(args)
    from morphjax.config import ConfigError
    try:
        return {"train": _train, "sweep": _sweep}[args.verb](args)
    except ConfigError as e:
        print(f"morphjax {args.verb}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
