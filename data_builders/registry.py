"""The screen builders of `morphjax build`: one package per public layout (data_builders/<name>/).

Each package defines NAME, SUMMARY, NEEDS (what must be on disk), DEFAULTS (builder options of
its paper: crop size, illumination, ...), `add_arguments(parser)` for its own flags and
`read(raw_dir, args) -> layout.RawScreen`; the shared raw-screen builder does the rest.
"""

from __future__ import annotations

import importlib
import types

# Real layouts, in the order `morphjax build --list` shows them.
REAL_BUILDERS = ("bbbc021", "rxrx1", "jump_cpg0000", "deepprofiler_layout", "ops")
# The two builders of the raw layout itself (data_builders/RAW_LAYOUT.md).
RAW_LAYOUT_BUILDERS = {
    "synthetic_screen": ("procedural Cell Painting screen with known ground truth "
                         "(renders, then builds)", "nothing: --preset and --scale"),
    "raw_screen": ("a screen already in morphjax's raw layout (DeepProfiler inputs/ + "
                   "screen.json)", "screen.json, index.csv, images/, locations/, "
                   "perturbations.csv (data_builders/RAW_LAYOUT.md)"),
}


def get_builder(name: str) -> types.ModuleType:
    """The builder package `name` (one of REAL_BUILDERS)."""
    if name not in REAL_BUILDERS:
        raise ValueError(f"Unknown screen builder {name!r}; choose one of {REAL_BUILDERS}.")
    return importlib.import_module(f"data_builders.{name}")


def builder_table() -> list[tuple[str, str, str]]:
    """(name, summary, what it needs on disk) for every builder."""
    rows = [(name, *info) for name, info in RAW_LAYOUT_BUILDERS.items()]
    for name in REAL_BUILDERS:
        module = get_builder(name)
        rows.append((name, module.SUMMARY, module.NEEDS))
    return rows
