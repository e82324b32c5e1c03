"""Test setup: 8 fake CPU devices so sharded code runs without accelerators (DESIGN.md, Testing)."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# Grain worker processes read absl flags; outside absl.app.run they must be parsed once.
flags.FLAGS(sys.argv[:1], known_only=True)
