"""`nexus neural ...` commands, run without Temporal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_jax_backend_probe_not_logged() -> None:
    # A CPU-only machine has no libtpu, and JAX logs the failed 'tpu' probe at
    # INFO when it picks a backend.
    script = (
        "from app.logs import configure_logging\n"
        "configure_logging('INFO')\n"
        "import jax\n"
        "jax.devices()\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "xla_bridge" not in completed.stderr, completed.stderr
