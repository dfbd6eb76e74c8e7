"""Settings for tests whose sandboxes run on the local backend, and the two
isolation modes that local backend tests run in."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from app.db.migrate import upgrade
from app.settings import Settings
from tests.conftest import TEST_ENCRYPTION_KEY

# Without bubblewrap (plain processes with rlimits) and under bubblewrap.
ISOLATION_MODES = [
    pytest.param(False, id="plain"),
    pytest.param(
        True,
        id="bwrap",
        marks=pytest.mark.skipif(
            shutil.which("bwrap") is None, reason="bubblewrap is not installed"
        ),
    ),
]


def sandbox_test_settings(
    tmp_path: Path, temporal_address: str, **overrides: Any
) -> Settings:
    """Build settings with a migrated SQLite database under `tmp_path`."""
    url = f"sqlite:///{tmp_path / 'nexus.db'}"
    upgrade(url)
    fields: dict[str, Any] = {
        "data_dir": tmp_path,
        "database_url": url,
        "temporal_address": temporal_address,
        "encryption_key": TEST_ENCRYPTION_KEY,
        # A closed local port: installs fail fast and never leave the machine.
        "sandbox_package_index": "http://127.0.0.1:9/simple",
    }
    return Settings(**{**fields, **overrides})
