"""The `sandboxes` mirror rows of sessions whose database was down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.sandbox import service, store
from app.settings import Settings
from app.tools import ToolContext, invoke_tool, load_tools
from tests.conftest import PostgresHandle, postgres_stopped, running_workers
from tests.support.replay import replay_run
from tests.support.sandboxes import sandbox_test_settings
from workflows.sandbox import SandboxSessionWorkflow


@pytest.fixture
async def postgres_ctx(
    client: Client, database_url: str, tmp_path: Path, temporal_address: str
) -> AsyncIterator[ToolContext]:
    settings: Settings = sandbox_test_settings(
        tmp_path, temporal_address, database_url=database_url
    )
    load_tools()
    async with running_workers(client, settings, [ORCHESTRATION, SANDBOX]):
        yield ToolContext(settings, user_id="test", temporal_client=client)


async def call(ctx: ToolContext, tool: str, **arguments: Any) -> dict[str, Any]:
    return await invoke_tool(ctx, tool, arguments)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_delete_during_outage_unlists_sandbox(
    postgres_ctx: ToolContext, restartable: PostgresHandle, client: Client
) -> None:
    created = await call(postgres_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    url = postgres_ctx.database_url
    row = await asyncio.to_thread(store.get_record, url, sandbox_id)
    assert row is not None
    assert row.status == "running"
    async with postgres_stopped(restartable):
        # The session deletes the sandbox, and its mirror write fails.
        deleted = await call(postgres_ctx, "sandbox_delete", sandbox_id=sandbox_id)
        assert deleted["status"] == "deleted"
    # The session ends once its retried write has removed the row.
    await service.wait_ended(client, sandbox_id, timeout=120)
    assert await asyncio.to_thread(store.get_record, url, sandbox_id) is None
    listed = await call(postgres_ctx, "sandbox_list", status="all")
    assert listed["count"] == 0
    status = await call(postgres_ctx, "sandbox_status", sandbox_id=sandbox_id)
    assert status["status"] == "deleted"
    await replay_run(client, service.workflow_id(sandbox_id), [SandboxSessionWorkflow])
