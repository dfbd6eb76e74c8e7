"""Fixtures for sandbox tests: SQLite settings, the two queues' workers, and
a local sandbox `box` in each isolation mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client

from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.sandbox.local import LocalBackend
from app.settings import Settings
from app.tools import ToolContext, load_tools
from tests.conftest import running_workers
from tests.support.sandboxes import ISOLATION_MODES, sandbox_test_settings


@pytest.fixture
def sandbox_settings(tmp_path: Path, temporal_address: str) -> Settings:
    return sandbox_test_settings(tmp_path, temporal_address)


@pytest.fixture
async def tool_ctx(
    client: Client, sandbox_settings: Settings
) -> AsyncIterator[ToolContext]:
    load_tools()
    async with running_workers(client, sandbox_settings, [ORCHESTRATION, SANDBOX]):
        yield ToolContext(sandbox_settings, user_id="test", temporal_client=client)


@pytest.fixture(params=ISOLATION_MODES)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[LocalBackend]:
    """A local backend with the sandbox `box` created, deleted afterwards."""
    local = LocalBackend(tmp_path / "sandboxes", use_bwrap=request.param)
    await local.create("box", template="base", timeout=300, env={}, metadata={})
    try:
        yield local
    finally:
        await local.delete("box")
