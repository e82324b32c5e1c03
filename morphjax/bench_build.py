"""`morphjax bench build`: crops/s of the raw-screen builder with 1 and N worker processes.

Builds the same raw screen (default: the small bbbc021_like synthetic screen of the demo,
rendered once) into temporary directories, one run per worker count, and prints sites/s,
crops/s, the speed-up over one worker and the peak resident memory of the builder process and
of its workers. The output of every run is identical (the builder is deterministic in the
number of workers).
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence

import pandas as pd

DEFAULT_RAW = "runs/data/bbbc021_like_small/raw"


def _peak_mib(who: int) -> float:
    peak = resource.getrusage(who).ru_maxrss  # KiB on Linux, bytes on macOS.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def bench_build(raw_dir: str | None = None, *, workers: Sequence[int] = (1, 2),
                crop_size: int = 96, illumination: str = "impa") -> pd.DataFrame:
    """Times `build_raw_screen` on `raw_dir` for each worker count; prints and returns a table."""
    from data_builders.raw_screen import build_raw_screen  # noqa: PLC0415

    if raw_dir is None:
        raw_dir = DEFAULT_RAW
        if not os.path.isdir(raw_dir):
            from data_builders.synthetic_screen import simulate_screen  # noqa: PLC0415
            simulate_screen("bbbc021_like", "small", raw_dir, seed=0)
    rows = []
    for n in workers:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = build_raw_screen(raw_dir, os.path.join(tmp, "out"), crop_size=crop_size,
                                      illumination=illumination, workers=n, progress=False)
            seconds = time.perf_counter() - start
        crops = report["cells"]["kept"]
        rows.append({"workers": n, "sites": report["sites"], "crops": crops,
                     "seconds": seconds, "sites_per_s": report["sites"] / seconds,
                     "crops_per_s": crops / seconds,
                     "peak_rss_main_mib": _peak_mib(resource.RUSAGE_SELF),
                     "peak_rss_worker_mib": _peak_mib(resource.RUSAGE_CHILDREN)})
    table = pd.DataFrame(rows)
    table["speedup"] = table["crops_per_s"] / table["crops_per_s"].iloc[0]
    table.insert(0, "cpus", os.cpu_count())
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"raw screen: {raw_dir}, crop {crop_size}, illumination {illumination}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table
