"""Procedural synthetic Cell Painting screen with known per-cell ground truth (DESIGN.md).

`phenotype` defines the latent per-cell morphology parameters, `render` turns them into
fluorescence fields of view with technical (plate/batch) effects. `presets` holds the screen
designs, `perturbations` what each perturbation does, and `screen` renders a whole screen into
the raw layout (data_builders/RAW_LAYOUT.md).
"""

from data_builders.synthetic_screen.presets import PRESETS, SCALES, get_preset
from data_builders.synthetic_screen.screen import simulate_screen

__all__ = ["PRESETS", "SCALES", "get_preset", "simulate_screen"]
