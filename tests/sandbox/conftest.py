"""Fixtures for sandbox tests: SQLite settings and the two queues' workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client

from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.db.migrate import upgrade
from app.settings import Settings
from app.tools import ToolContext, load_tools
from tests.conftest import TEST_ENCRYPTION_KEY, running_workers


@pytest.fixture
def sandbox_settings(tmp_path: Path, temporal_address: str) -> Settings:
    url = f"sqlite:///{tmp_path / 'nexus.db'}"
    upgrade(url)
    return Settings(
        data_dir=tmp_path,
        database_url=url,
        temporal_address=temporal_address,
        encryption_key=TEST_ENCRYPTION_KEY,  # type: ignore[arg-type]
        # A closed local port: installs fail fast and never leave the machine.
        sandbox_package_index="http://127.0.0.1:9/simple",
    )


@pytest.fixture
async def tool_ctx(
    client: Client, sandbox_settings: Settings
) -> AsyncIterator[ToolContext]:
    load_tools()
    async with running_workers(client, sandbox_settings, [ORCHESTRATION, SANDBOX]):
        yield ToolContext(sandbox_settings, user_id="test", temporal_client=client)
