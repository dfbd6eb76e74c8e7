"""`nexus neural ...` commands, run without Temporal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from app.cli import cli
from app.db.migrate import upgrade
from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_train_command_shows_only_real_error(tmp_path: Path) -> None:
    upgrade(Settings(data_dir=tmp_path).effective_database_url)
    env = {"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_TEMPORAL_ADDRESS": "127.0.0.1:1"}
    result = CliRunner().invoke(
        cli,
        ["neural", "train", "--tier", "nano", "--epochs", "0", "--dataset", "iris"],
        env=env,
    )
    assert result.exit_code == 1, result.output
    assert "config.training.epochs: 0 is invalid" in result.stderr
    # The command sends "layers": [], which selects the tier's widths.
    assert "layers" not in result.stderr
    assert "unknown tier" not in result.stderr


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
