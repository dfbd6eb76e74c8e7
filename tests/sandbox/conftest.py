"""Fixtures for sandbox tests: SQLite settings and the two queues' workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client

from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.settings import Settings
from app.tools import ToolContext, load_tools
from tests.conftest import running_workers
from tests.support.sandboxes import sandbox_test_settings


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
